"""Streaming training data: exactly-once sharding, batches, balance, augmentation, crops."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from tilenet.config import AugmentConfig, DataConfig, load_config
from tilenet.errors import ImageNotFoundError, InputError
from tilenet.patches.augment import build_augment
from tilenet.patches.data import (
    PatchStoreDataset,
    RandomCropDataset,
    build_loader,
    normalize_batch,
    repeat_factors,
    store_stats,
)
from tilenet.patches.tiler import tile_images
from tilenet.train import prepare_demo_data

P = 16


def _write(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(
        path, data, tile=(16, 16), compression="zlib", photometric="rgb" if data.ndim == 3 else None
    )


@pytest.fixture
def store(tmp_path: Path, rng: np.random.Generator) -> Path:
    """Two noise images (every patch unique) with labels; class 2 is rare (one corner)."""
    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    for i, (h, w) in enumerate([(96, 80), (64, 112)]):
        _write(tmp_path / "im" / f"a{i}.tif", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        lab = (rng.random((h, w)) < 0.5).astype(np.uint8)
        if i == 0:
            lab[:8, :8] = 2
        _write(tmp_path / "lab" / f"a{i}.tif", lab)
    return tile_images(
        [tmp_path / "im"],
        labels=tmp_path / "lab",
        out=tmp_path / "s.zarr",
        patch=P,
        overlap=0,
        chunk_patches=5,
        workers=1,
        progress=False,
    )


def _rows(store: Path) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(store, mode="r")
    n = g.attrs["count"]
    return g["images"][:n], g["labels"][:n]


def _key(x: torch.Tensor) -> bytes:
    """A raw (unnormalised) patch (C, P, P) float back to the stored bytes (P, P, C) uint8."""
    return x.permute(1, 2, 0).round().to(torch.uint8).numpy().tobytes()


def _collect(loader: DataLoader, batched: bool) -> list[tuple[bytes, bytes]]:
    out = []
    for x, m in loader:
        if not batched:
            x, m = x[None], m[None]
        assert x.dtype == torch.float32 and m.dtype == torch.int64
        out += [(_key(a), b.to(torch.uint8).numpy().tobytes()) for a, b in zip(x, m, strict=True)]
    return out


@pytest.mark.parametrize("batch_size", [None, pytest.param(7, marks=pytest.mark.slow)])
def test_exactly_once_across_two_workers_and_two_ranks(store: Path, batch_size: int | None) -> None:
    images, labels = _rows(store)
    expected = Counter((a.tobytes(), b.tobytes()) for a, b in zip(images, labels, strict=True))
    assert len(expected) == len(images) == 58  # all patches distinct
    seen: Counter = Counter()
    for epoch in (0, 1):
        seen.clear()
        orders = []
        for rank in (0, 1):
            ds = PatchStoreDataset(
                store,
                batch_size=batch_size,
                shuffle=True,
                buffer=12,
                seed=3,
                rank=rank,
                world_size=2,
                normalize=False,
            )
            ds.set_epoch(epoch)
            got = _collect(DataLoader(ds, batch_size=None, num_workers=2), batch_size is not None)
            # len() of the same dataset delivering single patches: this rank's share, exact.
            per_patch = PatchStoreDataset(
                store, shuffle=True, buffer=12, seed=3, rank=rank, world_size=2, normalize=False
            )
            per_patch.set_epoch(epoch)
            assert len(got) == len(per_patch)
            seen.update(got)
            orders.append(got)
        assert seen == expected  # every patch exactly once per epoch, labels stay with it
    ds0 = PatchStoreDataset(store, seed=3, normalize=False)
    a = _collect(DataLoader(ds0, batch_size=None), False)
    ds0.set_epoch(1)
    b = _collect(DataLoader(ds0, batch_size=None), False)
    assert a != b and sorted(a) == sorted(b)  # reshuffled, same set


def test_batches_normalised_with_store_stats(store: Path) -> None:
    images, _ = _rows(store)
    st = store_stats(store)
    np.testing.assert_allclose(st["mean"], images.reshape(-1, 3).mean(0), rtol=1e-6)
    assert st["channels"] == 3
    ds = PatchStoreDataset(store, batch_size=8, shuffle=False)
    x, m = next(iter(ds))
    assert x.shape == (8, 3, P, P) and m.shape == (8, P, P)
    raw = torch.from_numpy(images[:8]).permute(0, 3, 1, 2).float()
    ref = (raw - torch.tensor(st["mean"]).view(1, 3, 1, 1)) / torch.tensor(st["std"]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(x, ref)
    assert len(ds) == 8  # ceil(58 / 8)


def test_class_balance_oversamples_rare_class(store: Path) -> None:
    _, labels = _rows(store)
    rare = (labels == 2).reshape(len(labels), -1).any(1)
    assert rare.sum() == 1
    ds = PatchStoreDataset(store, batch_size=None, class_balance=True, normalize=False, seed=1)
    hits, total = 0, 0
    for epoch in range(5):
        ds.set_epoch(epoch)
        for _, m in ds:
            hits += int((m == 2).any())
            total += 1
    # repeat factor sqrt(0.3 / (1/58)) ~ 4.2: the rare patch comes ~4.2x per epoch, not once
    assert hits >= 15 and total > 5 * 58
    assert repeat_factors([58, 29, 1], 58)[:2].tolist() == [1.0, 1.0]


def test_augmentation_keeps_image_and_mask_aligned(tmp_path: Path) -> None:
    """Labels are a function of the pixel (label = red % 3), so any misalignment shows."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _write(tmp_path / "x.tif", img)
    (tmp_path / "l").mkdir()
    _write(tmp_path / "l" / "x.tif", (img[..., 0] % 3).astype(np.uint8))
    s = tile_images(
        [tmp_path / "x.tif"],
        labels=tmp_path / "l",
        out=tmp_path / "s.zarr",
        patch=P,
        overlap=0,
        progress=False,
    )
    aug = AugmentConfig(hflip=0.5, vflip=0.5, rot90=True, brightness=0, contrast=0, saturation=0)
    ds = PatchStoreDataset(s, batch_size=16, augment=aug, normalize=False)
    changed = 0
    stored, _ = _rows(s)
    for x, m in ds:
        assert torch.equal(x[:, 0].round().long() % 3, m)
        keys = {_key(a) for a in x}
        changed += len(keys - {r.tobytes() for r in stored})
    assert changed > 0  # it did augment
    # colour jitter changes values but never the mask
    ds = PatchStoreDataset(
        s, batch_size=16, augment=AugmentConfig(brightness=0.5), normalize=False, shuffle=False
    )
    ds_plain = PatchStoreDataset(s, batch_size=16, normalize=False, shuffle=False)
    (x1, m1), (x0, _) = next(iter(ds)), next(iter(ds_plain))
    assert x1.shape == x0.shape and not torch.equal(x1, x0)
    assert set(m1.unique().tolist()) <= {0, 1, 2}


