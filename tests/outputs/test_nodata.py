"""One validity mask: nodata values, alpha bands and GDAL dataset masks mark the same pixels
in every output, the network sees there what a training patch holds (NODATA_FILL before
normalisation), and training ignores them.

The rasters are written by GDAL (through rasterio) three ways: a nodata value (float32, as
rasterstats' ``slope_nodata.tif``), an alpha band (RGBA, ``ALPHA=YES``) and an internal
dataset mask (``GDAL_TIFF_INTERNAL_MASK``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import tifffile
import torch
import zarr
from rasterio.transform import from_origin

from tilenet.engine.checkpoint import load_model, save_checkpoint
from tilenet.engine.infer import infer_image
from tilenet.engine.predictor import predict
from tilenet.geometry import Window, ceil_to
from tilenet.io import open_image
from tilenet.io.base import IGNORE_INDEX
from tilenet.models import ModelSpec, create_model
from tilenet.normalize import NODATA_FILL
from tilenet.outputs.outputset import CLASSES_NODATA, GEOREF_KEY

H, W = 72, 90
MEAN, STD = [120.0, 110.0, 130.0], [60.0, 50.0, 70.0]
OUTPUTS = ["classes", "probabilities", "probabilities_tif", "instances", "regions", "preview"]


def _pixels() -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) uint8-valued pixels and the (H, W) mask of pixels without data: a block
    that crosses tile edges, a line, single pixels, the last column."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([128 + 100 * np.sin(yy / 5.0), 128 + 90 * np.cos(xx / 7.0), 60 + xx + yy])
    data = np.clip(base + rng.normal(0, 25, (3, H, W)), 0, 255).round()
    invalid = np.zeros((H, W), bool)
    invalid[20:41, 25:60] = True
    invalid[60, :] = True
    invalid[rng.integers(0, H, 30), rng.integers(0, W, 30)] = True
    invalid[:, -1] = True
    return data, invalid


def _raster(path: Path, kind: str, nodata: float = -9999.0) -> np.ndarray:
    """The scene written by GDAL with its invalid pixels marked as ``kind`` says; returns the
    invalid mask."""
    data, invalid = _pixels()
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": H,
        "width": W,
        "crs": "EPSG:32633",
        "transform": from_origin(500_000.0, 4_600_000.0, 10.0, 10.0),
        "tiled": True,
        "blockxsize": 32,
        "blockysize": 32,
    }
    if kind == "nodata":
        out = data.astype(np.float32)
        out[:, invalid] = nodata
        with rasterio.open(path, "w", count=3, dtype="float32", nodata=nodata, **profile) as ds:
            ds.write(out)
    elif kind == "alpha":
        rgba = np.concatenate([data, np.where(invalid, 0, 255)[None]]).astype(np.uint8)
        rgba[:3, invalid] = 7  # what hides under alpha 0 must not matter
        with rasterio.open(
            path, "w", count=4, dtype="uint8", photometric="rgb", alpha="YES", **profile
        ) as ds:
            ds.write(rgba)
    else:
        with (
            rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
            rasterio.open(path, "w", count=3, dtype="uint8", **profile) as ds,
        ):
            ds.write(data.astype(np.uint8))
            ds.write_mask(np.where(invalid, 0, 255).astype(np.uint8))
    return invalid


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=3)
    spec = ModelSpec.from_model(model, mean=MEAN, std=STD, class_names=["bg", "a", "b"])
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("model") / "m.pt")


def _infer(img: Path, ckpt: Path, out: Path, **options: Any) -> dict[str, Any]:
    bands = [1, 2, 3] if open_image(img).channels == 4 else None
    opts: dict[str, Any] = {"tile": 32, "device": "cpu", "outputs": OUTPUTS, "bands": bands}
    return infer_image(img, ckpt, out, **{**opts, **options})


def _level0(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(store, mode="r")["0"][:])


@pytest.mark.parametrize("kind", ["nodata", "alpha", "mask"])
def test_readers_give_one_validity_mask(tmp_path: Path, kind: str) -> None:
    img = tmp_path / f"{kind}.tif"
    invalid = _raster(img, kind)
    with open_image(img) as image:
        assert image.masked
        pixels, valid = image.read_masked(Window(-3, -5, H + 6, W + 10))
        assert valid is not None and pixels.shape[:2] == valid.shape
        np.testing.assert_array_equal(~valid[3 : 3 + H, 5 : 5 + W], invalid)
        assert not valid[:3].any() and not valid[:, :5].any()  # outside the image: no data
        # a band selection keeps the source's mask (alpha dropped from the pixels)
        rgb = image.select_bands([1, 2, 3])
        assert rgb.masked and rgb.read_masked(Window(0, 0, H, W))[0].shape == (H, W, 3)
        valid = rgb.valid(Window(0, 0, H, W))
        assert valid is not None
        np.testing.assert_array_equal(~valid, invalid)


def test_plain_tiff_alpha_and_gdal_nodata_tag(tmp_path: Path) -> None:
    """tifffile's reader: an RGBA TIFF's alpha (ExtraSamples) masks; GDAL's nodata tag (as
    tilenet's classes.ome.tif carries it) is the image's nodata."""
    data, invalid = _pixels()
    rgba = np.concatenate([data, np.where(invalid, 0, 255)[None]]).astype(np.uint8)
    p = tmp_path / "rgba.tif"
    tifffile.imwrite(p, np.moveaxis(rgba, 0, -1), photometric="rgb", extrasamples=[2])
    with open_image(p) as image:
        assert type(image).__name__ == "TiffImage" and image.masked and image.nodata is None
        valid = image.select_bands([1, 2, 3]).valid(Window(0, 0, H, W))
        assert valid is not None
        np.testing.assert_array_equal(~valid, invalid)
    q = tmp_path / "tagged.tif"
    classes = np.where(invalid, CLASSES_NODATA, 1).astype(np.uint8)
    tifffile.imwrite(q, classes, extratags=[(42113, "s", 0, str(CLASSES_NODATA), True)])
    with open_image(q) as image:
        assert image.nodata == CLASSES_NODATA
        valid = image.valid(Window(0, 0, H, W))
        assert valid is not None
        np.testing.assert_array_equal(~valid, invalid)


def test_plain_image_has_no_mask(tmp_path: Path) -> None:
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with open_image(p) as image:
        assert not image.masked
        assert image.read_masked(Window(0, 0, 16, 16))[1] is None
        assert image.valid(Window(0, 0, 16, 16)) is None


@pytest.mark.parametrize(  # nodata in crop mode: test_every_output_marks_...
    ("kind", "mode"), [("alpha", "crop"), ("mask", "crop"), ("nodata", "gaussian")]
)
def test_class_outputs_and_areas_mark_exactly_the_pixels_without_data(
    tmp_path: Path, ckpt: Path, kind: str, mode: str
) -> None:
    img = tmp_path / f"{kind}.tif"
    invalid = _raster(img, kind)
    out = tmp_path / "out"
    summary = _infer(img, ckpt, out, mode=mode, outputs=["classes"])
    classes = _assert_class_outputs(out, invalid)
    # areas: valid pixels only
    assert sum(summary["class_area_px"].values()) == int((~invalid).sum())
    assert summary["nodata_area_crs2"] == float(invalid.sum()) * 100.0
    assert classes[~invalid].max() < CLASSES_NODATA


def test_every_output_marks_exactly_the_pixels_without_data(tmp_path: Path, ckpt: Path) -> None:
    img = tmp_path / "scene.tif"
    invalid = _raster(img, "nodata")
    out = tmp_path / "out"
    _infer(img, ckpt, out)
    classes = _assert_class_outputs(out, invalid)
    with rasterio.open(out / "probabilities.tif") as ds:
        assert ds.nodata == CLASSES_NODATA
        pt = ds.read()
    assert (pt[:, invalid] == CLASSES_NODATA).all() and (pt[:, ~invalid] < 255).all()
    probs = _level0(out / "probabilities.ome.zarr")
    assert (probs[:, invalid] == 0).all()  # documented: 0 for every class
    np.testing.assert_allclose(probs[:, ~invalid].sum(0), 1.0, atol=3e-3)
    # no instance covers a pixel without data, and the instances are the valid classes'
    inst = _level0(out / "instances.ome.zarr")
    assert not inst[invalid].any() and inst[~invalid & (classes > 0)].all()
    # regions: no polygon over the pixels without data
    regions = json.loads((out / "classes.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in regions["features"]}
    assert names <= {"a", "b"}
    _assert_regions_miss(regions, invalid)
    assert (out / "preview.png").stat().st_size > 0


def _assert_class_outputs(out: Path, invalid: np.ndarray) -> np.ndarray:
    """classes.ome.zarr, classes.ome.tif and classes.tif: 255 exactly where ``invalid``,
    each with its nodata tag; returns the class map."""
    classes = _level0(out / "classes.ome.zarr")
    np.testing.assert_array_equal(classes == CLASSES_NODATA, invalid)
    attrs = zarr.open_group(out / "classes.ome.zarr", mode="r").attrs[GEOREF_KEY]
    assert attrs["nodata"] == CLASSES_NODATA and attrs["crs"]  # type: ignore[index]
    with tifffile.TiffFile(out / "classes.ome.tif") as tf:
        np.testing.assert_array_equal(tf.pages[0].asarray(), classes)
        assert tf.pages[0].tags[42113].value == str(CLASSES_NODATA)  # GDAL_NODATA
    with rasterio.open(out / "classes.tif") as ds:
        assert ds.nodata == CLASSES_NODATA
        np.testing.assert_array_equal(ds.read(1), classes)
    return classes


def _assert_regions_miss(regions: dict[str, Any], invalid: np.ndarray) -> None:
    from rasterio.features import rasterize

    shapes = [f["geometry"] for f in regions["features"]]
    if not shapes:
        return
    burnt = rasterize(
        shapes, out_shape=(H, W), transform=from_origin(500_000.0, 4_600_000.0, 10.0, 10.0)
    )
    assert not burnt[invalid].any()


def test_results_do_not_depend_on_the_nodata_value(tmp_path: Path, ckpt: Path) -> None:
    """The same scene stored with -9999 and with -32768 gives identical outputs (the raw value
    reached the network before: 161 of 6480 labels differed here), and crop mode equals one
    whole-image pass whose pixels without data hold NODATA_FILL before normalisation, as a
    training patch of this image holds them (tests/patches/test_patch_fill.py)."""
    runs = []
    for value in (-9999.0, -32768.0):
        img = tmp_path / f"scene{int(value)}.tif"
        invalid = _raster(img, "nodata", nodata=value)
        out = tmp_path / f"out{int(value)}"
        _infer(img, ckpt, out, outputs=["classes", "probabilities"], probabilities_dtype="float32")
        runs.append((_level0(out / "classes.ome.zarr"), _level0(out / "probabilities.ome.zarr")))
    (c1, p1), (c2, p2) = runs
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(p1, p2)

    model, spec = load_model(ckpt)
    data, _ = _pixels()
    x = np.zeros((3, ceil_to(H, spec.stride), ceil_to(W, spec.stride)), np.float32)
    filled = np.where(invalid, np.float32(NODATA_FILL), data.astype(np.float32))
    x[:, :H, :W] = (filled - np.float32(MEAN)[:, None, None]) * (
        np.float32(1.0) / np.float32(STD)[:, None, None]
    )
    with torch.inference_mode():
        ref = predict(model.eval(), torch.from_numpy(x)[None])[0, :, :H, :W].numpy()
    np.testing.assert_allclose(p1[:, ~invalid], ref[:, ~invalid], atol=1e-5)


def test_training_labels_ignore_pixels_without_data(tmp_path: Path) -> None:
    """Patches of an image with an alpha band: the label is the ignore index where alpha is 0
    (the loss skips it) and the store's statistics leave those pixels out."""
    from tilenet.patches.tiler import tile_images

    img = tmp_path / "scene.tif"
    invalid = _raster(img, "alpha")
    labels = tmp_path / "scene_labels.tif"
    lab = (np.arange(H * W).reshape(H, W) % 3).astype(np.uint8)
    tifffile.imwrite(labels, lab)
    store = tmp_path / "patches.zarr"
    tile_images(
        [img], out=store, labels=[labels], patch=32, overlap=0, min_foreground=0, progress=False,
        bands=[1, 2, 3], workers=1,
    )  # fmt: skip
    group = zarr.open_group(store, mode="r")
    coords = np.asarray(group["coords"][:])
    got = np.asarray(group["labels"][:])
    images = np.asarray(group["images"][:])
    checked, kept = 0, []
    for (_, _, y, x), patch, pixels in zip(coords, got, images, strict=True):
        inv = invalid[y : y + 32, x : x + 32]
        want = np.where(inv, IGNORE_INDEX, lab[y : y + 32, x : x + 32])
        np.testing.assert_array_equal(patch[: inv.shape[0], : inv.shape[1]], want)
        checked += int(inv.sum())
        kept.append(pixels[: inv.shape[0], : inv.shape[1]][~inv])
    assert checked > 0
    # the store's mean is over valid pixels only (the hidden 7s would pull it down)
    np.testing.assert_allclose(group.attrs["mean"], np.concatenate(kept).mean(0), rtol=1e-9)


def test_skipped_tiles_are_masked_too(tmp_path: Path, ckpt: Path) -> None:
    """Tiles written as background without running the model (``--min-foreground``) still
    mark their pixels without data."""
    from tilenet.config import InferConfig
    from tilenet.engine.predictor import Predictor
    from tilenet.engine.stitch import STITCHERS
    from tilenet.outputs.sink import NODATA_CLASS, OutputSink

    img = tmp_path / "scene.tif"
    invalid = _raster(img, "mask")
    predictor = Predictor(ckpt, InferConfig(tile=32, device="cpu"))
    classes = np.zeros((H, W), np.uint8)
    sink = OutputSink(num_classes=3, classes=classes)
    with open_image(img) as image:
        grid, _ = predictor.plan((H, W))
        tiles = list(grid)
        skip = np.arange(len(tiles)) % 2 == 0
        stitcher = STITCHERS["crop"](grid, sink, tmp_path / "scratch")
        predictor.run(image, tiles, stitcher, grid=grid, skip=skip)
    np.testing.assert_array_equal(classes == NODATA_CLASS, invalid)
    assert sink.nodata == int(invalid.sum()) and sink.area.sum() == int((~invalid).sum())
