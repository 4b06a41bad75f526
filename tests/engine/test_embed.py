"""``tilenet embed``: TRIDENT's h5 layout, rows reproduced from OpenSlide reads, the pixel
size, patch filters and batch transforms, resume after an interruption, zarr, the CLI."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from tilenet.cli import main
from tilenet.engine.embed import EmbedConfig, embed_image, encoder_input
from tilenet.engine.weights import LoadedEncoder
from tilenet.geometry import Window
from tilenet.models.encoders import Encoder, build_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builders import kill_when
from slidewriters import write_aperio_svs

P = 64  # patch side of the tests (a tiny ViT at a 64 px input)


def _slide(path: Path, h: int, w: int, mpp: float, seed: int = 0) -> Path:
    """A smooth random RGB slide (JPEG tiles, as scanners write them)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 230, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.ascontiguousarray(small.repeat(8, 0).repeat(8, 1)[:h, :w])
    return write_aperio_svs(path, img, mpp=mpp, levels=(4,))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _slide(tmp_path_factory.mktemp("embed") / "s.svs", 256, 320, 0.5)


def _encoder(seed: int = 0) -> LoadedEncoder:
    torch.manual_seed(seed)
    enc = build_encoder("virchow2", tiny=True, img_size=P, patch_size=16)
    enc.spec = replace(enc.spec, input_size=P, resize=None, patch=P)
    return LoadedEncoder(enc.eval(), "random", "random")


