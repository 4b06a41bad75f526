"""Georeferenced rasters: read through rasterio, described by ``tilenet info``, and inferred
into a Cloud-Optimized GeoTIFF in the input's CRS.

Every raster here is written by GDAL itself (through rasterio) in a projected CRS
(EPSG:32633, UTM zone 33N); plain TIFFs and PNGs are checked to stay on their own readers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import tifffile
import zarr
from builders import make_checkpoint
from rasterio.enums import Resampling
from rasterio.env import get_gdal_config
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

from tilenet.cli import main
from tilenet.errors import UnsupportedFormatError
from tilenet.geometry import Window
from tilenet.io import open_image
from tilenet.io.raster import GDAL_CACHE_BYTES, write_cog
from tilenet.outputs.outputset import CLASSES_NODATA

ORIGIN = (500_000.0, 4_600_000.0)
GSD = 10.0
EPSG = 32633


def _raster(
    path: Path,
    h: int,
    w: int,
    *,
    count: int = 3,
    dtype: str = "uint8",
    nodata: float | None = 0,
    overviews: tuple[int, ...] = (2, 4),
    driver: str = "GTiff",
    **creation: object,
) -> np.ndarray:
    """A structured (count, h, w) raster written by GDAL; the top-left 16 x 24 is nodata."""
    yy, xx = np.mgrid[0:h, 0:w]
    bands = [
        128 + 100 * np.sin(yy / 7.0),
        128 + 100 * np.cos(xx / 11.0),
        128 + 90 * np.sin((yy + xx) / 17.0),
    ]
    data = np.stack([bands[i % 3] for i in range(count)]).astype(dtype)
    data[data == 0] = 1
    if nodata is not None:
        data[:, :16, :24] = nodata
    profile = {"tiled": True, "blockxsize": 64, "blockysize": 64} if driver == "GTiff" else {}
    with rasterio.open(
        path,
        "w",
        driver=driver,
        width=w,
        height=h,
        count=count,
        dtype=dtype,
        crs=f"EPSG:{EPSG}",
        transform=from_origin(*ORIGIN, GSD, GSD),
        nodata=nodata,
        **{**profile, **creation},
    ) as dst:
        dst.write(data)
        dst.descriptions = tuple(f"b{i}" for i in range(count))
        if overviews:
            dst.build_overviews(list(overviews), Resampling.nearest)
    return data


def test_geotiff_opens_with_rasterio_and_reads_windows(tmp_path: Path) -> None:
    p = tmp_path / "scene.tif"
    data = _raster(p, 200, 300)
    hwc = np.moveaxis(data, 0, -1)
    with open_image(p) as img:
        assert type(img).__name__ == "RasterImage"
        assert img.format == "geotiff"
        assert img.shape == (200, 300, 3)
        assert img.pixel_size is None  # a GSD is not a microscope pixel
        assert img.transform == (ORIGIN[0], GSD, 0.0, ORIGIN[1], 0.0, -GSD)
        assert img.crs is not None and "UTM zone 33N" in img.crs
        assert img.nodata == 0.0
        assert img.band_names == ["b0", "b1", "b2"]
        assert [lv.shape for lv in img.levels] == [(200, 300), (100, 150), (50, 75)]
        assert [lv.downsample for lv in img.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        assert img.chunks == (64, 64)
        if "GDAL_CACHEMAX" not in os.environ:  # GDAL's cache is bounded (default: 5 % of RAM)
            assert get_gdal_config("GDAL_CACHEMAX") == GDAL_CACHE_BYTES
        np.testing.assert_array_equal(img.read(Window(30, 40, 50, 70)), hwc[30:80, 40:110])
        # Past the edge: zero-filled, like every reader.
        edge = img.read(Window(190, 290, 20, 20))
        np.testing.assert_array_equal(edge[:10, :10], hwc[190:, 290:])
        assert not edge[10:].any() and not edge[:, 10:].any()
        # Overview level: GDAL's own overview pixels (nearest from level 0).
        with rasterio.open(p, overview_level=0) as ov:
            expected = np.moveaxis(ov.read(), 0, -1)
        np.testing.assert_array_equal(img.read(Window(0, 0, 100, 150), level=1), expected)


def test_plain_tiff_and_png_stay_on_their_readers(tmp_path: Path) -> None:
    tif = tmp_path / "plain.tif"
    tifffile.imwrite(tif, np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    with open_image(tif) as img:
        assert type(img).__name__ == "TiffImage"
        assert img.crs is None and img.transform is None
        info = img.info()
    assert info["crs"] is None and info["epsg"] is None and info["transform"] is None
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    code = (
        "import sys, tilenet.io as io; io.open_image(sys.argv[1]).info(); "
        "print(sorted(m for m in ('rasterio', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(png)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_formats_only_gdal_reads(tmp_path: Path) -> None:
    src = tmp_path / "scene.tif"
    data = _raster(src, 64, 80, overviews=())
    vrt = tmp_path / "scene.vrt"
    with rasterio.open(src) as ds:
        rasterio.shutil.copy(ds, vrt, driver="VRT")
    with open_image(vrt) as img:
        assert img.format == "vrt"
        assert img.transform == (ORIGIN[0], GSD, 0.0, ORIGIN[1], 0.0, -GSD)
        np.testing.assert_array_equal(img.read(Window(0, 0, 64, 80)), np.moveaxis(data, 0, -1))
    with rasterio.Env() as env:
        has_jp2 = "JP2OpenJPEG" in env.drivers()
    if has_jp2:
        jp2 = tmp_path / "scene.jp2"
        with rasterio.open(src) as ds:
            rasterio.shutil.copy(ds, jp2, driver="JP2OpenJPEG", reversible="YES", quality=100)
        with open_image(jp2) as img:
            assert img.format == "jp2openjpeg"
            assert img.crs is not None and img.shape == (64, 80, 3)
            np.testing.assert_array_equal(
                img.read(Window(20, 20, 30, 30)), np.moveaxis(data, 0, -1)[20:50, 20:50]
            )
        plain = tmp_path / "plain.jp2"  # no georeferencing: no warning (warnings are errors)
        with warnings.catch_warnings():  # rasterio warns when writing it
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(
                plain, "w", driver="JP2OpenJPEG", width=40, height=30, count=1, dtype="uint8"
            ) as dst:
                dst.write(np.full((1, 30, 40), 9, np.uint8))
        with open_image(plain) as img:
            assert img.transform is None and img.crs is None and img.info()["gsd"] is None
            assert (img.read(Window(0, 0, 30, 40)) == 9).all()
    text = tmp_path / "grid.xyz"
    text.write_text("0 0 1\n1 0 2\n")
    with pytest.raises(UnsupportedFormatError, match="not a TIFF"):
        open_image(text)


def test_info_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "scene.tif"
    _raster(p, 40, 50, count=4, dtype="uint16", nodata=65535, overviews=())
    assert main(["info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["epsg"] == EPSG and "PROJCS" in info["crs"]
    assert info["transform"] == [ORIGIN[0], GSD, 0.0, ORIGIN[1], 0.0, -GSD]
    assert info["gsd"] == [GSD, GSD] and info["crs_units"] == "metre"
    assert info["nodata"] == 65535 and info["dtype"] == "uint16"
    assert info["bands"] == ["b0", "b1", "b2", "b3"] and info["pixel_size"] is None
    assert main(["info", str(p)]) == 0
    text = capsys.readouterr().out
    assert "crs:         EPSG:32633" in text
    assert "gsd:         10 x 10 metre" in text
    assert "nodata:      65535" in text


def _tiny_checkpoint(path: Path) -> Path:
    return make_checkpoint(path, class_names=["bg", "a", "b"])


def _infer(
    tmp_path: Path, img: Path, *extra: str, ckpt: Path | None = None
) -> tuple[Path, dict[str, object]]:
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "out"
    ckpt = ckpt or _tiny_checkpoint(tmp_path / "m.pt")
    argv = ["infer", str(img), "--model", str(ckpt), "--out", str(out)]
    argv += ["--tile", "64", "--device", "cpu", "--outputs", "classes", *extra]
    assert main(argv) == 0
    return out, json.loads((out / "summary.json").read_text())


def _assert_cog(path: Path) -> None:
    """A COG as GDAL lays one out: tiled, with overviews, ``LAYOUT=COG``, IFDs before data."""
    with rasterio.open(path) as ds:
        assert ds.driver == "GTiff"
        assert ds.profile["tiled"] is True
        assert ds.overviews(1), "no overviews"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    with tifffile.TiffFile(path) as tf:
        pages = list(tf.pages)
        assert len(pages) >= 2 and all(p.is_tiled for p in pages)
        # COG layout: every IFD comes before the first tile's data.
        first_data = min(int(min(p.dataoffsets)) for p in pages)
        assert max(p.offset for p in pages) < first_data
    try:
        from rio_cogeo.cogeo import cog_validate
    except ImportError:
        return
    valid, errors, _ = cog_validate(str(path))
    assert valid, errors


def test_infer_writes_cog_in_input_crs(tmp_path: Path) -> None:
    img = tmp_path / "scene.tif"
    h, w = 700, 600  # above one 512 block, so GDAL's COG driver makes an overview
    _raster(img, h, w)
    out, summary = _infer(tmp_path, img, "--tile", "256")  # 12 tiles, not 143
    cog = out / "classes.tif"
    _assert_cog(cog)
    with rasterio.open(img) as src, rasterio.open(cog) as dst:
        assert dst.crs == src.crs and dst.crs.to_epsg() == EPSG
        assert dst.transform == src.transform
        assert (dst.height, dst.width) == (src.height, src.width)
        assert dst.nodata == CLASSES_NODATA
        written = dst.read(1)
        valid = dst.dataset_mask() > 0
        assert src.nodata == 0
        np.testing.assert_array_equal(valid, src.dataset_mask() > 0)  # nodata area matches
    expected = zarr.open_group(out / "classes.ome.zarr", mode="r")["0"][:]
    assert (~valid).sum() == 16 * 24 and not valid[:16, :24].any()
    assert (written[:16, :24] == CLASSES_NODATA).all()
    # The class map marks the same pixels: every class output is classes.tif's map.
    np.testing.assert_array_equal(written, expected)
    assert expected[valid].max() < CLASSES_NODATA
    assert summary["epsg"] == EPSG and summary["crs_units"] == "metre"
    assert summary["transform"] == [ORIGIN[0], GSD, 0.0, ORIGIN[1], 0.0, -GSD]
    area = summary["class_area_crs2"]
    px = summary["class_area_px"]
    assert isinstance(area, dict) and isinstance(px, dict)
    # Areas of classes.tif's classes: the nodata area is left out and counted apart.
    counts = np.bincount(written[valid], minlength=3)
    assert area == {k: float(n) * GSD * GSD for k, n in zip(px, counts, strict=True)}
    assert summary["nodata_area_crs2"] == 16 * 24 * GSD * GSD
    assert sum(area.values()) == (h * w - 16 * 24) * GSD * GSD
    assert sum(px.values()) == h * w - 16 * 24  # pixel counts: valid pixels only
    assert summary["class_area_um2"] is None
    assert summary["outputs"]["classes_geotiff"] == str(cog)  # type: ignore[index]
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name or "staging" in p.name]


def test_infer_at_overview_level_scales_transform(tmp_path: Path) -> None:
    img = tmp_path / "scene.tif"
    _raster(img, 256, 256)
    out, summary = _infer(tmp_path, img, "--level", "1")
    with rasterio.open(out / "classes.tif") as dst:
        assert (dst.height, dst.width) == (128, 128)
        assert dst.transform == from_origin(*ORIGIN, 2 * GSD, 2 * GSD)
        assert (dst.read(1)[:8, :12] == CLASSES_NODATA).all()
        assert (dst.dataset_mask() == 0).sum() == 8 * 12
    assert summary["transform"] == [ORIGIN[0], 2 * GSD, 0.0, ORIGIN[1], 0.0, -2 * GSD]


def test_write_cog_out_of_core_from_zarr(tmp_path: Path) -> None:
    arr = zarr.open_array(
        tmp_path / "a.zarr", mode="w", shape=(1100, 1300), chunks=(256, 256), dtype="uint8"
    )
    data = (np.arange(1100 * 1300) % 7).astype(np.uint8).reshape(1100, 1300)
    arr[:] = data
    t = (ORIGIN[0], GSD, 0.0, ORIGIN[1], 0.0, -GSD)
    p = write_cog(tmp_path / "x.tif", arr, crs=f"EPSG:{EPSG}", transform=t)
    _assert_cog(p)
    with rasterio.open(p) as ds:
        assert ds.overviews(1) == [2, 4]
        assert ds.transform.to_gdal() == t and ds.crs.to_epsg() == EPSG
        np.testing.assert_array_equal(ds.read(1), data)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.zarr", "x.tif"]


def test_bands_pick_and_order_input_channels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    four = tmp_path / "four.tif"
    data = _raster(four, 80, 96, count=4, dtype="uint16", nodata=None, overviews=())
    data[3] += 7  # band 4 differs from band 1
    with rasterio.open(four, "r+") as ds:
        ds.write(data)
    three = tmp_path / "three.tif"
    with rasterio.open(four) as ds:
        profile = {**ds.profile, "count": 3}
    with rasterio.open(three, "w", **profile) as dst:
        dst.write(data[[3, 1, 0]])
    with open_image(four) as img:
        view = img.select_bands([4, 2, 1])
        assert view.channels == 3 and view.band_names == ["b3", "b1", "b0"]
        np.testing.assert_array_equal(
            view.read(Window(-3, 5, 20, 20)), img.read(Window(-3, 5, 20, 20))[:, :, [3, 1, 0]]
        )
    out_a, _ = _infer(tmp_path / "a", four, "--bands", "4,2,1")
    out_b, _ = _infer(tmp_path / "b", three)
    with rasterio.open(out_a / "classes.tif") as a, rasterio.open(out_b / "classes.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    capsys.readouterr()
    ckpt = tmp_path / "a" / "m.pt"
    argv = ["infer", str(four), "--model", str(ckpt), "--out", str(tmp_path / "c")]
    assert main([*argv, "--bands", "1,2,5"]) == 2
    assert "bands [5] do not exist; the image has bands 1..4 (b0, b1, b2, b3)" in (
        capsys.readouterr().err
    )


def test_plain_tiff_infer_makes_no_geotiff(tmp_path: Path) -> None:
    img = tmp_path / "plain.tif"
    tifffile.imwrite(img, np.full((64, 64, 3), 100, np.uint8), photometric="rgb")
    out, summary = _infer(tmp_path, img)
    assert not (out / "classes.tif").exists()
    assert "crs" not in summary and "class_area_crs2" not in summary


def _stripes_checkpoint(path: Path) -> Path:
    """A tiny model set by hand: class 1 where band 1 is bright, 2 where band 2 is (a lattice
    of blobs on :func:`_raster`'s sine bands), else 0."""
    return make_checkpoint(path, stripes=True, mean=[128.0] * 3, class_names=["bg", "a", "b"])


def test_polygons_overlay_the_class_map_in_map_coordinates(tmp_path: Path) -> None:
    import pyogrio
    import shapely

    from tilenet.outputs.outputset import GEOREF_KEY

    img = tmp_path / "scene.tif"
    _raster(img, 300, 340, nodata=None)
    ckpt = _stripes_checkpoint(tmp_path / "stripes.pt")
    out, summary = _infer(
        tmp_path / "a",
        img,
        "--outputs",
        "classes,probabilities,geojson",
        "--tile",
        "128",
        ckpt=ckpt,
    )
    assert summary["outputs"]["geopackage"] == str(out / "instances.gpkg")  # type: ignore[index]
    with rasterio.open(out / "classes.tif") as cog:
        classes = cog.read(1)
        info = pyogrio.read_info(out / "instances.gpkg")
        assert rasterio.crs.CRS.from_user_input(info["crs"]) == cog.crs
        assert rasterio.crs.CRS.from_user_input(info["crs"]).to_epsg() == EPSG
        assert info["geometry_type"] == "MultiPolygon" and info["features"] > 10
        _, _, wkb, fields = pyogrio.raw.read(out / "instances.gpkg")
        geoms = shapely.from_wkb(wkb)
        ids, area, cls, names = fields
        assert set(cls.tolist()) == {1, 2} and set(names.tolist()) == {"a", "b"}
        # Every polygon's interior point, sampled from classes.tif, has the polygon's class.
        pts = shapely.get_coordinates(shapely.point_on_surface(geoms))
        rows, cols = rasterio.transform.rowcol(cog.transform, pts[:, 0], pts[:, 1])
        np.testing.assert_array_equal(classes[rows, cols], cls)
        assert cog.index(*pts[0]) == (rows[0], cols[0])
        sampled = np.array([v[0] for v in cog.sample(pts.tolist())])
        np.testing.assert_array_equal(sampled, cls)
        # Exact outlines in map units: burnt into classes.tif's grid, the polygons give back
        # its class map exactly (a shift by one pixel would not).
        from rasterio.features import rasterize

        burnt = rasterize(
            zip(geoms, cls.tolist(), strict=True), out_shape=classes.shape, transform=cog.transform
        )
        np.testing.assert_array_equal(burnt, classes)
        np.testing.assert_allclose(shapely.area(geoms), area)
        for c in (1, 2):
            assert area[cls == c].sum() == (classes == c).sum() * GSD * GSD
        left, b, r, t = shapely.total_bounds(geoms)
        assert cog.bounds.left <= left and r <= cog.bounds.right
        assert cog.bounds.bottom <= b and t <= cog.bounds.top
    # The GeoJSON in the input's CRS: same polygons, its CRS named.
    gj = json.loads((out / "instances.geojson").read_text())
    assert gj["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{EPSG}"
    assert len(gj["features"]) == info["features"]
    by_id = {int(i): g for i, g in zip(ids, geoms, strict=True)}
    for f in gj["features"]:
        g = shapely.geometry.shape(f["geometry"])
        assert g.equals(by_id[f["properties"]["id"]])
        assert f["properties"]["area"] == g.area
    # The OME-Zarr outputs carry the georeferencing, scaled per stored level.
    t0 = [ORIGIN[0], GSD, 0.0, ORIGIN[1], 0.0, -GSD]
    for name in ("classes", "probabilities", "instances"):
        geo = zarr.open_group(out / f"{name}.ome.zarr", mode="r").attrs[GEOREF_KEY]
        assert rasterio.crs.CRS.from_wkt(geo["crs"]).to_epsg() == EPSG and geo["epsg"] == EPSG
        assert geo["transforms"]["0"] == t0
        assert geo["transforms"]["1"] == [ORIGIN[0], 2 * GSD, 0.0, ORIGIN[1], 0.0, -2 * GSD]
    # WGS84 (RFC 7946): longitude/latitude near the scene (UTM 33N, E 500 km = 15 deg E).
    wgs = _infer(
        tmp_path / "b",
        img,
        "--outputs",
        "geojson",
        "--geojson-crs",
        "wgs84",
        "--tile",
        "128",
        ckpt=ckpt,
    )[0]
    gw = json.loads((wgs / "instances.geojson").read_text())
    assert "crs" not in gw and len(gw["features"]) == len(gj["features"])
    from rasterio.warp import transform_bounds

    w, s, e, n = transform_bounds(f"EPSG:{EPSG}", "EPSG:4326", *cog.bounds)
    assert 14.9 < w < e < 15.1 and 41.5 < s < n < 41.6
    for f in gw["features"]:
        lon, lat = np.array(shapely.get_coordinates(shapely.geometry.shape(f["geometry"]))).T
        assert (w - 1e-9 <= lon).all() and (lon <= e + 1e-9).all()
        assert (s - 1e-9 <= lat).all() and (lat <= n + 1e-9).all()
    # Reprojected back, the vertices are the map-coordinate vertices of the same polygon.
    f0 = gw["features"][0]
    lon, lat = shapely.get_coordinates(shapely.geometry.shape(f0["geometry"])).T
    xs, ys = rasterio.warp.transform("EPSG:4326", f"EPSG:{EPSG}", lon.tolist(), lat.tolist())
    ref = shapely.get_coordinates(by_id[f0["properties"]["id"]])
    np.testing.assert_allclose(np.c_[xs, ys], ref, atol=1e-3)


def test_plain_input_geojson_stays_in_level0_pixels(tmp_path: Path) -> None:
    img = tmp_path / "plain.tif"
    yy, xx = np.mgrid[0:96, 0:96]
    data = np.stack([128 + 100 * np.sin(yy / 7.0), 128 + 100 * np.cos(xx / 11.0), yy + xx], -1)
    tifffile.imwrite(img, data.astype(np.uint8), photometric="rgb")
    out, _ = _infer(tmp_path, img, "--outputs", "geojson")
    gj = json.loads((out / "instances.geojson").read_text())
    assert "crs" not in gj and gj["features"]
    assert not (out / "instances.gpkg").exists()
    xy = np.array([p for f in gj["features"] for p in f["geometry"]["coordinates"][0]])
    assert xy.min() >= 0 and xy.max() <= 96 and np.issubdtype(xy.dtype, np.integer)
    assert "tilenet:georef" not in zarr.open_group(out / "instances.ome.zarr").attrs
