"""Multispectral training data: band selection (``--bands``, ``data.bands``), statistics that
leave nodata out, and nodata pixels ignored by the loss, on a 4-band uint16 GeoTIFF with
nodata written by GDAL (through rasterio); checkpoints record the training bands and
inference picks them by default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin

from tilenet.cli import main
from tilenet.config import DataConfig, load_config
from tilenet.engine.checkpoint import load_checkpoint, save_checkpoint
from tilenet.engine.infer import infer_image
from tilenet.errors import CheckpointError, ConfigError, InputError, ModelError
from tilenet.io.base import IGNORE_INDEX, nodata_mask
from tilenet.models import ModelSpec
from tilenet.patches.data import build_loader, store_stats
from tilenet.train import train

H, W = 64, 96
BANDS = [4, 2]


def _write(path: Path, data: np.ndarray, nodata: float | None) -> None:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs="EPSG:32633",
        transform=from_origin(500000.0, 4000000.0, 10.0, 10.0),
        nodata=nodata,
        tiled=True,
        blockxsize=32,
        blockysize=32,
    ) as dst:
        dst.write(data)


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """images/scene.tif: 4 bands of uint16 (band b around b * 1000), nodata 0 in a top-left
    block and a stripe; labels/scene.tif: classes 1 and 2 everywhere, nodata area included."""
    rng = np.random.default_rng(0)
    data = np.stack([b * 1000 + rng.integers(0, 500, (H, W)) for b in (1, 2, 3, 4)])
    data = data.astype(np.uint16)
    data[:, :20, :30] = 0
    data[:, 40:43, :] = 0
    data[1, 50:52, :] = 0  # one band only: still data
    labels = (1 + (np.arange(W)[None, :] >= W // 2) * np.ones((H, 1), int)).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _write(tmp_path / "images" / "scene.tif", data, 0)
    _write(tmp_path / "labels" / "scene.tif", labels[None], None)
    return tmp_path / "images", tmp_path / "labels", data, labels


def _valid_stats(data: np.ndarray, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std per band over the pixels where not every band is nodata (0)."""
    sel = data[[b - 1 for b in bands]].astype(np.float64)
    valid = (data != 0).any(0)
    px = sel[:, valid]
    return px.mean(1), px.std(1)


def test_nodata_mask_needs_every_band() -> None:
    px = np.array([[[0, 0], [0, 3]], [[5, 0], [0, 0]]], np.uint16)
    assert nodata_mask(px, 0).tolist() == [[True, False], [False, True]]  # type: ignore[union-attr]
    assert nodata_mask(px, None) is None
    f = np.array([[[np.nan, np.nan], [np.nan, 1.0]]])
    assert nodata_mask(f, float("nan")).tolist() == [[True, False]]  # type: ignore[union-attr]


