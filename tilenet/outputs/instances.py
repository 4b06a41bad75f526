"""Instance polygons: each object of an instance map as a GeoJSON or GeoPackage feature.

The instance map comes from :func:`label_instances` (re-exported here; the out-of-core
labelling lives in :mod:`tilenet.outputs.components`). :func:`write_geojson` and
:func:`write_geopackage` outline each object with the exact pixel-edge tracer
(:func:`tilenet.outputs.polygons.trace`: the polygons cover exactly the object's pixels) and
write through :mod:`tilenet.outputs.polygons`' feature writers, block by block: memory holds
a few blocks, the statistics of the objects crossing block edges, and one batch of features.
"""

from __future__ import annotations

import bisect
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import zarr

from tilenet.errors import InputError, ShapeMismatchError
from tilenet.geometry import GeoTransform, iter_blocks
from tilenet.io.crs import to_wgs84
from tilenet.io.writers import DEFAULT_PALETTE
from tilenet.outputs.components import META_KEY, block_shape, label_instances, open_2d
from tilenet.outputs.polygons import GeoJSONStream, VectorLayer, trace

__all__ = ["META_KEY", "label_instances", "write_geojson", "write_geopackage"]

#: Namespace of the GeoJSON features' UUIDs (uuid5 of a seed and the instance id).
_UUID_NAMESPACE = uuid.UUID("6f1c4f5e-3a57-4b0c-9d7e-2b8f1a5c0e12")


def _class_names(class_names: Sequence[str] | Mapping[int, str] | None) -> dict[int, str]:
    if class_names is None:
        return {}
    if isinstance(class_names, Mapping):
        return {int(k): str(v) for k, v in class_names.items()}
    return dict(enumerate(str(v) for v in class_names))


class _Stats:
    """Bounding box, pixel count and class histogram of objects, merged over blocks."""

    def __init__(self) -> None:
        self.box: dict[int, list[int]] = {}
        self.count: dict[int, int] = {}
        self.hist: dict[int, dict[int, int]] = {}

    def add(self, i: int, box: list[int], count: int, hist: dict[int, int]) -> None:
        if i not in self.box:
            self.box[i], self.count[i], self.hist[i] = box, count, hist
            return
        b = self.box[i]
        self.box[i] = [min(b[0], box[0]), min(b[1], box[1]), max(b[2], box[2]), max(b[3], box[3])]
        self.count[i] += count
        for k, v in hist.items():
            self.hist[i][k] = self.hist[i].get(k, 0) + v


_Object = tuple[int, list[list[list[list[Any]]]], float, "int | None"]


def _objects(
    instances: Any,
    *,
    class_map: Any,
    downsample: float,
    transform: Sequence[float] | None,
    min_area: float,
) -> Iterator[_Object]:
    """Check the arguments, then return an iterator of ``(id, polygons, area, class)``.

    Coordinates are level-0 pixels (``downsample`` per instance-map pixel), or map
    coordinates through ``transform`` (the instance map's GDAL-order geotransform; areas in
    square CRS units then).
    """
    inst = open_2d(instances, "instance map")[0]
    cmap = None
    if class_map is not None:
        cmap, clabel = open_2d(class_map, "class map")
        if tuple(cmap.shape) != tuple(inst.shape):
            raise ShapeMismatchError(
                f"{clabel}: class map shape {tuple(cmap.shape)} differs from the instance map "
                f"shape {tuple(inst.shape)}"
            )
    if not downsample > 0 or not min_area >= 0:
        raise InputError(f"downsample must be > 0 and min_area >= 0, got {downsample}, {min_area}")
    affine = None if transform is None else GeoTransform.from_gdal(transform)
    ranges: dict[int, list[int]] = {}
    meta: Any = inst.attrs.get(META_KEY) if isinstance(inst, zarr.Array) else None
    if cmap is None and meta and meta.get("class_ranges"):
        ranges = {int(k): v for k, v in meta["class_ranges"].items()}
    return _iter_objects(inst, cmap, ranges, downsample, affine, min_area)


