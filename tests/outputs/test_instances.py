"""Out-of-core instance labelling and GeoJSON polygons (tilenet.outputs.instances)."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from tilenet.errors import ImageNotFoundError, InputError, ShapeMismatchError
from tilenet.io.writers import OmeZarrWriter
from tilenet.outputs.instances import META_KEY, label_instances, write_geojson, write_geopackage

H, W = 300, 500
CHUNK = (64, 48)


def _zarr(a: np.ndarray, chunks: tuple[int, int] = CHUNK) -> zarr.Array:
    z = zarr.create_array(store={}, shape=a.shape, chunks=chunks, dtype=a.dtype)
    z[:] = a
    return z


def _read(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(path, mode="r")["0"][:])


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Thresholded smoothed noise with classes 1..3: many objects, cut by many blocks."""
    rng = np.random.default_rng(7)
    noise = ndi.gaussian_filter(rng.standard_normal((H, W)), 3)
    cls = np.zeros((H, W), np.uint8)
    cls[noise > 0.05] = 1
    cls[noise > 0.15] = 2  # class 2 inside class 1 blobs: touching objects of other classes
    cls[noise < -0.2] = 3
    return cls


def _reference(cls: np.ndarray, *, per_class: bool, connectivity: int) -> tuple[np.ndarray, int]:
    """scipy.ndimage.label on the whole map, ids class-major (as documented)."""
    st = ndi.generate_binary_structure(2, connectivity)
    if not per_class:
        ref, n = ndi.label(cls > 0, st)
        return ref, n
    ref = np.zeros(cls.shape, np.int64)
    n = 0
    for c in np.unique(cls[cls > 0]):
        lab, k = ndi.label(cls == c, st)
        ref[lab > 0] = lab[lab > 0] + n
        n += k
    return ref, n


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a bijection of ids maps a onto b (background 0 on both sides)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("per_class", [True, False])
@pytest.mark.parametrize("connectivity", [1, 2])
def test_partition_equals_whole_map_label(
    tmp_path: Path, blobs: np.ndarray, per_class: bool, connectivity: int
) -> None:
    out = tmp_path / "instances.ome.zarr"
    info = label_instances(
        _zarr(blobs), out, per_class=per_class, connectivity=connectivity, chunk=CHUNK
    )
    got = _read(out)
    ref, n = _reference(blobs, per_class=per_class, connectivity=connectivity)
    assert got.dtype == np.uint32 and got.shape == (H, W)
    assert n > 100 and info["count"] == n
    assert _same_partition(got, ref)
    # ids are consecutive, class-major and in raster order: exactly the reference ids
    np.testing.assert_array_equal(got, ref)
    if per_class:
        counts = {c: len(np.unique(ref[blobs == c])) for c in (1, 2, 3)}
        assert info["per_class_counts"] == counts
        meta = zarr.open_group(out, mode="r")["0"].attrs[META_KEY]
        for c, (lo, hi) in meta["class_ranges"].items():
            assert set(np.unique(blobs[(got >= lo) & (got <= hi)])) == {int(c)}
    else:
        assert info["per_class_counts"] == {}


def test_ids_do_not_depend_on_block_size(tmp_path: Path, blobs: np.ndarray) -> None:
    a, b = tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"
    label_instances(_zarr(blobs), a, connectivity=2, chunk=(37, 91))
    label_instances(_zarr(blobs, (128, 128)), b, connectivity=2)  # default: source chunks
    np.testing.assert_array_equal(_read(a), _read(b))


def _snake(h: int, w: int) -> np.ndarray:
    """A one-pixel-wide boustrophedon: one object that crosses every block many times."""
    m = np.zeros((h, w), bool)
    m[::2] = True
    for k, r in enumerate(range(1, h, 2)):
        m[r, w - 1 if k % 2 == 0 else 0] = True
    return m


def test_snake_spanning_many_blocks_is_one_object(tmp_path: Path) -> None:
    m = _snake(97, 131)
    assert ndi.label(m)[1] == 1
    out = tmp_path / "i.ome.zarr"
    info = label_instances(_zarr(m.astype(np.uint8), (16, 16)), out, chunk=(13, 11))
    got = _read(out)
    assert info["count"] == 1
    np.testing.assert_array_equal(got, m.astype(np.uint32))


