"""Target pixel size composed with vector labels, band selection and slide readers.

Each piece has its own tests; these check that they meet on one grid: the resampled view's.
QuPath polygons are in level-0 pixels of the file, so at ``--mpp 1.0`` on a 0.5 µm/px slide
a polygon's vertex (x, y) lies at view pixel (x / 2, y / 2); a vector file in EPSG:4326 over
a GeoTIFF tiled at twice its GSD lands on the view's 2x coarser geotransform. References are
independent: skimage's point-in-polygon fill of the scaled polygons, GDAL's rasterization
(rasterio) at the coarser transform, numpy block means of the file's own pixels.

Real files from real writers: OME-TIFF and Aperio SVS by tifffile, GeoTIFF by GDAL
(rasterio), GeoPackage by OGR (pyogrio).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from slidewriters import write_aperio_svs, write_philips_tiff

from tilenet.cli import main
from tilenet.config import AugmentConfig, DataConfig, ResolutionConfig
from tilenet.engine.checkpoint import save_checkpoint
from tilenet.geometry import Window
from tilenet.io import open_image
from tilenet.io.base import IGNORE_INDEX
from tilenet.models import ModelSpec, create_model
from tilenet.patches.data import build_loader

# -- a 0.5 µm/px slide whose annotated regions have their own colours ---------------------
H, W = 384, 512
BACKGROUND = (60, 60, 60)
#: Polygons in level-0 pixels (QuPath's coordinates), class names sorted: Stroma 0, Tumor 1.
TUMOR = [(40.3, 50.6), (300.7, 30.2), (280.1, 250.9), (60.4, 220.3)]
STROMA = [(330.2, 40.7), (490.6, 60.1), (470.9, 350.3), (350.5, 300.8)]
NAMES = ["Stroma", "Tumor"]
COLOURS = {"Stroma": (40, 90, 230), "Tumor": (230, 40, 40)}


def _fill(ring: list[tuple[float, float]], shape: tuple[int, int], scale: float) -> Any:
    """Pixels whose centres lie inside ``ring`` (level-0 coordinates) on a grid whose pixel
    is ``scale`` level-0 pixels (skimage, independent of tilenet's rasterizer)."""
    from skimage.draw import polygon

    xy = np.array(ring) / scale - 0.5  # pixel (r, c) has its centre at ((c + .5)s, (r + .5)s)
    return polygon(xy[:, 1], xy[:, 0], shape=shape)


def _reference(scale: float) -> np.ndarray:
    h, w = int(H / scale), int(W / scale)
    ref = np.full((h, w), IGNORE_INDEX, np.uint8)
    ref[_fill(TUMOR, (h, w), scale)] = NAMES.index("Tumor")
    ref[_fill(STROMA, (h, w), scale)] = NAMES.index("Stroma")
    return ref


def _slide_pixels() -> np.ndarray:
    arr = np.empty((H, W, 3), np.uint8)
    arr[:] = BACKGROUND
    arr[_fill(TUMOR, (H, W), 1.0)] = COLOURS["Tumor"]
    arr[_fill(STROMA, (H, W), 1.0)] = COLOURS["Stroma"]
    return arr


def _feature(ring: list[tuple[float, float]], name: str) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": name,
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in [*ring, ring[0]]]]},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(COLOURS[name])},
        },
    }