def test_tile_keeps_bands_ignores_nodata_in_stats_and_labels(
    scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels, data, lab = scene
    out = tmp_path / "s.zarr"
    argv = ["tile", str(images), "--labels", str(labels), "--out", str(out), "--bands", "4,2"]
    assert main([*argv, "--patch", "32", "--overlap", "0", "--quiet"]) == 0
    group: Any = zarr.open_group(out, mode="r")
    attrs: dict[str, Any] = dict(group.attrs)
    imgs, labs, coords = (np.asarray(group[k][:]) for k in ("images", "labels", "coords"))
    assert imgs.shape == (6, 32, 32, 2) and imgs.dtype == np.uint16
    none = (data == 0).all(0)
    for img, lb, (_, _, y, x) in zip(imgs, labs, coords, strict=True):
        win = np.s_[y : y + 32, x : x + 32]
        np.testing.assert_array_equal(img, np.moveaxis(data[[3, 1]][(slice(None), *win)], 0, -1))
        np.testing.assert_array_equal(lb, np.where(none[win], IGNORE_INDEX, lab[win]))
    assert (labs == IGNORE_INDEX).sum() == none.sum() > 0
    mean, std = _valid_stats(data, BANDS)
    np.testing.assert_allclose(attrs["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(attrs["std"], std, rtol=1e-9)
    # All bands, with nodata counted, would be far off: band 4's mean is near 4250.
    assert abs(mean[0] - 4250) < 30


def test_random_crops_pick_bands_and_ignore_nodata(
    scene: tuple[Path, Path, np.ndarray, np.ndarray],
) -> None:
    images, labels, data, _ = scene
    st = store_stats([images], bands=BANDS)
    mean, std = _valid_stats(data, BANDS)
    assert st["channels"] == 2
    np.testing.assert_allclose(st["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(st["std"], std, rtol=1e-9)
    cfg = DataConfig(
        images=str(images),
        labels=str(labels),
        bands=BANDS,
        patch=32,
        batch_size=8,
        samples_per_epoch=16,
    )
    cfg.augment.enabled = False
    loader = build_loader(cfg, train=True)
    ds = loader.dataset
    assert ds.channels == 2  # type: ignore[attr-defined]
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-9)  # type: ignore[attr-defined]
    seen = 0
    for x, y in loader:
        raw = x.numpy() * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
        none = (np.abs(raw) < 0.5).all(1)
        assert np.array_equal(y.numpy() == IGNORE_INDEX, none)
        assert set(np.unique(y.numpy()[~none]).tolist()) <= {1, 2}
        seen += int(none.sum())
    assert seen > 0


def test_band_errors(scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images = scene[0]
    with pytest.raises(InputError, match=r"bands \[5\] do not exist; the image has bands 1..4"):
        store_stats([images], bands=[5])
    cfg = DataConfig(stores=[str(tmp_path / "s.zarr")], bands=BANDS)
    with pytest.raises(InputError, match=r"data\.bands picks the bands of data\.images"):
        build_loader(cfg, train=True)


# -- the checkpoint records the bands; inference picks them by default ---------------------
def _train(tmp_path: Path, name: str, **data: Any) -> Path:
    """A ``tiny`` model on 2 input channels after 2 steps; its last.pt."""
    over = {
        "data.patch": 32, "data.batch_size": 2, "data.augment.enabled": False,
        "model.name": "tiny", "model.in_channels": 2, "model.num_classes": 3,
        "model.kwargs.width": 2, "train.device": "cpu", "train.progress": False,
        "train.steps": 2, "train.warmup_steps": 0, "train.val_every": 100,
        "train.out_dir": tmp_path / name, **data,
    }  # fmt: skip
    return train(load_config(None, [f"{k}={v}" for k, v in over.items()])) / "last.pt"


def _probs(out: Path) -> np.ndarray:
    group: Any = zarr.open_group(out / "probabilities.ome.zarr", mode="r")
    return np.asarray(group["0"][:])


OPTS: dict[str, Any] = {
    "tile": 32,
    "outputs": ["probabilities"],
    "probabilities_dtype": "float32",
    "device": "cpu",
}


def test_checkpoint_records_store_bands_and_infer_uses_them(
    scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels, data, _ = scene
    tif = images / "scene.tif"
    store = tmp_path / "s.zarr"
    argv = ["tile", str(images), "--labels", str(labels), "--out", str(store), "--bands", "4,2"]
    assert main([*argv, "--patch", "32", "--overlap", "0", "--quiet"]) == 0
    ckpt = _train(tmp_path, "run", **{"data.stores": f"[{store}]"})
    assert load_checkpoint(ckpt)["spec"]["bands"] == [4, 2]
    # no --bands: the checkpoint's bands 4,2 of the 4-band scene
    s = infer_image(tif, ckpt, tmp_path / "default", **OPTS)
    assert s["bands"] == [4, 2] and s["bands_from"] == "checkpoint"
    # the same as --bands 4,2, and as a 2-band file holding bands 4 and 2 run with --bands 1,2
    e = infer_image(tif, ckpt, tmp_path / "explicit", **OPTS, bands=[4, 2])
    assert e["bands"] == [4, 2] and e["bands_from"] == "requested"
    two = tmp_path / "two.tif"
    _write(two, data[[3, 1]], 0)
    infer_image(two, ckpt, tmp_path / "two", **OPTS, bands=[1, 2])
    default = _probs(tmp_path / "default")
    np.testing.assert_array_equal(default, _probs(tmp_path / "explicit"))
    np.testing.assert_array_equal(default, _probs(tmp_path / "two"))
    # --bands overrides the checkpoint's
    o = infer_image(tif, ckpt, tmp_path / "other", **OPTS, bands=[3, 1])
    assert o["bands"] == [3, 1] and o["bands_from"] == "requested"
    assert not np.array_equal(default, _probs(tmp_path / "other"))
    # an image without band 4: one line naming the file and the bands
    with pytest.raises(InputError, match=r"two\.tif: the model was trained on bands 4,2 .*1\.\.2"):
        infer_image(two, ckpt, tmp_path / "fail", **OPTS)
    code = main(["infer", str(two), "--model", str(ckpt), "--out", str(tmp_path / "f2")])
    assert code == 2


@pytest.mark.slow  # recorded bands: test_checkpoint_records_store_bands_... stays in the default run
def test_checkpoint_records_data_bands(
    scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels, _, _ = scene
    crops = {
        "data.images": images, "data.labels": labels, "data.bands": "[4,2]",
        "data.samples_per_epoch": 4,
    }  # fmt: skip
    ckpt = _train(tmp_path, "crops", **crops)
    assert load_checkpoint(ckpt)["spec"]["bands"] == [4, 2]
    s = infer_image(images / "scene.tif", ckpt, tmp_path / "o", **OPTS)
    assert s["bands"] == [4, 2] and s["bands_from"] == "checkpoint"
    # A resume on the same bands goes on; on other bands of the same count (the weights
    # would load) it is refused in one line, naming both.
    more = {**crops, "train.resume": ckpt, "train.steps": 3}
    assert load_checkpoint(_train(tmp_path, "more", **more))["step"] == 3
    with pytest.raises(
        CheckpointError, match=r"trained on bands 4,2, the data now gives bands 2,4"
    ):
        _train(tmp_path, "swapped", **{**more, "data.bands": "[2,4]"})


def test_stores_with_other_bands_are_refused(
    scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels, _, _ = scene
    for name, bands in (("a.zarr", "4,2"), ("b.zarr", "3,1")):
        argv = ["tile", str(images), "--labels", str(labels), "--out", str(tmp_path / name)]
        assert main([*argv, "--bands", bands, "--patch", "32", "--overlap", "0", "--quiet"]) == 0
    both = f"[{tmp_path / 'a.zarr'},{tmp_path / 'b.zarr'}]"
    with pytest.raises(ConfigError, match=r"different bands \(.*a\.zarr: 4,2; .*b\.zarr: 3,1\)"):
        _train(tmp_path, "mixed", **{"data.stores": both})


def test_checkpoint_without_bands_runs_all_bands(
    scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A checkpoint written before specs had ``bands`` (no key) loads and runs on all bands;
    ``--bands`` picks them as before."""
    from tilenet.models import create_model

    tif = scene[0] / "scene.tif"
    model = create_model("tiny", in_channels=2, num_classes=2, width=2)
    old = ModelSpec.from_model(model).to_dict()
    del old["bands"]
    ckpt = save_checkpoint(tmp_path / "old.pt", {"spec": old, "model": model.state_dict()})
    assert ModelSpec.from_dict(load_checkpoint(ckpt)["spec"]).bands is None
    s = infer_image(tif, ckpt, tmp_path / "o", **OPTS, bands=[4, 2])
    assert s["bands"] == [4, 2] and s["bands_from"] == "requested"
    with pytest.raises(InputError, match="image has 4 channels but the model expects 2"):
        infer_image(tif, ckpt, tmp_path / "all", **OPTS)
    model4 = create_model("tiny", in_channels=4, num_classes=2, width=2)
    ckpt4 = save_checkpoint(
        tmp_path / "all.pt", {"spec": ModelSpec.from_model(model4), "model": model4.state_dict()}
    )
    s = infer_image(tif, ckpt4, tmp_path / "all4", **OPTS)
    assert s["bands"] is None and s["bands_from"] is None


def test_spec_bands_are_checked() -> None:
    spec = ModelSpec("tiny", in_channels=2, num_classes=2, stride=2, receptive_field=4)
    assert spec.bands is None and spec.to_dict()["bands"] is None
    got = ModelSpec.from_dict({**spec.to_dict(), "bands": [4, 2]})
    assert got.bands == (4, 2) and got.to_dict()["bands"] == [4, 2]
    with pytest.raises(ModelError, match=r"bands \[4, 2, 1\] are 3 for 2 input channels"):
        ModelSpec.from_dict({**spec.to_dict(), "bands": [4, 2, 1]})
    with pytest.raises(ModelError, match="bands must be band numbers >= 1"):
        ModelSpec.from_dict({**spec.to_dict(), "bands": [0, 2]})
    with pytest.raises(ModelError, match="bands must be a list"):
        ModelSpec.from_dict({**spec.to_dict(), "bands": "4,2"})


def test_plan_shows_the_bands(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "model.name=tiny", "--tile", "64", "--memory", "1GB", "--no-measure"]
    assert main([*argv, "model.in_channels=2", "tiling.bands=[4,2]", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["model"]
    assert m["bands"] == [4, 2] and m["bands_from"] == "tiling.bands"
    assert main([*argv, "data.bands=[4,2]", "infer.bands=[3,2,1]"]) == 0
    out = capsys.readouterr().out
    assert "bands        3,2,1 of the input image" in out and "(infer.bands)" in out
    assert main([*argv, "data.bands=[4,2]"]) == 0
    assert (
        "(data.bands); but model.in_channels=3: set model.in_channels=2" in capsys.readouterr().out
    )
    assert main(argv) == 0
    assert "bands   " not in capsys.readouterr().out