def test_diagonal_across_a_block_corner(tmp_path: Path) -> None:
    cls = np.zeros((8, 8), np.uint8)
    cls[3, 3] = cls[4, 4] = 1  # the pixels sit in different blocks, touching at a corner
    cls[3, 4] = 2
    z = _zarr(cls, (4, 4))
    assert label_instances(z, tmp_path / "a", connectivity=1)["count"] == 3
    assert label_instances(z, tmp_path / "b", connectivity=2)["count"] == 2
    got = _read(tmp_path / "b")
    assert got[3, 3] == got[4, 4] != got[3, 4]
    assert label_instances(z, tmp_path / "c", connectivity=2, per_class=False)["count"] == 1


def test_no_foreground_gives_no_objects(tmp_path: Path) -> None:
    out = tmp_path / "i.ome.zarr"
    info = label_instances(_zarr(np.zeros((50, 70), np.uint8), (16, 16)), out)
    assert info == {"count": 0, "per_class_counts": {}}
    assert not _read(out).any()
    gj = tmp_path / "i.geojson"
    assert write_geojson(out, gj) == 0
    assert json.loads(gj.read_text()) == {"type": "FeatureCollection", "features": []}


def test_foreground_subset_and_ome_zarr_path(tmp_path: Path, blobs: np.ndarray) -> None:
    src = tmp_path / "classes.ome.zarr"
    with OmeZarrWriter(src, shape=(H, W), dtype=np.uint8, chunks=64) as w:
        w.array[:] = blobs
        w.finalize(method="nearest")
    out = tmp_path / "i.ome.zarr"
    info = label_instances(src, out, foreground=[3])
    got = _read(out)
    ref, n = ndi.label(blobs == 3)
    assert info["count"] == n and info["per_class_counts"] == {3: n}
    np.testing.assert_array_equal(got, ref)
    assert "multiscales" in zarr.open_group(out, mode="r").attrs  # a real OME-Zarr


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="2-D"):
        label_instances(np.zeros((4, 4, 3), np.uint8), tmp_path / "o")
    with pytest.raises(InputError, match="connectivity"):
        label_instances(_zarr(np.zeros((4, 4), np.uint8), (4, 4)), tmp_path / "o", connectivity=3)
    with pytest.raises(ImageNotFoundError, match="not found"):
        label_instances(tmp_path / "missing.ome.zarr", tmp_path / "o")
    with pytest.raises(InputError, match="integers"):
        label_instances(_zarr(np.zeros((4, 4), np.float32), (4, 4)), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ShapeMismatchError, match="differs"):
        write_geojson(
            _zarr(np.ones((4, 4), np.uint32), (4, 4)),
            tmp_path / "g.geojson",
            class_map=_zarr(np.ones((4, 5), np.uint8), (4, 4)),
        )
    assert not (tmp_path / "g.geojson").exists()


@pytest.mark.slow  # ~7 s; a bound, not a result: the object tests stay
def test_memory_is_bounded_by_the_block(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    big = (1024, 1536)
    z = zarr.create_array(
        store=str(tmp_path / "c.zarr"), shape=big, chunks=(128, 128), dtype=np.uint8
    )
    for y in range(0, big[0], 256):  # write blobs band by band
        noise = ndi.gaussian_filter(rng.standard_normal((256, big[1])), 2)
        z[y : y + 256] = (noise > 0.1).astype(np.uint8)
    tracemalloc.start()
    try:
        info = label_instances(z, tmp_path / "i.ome.zarr", chunk=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info["count"] > 1000
    # the whole map as uint32 would be 6 MiB (int64 provisional ids 12 MiB)
    print(f"peak traced memory {peak / 2**20:.1f} MiB")
    assert peak < big[0] * big[1] * 4 / 2, peak


# -- GeoJSON -----------------------------------------------------------------------------------
def _shoelace(ring: list[list[float]]) -> float:
    r = np.asarray(ring, float)
    return 0.5 * float(np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1]))


def _polygons(geom: dict) -> list:
    return [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]


