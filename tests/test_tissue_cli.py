"""``tilenet tissue``: the mask, overlay and QuPath polygons it writes, in level-0 pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from slidewriters import write_aperio_svs
from test_tissue import MPP, synthetic_slide

from tilenet.cli import main


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rgb, truth = synthetic_slide()
    path = tmp_path_factory.mktemp("tissuecli") / "case 1.svs"
    return write_aperio_svs(path, rgb, mpp=MPP, levels=(4, 16)), truth


def test_writes_mask_overlay_and_level0_polygons(
    slide: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shapely

    path, truth = slide
    out = tmp_path / "tissue"
    assert main(["tissue", str(path), "--out", str(out)]) == 0
    folder = out / "case_1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "mask.ome.zarr",
        "overlay.png",
        "tissue.geojson",
        "tissue.json",
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing partial left
    record = json.loads((folder / "tissue.json").read_text())
    assert record["scale"] == [4.0, 4.0] and record["mask_mpp"] == [8.0, 8.0]
    assert record["pieces"] == 7  # 3 large pieces (one with a lumen), 4 fragments
    assert abs(record["tissue_fraction"] - truth.mean()) < 0.01
    # the mask: uint8 0/1 at 8 µm/px in the OME metadata
    group = zarr.open_group(folder / "mask.ome.zarr", mode="r")
    level0 = np.asarray(group["0"])
    assert level0.shape == (256, 256) and set(np.unique(level0)) == {0, 1}
    scale = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"] == [8.0, 8.0]
    assert group.attrs["tilenet:tissue"]["scale_to_level0"] == [4.0, 4.0]
    assert Image.open(folder / "overlay.png").size == (256, 256)
    # polygons: QuPath annotations in level-0 pixels (the slide is 1024² pixels)
    features = json.loads((folder / "tissue.geojson").read_text())["features"]
    assert len(features) == 7
    assert {f["properties"]["classification"]["name"] for f in features} == {"Tissue"}
    polys = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert all(p.is_valid for p in polys)
    union = shapely.union_all(polys)
    assert abs(union.area - level0.sum() * 16) < 1e-6  # area = mask pixels x 4 x 4
    ys, xs = np.nonzero(truth)
    x0, y0, x1, y1 = union.bounds
    assert abs(x0 - xs.min()) <= 4 and abs(y0 - ys.min()) <= 4
    assert abs(x1 - (xs.max() + 1)) <= 4 and abs(y1 - (ys.max() + 1)) <= 4
    lumen = shapely.Point(640 / MPP, 650 / MPP)  # the hole of the first piece
    assert not union.contains(lumen) and union.contains(shapely.Point(640 / MPP, 400 / MPP))
    assert "tissue" in capsys.readouterr().out


def test_rerun_skips_force_redoes_and_a_bad_image_is_reported(
    slide: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t"
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 not a tiff")
    assert main(["tissue", str(slide[0]), "--out", str(out)]) == 0
    stamp = (out / "case_1" / "tissue.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["tissue", str(slide[0]), str(bad), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "done already" in text and "bad.tif: failed:" in text
    assert (out / "case_1" / "tissue.json").stat().st_mtime_ns == stamp
    assert main(["tissue", str(slide[0]), "--out", str(out), "--force"]) == 0
    assert (out / "case_1" / "tissue.json").stat().st_mtime_ns != stamp
    assert not (out / "bad").exists()


def test_tile_with_tissue_keeps_only_patches_on_tissue(
    slide: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    path, truth = slide
    out = tmp_path / "t.zarr"
    args = ["tile", str(path), "--patch", "128", "--overlap", "0", "--quiet", "--tissue"]
    assert main([*args, "--out", str(out)]) == 0
    g = zarr.open_group(out, mode="r")
    assert g.attrs["tissue"] == 0.25  # --tissue alone
    got = {(int(y), int(x)) for y, x in np.asarray(g["coords"])[: g.attrs["count"], 2:]}
    grid = [(y, x) for y in range(0, 1024, 128) for x in range(0, 1024, 128)]
    on = {w for w in grid if truth[w[0] : w[0] + 128, w[1] : w[1] + 128].mean() >= 0.25}
    assert 20 < len(on) < 50 and len(got ^ on) <= 2  # borderline patches may differ


def test_infer_with_tissue_skips_tiles_off_tissue(
    slide: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from tilenet.engine.checkpoint import save_checkpoint
    from tilenet.models import ModelSpec, create_model

    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=2)
    spec = ModelSpec.from_model(model, mean=[200.0] * 3, std=[40.0] * 3, class_names=["a", "b"])
    ckpt = save_checkpoint(tmp_path / "m.pt", {"spec": spec, "model": model.state_dict()})
    path, _ = slide
    args = ["infer", str(path), "--model", str(ckpt), "--level", "1", "--tile", "64"]
    assert main([*args, "--outputs", "classes", "--tissue", "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    n, skipped = summary["tiles"], summary["tiles_skipped"]
    assert f"skipped {skipped} of {n} tiles" in err
    # the tiles whose core holds no tissue are skipped and class 0; the others were run
    classes = np.asarray(zarr.open_group(tmp_path / "t" / "classes.ome.zarr")["0"])
    from tilenet.io import open_image
    from tilenet.tissue import detect_tissue

    with open_image(path) as img:
        mask = detect_tissue(img)
        ds = img.levels[1].downsample
    core = summary["tile"] - 2 * summary["halo"]
    cores = [(y, x, core, core) for y in range(0, 256, core) for x in range(0, 256, core)]
    assert len(cores) == n
    off = mask.fractions(cores, ds) == 0
    assert off.sum() == skipped > 0
    for (y, x, h, w), is_off in zip(cores, off, strict=True):
        assert (classes[y : y + h, x : x + w] == 0).all() == is_off


def test_infer_with_stain_is_one_transform_per_slide(
    slide: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--stain: tiles of two sizes give the same probabilities (one source estimate per
    slide, so no seams); a reference without two stains is refused in one line."""
    import torch
    from test_stain import synthetic_he

    from tilenet.engine.checkpoint import save_checkpoint
    from tilenet.models import ModelSpec, create_model

    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=2)
    spec = ModelSpec.from_model(model, mean=[200.0] * 3, std=[40.0] * 3, class_names=["a", "b"])
    ckpt = save_checkpoint(tmp_path / "m.pt", {"spec": spec, "model": model.state_dict()})
    ref = tmp_path / "ref.png"
    Image.fromarray(synthetic_he(5, h_gain=1.5)).save(ref)
    args = ["infer", str(slide[0]), "--model", str(ckpt), "--level", "1", "--stain", str(ref)]
    args += ["--outputs", "probabilities", "--probabilities-dtype", "float32"]
    probs = []
    for tile in ("64", "128"):
        assert main([*args, "--tile", tile, "--out", str(tmp_path / tile)]) == 0
        group = zarr.open_group(tmp_path / tile / "probabilities.ome.zarr", mode="r")
        probs.append(np.asarray(group["0"]))
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)
    plain = [a for a in args if a not in ("--stain", str(ref))]
    assert main([*plain, "--tile", "128", "--out", str(tmp_path / "plain")]) == 0
    group = zarr.open_group(tmp_path / "plain" / "probabilities.ome.zarr", mode="r")
    assert np.abs(np.asarray(group["0"]) - probs[1]).max() > 0.01  # the stain did change it
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(ref)
    assert main([*args, "--out", str(tmp_path / "white")]) == 2
    assert "two stains" in capsys.readouterr().err