def test_augment_from_yaml(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("data:\n  augment:\n    hflip: 0.0\n    rot90: false\n    scale: [0.8, 1.25]\n")
    cfg = load_config(conf)
    assert tuple(cfg.data.augment.scale) == (0.8, 1.25) and cfg.data.augment.rot90 is False
    aug = build_augment(OmegaConf.to_object(cfg.data).augment, channels=3)
    assert aug is not None and aug.per_sample is not None
    kinds = [type(t).__name__ for t in aug.per_sample.transforms]
    assert kinds == ["ColorJitter", "RandomAffine"]
    assert build_augment(AugmentConfig(enabled=False), channels=3) is None
    with pytest.raises(InputError, match="valid keys"):
        load_config(None, ["data.augment.flip=1"])


def test_random_crops_read_lazily(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    _write(tmp_path / "big.tif", img)
    _write(tmp_path / "big_mask.tif", (img[..., 1] % 3).astype(np.uint8))
    ds = RandomCropDataset(
        [tmp_path / "big.tif"],
        [tmp_path / "big_mask.tif"],
        patch=P,
        samples_per_epoch=20,
        batch_size=6,
        normalize=False,
        seed=5,
    )
    wins = ds.windows()
    got = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert sum(len(x) for x, _ in got) == 20
    flat = [(x, m) for xb, mb in got for x, m in zip(xb, mb, strict=True)]
    # each crop equals the source window of one drawn crop, and its mask matches
    srcs = {img[w.y : w.y1, w.x : w.x1].tobytes() for _, w in wins}
    for x, m in flat:
        assert _key(x) in srcs
        assert torch.equal(x[1].round().long() % 3, m)


def test_build_loader_from_config(store: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [f"data.stores=[{store}]", "data.patch=16", "data.batch_size=10", "data.num_workers=0"],
    )
    loader = build_loader(cfg.data, train=True)
    n = sum(len(x) for x, _ in loader)
    assert n == 58
    with pytest.raises(InputError, match="val_stores"):
        build_loader(cfg.data, train=False)
    with pytest.raises(InputError, match=r"data\.patch"):
        build_loader(DataConfig(stores=[str(store)], patch=256), train=True)
    with pytest.raises(ImageNotFoundError, match="not found"):
        PatchStoreDataset(tmp_path / "nope.zarr")


def test_uint8_output_for_device_normalisation(store: Path) -> None:
    images, labels = _rows(store)
    raw = PatchStoreDataset(store, batch_size=9, shuffle=False, output="uint8")
    flt = PatchStoreDataset(store, batch_size=9, shuffle=False)
    (xu, mu), (xf, mf) = next(iter(raw)), next(iter(flt))
    assert xu.dtype == torch.uint8 and mu.dtype == torch.uint8 and xu.shape == (9, 3, P, P)
    np.testing.assert_array_equal(xu.permute(0, 2, 3, 1).numpy(), images[:9])
    np.testing.assert_array_equal(mu.numpy(), labels[:9])
    torch.testing.assert_close(normalize_batch(xu, raw.mean, raw.std), xf)
    # one arithmetic (tilenet.normalize) for device and worker normalisation: bit for bit
    assert torch.equal(normalize_batch(xu, raw.mean, raw.std), xf)
    assert torch.equal(mu.long(), mf)
    with pytest.raises(InputError, match="output"):
        PatchStoreDataset(store, output="half")  # type: ignore[arg-type]


def test_set_epoch_reaches_persistent_workers(store: Path) -> None:
    images, _ = _rows(store)
    ds = PatchStoreDataset(store, batch_size=5, normalize=False, seed=2)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = []
    for e in range(2):
        ds.set_epoch(e)
        got = [k for k, _ in _collect(loader, True)]
        assert sorted(got) == sorted(a.tobytes() for a in images)
        epochs.append(got)
    assert epochs[0] != epochs[1]


def test_build_loader_synth_demo(tmp_path: Path) -> None:
    """data.synth_dir: the synthetic dataset is made and tiled once, then streamed."""
    cfg = DataConfig(
        synth_dir=str(tmp_path / "syn"), synth_size=128, synth_count=1, patch=64, batch_size=4
    )
    with pytest.raises(InputError, match="prepare_demo_data"):
        build_loader(cfg, train=True)  # the loader reads stores; it makes no data
    prepared = prepare_demo_data(cfg)
    cfg.stores, cfg.val_stores = prepared["stores"], prepared["val_stores"]
    train = build_loader(cfg, train=True)
    x, m = next(iter(train))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32 and m.max() <= 2
    assert sum(len(b) for b, _ in train) == 4  # 128^2 image, 64^2 patches
    val = build_loader(cfg, train=False)  # a separate synthetic image
    assert sum(len(b) for b, _ in val) == 4
    assert (tmp_path / "syn" / "val" / "images").is_dir()
    mtime = (tmp_path / "syn" / "patches_64.zarr" / "zarr.json").stat().st_mtime_ns
    assert prepare_demo_data(cfg) == prepared  # reuses the store
    assert (tmp_path / "syn" / "patches_64.zarr" / "zarr.json").stat().st_mtime_ns == mtime