def _iter_objects(
    inst: Any,
    cmap: Any,
    ranges: dict[int, list[int]],
    downsample: float,
    affine: GeoTransform | None,
    min_area: float,
) -> Iterator[_Object]:
    range_cls = sorted(ranges, key=lambda k: ranges[k][0])
    range_lo = [ranges[k][0] for k in range_cls]
    bh, bw = block_shape(None, inst)
    H, W = (int(s) for s in inst.shape)
    max_crop = 4 * bh * bw  # what a group of objects spanning 2x2 blocks needs anyway
    if affine is None:
        area_scale = float(downsample) ** 2
    else:
        area_scale = affine.pixel_area
    # integer coordinates stay integers in the JSON
    scale: float = int(downsample) if float(downsample).is_integer() else float(downsample)

    def classify(i: int, hist: dict[int, int] | None) -> int | None:
        if hist:
            return max(hist.items(), key=lambda kv: (kv[1], -kv[0]))[0]
        if ranges:
            t = bisect.bisect_right(range_lo, i) - 1
            if t >= 0 and i <= ranges[range_cls[t]][1]:
                return range_cls[t]
        return None

    def block_stats(y0: int, y1: int, x0: int, x1: int):
        lab = np.asarray(inst[y0:y1, x0:x1])
        ids, inv = np.unique(lab, return_inverse=True)
        inv = inv.reshape(lab.shape)
        if ids[0] == 0:
            ids, inv = ids[1:], inv - 1
        counts = np.bincount(inv[inv >= 0].ravel(), minlength=ids.size)
        boxes = ndi.find_objects(inv + 1, max_label=ids.size) if ids.size else []
        hists: list[dict[int, int]] = [{} for _ in range(ids.size)]
        if cmap is not None and ids.size:
            cl = np.asarray(cmap[y0:y1, x0:x1]).astype(np.int64)
            m = inv >= 0
            nc = int(cl.max()) + 1
            up, uc = np.unique(inv[m].astype(np.int64) * nc + cl[m], return_counts=True)
            for p_, c_ in zip(up.tolist(), uc.tolist(), strict=True):
                hists[p_ // nc][p_ % nc] = c_
        return lab, ids, counts, boxes, hists

    border = _Stats()
    for blk in iter_blocks((H, W), (bh, bw)):
        y0, y1, x0, x1 = blk.y, blk.y1, blk.x, blk.x1
        lab, ids, counts, boxes, hists = block_stats(y0, y1, x0, x1)
        inside = []
        for t, i in enumerate(ids.tolist()):
            sy, sx = boxes[t]
            box = [sy.start + y0, sx.start + x0, sy.stop + y0, sx.stop + x0]
            cut = (
                (box[0] == y0 and y0 > 0)
                or (box[2] == y1 and y1 < H)
                or (box[1] == x0 and x0 > 0)
                or (box[3] == x1 and x1 < W)
            )
            if cut:
                border.add(i, box, int(counts[t]), hists[t])
            elif counts[t] * area_scale >= min_area:
                inside.append(t)
        if inside:
            keep = ids[inside]
            traced = trace(lab, keep, origin=(x0, y0), scale=scale, affine=affine)
            for (i, polys), t in zip(traced, inside, strict=True):
                yield i, polys, int(counts[t]) * area_scale, classify(i, hists[t])
    # objects crossing block edges: group those spanning at most 2x2 blocks by their
    # top-left block and trace each group from one crop
    groups: dict[tuple[int, int], list[int]] = {}
    for i in sorted(border.box):
        if border.count[i] * area_scale < min_area:
            continue
        y0, x0, y1, x1 = border.box[i]
        by, bx = y0 // bh, x0 // bw
        if y1 <= (by + 2) * bh and x1 <= (bx + 2) * bw:
            groups.setdefault((by, bx), []).append(i)
        else:
            groups.setdefault((-1 - i, 0), []).append(i)  # alone
    for members in groups.values():
        boxes_m = np.array([border.box[i] for i in members])
        y0, x0 = boxes_m[:, :2].min(axis=0)
        y1, x1 = boxes_m[:, 2:].max(axis=0)
        step = 1
        while ((y1 - y0) // step) * ((x1 - x0) // step) > max_crop:
            step *= 2
        crop = np.asarray(inst[y0:y1:step, x0:x1:step])
        traced = trace(
            crop, np.asarray(members), origin=(x0, y0), step=step, scale=scale, affine=affine
        )
        for i, polys in traced:
            yield i, polys, border.count[i] * area_scale, classify(i, border.hist[i])


def write_geojson(
    instances: Any,
    path: str | os.PathLike[str],
    *,
    class_map: Any = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    downsample: float = 1,
    min_area: float = 0,
    transform: Sequence[float] | None = None,
    crs: str | None = None,
    wgs84: bool = False,
    seed: str = "",
) -> int:
    """Write the instances as a GeoJSON FeatureCollection of polygons for QuPath; return count.

    ``instances`` is an instance map (zarr array or OME-Zarr path, e.g. from
    :func:`label_instances`); ``downsample`` is its pixel size in level-0 pixels, so the
    coordinates are level-0 pixel coordinates (x right, y down). Each object becomes one
    Feature (``objectType`` "detection") whose geometry is the exact outline of its pixels
    (Polygon, or MultiPolygon when the object's pieces only touch diagonally), with
    properties ``id``, ``area`` (level-0 pixels) and ``classification`` {"name", "color"}:
    the object's most frequent class in ``class_map`` if given, else the class recorded by
    :func:`label_instances` (``per_class=True``), else none. ``class_names`` maps class ids
    to names (default "class <id>"). Objects with ``area < min_area`` are left out. Each
    feature's ``id`` is a UUID (uuid5 of ``seed`` and the instance id), as QuPath writes.

    Georeferenced: ``transform`` (the instance map's geotransform, GDAL order) puts the
    pixel corners in map coordinates instead (``downsample`` unused; ``area`` and
    ``min_area`` in square CRS units); ``crs`` (WKT or "EPSG:n") is recorded as the
    collection's ``crs`` member (a URN where it has an EPSG code), or with ``wgs84`` the
    vertices are reprojected to longitude/latitude (RFC 7946; no ``crs`` member).

    Works block by block: objects inside one block are traced from it; objects crossing
    block edges are traced afterwards from a crop of their bounding box (grouped per
    block). An object whose box exceeds ~4 blocks is traced from a strided crop, i.e. its
    outline is approximate at that stride (its area is still exact). Features come in that
    order (block by block), not in id order. Written to a temporary name, then renamed.
    """
    if (crs is not None or wgs84) and transform is None:
        raise InputError("crs and wgs84 need the instance map's transform")
    if wgs84 and not crs:
        raise InputError("wgs84 needs the CRS to reproject from")
    objects = _objects(
        instances,
        class_map=class_map,
        downsample=downsample,
        transform=transform,
        min_area=min_area,
    )
    names = _class_names(class_names)
    palette = DEFAULT_PALETTE.tolist()
    project = _to_wgs84(crs) if wgs84 and crs else None

    def feature(i: int, coords: list[Any], area: float, cls: int | None) -> dict[str, Any]:
        if project is not None:
            coords = project(coords)
        geom = (
            {"type": "Polygon", "coordinates": coords[0]}
            if len(coords) == 1
            else {"type": "MultiPolygon", "coordinates": coords}
        )
        props: dict[str, Any] = {"objectType": "detection", "id": i, "area": area}
        if cls is not None:
            colour = palette[cls % len(palette)]
            props["classification"] = {"name": names.get(cls, f"class {cls}"), "color": colour}
        # QuPath (0.4+) reads a feature's "id" as the object's UUID.
        fid = str(uuid.uuid5(_UUID_NAMESPACE, f"{seed}:instances:{i}"))
        return {"type": "Feature", "id": fid, "geometry": geom, "properties": props}

    with GeoJSONStream(path, crs=None if wgs84 else crs) as out:
        for i, polys, area, cls in objects:
            out.write(feature(i, polys, area, cls))
    return out.count


def _to_wgs84(crs: str) -> Any:
    """A function reprojecting nested polygon coordinates from ``crs`` to lon/lat."""
    to_lonlat = to_wgs84(crs)

    def project(polys: list[Any]) -> list[Any]:
        flat = [pt for poly in polys for ring in poly for pt in ring]
        it = iter(to_lonlat(np.asarray(flat, dtype=np.float64).reshape(-1, 2)).tolist())
        return [[[next(it) for _ in ring] for ring in poly] for poly in polys]

    return project


def write_geopackage(
    instances: Any,
    path: str | os.PathLike[str],
    *,
    transform: Sequence[float],
    crs: str | None,
    class_map: Any = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    min_area: float = 0,
    layer: str = "instances",
    batch: int = 4096,
) -> int:
    """Write the instances as a GeoPackage layer of polygons in ``crs`` (WKT or "EPSG:n"; None:
    unknown); return the count.

    Geometries are as in :func:`write_geojson` with ``transform`` (map coordinates; every
    feature a MultiPolygon), with fields ``id``, ``area`` (square CRS units), ``class``
    (-1: none) and ``class_name``. Written ``batch`` features at a time through pyogrio
    (memory bounded by the batch and the blocks read), to a temporary name, then renamed.
    """
    import shapely

    objects = _objects(
        instances, class_map=class_map, downsample=1, transform=transform, min_area=min_area
    )
    names = _class_names(class_names)
    fields = [("id", np.int64), ("area", np.float64), ("class", np.int32), ("class_name", object)]
    with VectorLayer(
        path,
        layer=layer,
        fields=fields,
        geometry_type="MultiPolygon",
        crs=crs,
        driver="GPKG",
        batch=batch,
    ) as out:
        for i, polys, area, c in objects:
            cls = -1 if c is None else c
            geom = shapely.MultiPolygon([(p[0], p[1:]) for p in polys])
            out.add(geom, i, area, cls, names.get(cls, f"class {cls}") if cls >= 0 else "")
    return out.count