def test_tissue_outputs_in_a_bucket(
    slide: tuple[Path, np.ndarray], bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same folder published to object storage (moto's S3 server), tissue.json last."""
    import fsspec

    out = f"{bucket}/runs/tissue"
    assert main(["tissue", str(slide[0]), "--out", out]) == 0
    fs, root = fsspec.core.url_to_fs(out)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/case_1")}
    assert {"mask.ome.zarr", "overlay.png", "tissue.geojson", "tissue.json"} <= names
    record = json.loads(fs.cat(f"{root}/case_1/tissue.json"))
    assert record["pieces"] == 7
    group = zarr.open_group(f"{out}/case_1/mask.ome.zarr", mode="r")
    assert group["0"].shape == (256, 256)
    capsys.readouterr()
    assert main(["tissue", str(slide[0]), "--out", out]) == 0
    assert "done already" in capsys.readouterr().out


def test_embed_with_tissue_and_stain(
    slide: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`embed --tissue` keeps the patches on tissue (recorded in the file); `--stain`
    changes the features and records its reference."""
    import h5py
    from test_stain import synthetic_he

    from tilenet.stain import make_stain, plain_state

    path, truth = slide
    ref = tmp_path / "ref.png"
    Image.fromarray(synthetic_he(5, h_gain=1.5)).save(ref)
    args = ["embed", str(path), "--encoder", "timm:test_vit", "--weights", "random"]
    args += ["--mpp", str(MPP), "--patch", "128", "--batch", "8", "--quiet", "--tissue"]
    assert main([*args, "--out", str(tmp_path / "t")]) == 0
    with h5py.File(tmp_path / "t" / "features" / "case_1.h5") as f:
        got = {(int(y), int(x)) for x, y in f["coords"][:]}
        assert json.loads(f.attrs["tilenet"])["extra"]["tissue"]["fraction"] == 0.25
        plain = f["features"][:]
    grid = [(y, x) for y in range(0, 1024, 128) for x in range(0, 1024, 128)]
    on = {w for w in grid if truth[w[0] : w[0] + 128, w[1] : w[1] + 128].mean() >= 0.25}
    assert 20 < len(on) < 50 and len(got ^ on) <= 2  # borderline patches may differ
    assert main([*args, "--stain", str(ref), "--out", str(tmp_path / "s")]) == 0
    with h5py.File(tmp_path / "s" / "features" / "case_1.h5") as f:
        stain = json.loads(f.attrs["tilenet"])["extra"]["stain"]
        assert stain["method"] == "macenko"
        # the fitted normaliser is stored with the features (tilenet.stain.stain_from_state)
        assert stain["state"] == plain_state(make_stain("macenko", np.array(Image.open(ref))))
        assert f["features"].shape == plain.shape
        assert np.abs(f["features"][:] - plain).max() > 1e-3  # the stain changed the input
