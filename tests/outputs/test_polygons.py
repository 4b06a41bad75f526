"""outputs.polygons: the tracer, GDAL's polygonizer, and the GeoJSON / vector layer writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely

from tilenet.errors import InputError
from tilenet.geometry import GeoTransform
from tilenet.outputs.polygons import GeoJSONStream, VectorLayer, polygonize, trace


def _labels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random((24, 31)) < 0.45
    return (mask * rng.integers(1, 4, (24, 31))).astype(np.int32)


@pytest.mark.parametrize("seed", range(4))
def test_trace_and_polygonize_outline_the_same_pixels(seed: int) -> None:
    import scipy.ndimage as ndi

    classes = _labels(seed)
    ids = np.zeros(classes.shape, np.int64)
    n = 0
    for c in (1, 2, 3):  # 4-connected regions of each class: the objects both outline
        lab, k = ndi.label(classes == c)
        ids[lab > 0] = lab[lab > 0] + n
        n += k
    traced = {
        i: shapely.MultiPolygon([(p[0], p[1:]) for p in polys])
        for i, polys in trace(ids, np.arange(1, n + 1))
    }
    assert sorted(traced) == list(range(1, n + 1))
    for i, geom in traced.items():
        assert geom.is_valid and geom.area == (ids == i).sum()
    gdal = list(polygonize(classes, classes > 0, (0, 0)))
    assert len(gdal) == n
    for c, poly in gdal:
        i = int(ids[int(poly.representative_point().y), int(poly.representative_point().x)])
        assert c == classes[ids == i][0] and poly.equals(traced[i])


def test_trace_maps_corners_through_a_geotransform() -> None:
    gt = GeoTransform(500000.0, 10.0, 0.0, 4e6, 0.0, -10.0)
    [(i, polys)] = list(trace(np.array([[0, 7], [0, 7]]), np.array([7]), affine=gt))
    assert i == 7 and sorted(map(tuple, polys[0][0][:-1])) == sorted(
        [gt(1, 0), gt(2, 0), gt(2, 2), gt(1, 2)]
    )


def test_geojson_stream_writes_a_collection_and_nothing_on_error(tmp_path: Path) -> None:
    out = tmp_path / "f.geojson"
    with GeoJSONStream(out, crs="EPSG:32632") as s:
        for i in range(3):
            s.write({"type": "Feature", "id": i, "geometry": None, "properties": {}})
    doc = json.loads(out.read_text())
    assert [f["id"] for f in doc["features"]] == [0, 1, 2] and s.count == 3
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32632"
    with pytest.raises(RuntimeError), GeoJSONStream(tmp_path / "g.geojson") as s:
        s.write({"type": "Feature", "geometry": None, "properties": {}})
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.geojson"]


def test_vector_layer_writes_in_batches_and_cleans_up(tmp_path: Path) -> None:
    fields = [("n", np.int64), ("name", object)]
    with VectorLayer(
        tmp_path / "v.gpkg",
        layer="x",
        fields=fields,
        geometry_type="Polygon",
        crs="EPSG:4326",
        batch=2,
    ) as v:
        for k in range(5):
            v.add(shapely.box(k, 0, k + 1, 1), k, f"n{k}")
    _, _, wkb, (n, name) = pyogrio.raw.read(tmp_path / "v.gpkg", layer="x")
    assert n.tolist() == [0, 1, 2, 3, 4] and name.tolist()[-1] == "n4"
    assert shapely.from_wkb(wkb[4]).equals(shapely.box(4, 0, 5, 1))
    with VectorLayer(
        tmp_path / "e.fgb", layer="x", fields=fields, geometry_type="Polygon", crs="EPSG:4326"
    ):
        pass
    assert len(pyogrio.raw.read(tmp_path / "e.fgb")[2]) == 0  # an empty layer, still a file
    with (
        pytest.raises(RuntimeError),
        VectorLayer(
            tmp_path / "w.gpkg",
            layer="x",
            fields=fields,
            geometry_type="Polygon",
            crs="EPSG:4326",
            batch=1,
        ) as v,
    ):
        v.add(shapely.box(0, 0, 1, 1), 1, "a")
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.fgb", "v.gpkg"]
    with pytest.raises(InputError, match=r"x\.shp: vector output must end in \.gpkg or \.fgb"):
        VectorLayer(
            tmp_path / "x.shp", layer="x", fields=fields, geometry_type="Polygon", crs="EPSG:4326"
        )