@pytest.fixture(scope="module", params=["ome", "philips"])
def slide(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 0.5 µm/px pyramid (levels at downsample 1, 4) and its QuPath export: an OME-TIFF
    (read by tifffile) or a Philips-like JPEG TIFF (read by OpenSlide)."""
    root = tmp_path_factory.mktemp(request.param)
    arr = _slide_pixels()
    low = arr.reshape(H // 4, 4, W // 4, 4, 3).mean((1, 3)).round().astype(np.uint8)
    if request.param == "ome":
        path = root / "slide.ome.tif"
        meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            tw.write(arr, subifds=1, tile=(64, 64), photometric="rgb", metadata=meta)
            tw.write(low, subfiletype=1, tile=(16, 16), photometric="rgb")
    else:
        pytest.importorskip("openslide")
        path = write_philips_tiff(
            root / "slide.tiff", [arr, low], mpp_mm=0.0005, factors=(1, 4), tile=128
        )
    with open_image(path) as img:  # what the reader decodes (JPEG is lossy)
        vendor = img.vendor
        assert img.pixel_size == pytest.approx((0.5, 0.5))
        pixels = img.read(Window(0, 0, H, W))
    assert (vendor == "philips") is (request.param == "philips"), vendor
    ann = root / "ann"
    ann.mkdir()
    feats = [_feature(TUMOR, "Tumor"), _feature(STROMA, "Stroma")]
    name = path.name.split(".")[0] + ".geojson"
    (ann / name).write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return {"image": path, "annotations": ann / name, "pixels": pixels, "lossy": vendor is not None}


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Exact ``f`` x ``f`` block means of (H, W, C) integers, rounded half to even."""
    h, w = a.shape[0] // f, a.shape[1] // f
    m = a[: h * f, : w * f].reshape(h, f, w, f, -1).astype(np.float64).mean((1, 3))
    return np.rint(m).astype(a.dtype)


def _near(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels (..., 3) of about ``colour`` (JPEG moves a flat colour by a few levels)."""
    return np.abs(rgb.astype(np.float32) - colour).max(-1) <= 24


def _padded(a: np.ndarray, pad: int, fill: int) -> np.ndarray:
    out = np.full((a.shape[0] + pad, a.shape[1] + pad, *a.shape[2:]), fill, a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def test_tile_qupath_annotations_at_mpp(slide: dict[str, Any], tmp_path: Path) -> None:
    """--annotations + --mpp 1.0: labels on the 2x coarser grid, the store records 1 µm/px."""
    out = tmp_path / "p.zarr"
    argv = ["tile", str(slide["image"]), "--annotations", str(slide["annotations"])]
    argv += ["--mpp", "1.0", "--out", str(out), "--patch", "32", "--overlap", "0"]
    assert main([*argv, "--min-annotated", "0.2", "--quiet"]) == 0
    g: Any = zarr.open_group(out, mode="r")
    attrs: dict[str, Any] = dict(g.attrs)
    assert attrs["class_names"] == NAMES
    src = attrs["sources"][0]
    assert src["resolution"]["pixel_size"] == [1.0, 1.0], src["resolution"]
    assert src["resolution"]["factor"] == [2.0, 2.0]
    labels, coords, images = g["labels"][:], g["coords"][:], g["images"][:]
    assert len(labels) > 10
    ref = _padded(_reference(2.0), 32, IGNORE_INDEX)
    view = _padded(_block_mean(slide["pixels"], 2), 32, 0)
    agree = []
    for lab, img, c in zip(labels, images, coords, strict=True):
        y, x = int(c[2]), int(c[3])
        assert y + 32 <= H // 2 + 32 and x + 32 <= W // 2 + 32  # coordinates at 1 µm/px
        agree.append((lab == ref[y : y + 32, x : x + 32]).mean())
        inside = (y + 32 <= H // 2) and (x + 32 <= W // 2)
        if inside:
            np.testing.assert_array_equal(img, view[y : y + 32, x : x + 32])
    print(f"tile: {np.mean(agree):.5f} of label pixels agree with the scaled polygons")
    assert np.mean(agree) >= 0.98 and min(agree) >= 0.9
    # both classes were cut, and label = class colour where the view pixel is a pure colour
    assert set(np.unique(labels).tolist()) >= {0, 1}
    for name, colour in COLOURS.items():
        pure = _near(images, colour)
        assert (labels[pure] == NAMES.index(name)).mean() >= 0.98


def test_labels_on_the_view_are_window_independent(slide: dict[str, Any]) -> None:
    """Annotations rasterized on the 1 µm/px view: any window equals the same region of a
    whole read (seam-free), and the whole read is the scaled polygons'."""
    from tilenet.io.resolution import at_resolution
    from tilenet.io.vector import read_annotations

    with open_image(slide["image"]) as img:
        view, _ = at_resolution(img, ResolutionConfig(mpp=1.0))
        lab = read_annotations(slide["annotations"]).for_image(view)
        h, w = view.levels[0].shape
        whole = lab.read(Window(0, 0, h, w))[..., 0]
        assert (whole == _reference(2.0)).mean() >= 0.98
        rng = np.random.default_rng(0)
        for _ in range(20):
            y, x = int(rng.integers(-20, h)), int(rng.integers(-20, w))
            wh, ww = int(rng.integers(1, 90)), int(rng.integers(1, 90))
            got = lab.read(Window(y, x, wh, ww), fill=IGNORE_INDEX)[..., 0]
            pad = np.full((h + 200, w + 200), IGNORE_INDEX, np.uint8)
            pad[20 : 20 + h, 20 : 20 + w] = whole
            np.testing.assert_array_equal(got, pad[20 + y : 20 + y + wh, 20 + x : 20 + x + ww])


def test_random_crops_with_annotations_at_mpp(slide: dict[str, Any]) -> None:
    """build_loader with data.images + data.annotations at mpp 1.0: masks agree with the
    crops' colours and with the scaled polygons at the crops' windows."""
    cfg = DataConfig(
        images=str(slide["image"]),
        annotations=str(slide["annotations"].parent),
        patch=32,
        batch_size=8,
        samples_per_epoch=24,
        normalize=False,
        augment=AugmentConfig(enabled=False),
    )
    loader = build_loader(cfg, train=True, resolution=ResolutionConfig(mpp=1.0))
    ds: Any = loader.dataset
    assert ds.class_names == NAMES
    assert ds.resolution["mpp"] == pytest.approx(1.0), ds.resolution
    assert ds.shapes == [(H // 2, W // 2)]
    crops, masks = zip(*[(x.numpy(), m.numpy()) for x, m in loader], strict=True)
    x, m = np.concatenate(crops), np.concatenate(masks)
    assert x.shape == (24, 3, 32, 32) and m.shape == (24, 32, 32)
    ref = _reference(2.0)
    view = _block_mean(slide["pixels"], 2)
    wins = ds.windows(0)
    for crop, mask, (_, win) in zip(x, m, wins, strict=True):
        np.testing.assert_array_equal(crop.transpose(1, 2, 0), view[win.slices])
        assert (mask == ref[win.slices]).mean() >= 0.95
    agree = float(
        np.mean([(mk == ref[w.slices]).mean() for mk, (_, w) in zip(m, wins, strict=True)])
    )
    print(f"crops: {agree:.5f} of mask pixels agree with the scaled polygons")
    assert agree >= 0.98
    # every crop is centred on an annotation; pure-colour pixels carry their class
    assert (m != IGNORE_INDEX).any((1, 2)).all()
    rgb = x.transpose(0, 2, 3, 1)
    for name, colour in COLOURS.items():
        pure = _near(rgb, colour)
        assert pure.sum() > 100 and (m[pure] == NAMES.index(name)).mean() >= 0.98


# -- a 4-band uint16 GeoTIFF, tiled at twice its GSD with two of its bands -----------------
UTM = "EPSG:32632"
ORIGIN = (600000.0, 5100000.0)
GSD = 10.0
GH, GW = 128, 160


def _utm_polygons() -> tuple[list[Any], list[str]]:
    import shapely

    def pt(col: float, row: float) -> tuple[float, float]:
        return (ORIGIN[0] + col * GSD, ORIGIN[1] - row * GSD)

    wheat = shapely.Polygon([pt(8.3, 6.1), pt(90.2, 12.7), pt(80.4, 70.9), pt(12.6, 60.2)])
    rye = shapely.Polygon([pt(100.1, 20.3), pt(150.7, 30.6), pt(120.2, 120.4)])
    return [wheat, rye], ["wheat", "rye"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import pyogrio.raw
    import rasterio
    import shapely
    from rasterio.transform import from_origin
    from rasterio.warp import transform_geom

    root = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(3)
    data = np.stack([b * 1000 + rng.integers(0, 997, (GH, GW)) for b in (1, 2, 3, 4)])
    data = data.astype(np.uint16)
    data[:, :21, :31] = 0  # nodata, on an odd edge: 2x2 blocks half or partly valid
    with rasterio.open(
        root / "scene.tif",
        "w",
        driver="GTiff",
        width=GW,
        height=GH,
        count=4,
        dtype="uint16",
        crs=UTM,
        transform=from_origin(*ORIGIN, GSD, GSD),
        tiled=True,
        blockxsize=32,
        blockysize=32,
        nodata=0,
    ) as dst:
        dst.write(data)
    geoms, names = _utm_polygons()
    wgs = [
        shapely.geometry.shape(transform_geom(UTM, "EPSG:4326", shapely.geometry.mapping(g)))
        for g in geoms
    ]
    pyogrio.raw.write(
        root / "fields.gpkg",
        geometry=np.array([shapely.to_wkb(g) for g in wgs], dtype=object),
        field_data=[np.array(names, dtype=object)],
        fields=["crop"],
        crs="EPSG:4326",
        geometry_type="Polygon",
        driver="GPKG",
    )
    return {"image": root / "scene.tif", "labels": root / "fields.gpkg", "data": data}


def _gdal_reference(vector: Path, gsd: float, shape: tuple[int, int]) -> np.ndarray:
    """GDAL's rasterization of the file's polygons (reprojected by GDAL) at ``gsd``."""
    import pyogrio
    import pyogrio.raw
    import shapely
    from rasterio.features import rasterize
    from rasterio.transform import from_origin
    from rasterio.warp import transform_geom

    _, _, wkb, fields = pyogrio.raw.read(vector)
    crs = pyogrio.read_info(vector)["crs"]
    values = {"rye": 0, "wheat": 1}
    shapes = [
        (transform_geom(crs, UTM, shapely.geometry.mapping(g)), values[n])
        for g, n in zip(shapely.from_wkb(wkb), fields[0], strict=True)
    ]
    return rasterize(
        shapes,
        out_shape=shape,
        transform=from_origin(*ORIGIN, gsd, gsd),
        fill=IGNORE_INDEX,
        dtype="uint8",
    )


def _gsd_view(data: np.ndarray) -> np.ndarray:
    """Bands 4, 2 of ``data`` (4, H, W) at twice the GSD, by numpy: the mean of the valid
    samples of each 2x2 block (a sample is nodata where every band is 0), nodata (0) where
    fewer than half of them are valid; rounded half to even."""
    sel = np.moveaxis(data[[3, 1]], 0, -1).astype(np.float64)
    valid = (data != 0).any(0)
    h, w = data.shape[1] // 2, data.shape[2] // 2
    total = (sel * valid[..., None]).reshape(h, 2, w, 2, 2).sum((1, 3))
    count = valid.reshape(h, 2, w, 2).sum((1, 3))[..., None]
    out = np.where(count >= 2, np.rint(total / np.maximum(count, 1)), 0)
    return out.astype(np.uint16)


def _gsd_labels(scene: dict[str, Any], view: np.ndarray) -> np.ndarray:
    """GDAL's labels at 20 m, outside = background (0), classes + 1; nodata ignored."""
    ref = _gdal_reference(scene["labels"], 20.0, view.shape[:2])
    want = np.where(ref == IGNORE_INDEX, 0, ref + 1).astype(np.uint8)
    want[(view == 0).all(-1)] = IGNORE_INDEX
    return want


def test_tile_bands_at_gsd_with_vector_labels(
    scene: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--bands 4,2 --gsd 20: patches are 2x2 means of bands 4 and 2 (nodata left out),
    labels on that grid, nodata pixels ignored."""
    out = tmp_path / "g.zarr"
    argv = ["tile", str(scene["image"]), "--vector-labels", str(scene["labels"])]
    argv += ["--label-field", "crop", "--outside", "background", "--bands", "4,2"]
    argv += ["--gsd", "20", "--out", str(out), "--patch", "16", "--overlap", "0", "--quiet"]
    assert main(argv) == 0
    g: Any = zarr.open_group(out, mode="r")
    attrs: dict[str, Any] = dict(g.attrs)
    assert attrs["class_names"] == ["background", "rye", "wheat"]
    res = attrs["sources"][0]["resolution"]
    assert res["gsd"] == [20.0, 20.0] and res["factor"] == [2.0, 2.0], res
    images, labels, coords = g["images"][:], g["labels"][:], g["coords"][:]
    assert images.dtype == np.uint16 and images.shape[1:] == (16, 16, 2)
    hh, ww = GH // 2, GW // 2
    view = _gsd_view(scene["data"])
    assert view.shape == (hh, ww, 2) and len(images) == (hh // 16) * (ww // 16)
    ref = _gsd_labels(scene, view)
    agree = []
    for img, lab, c in zip(images, labels, coords, strict=True):
        y, x = int(c[2]), int(c[3])
        np.testing.assert_array_equal(img, view[y : y + 16, x : x + 16])
        agree.append((lab == ref[y : y + 16, x : x + 16]).mean())
    print(f"gsd: {np.mean(agree):.5f} of label pixels agree with GDAL's at 20 m")
    assert np.mean(agree) >= 0.98
    assert set(np.unique(labels).tolist()) == {0, 1, 2, IGNORE_INDEX}
    # the store records its bands: a rerun resumes, other bands are refused, not mixed in
    assert attrs["bands"] == [4, 2]
    assert main(argv) == 0
    assert zarr.open_group(out, mode="r")["images"].shape[0] == len(images)  # type: ignore[union-attr]
    assert main([a if a != "4,2" else "3,2" for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("store was tiled with bands=[4, 2], not [3, 2]; use the same settings "
                        "to resume/append, or a new --out") and "\n" not in err  # fmt: skip


def test_random_crops_bands_at_gsd_with_vector_labels(scene: dict[str, Any]) -> None:
    """Training's crops: data.bands + data.vector_labels at gsd 20, same grid as tiling."""
    cfg = DataConfig(
        images=str(scene["image"]),
        vector_labels=str(scene["labels"]),
        label_field="crop",
        outside="background",
        bands=[4, 2],
        patch=16,
        batch_size=8,
        samples_per_epoch=16,
        normalize=False,
        augment=AugmentConfig(enabled=False),
    )
    loader = build_loader(cfg, train=True, resolution=ResolutionConfig(gsd=20.0))
    ds: Any = loader.dataset
    assert ds.class_names == ["background", "rye", "wheat"]
    assert ds.shapes == [(GH // 2, GW // 2)]
    view = _gsd_view(scene["data"])
    ref = _gsd_labels(scene, view)
    batches = [(x.numpy(), m.numpy()) for x, m in loader]
    x = np.concatenate([b[0] for b in batches])
    m = np.concatenate([b[1] for b in batches])
    assert x.shape == (16, 2, 16, 16)
    agree = []
    for crop, mask, (_, win) in zip(x, m, ds.windows(0), strict=True):
        np.testing.assert_array_equal(crop.transpose(1, 2, 0), view[win.slices])
        agree.append((mask == ref[win.slices]).mean())
    assert np.mean(agree) >= 0.98, np.mean(agree)


# -- tilenet infer on an Aperio SVS at --mpp 1.0 -----------------------------------------
SH, SW = 512, 768
CY, CX, R = 240, 400, 64


def _write_svs(path: Path) -> Path:
    """Aperio layout: a bright disk on a dark slide, 0.5 µm/px, a level at 1/4."""
    yy, xx = np.mgrid[0:SH, 0:SW]
    img = np.full((SH, SW, 3), 20, np.uint8)
    img[(yy - CY) ** 2 + (xx - CX) ** 2 <= R * R] = 230
    return write_aperio_svs(path, img, mpp=0.5, levels=(4,))


def _bright_model(path: Path) -> Path:
    """``tiny`` with weights set so that class 1 wins where the channel mean exceeds 128."""
    model: Any = create_model("tiny", in_channels=3, num_classes=2, width=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.enc[0].weight[0, :, 1, 1] = 1.0 / 3.0
        model.enc[1].weight.fill_(1.0)
        model.enc[1].running_mean.zero_()
        model.enc[1].running_var.fill_(1.0)
        model.head.weight[1, 0, 0, 0] = 1.0
        model.head.bias[1] = -128.0
    spec = ModelSpec.from_model(model, class_names=["background", "disk"])
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


@pytest.mark.parametrize(
    "target", [["--mpp", "1.0"], pytest.param(["--magnification", "10"], marks=pytest.mark.slow)]
)
def test_infer_svs_at_mpp(tmp_path: Path, target: list[str]) -> None:
    """--mpp 1.0 (or 10x of the scan's 20x) on a 0.5 µm/px SVS: 2x coarser, outputs in the
    slide's frame."""
    pytest.importorskip("openslide")
    svs = _write_svs(tmp_path / "slide.svs")
    model = _bright_model(tmp_path / "m.pt")
    out = tmp_path / "out"
    argv = ["infer", str(svs), "--model", str(model), "--out", str(out), *target]
    assert main([*argv, "--tile", "64", "--outputs", "classes,instances,geojson", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    res = s["resolution"]
    assert res["requested"] == {target[0][2:]: float(target[1])} and res["source_level"] == 0
    assert res["factor"] == [2.0, 2.0] and res["pixel_size"] == [1.0, 1.0]
    assert s["shape"] == [SH // 2, SW // 2]
    # areas from the effective pixel size: the disk is pi * (32 µm)^2
    assert s["class_area_um2"]["disk"] == pytest.approx(np.pi * (R * 0.5) ** 2, rel=0.05)
    with open_image(svs) as img:
        assert img.vendor == "aperio" and img.pixel_size == pytest.approx((0.5, 0.5))
    with open_image(out / "classes.ome.tif") as ct, open_image(out / "classes.ome.zarr") as cz:
        assert ct.pixel_size == pytest.approx((1.0, 1.0)) and ct.shape[:2] == (SH // 2, SW // 2)
        assert cz.pixel_size == pytest.approx((1.0, 1.0))
    feats = json.loads((out / "instances.geojson").read_text())["features"]
    assert len(feats) == 1
    from shapely.geometry import shape

    x0, y0, x1, y1 = shape(feats[0]["geometry"]).bounds
    # level-0 pixels of the SVS (not the 1 µm/px grid: that would be half these)
    tol = 4
    assert abs(x0 - (CX - R)) <= tol and abs(x1 - (CX + R + 1)) <= tol
    assert abs(y0 - (CY - R)) <= tol and abs(y1 - (CY + R + 1)) <= tol


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of ``a`` (..., H, W) in its last two axes."""
    rots = [np.rot90(a, k, axes=(-2, -1)) for k in range(4)]
    return rots + [np.flip(r, -1) for r in rots]


def test_default_augmentation_on_two_uint16_bands(scene: dict[str, Any]) -> None:
    """Flips and rotations move uint16 band pixels and their labels together (torch has no
    index_put for uint16), and the default brightness/contrast jitter takes 2 bands
    (torchvision's ColorJitter takes 1 or 3)."""
    view = _gsd_view(scene["data"])
    ref = _gsd_labels(scene, view)
    cfg = DataConfig(
        images=str(scene["image"]),
        vector_labels=str(scene["labels"]),
        label_field="crop",
        outside="background",
        bands=[4, 2],
        patch=16,
        batch_size=8,
        samples_per_epoch=16,
        normalize=False,
        augment=AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0),
    )
    torch.manual_seed(0)
    loader = build_loader(cfg, train=True, resolution=ResolutionConfig(gsd=20.0))
    wins = loader.dataset.windows(0)  # type: ignore[attr-defined]
    batches = [(x.numpy(), m.numpy()) for x, m in loader]
    x = np.concatenate([b[0] for b in batches])
    m = np.concatenate([b[1] for b in batches])
    moved = 0
    for crop, mask, (_, win) in zip(x, m, wins, strict=True):
        want = np.moveaxis(view[win.slices], -1, 0)
        k = next(i for i, t in enumerate(_dihedral(want)) if np.array_equal(t, crop))
        np.testing.assert_array_equal(mask, _dihedral(ref[win.slices])[k])
        moved += k > 0
    assert moved > 8  # most crops were flipped or rotated
    cfg.augment = AugmentConfig()  # brightness and contrast 0.1: per band
    cfg.normalize = True
    x, m = next(iter(build_loader(cfg, train=True, resolution=ResolutionConfig(gsd=20.0))))
    assert x.shape == (8, 2, 16, 16) and bool(torch.isfinite(x).all())


def test_colour_jitter_keeps_float_reflectances() -> None:
    """Float rasters (e.g. reflectance in 0..10000) are jittered by about brightness and
    contrast, not clamped to torchvision's [0, 1] float range."""
    from tilenet.patches.augment import build_augment

    aug = build_augment(AugmentConfig(hflip=0, vflip=0, rot90=False), channels=3)
    assert aug is not None
    x = torch.linspace(2000.0, 3000.0, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    y, _ = aug(x.clone(), torch.zeros(2, 8, 8, dtype=torch.uint8))
    assert y.dtype == torch.float32 and 1500.0 < float(y.min()) and float(y.max()) < 3700.0