def _rasterise(polys: list, shape: tuple[int, int], scale: float = 1) -> np.ndarray:
    """Even-odd fill at pixel centres (rays to +x cross the vertical edges)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    inside = np.zeros(shape, bool)
    for poly in polys:
        for ring in poly:
            r = np.asarray(ring, float) / scale
            for (x0, y0), (x1, y1) in itertools.pairwise(r):
                if x0 == x1:
                    lo, hi = min(y0, y1), max(y0, y1)
                    inside ^= (xx < x0) & (yy > lo) & (yy < hi)
    return inside


def _check_features(fc: dict, inst: np.ndarray, scale: float = 1, every: int = 1) -> None:
    """Areas and ring orientation of all features; exact pixel cover of every ``every``-th."""
    areas = np.bincount(inst.ravel())
    for k, ft in enumerate(fc["features"]):
        i = ft["properties"]["id"]
        polys = _polygons(ft["geometry"])
        total = 0.0
        for poly in polys:
            assert _shoelace(poly[0]) > 0 and all(_shoelace(h) < 0 for h in poly[1:])
            for ring in poly:
                assert ring[0] == ring[-1]
                assert len({tuple(v) for v in ring[:-1]}) == len(ring) - 1  # simple ring
            total += sum(_shoelace(r) for r in poly)
        assert total == areas[i] * scale**2 == ft["properties"]["area"]
        if k % every:
            continue
        ys, xs = np.nonzero(inst == i)
        y0, x0 = ys.min(), xs.min()
        crop = inst[y0 : ys.max() + 1, x0 : xs.max() + 1] == i
        shifted = [[[[x / scale - x0, y / scale - y0] for x, y in r] for r in p] for p in polys]
        np.testing.assert_array_equal(_rasterise(shifted, crop.shape), crop)


@pytest.mark.parametrize("connectivity", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_geojson_polygons_are_the_objects(
    tmp_path: Path, blobs: np.ndarray, connectivity: int
) -> None:
    out = tmp_path / "i.ome.zarr"
    info = label_instances(_zarr(blobs), out, connectivity=connectivity, chunk=CHUNK)
    gj = tmp_path / "i.geojson"
    n = write_geojson(out, gj, class_names={1: "Tumor", 2: "Stroma"})
    fc = json.loads(gj.read_text())
    assert fc["type"] == "FeatureCollection"
    assert n == len(fc["features"]) == info["count"]
    inst = _read(out)
    assert sorted(f["properties"]["id"] for f in fc["features"]) == list(range(1, n + 1))
    _check_features(fc, inst, every=3)
    for ft in fc["features"]:
        cls = blobs[inst == ft["properties"]["id"]][0]
        name = {1: "Tumor", 2: "Stroma"}.get(int(cls), f"class {cls}")
        assert ft["properties"]["classification"]["name"] == name
        assert len(ft["properties"]["classification"]["color"]) == 3
        assert ft["properties"]["objectType"] == "detection"


def test_geojson_shapes(tmp_path: Path) -> None:
    inst = np.zeros((12, 14), np.uint32)
    inst[1:6, 1:6] = 1
    inst[2:5, 2:5] = 0  # hole
    inst[3, 3] = 2  # island in the hole (another object)
    inst[7, 1] = inst[8, 2] = 3  # diagonal pieces of one (8-connected) object
    inst[7:11, 5:9] = 4
    inst[8, 6] = inst[9, 7] = 0  # hole made of two diagonal pixels
    inst[1:4, 9:12] = 5
    inst[2, 10] = 0
    inst[1, 11] = 0  # the hole touches the outside at a corner
    path = tmp_path / "inst.zarr"
    z = zarr.create_array(store=str(path), shape=inst.shape, chunks=(4, 4), dtype=np.uint32)
    z[:] = inst
    gj = tmp_path / "s.geojson"
    assert write_geojson(path, gj) == 5
    fc = json.loads(gj.read_text())
    _check_features(fc, inst)
    geoms = {f["properties"]["id"]: f["geometry"] for f in fc["features"]}
    assert geoms[1]["type"] == "Polygon" and len(geoms[1]["coordinates"]) == 2
    assert geoms[1]["coordinates"][0][:-1] == [[1, 1], [6, 1], [6, 6], [1, 6]]
    assert geoms[3]["type"] == "MultiPolygon" and len(geoms[3]["coordinates"]) == 2
    assert len(geoms[4]["coordinates"]) == 3  # outer ring and two holes touching at a corner
    assert "classification" not in fc["features"][0]["properties"]  # no class known
    # downsample scales to level-0 coordinates; min_area drops small objects
    assert write_geojson(path, gj, downsample=2, min_area=4 * 4) == 3
    fc2 = json.loads(gj.read_text())
    _check_features(fc2, np.where(np.isin(inst, [1, 4, 5]), inst, 0), scale=2)


def test_geojson_class_map_majority(tmp_path: Path, blobs: np.ndarray) -> None:
    out = tmp_path / "i.ome.zarr"
    label_instances(_zarr(blobs), out, per_class=False, chunk=CHUNK)
    inst = _read(out)
    gj = tmp_path / "i.geojson"
    write_geojson(out, gj, class_map=_zarr(blobs), class_names=["bg", "a", "b", "c"])
    for ft in json.loads(gj.read_text())["features"]:
        vals, counts = np.unique(blobs[inst == ft["properties"]["id"]], return_counts=True)
        expected = ["bg", "a", "b", "c"][vals[np.argmax(counts)]]
        assert ft["properties"]["classification"]["name"] == expected


def test_geojson_huge_object_is_traced_strided(tmp_path: Path) -> None:
    # a 200x300 object in 16x16 chunks exceeds 4 blocks: traced from a strided crop
    inst = np.zeros((210, 310), np.uint32)
    inst[5:205, 5:305] = 7
    inst[20:40, 20:40] = 0
    path = tmp_path / "inst.zarr"
    z = zarr.create_array(store=str(path), shape=inst.shape, chunks=(16, 16), dtype=np.uint32)
    z[:] = inst
    gj = tmp_path / "h.geojson"
    assert write_geojson(path, gj) == 1
    (ft,) = json.loads(gj.read_text())["features"]
    assert ft["properties"]["area"] == (inst == 7).sum()  # exact even when the outline is not
    xs = [x for x, _ in ft["geometry"]["coordinates"][0]]
    assert abs(min(xs) - 5) <= 16 and abs(max(xs) - 305) <= 16


@pytest.mark.slow  # ~10-20 s; default: test_geojson_polygons_are_the_objects, test_geo's map coordinates
def test_geojson_and_geopackage_through_a_geotransform(tmp_path: Path, blobs: np.ndarray) -> None:
    import pyogrio.raw
    import shapely

    out = tmp_path / "i.ome.zarr"
    label_instances(_zarr(blobs), out, chunk=CHUNK)
    px, geo = tmp_path / "px.geojson", tmp_path / "geo.geojson"
    n = write_geojson(out, px)
    t = (500_000.0, 10.0, 2.0, 4_600_000.0, 1.5, -10.0)  # sheared/rotated: every term counts
    assert write_geojson(out, geo, transform=t, crs="EPSG:32633", min_area=5 * 103.0) < n
    assert write_geojson(out, geo, transform=t, crs="EPSG:32633") == n
    fc_px, fc_geo = (json.loads(p.read_text())["features"] for p in (px, geo))
    for a, b in zip(fc_px, fc_geo, strict=True):
        assert a["properties"]["id"] == b["properties"]["id"]
        xy = shapely.get_coordinates(shapely.geometry.shape(a["geometry"]))
        mapped = np.c_[
            t[0] + xy[:, 0] * t[1] + xy[:, 1] * t[2], t[3] + xy[:, 0] * t[4] + xy[:, 1] * t[5]
        ]
        np.testing.assert_allclose(
            shapely.get_coordinates(shapely.geometry.shape(b["geometry"])), mapped
        )
        assert b["properties"]["area"] == a["properties"]["area"] * 103.0  # |det| = |-100 - 3|
    gpkg = tmp_path / "i.gpkg"
    assert write_geopackage(out, gpkg, transform=t, crs="EPSG:32633", batch=7) == n
    meta, _, wkb, (ids, area, cls, names) = pyogrio.raw.read(gpkg)
    assert meta["crs"] == "EPSG:32633" and len(ids) == n and sorted(ids) == list(range(1, n + 1))
    by_id = {f["properties"]["id"]: shapely.geometry.shape(f["geometry"]) for f in fc_geo}
    for i, g, a_ in zip(ids.tolist(), shapely.from_wkb(wkb), area.tolist(), strict=True):
        assert g.equals(by_id[i]) and g.area == pytest.approx(a_)
    assert set(cls.tolist()) == {1, 2, 3} and names[0] == f"class {cls[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["i.ome.zarr", "px.geojson", "geo.geojson", "i.gpkg"]
    )
    # nothing to write: an empty layer, still with its CRS
    empty = tmp_path / "e.ome.zarr"
    label_instances(_zarr(np.zeros((20, 20), np.uint8)), empty)
    assert write_geopackage(empty, tmp_path / "e.gpkg", transform=t, crs="EPSG:32633") == 0
    assert pyogrio.read_info(tmp_path / "e.gpkg")["crs"] == "EPSG:32633"
    with pytest.raises(InputError, match="transform"):
        write_geojson(out, geo, transform=(0, 1, 0, 0, 0, 0))
    with pytest.raises(InputError, match="wgs84 needs"):
        write_geojson(out, geo, transform=t, wgs84=True)
