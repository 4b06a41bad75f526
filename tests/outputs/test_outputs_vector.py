"""Vector and COG outputs of inference: merged class regions (QuPath annotations, GeoPackage),
QuPath detections, ``probabilities.tif``; and peak memory on a 40000² GeoTIFF (slow).

Rasters are written by GDAL (rasterio) and tifffile; polygons are checked against
scipy's connected components and GDAL's own rasterization, and COGs with rio-cogeo's
validator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import scipy.ndimage as ndi
import shapely
import tifffile
import zarr
from builders import make_checkpoint
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.transform import from_origin

from tilenet.cli import main
from tilenet.outputs.regions import iter_regions, write_class_regions

ORIGIN = (500_000.0, 4_600_000.0)
GSD = 10.0
EPSG = 32633
NAMES = ["bg", "a", "b"]


def _stripes_checkpoint(path: Path) -> Path:
    """A hand-set tiny model: class 1 where band 1 is bright, 2 where band 2 is, else 0."""
    return make_checkpoint(path, stripes=True, mean=[128.0] * 3, class_names=NAMES)


def _bands(h: int, w: int) -> np.ndarray:
    """(3, h, w) uint8 sine bands: blobs of classes 1 and 2 under the stripes model."""
    yy, xx = np.mgrid[0:h, 0:w]
    b = [
        128 + 100 * np.sin(yy / 7.0) * np.cos(xx / 13.0),
        128 + 100 * np.cos(xx / 11.0) * np.sin(yy / 17.0),
        128 + 90 * np.sin((yy + xx) / 17.0),
    ]
    data = np.stack(b).astype(np.uint8)
    data[data == 0] = 1
    return data


def _class_map(h: int, w: int) -> np.ndarray:
    """Blobs of classes 1..3 with holes (rings of class 1 around class 2)."""
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 4, (h // 6 + 1, w // 6 + 1)).astype(np.uint8)
    cm = np.kron(coarse, np.ones((6, 6), np.uint8))[:h, :w].copy()
    cm[18:42, 28:62] = 0
    cm[20:40, 30:60] = 1  # a ring across block seams, with a hole of class 0 and an island
    cm[25:35, 35:55] = 0
    cm[28:32, 40:44] = 2
    return cm


def _rings_closed(coords: list) -> bool:
    return all(len(r) >= 4 and r[0] == r[-1] for r in coords)


# -- the polygonizer -----------------------------------------------------------------------
@pytest.mark.parametrize("block", [16, pytest.param(23, marks=pytest.mark.slow)])
def test_regions_are_the_connected_components_merged_across_blocks(block: int) -> None:
    cm = _class_map(70, 90)
    regions = list(iter_regions(cm, block=block))
    assert regions and all(shapely.is_valid(r.polygon) for r in regions)
    for c in (1, 2, 3):
        mine = [r for r in regions if r.cls == c]
        _, n = ndi.label(cm == c)  # 4-connected, as the regions
        assert len(mine) == n
        assert sum(r.pixels for r in mine) == (cm == c).sum()
    # Burnt back by GDAL, the polygons give the class map (background stays 0).
    burnt = rasterize(((r.polygon, r.cls) for r in regions), out_shape=cm.shape)
    np.testing.assert_array_equal(burnt, cm)
    # The ring crossing seams is one polygon with its hole; the same as a one-block pass.
    ring = [r for r in regions if r.cls == 1 and r.polygon.bounds == (30, 20, 60, 40)]
    assert len(ring) == 1 and len(ring[0].polygon.interiors) == 1
    whole = list(iter_regions(cm, block=4096))

    def key(r: object) -> tuple:
        return (r.cls, r.polygon.bounds, r.pixels)  # type: ignore[attr-defined]

    for a, b in zip(sorted(regions, key=key), sorted(whole, key=key), strict=True):
        assert a.cls == b.cls and a.polygon.equals(b.polygon)


def test_seam_regions_touching_at_a_corner_stay_apart_and_come_in_reading_order() -> None:
    """Seam pieces are merged per group of touching pieces: two regions of a class meeting at
    a block corner only diagonally stay two (4-connected), and seam regions come top to
    bottom, then left to right."""
    cm = np.zeros((8, 8), np.uint8)
    cm[3, 3] = cm[4, 4] = 1  # diagonal across the corner of four blocks
    cm[2:6, 6] = 1  # a bar across the horizontal seam
    got = [(r.cls, r.pixels, r.polygon.bounds) for r in iter_regions(cm, block=4)]
    assert got == [
        (1, 4, (6.0, 2.0, 7.0, 6.0)),
        (1, 1, (3.0, 3.0, 4.0, 4.0)),
        (1, 1, (4.0, 4.0, 5.0, 5.0)),
    ]


def test_write_class_regions_qupath_geojson(tmp_path: Path) -> None:
    cm = zarr.open_array(tmp_path / "c.zarr", mode="w", shape=(70, 90), chunks=(32, 32), dtype="u1")
    cm[:] = _class_map(70, 90)
    names = ["bg", "one", "two", "three"]
    made = write_class_regions(
        cm,
        tmp_path / "classes.geojson",
        transform=(0.0, 2.0, 0.0, 0.0, 0.0, 2.0),  # a level downsampled by 2
        class_names=names,
        block=32,
        seed="s",
    )
    gj = json.loads((tmp_path / "classes.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and "crs" not in gj
    feats = gj["features"]
    assert sum(made["count"].values()) == len(feats)
    ids = [uuid.UUID(f["id"]) for f in feats]
    assert len(set(ids)) == len(ids)
    for f in feats:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert _rings_closed(f["geometry"]["coordinates"])
        p = f["properties"]
        assert p["objectType"] == "annotation" and p["classification"]["name"] in names[1:]
        assert len(p["classification"]["color"]) == 3
    xy = np.array([pt for f in feats for r in f["geometry"]["coordinates"] for pt in r])
    assert np.issubdtype(xy.dtype, np.integer) and xy.max() <= 180 and xy.min() >= 0
    # Level-0 coordinates: burnt at level 0 and subsampled, they are the class map.
    geoms = [
        (
            shapely.geometry.shape(f["geometry"]),
            names.index(f["properties"]["classification"]["name"]),
        )
        for f in feats
    ]
    burnt = rasterize(geoms, out_shape=(140, 180))
    np.testing.assert_array_equal(burnt[::2, ::2], cm[:])
    assert made["area"]["one"] == 4 * (cm[:] == 1).sum()
    # The same seed gives the same file.
    write_class_regions(
        cm,
        tmp_path / "again.geojson",
        transform=(0, 2, 0, 0, 0, 2),
        class_names=names,
        block=32,
        seed="s",
    )
    assert (tmp_path / "again.geojson").read_bytes() == (tmp_path / "classes.geojson").read_bytes()


def test_write_class_regions_flatgeobuf_in_crs_and_bad_suffix(tmp_path: Path) -> None:
    import pyogrio

    from tilenet.errors import InputError

    cm = _class_map(70, 90)
    t = (ORIGIN[0], GSD, 0.0, ORIGIN[1], 0.0, -GSD)
    made = write_class_regions(
        cm,
        tmp_path / "c.geojson",
        transform=t,
        class_names=["bg", "one", "two", "three"],
        crs=f"EPSG:{EPSG}",
        vector=tmp_path / "c.fgb",
        block=16,
        batch=7,  # several appends
    )
    info = pyogrio.read_info(tmp_path / "c.fgb")
    assert info["driver"] == "FlatGeobuf" and info["features"] == sum(made["count"].values())
    assert rasterio.crs.CRS.from_user_input(info["crs"]).to_epsg() == EPSG
    _, _, wkb, (cls, _, area, pixels) = pyogrio.raw.read(tmp_path / "c.fgb")
    geoms = shapely.from_wkb(wkb)
    burnt = rasterize(
        zip(geoms, cls.tolist(), strict=True),
        out_shape=cm.shape,
        transform=from_origin(*ORIGIN, GSD, GSD),
    )
    np.testing.assert_array_equal(burnt, cm)
    np.testing.assert_allclose(area, pixels * GSD * GSD)
    with pytest.raises(InputError, match=r"c\.shp: vector output must end in"):
        write_class_regions(
            cm, tmp_path / "x.geojson", transform=t, class_names=["bg"], vector=tmp_path / "c.shp"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.fgb", "c.geojson"]


# -- end to end ------------------------------------------------------------------------------
def test_plain_image_qupath_detections_and_annotations(tmp_path: Path) -> None:
    img = tmp_path / "plain.tif"
    tifffile.imwrite(img, np.moveaxis(_bands(120, 140), 0, -1), photometric="rgb")
    ckpt = _stripes_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    argv = ["infer", str(img), "--model", str(ckpt), "--out", str(out), "--tile", "64"]
    assert main([*argv, "--device", "cpu", "--outputs", "classes,geojson,probabilities_tif"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cm = zarr.open_group(out / "classes.ome.zarr", mode="r")["0"][:]
    assert {1, 2} <= set(np.unique(cm).tolist())
    regions = json.loads((out / "classes.geojson").read_text())["features"]
    detections = json.loads((out / "instances.geojson").read_text())["features"]
    for feats, kind in ((regions, "annotation"), (detections, "detection")):
        assert feats and all(f["properties"]["objectType"] == kind for f in feats)
        assert len({uuid.UUID(f["id"]) for f in feats}) == len(feats)
        for f in feats:
            g = f["geometry"]
            polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
            assert all(_rings_closed(p) for p in polys)
            assert f["properties"]["classification"]["name"] in ("a", "b")
    # Regions are the class's 4-connected components; detections here are the same objects.
    assert summary["class_regions"] == {
        n: int(ndi.label(cm == c)[1]) for c, n in enumerate(NAMES) if c
    }
    assert len(regions) == len(detections) == sum(summary["class_regions"].values())
    burnt = rasterize(
        (
            (
                shapely.geometry.shape(f["geometry"]),
                NAMES.index(f["properties"]["classification"]["name"]),
            )
            for f in regions
        ),
        out_shape=cm.shape,
    )
    np.testing.assert_array_equal(burnt, cm)
    assert summary["class_area_um2"] is None  # no real pixel size: pixels only
    assert summary["outputs"]["classes_geojson"] == str(out / "classes.geojson")
    assert not (out / "classes.gpkg").exists()
    # probabilities.tif without georeferencing: pixels only, still a valid COG.
    from rasterio.errors import NotGeoreferencedWarning
    from rio_cogeo.cogeo import cog_validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        assert cog_validate(str(out / "probabilities.tif"))[0]
    with tifffile.TiffFile(out / "probabilities.tif") as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.shape == (120, 140, 3) and 33922 not in page.tags
        q = page.asarray()
    assert q.max() <= 254 and (np.argmax(q, axis=-1) == cm).mean() > 0.99


def _geotiff(path: Path, h: int, w: int) -> None:
    data = _bands(h, w)
    data[:, :16, :24] = 0
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=3,
        dtype="uint8",
        crs=f"EPSG:{EPSG}",
        transform=from_origin(*ORIGIN, GSD, GSD),
        nodata=0,
        tiled=True,
        blockxsize=64,
        blockysize=64,
    ) as dst:
        dst.write(data)
        dst.build_overviews([2], Resampling.nearest)


def _assert_cog(path: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.profile["tiled"] and ds.overviews(1)
    valid, errors, _ = cog_validate(str(path))
    assert valid, errors


@pytest.mark.slow  # ~12 s; default: test_geo's COG in the input CRS
def test_georeferenced_regions_and_probabilities_cog(tmp_path: Path) -> None:
    import pyogrio

    img = tmp_path / "scene.tif"
    _geotiff(img, 600, 560)  # above one 512 block: the COGs get an overview
    ckpt = _stripes_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    argv = ["infer", str(img), "--model", str(ckpt), "--out", str(out), "--tile", "256"]
    argv += ["--device", "cpu", "--probabilities-dtype", "float32"]
    assert main([*argv, "--outputs", "classes,probabilities,geojson,probabilities_tif"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    with rasterio.open(out / "classes.tif") as cog:
        classes = cog.read(1)
        info = pyogrio.read_info(out / "classes.gpkg")
        assert rasterio.crs.CRS.from_user_input(info["crs"]).to_epsg() == EPSG
        assert info["geometry_type"] == "Polygon"
        _, _, wkb, (cls, names, area, pixels) = pyogrio.raw.read(out / "classes.gpkg")
        geoms = shapely.from_wkb(wkb)
        assert set(cls.tolist()) == {1, 2} and set(names.tolist()) == {"a", "b"}
        # Sampled at each polygon's interior point, classes.tif has the polygon's class.
        pts = shapely.get_coordinates(shapely.point_on_surface(geoms))
        rc = np.array([cog.index(x, y) for x, y in pts])
        np.testing.assert_array_equal(classes[rc[:, 0], rc[:, 1]], cls)
        # Burnt into classes.tif's grid they give its classes; nodata is no region.
        burnt = rasterize(
            zip(geoms, cls.tolist(), strict=True), out_shape=classes.shape, transform=cog.transform
        )
        valid = classes != 255
        np.testing.assert_array_equal(burnt[valid], classes[valid])
        assert (burnt[~valid] == 0).all() and (~valid).sum() == 16 * 24
        np.testing.assert_allclose(area, pixels * GSD * GSD)
        np.testing.assert_allclose(shapely.area(geoms), area)
    gj = json.loads((out / "classes.geojson").read_text())
    assert gj["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{EPSG}"
    assert len(gj["features"]) == info["features"]
    assert summary["class_regions"] == {"a": int((cls == 1).sum()), "b": int((cls == 2).sum())}
    assert summary["class_area_crs2"]["a"] == (classes == 1).sum() * GSD * GSD
    # probabilities.tif: a COG in the input's CRS, uint8 p*254, 255 where the input had none.
    _assert_cog(out / "probabilities.tif")
    probs = zarr.open_group(out / "probabilities.ome.zarr", mode="r")["0"][:]
    with rasterio.open(out / "probabilities.tif") as pt, rasterio.open(img) as src:
        assert pt.crs == src.crs and pt.transform == src.transform and pt.count == 3
        assert pt.descriptions == tuple(NAMES) and pt.nodata == 255
        np.testing.assert_allclose(pt.scales, [1 / 254] * 3)
        q = pt.read()
        assert (q[:, :16, :24] == 255).all()
        m = np.broadcast_to(valid, q.shape)
        np.testing.assert_array_equal(q[m], np.rint(probs * 254).astype(np.uint8)[m])
    assert summary["outputs"]["probabilities_geotiff"] == str(out / "probabilities.tif")
    # WGS84 per RFC 7946: lon/lat, exterior rings counter-clockwise, no crs member.
    out2 = tmp_path / "wgs"
    argv[argv.index(str(out))] = str(out2)
    assert main([*argv, "--outputs", "classes,regions", "--geojson-crs", "wgs84"]) == 0
    assert not (out2 / "instances.ome.zarr").exists()  # regions alone: no instances
    gw = json.loads((out2 / "classes.geojson").read_text())
    assert "crs" not in gw and len(gw["features"]) == len(gj["features"])
    from rasterio.warp import transform_bounds

    w, s, e, n = transform_bounds(f"EPSG:{EPSG}", "EPSG:4326", *cog.bounds)
    assert 14.9 < w < e < 15.1 and 41.4 < s < n < 41.6
    for f in gw["features"]:
        g = shapely.geometry.shape(f["geometry"])
        assert g.exterior.is_ccw and all(not r.is_ccw for r in g.interiors)
        lon, lat = shapely.get_coordinates(g).T
        assert (w - 1e-9 <= lon).all() and (lon <= e + 1e-9).all()
        assert (s - 1e-9 <= lat).all() and (lat <= n + 1e-9).all()


# -- memory ----------------------------------------------------------------------------------
_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tilenet.engine.infer import infer_image
    img, ckpt, out = sys.argv[1:4]
    def peak():  # VmHWM: unlike ru_maxrss, not inherited from the parent across exec
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmHWM")).split()[1]) * 1024
    s = infer_image(img, ckpt, out, tile=1024, device="cpu", outputs=["classes", "regions"])
    t = s["timings"]["total_s"]
    flat = s["timings"]["heap_went_flat"]
    print(json.dumps({"peak": peak(), "regions": s["class_regions"], "total_s": t, "flat": flat}))
    """
)