def _encode(enc: Encoder, rgb: np.ndarray) -> np.ndarray:
    """One patch (H, W, 3 uint8) through the encoder alone."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return enc(encoder_input(enc.spec, "cpu")(x))[0].numpy()


def _openslide(path: Path, x: int, y: int, size: int) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((x, y), 0, (size, size)).convert("RGB"))


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, Any]]:
    with h5py.File(path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f["coords"].attrs), dict(f.attrs)


def test_h5_has_tridents_names_and_each_row_is_its_openslide_patch_encoded(
    slide: Path, tmp_path: Path
) -> None:
    loaded = _encoder()
    r = embed_image(slide, loaded, tmp_path, config=EmbedConfig(patch=P, batch=4))
    assert r.path == str(tmp_path / "features" / "s.h5") and not r.skipped
    feats, coords, attrs, root = _read(Path(r.path))
    assert feats.dtype == np.float32 and feats.shape == (4 * 5, 64)
    assert coords.dtype == np.int64 and coords.shape == (20, 2)
    assert coords[1].tolist() == [P, 0] and coords[5].tolist() == [0, P]  # (x, y), rows first
    for k, v in {
        "patch_size": P,
        "patch_size_level0": P,
        "level0_magnification": 20,
        "target_magnification": 20,
        "overlap": 0,
        "level0_width": 320,
        "level0_height": 256,
    }.items():
        assert attrs[k] == v, k
    import openslide

    mpp = float(openslide.OpenSlide(str(slide)).properties["openslide.mpp-x"])
    assert abs(attrs["mpp"] / mpp - 1) < 0.01
    assert json.loads(root["tilenet"])["encoder"]["pooling"] == "cls+mean"
    for i in (0, 7, 19):
        x, y = coords[i]
        row = _encode(loaded.encoder, _openslide(slide, x, y, P))
        np.testing.assert_allclose(feats[i], row, rtol=1e-4, atol=1e-4)


def test_a_coarser_pixel_size_reads_larger_level0_windows(tmp_path: Path) -> None:
    """0.25 µm/px slide at --mpp 0.5: each patch covers 2P level-0 pixels (area mean)."""
    fine = _slide(tmp_path / "fine.svs", 256, 384, 0.25, seed=1)
    loaded = _encoder()
    from tilenet.config import ResolutionConfig

    cfg = EmbedConfig(patch=P, batch=8)
    r = embed_image(fine, loaded, tmp_path, config=cfg, resolution=ResolutionConfig(mpp=0.5))
    feats, coords, attrs, _ = _read(Path(r.path))
    assert len(coords) == 2 * 3 and coords[1].tolist() == [2 * P, 0]
    assert attrs["patch_size_level0"] == 2 * P and attrs["patch_size"] == P
    assert abs(attrs["mpp"] / 0.5 - 1) < 0.01 and attrs["target_magnification"] == 10
    x, y = coords[4]
    region = _openslide(fine, x, y, 2 * P).astype(np.float64)
    mean = region.reshape(P, 2, P, 2, 3).mean(axis=(1, 3))
    row = _encode(loaded.encoder, np.rint(mean).astype(np.uint8))
    np.testing.assert_allclose(feats[4], row, rtol=1e-3, atol=1e-3)


def test_keep_filter_and_batch_transform_hooks(slide: Path, tmp_path: Path) -> None:
    loaded = _encoder()
    cfg = EmbedConfig(patch=P, batch=4)
    full, coords, _, _ = _read(Path(embed_image(slide, loaded, tmp_path / "a", config=cfg).path))
    seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def keep(w: Window) -> bool:
        return w.x < 2 * P  # level-0 window of the patch

    def transform(x: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(x.shape), x.dtype))
        return x

    r = embed_image(
        slide, loaded, tmp_path / "b", config=cfg, keep=keep, transform=transform,
        extra_attrs={"tissue": "x < 128"},
    )  # fmt: skip
    part, pcoords, attrs, _ = _read(Path(r.path))
    sel = coords[:, 0] < 2 * P
    assert pcoords.tolist() == coords[sel].tolist() and attrs["tissue"] == "x < 128"
    np.testing.assert_allclose(part, full[sel], rtol=1e-5, atol=1e-5)
    assert seen[0] == ((4, 3, P, P), torch.uint8) and len(seen) == 2  # 8 patches, batches of 4
    made = embed_image(slide, loaded, tmp_path / "d", config=cfg, keep_for=lambda image: keep)
    assert _read(Path(made.path))[1].tolist() == pcoords.tolist()

    def invert(x: torch.Tensor) -> torch.Tensor:
        return 255 - x

    inv = embed_image(slide, loaded, tmp_path / "c", config=cfg, transform=invert)
    feats_inv, c, _, _ = _read(Path(inv.path))
    row = _encode(loaded.encoder, 255 - _openslide(slide, *c[3], P))
    np.testing.assert_allclose(feats_inv[3], row, rtol=1e-4, atol=1e-4)


class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_file(slide: Path, tmp_path: Path) -> None:
    loaded = _encoder()
    cfg = EmbedConfig(patch=P, batch=3, checkpoint_every=2)
    ref = embed_image(slide, loaded, tmp_path / "ref", config=cfg)
    calls = 0

    def stop_at_5(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise _Stop
        return x

    out = tmp_path / "out"
    with pytest.raises(_Stop):
        embed_image(slide, loaded, out, config=cfg, transform=stop_at_5, extra_attrs={"t": 1})
    marker = json.loads((out / "features" / "s.h5.partial.json").read_text())
    assert marker["rows"] == 12  # batches 1-4 written, marked after 2 and 4
    assert not (out / "features" / "s.h5").exists()
    r = embed_image(slide, loaded, out, config=cfg, transform=lambda x: x, extra_attrs={"t": 1})
    assert r.rows_resumed == 12 and r.patches == 20
    a, ca, _, _ = _read(Path(r.path))
    b, cb, _, _ = _read(Path(ref.path))
    assert a.tobytes() == b.tobytes() and ca.tobytes() == cb.tobytes()
    assert sorted(p.name for p in (out / "features").iterdir()) == ["s.h5"]  # no partials
    again = embed_image(slide, loaded, out, config=cfg, transform=lambda x: x, extra_attrs={"t": 1})
    assert again.skipped


def test_a_marker_whose_rows_do_not_match_starts_again(slide: Path, tmp_path: Path) -> None:
    loaded = _encoder()
    cfg = EmbedConfig(patch=P, batch=4, checkpoint_every=1)
    calls = 0

    def stop_at_3(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise _Stop
        return x

    with pytest.raises(_Stop):
        embed_image(slide, loaded, tmp_path, config=cfg, transform=stop_at_3)
    marker_path = tmp_path / "features" / "s.h5.partial.json"
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "tail_sha256": "0" * 64}))
    r = embed_image(slide, loaded, tmp_path, config=cfg, transform=lambda x: x)
    assert r.rows_resumed == 0
    ref = embed_image(slide, loaded, tmp_path / "ref", config=cfg)
    assert _read(Path(r.path))[0].tobytes() == _read(Path(ref.path))[0].tobytes()


def test_zarr_holds_the_same_arrays_and_attributes(slide: Path, tmp_path: Path) -> None:
    import zarr

    loaded = _encoder()
    h5 = embed_image(slide, loaded, tmp_path, config=EmbedConfig(patch=P, batch=8))
    z = embed_image(slide, loaded, tmp_path, config=EmbedConfig(patch=P, batch=8, format="zarr"))
    assert z.path.endswith("s.zarr")
    g = zarr.open_group(z.path, mode="r")
    feats, coords, attrs, _ = _read(Path(h5.path))
    assert np.asarray(g["features"][:]).tobytes() == feats.tobytes()
    assert np.asarray(g["coords"][:]).tolist() == coords.tolist()
    assert g["coords"].attrs["patch_size_level0"] == attrs["patch_size_level0"]
    assert json.loads(str(g.attrs["tilenet"]))["key"]


def test_cli_embeds_a_slide_then_skips_it_and_batches_a_folder(
    slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "w.safetensors")
    args = ["--encoder", "timm:test_vit", "--weights", str(tmp_path / "w.safetensors")]
    args += ["--patch", "160", "--batch", "2", "--quiet"]
    assert main(["embed", str(slide), "--out", str(tmp_path / "o"), *args]) == 0
    assert "s.h5: 2 patches x 64" in capsys.readouterr().out
    assert main(["embed", str(slide), "--out", str(tmp_path / "o"), *args]) == 0
    assert "already done" in capsys.readouterr().out
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slide, folder / "a.svs")
    (folder / "b.svs").write_bytes(slide.read_bytes()[:4000])  # a TIFF header, cut short
    assert main(["embed", str(folder), "--out", str(tmp_path / "o"), *args]) == 1
    lines = [json.loads(x) for x in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()]
    status = {Path(x["image"]).name: x["status"] for x in lines}
    assert status == {"a.svs": "done", "b.svs": "failed"}
    assert h5py.File(tmp_path / "o" / "features" / "a.h5")["features"].shape == (2, 64)


def _cli(slide: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tilenet", "embed", str(slide), "--out", str(out),
        "--encoder", "timm:test_vit", "--weights", str(weights), "--patch", "160",
        "--batch", "2", "--checkpoint-every", "1", "--readers", "1", "--quiet", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # ~3 CLI processes of several seconds each on a shared machine
def test_sigkill_then_rerun_gives_identical_features(tmp_path: Path) -> None:
    import os
    import subprocess

    import timm
    from safetensors.torch import save_file

    slide = _slide(tmp_path / "k.svs", 640, 800, 0.5, seed=2)  # 4 x 5 patches of 160
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), weights)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    marker = out / "features" / "k.h5.partial.json"
    kill_when(_cli(slide, out, weights), marker.exists)
    kept = json.loads(marker.read_text())["rows"]
    assert 0 < kept < 20 and not (out / "features" / "k.h5").exists()
    rerun = subprocess.run(_cli(slide, out, weights), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    ref = subprocess.run(
        _cli(slide, tmp_path / "ref", weights), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr
    a, ca, _, _ = _read(out / "features" / "k.h5")
    b, cb, _, _ = _read(tmp_path / "ref" / "features" / "k.h5")
    assert a.shape == (20, 64) and a.tobytes() == b.tobytes() and ca.tobytes() == cb.tobytes()
    assert not marker.exists()


_PEAK = """
import sys
from tilenet.engine.embed import EmbedConfig, embed_image
from tilenet.engine.weights import load_encoder