def _blocky_geotiff(path: Path, side: int, blk: int = 1000) -> None:
    """Highly compressible blocks, written one at a time: a class-2 disk inside every other
    block (interior regions) and a class-1 stripe along the bottom of every block row
    (regions as long as the image, crossing every polygonizing seam), else background."""
    yy, xx = np.mgrid[0:blk, 0:blk]
    dark = np.full((3, blk, blk), 40, np.uint8)
    dark[0, 900:950] = 230
    disk = dark.copy()
    disk[1][(yy - 450) ** 2 + (xx - 500) ** 2 < 300**2] = 230
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=side,
        height=side,
        count=3,
        dtype="uint8",
        crs=f"EPSG:{EPSG}",
        transform=from_origin(*ORIGIN, GSD, GSD),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        bigtiff="yes",
    ) as dst:
        for by in range(0, side, blk):
            for bx in range(0, side, blk):
                data = disk if (by + bx) // blk % 2 else dark
                dst.write(data, window=rasterio.windows.Window(bx, by, blk, blk))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_peak_rss_on_a_40000_geotiff_is_bounded_by_the_tile(tmp_path: Path) -> None:
    """``tilenet infer`` (default tile 1024 and batch 4, default heap policy) on a 40000²
    GeoTIFF (1.6 Gpx: 4.8 GB of RGB, 1.6 GB of classes) with classes.ome.tif, classes.tif and
    the class regions: its peak RSS is that of the same run on a 12000² GeoTIFF (11x fewer
    pixels) plus < 200 MB.

    Both peaks are the engine's tile-bound working set (the batch of four 1024² tiles with
    their halos and the tiny model's activations, read-ahead, chunk buffers, GDAL's 64 MiB
    cache, and the heap the reuse policy keeps for the next batch) on top of ~0.7 GB of
    imported libraries. The baseline is 12000² (36 batches), not a 4-batch image: the kept
    heap settles over the first few dozen batches (4000²: 1.80 GB; 12000²: 2.02 GB; 40000²:
    1.97-2.15 GB, 2026-12-01) and is capped by the policy's ceiling
    (tilenet.runtime.HeapGuard), so it never follows the image. The figures are printed."""
    ckpt = _stripes_checkpoint(tmp_path / "m.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs = {}
    for side in (12_000, 40_000):
        img = tmp_path / f"scene{side}.tif"
        _blocky_geotiff(img, side)
        res = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(img), str(ckpt), str(tmp_path / f"o{side}")],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=3000,
        )
        runs[side] = r = json.loads(res.stdout.strip().splitlines()[-1])
        print(side, r)
        n = side // 1000
        assert r["regions"] == {"a": n, "b": n * n // 2}, r
        img.unlink()
    assert runs[40_000]["peak"] - runs[12_000]["peak"] < 200e6, runs
    assert runs[40_000]["peak"] < 2.5e9, runs