def peak_kib():  # VmHWM: ru_maxrss would carry the parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

enc = load_encoder("timm:test_resnet", "random")
cfg = EmbedConfig(patch=256, batch=8, readers=2)
embed_image(sys.argv[1], enc, sys.argv[3], config=cfg)  # warm: model, threads, buffers
base = peak_kib()
embed_image(sys.argv[2], enc, sys.argv[3], config=cfg)
print(peak_kib() - base)
"""


@pytest.mark.slow  # two processes, ~300 patches of 256²: minutes on a shared machine
def test_memory_is_bounded_by_the_batch_not_the_slide(tmp_path: Path) -> None:
    """The peak RSS an embedding adds is the same for a 1024² and a 4096² slide (16x the
    pixels, 48 MiB of RGB more): within 24 MiB, so neither the slide nor its features are
    held whole."""
    import os
    import subprocess

    warm = _slide(tmp_path / "warm.svs", 512, 512, 0.5, seed=4)
    grown = []
    for side in (1024, 4096):
        s = _slide(tmp_path / f"s{side}.svs", side, side, 0.5, seed=3)
        r = subprocess.run(
            [sys.executable, "-c", _PEAK, str(warm), str(s), str(tmp_path / str(side))],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        grown.append(int(r.stdout.split()[-1]))  # KiB
    assert grown[1] - grown[0] < 24 * 1024, grown


def test_a_georeferenced_raster_keeps_its_crs_and_transform(tmp_path: Path) -> None:
    """A GeoTIFF at --gsd 20 (2x its 10 m pixels): coords in its level-0 pixels, the CRS and
    level-0 transform recorded, no microscope pixel size."""
    import rasterio
    from rasterio.transform import from_origin

    from tilenet.config import ResolutionConfig

    t = from_origin(500000.0, 4_200_000.0, 10.0, 10.0)
    arr = np.random.default_rng(5).integers(0, 255, (3, 256, 256), dtype=np.uint8)
    prof = {"driver": "GTiff", "height": 256, "width": 256, "count": 3, "dtype": "uint8",
            "crs": "EPSG:32633", "transform": t}  # fmt: skip
    with rasterio.open(tmp_path / "geo.tif", "w", **prof) as ds:
        ds.write(arr)
    r = embed_image(
        tmp_path / "geo.tif", _encoder(), tmp_path, config=EmbedConfig(patch=P, batch=4),
        resolution=ResolutionConfig(gsd=20.0),
    )  # fmt: skip
    _, coords, attrs, _ = _read(Path(r.path))
    assert len(coords) == 4 and coords[1].tolist() == [2 * P, 0]
    assert "32633" in attrs["crs"] and list(attrs["transform"]) == list(t.to_gdal())
    assert attrs["mpp"] == "None" and attrs["patch_size_level0"] == 2 * P
