"""Class regions: the connected pixels of each class of a class map as polygons, out of core.

:func:`iter_regions` polygonizes a (H, W) class map block by block with GDAL's polygonizer
(:func:`tilenet.outputs.polygons.polygonize`, 4-connected, so a region is what
:func:`tilenet.outputs.instances.label_instances` calls one object of a class). A piece that
touches no block seam is a whole region and is yielded at once; pieces touching a seam are
kept (in exact integer pixel coordinates) and, once every block is read, merged per class
and per group of touching pieces with ``shapely.unary_union``, which joins the pieces sharing
seam edges and keeps holes; merged regions come top to bottom, then left to right.
By design memory scales with the vector output (the outlines of the regions crossing seams),
not with the image: the class map is read one block at a time and never held whole, and
GEOS's overlay only ever holds one group of pieces (one union of every seam piece of a class
peaked at +232 MB over a 40000² class map; see docs/benchmarks.md, "Peak RSS on a 40000²
GeoTIFF").

:func:`write_class_regions` writes the regions once polygonized, in one pass:

* ``classes.geojson``: a GeoJSON FeatureCollection of QuPath annotations (``objectType``
  "annotation", ``classification`` {"name", "color": [r, g, b]}, a UUID ``id`` per feature,
  as QuPath writes them). Coordinates go through ``transform``: for a slide or plain image
  the pixel transform to the file's level-0 pixels (QuPath's coordinates), for a
  georeferenced image to its CRS (named in the collection's ``crs`` member) or, with
  ``wgs84``, reprojected to longitude/latitude per RFC 7946 (exterior rings
  counter-clockwise, no ``crs`` member);
* optionally a GeoPackage or FlatGeobuf layer (pyogrio) of the same polygons in ``crs``.

Both through the feature writers of :mod:`tilenet.outputs.polygons`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilenet.errors import InputError
from tilenet.geometry import GeoTransform, iter_blocks
from tilenet.io.crs import to_wgs84
from tilenet.io.writers import DEFAULT_PALETTE
from tilenet.outputs.polygons import GeoJSONStream, VectorLayer, polygonize

__all__ = ["REGION_BLOCK", "Region", "iter_regions", "write_class_regions"]

#: Side of the blocks polygonized at a time (a multiple of the COG block of ``classes.tif``).
REGION_BLOCK = 2048
#: Namespace of the features' UUIDs (uuid5 of a seed and the feature number).
_NAMESPACE = uuid.UUID("6f1c4f5e-3a57-4b0c-9d7e-2b8f1a5c0e11")


@dataclass(frozen=True)
class Region:
    """One connected region of one class, in pixel coordinates of the class map."""

    cls: int
    #: A shapely Polygon (holes kept) in the class map's pixel coordinates (x right, y down).
    polygon: Any
    #: Its area in class-map pixels (exact: the outline follows pixel edges).
    pixels: int


class _RasterBand:
    """Band 1 of a raster GDAL reads, as a 2-D array-like read window by window."""

    def __init__(self, path: Path) -> None:
        import rasterio

        self._ds = rasterio.open(path)
        self.shape = (int(self._ds.height), int(self._ds.width))
        self.dtype = np.dtype(self._ds.dtypes[0])

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        from rasterio.windows import Window

        ys, xs = key
        return self._ds.read(
            1, window=Window(xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start)
        )

    def close(self) -> None:
        self._ds.close()


def iter_regions(
    classes: Any,
    *,
    skip: Sequence[int] = (0,),
    block: int = REGION_BLOCK,
) -> Iterator[Region]:
    """The connected regions of every class of ``classes`` but ``skip`` (background, nodata).

    ``classes`` is a 2-D integer array-like sliced ``[y0:y1, x0:x1]`` (a zarr array). Regions
    inside one block come block by block; regions crossing block seams come last, class by
    class. The union of the regions of a class is exactly its pixels.

    >>> a = np.array([[1, 1, 0], [0, 1, 2], [0, 0, 2]], np.uint8)
    >>> [(r.cls, r.pixels) for r in iter_regions(a, block=2)]
    [(1, 3), (2, 2)]
    """
    if len(classes.shape) != 2:
        raise InputError(f"a class map must be 2-D (H, W), got shape {tuple(classes.shape)}")
    h, w = (int(s) for s in classes.shape)
    skip_values = [int(v) for v in skip]
    seams: dict[int, list[Any]] = {}
    for win in iter_blocks((h, w), block):
        data = np.asarray(classes[win.slices])
        if data.dtype not in (np.uint8, np.uint16, np.int16, np.int32, np.float32):
            data = data.astype(np.int32)
        # Not np.isin: its lookup table indexes with intp copies of the block (8 bytes a pixel).
        mask = np.ones(data.shape, bool)
        for v in skip_values:
            mask &= data != v
        if not mask.any():
            continue
        edges = (win.x if win.x > 0 else None, win.x1 if win.x1 < w else None)
        rows = (win.y if win.y > 0 else None, win.y1 if win.y1 < h else None)
        for c, poly in polygonize(data, mask, (win.x, win.y)):
            x0, y0, x1, y1 = poly.bounds
            if x0 == edges[0] or x1 == edges[1] or y0 == rows[0] or y1 == rows[1]:
                seams.setdefault(c, []).append(poly)
            else:
                yield Region(c, poly, round(poly.area))
    for c in sorted(seams):
        for poly in _merge_seam_pieces(seams.pop(c)):
            yield Region(c, poly, round(poly.area))


def _merge_seam_pieces(pieces: list[Any]) -> list[Any]:
    """The regions the pieces of one class form, top to bottom then left to right.

    Only pieces that touch can merge, so each group of touching pieces is unioned on its own:
    one ``unary_union`` of all of a class's pieces held GEOS's overlay graph of every piece
    at once (measured: +232 MB and 5.1 s for the 960 pieces of a 40000² class map, against
    +11 MB and 0.4 s by groups). Same regions, in a defined order.
    """
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    geoms = np.asarray(pieces, dtype=object)
    i, j = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    n = len(geoms)
    _, group = connected_components(coo_matrix((np.ones(len(i), bool), (i, j)), shape=(n, n)))
    order = np.argsort(group, kind="stable")
    merged: list[Any] = []
    for members in np.split(order, np.flatnonzero(np.diff(group[order])) + 1):
        merged.extend(shapely.get_parts(shapely.unary_union(geoms[members])))
    return sorted(merged, key=lambda p: (p.bounds[1], p.bounds[0]))


def _to_reference(gt: GeoTransform) -> Callable[[Any], Any]:
    """Pixel polygon -> reference coordinates through ``gt``."""
    import shapely.affinity

    if gt.is_identity:
        return lambda p: p
    matrix = [gt.dx, gt.rx, gt.ry, gt.dy, gt.x0, gt.y0]  # shapely's order
    return lambda p: shapely.affinity.affine_transform(p, matrix)


def _to_wgs84(crs: str) -> Callable[[Any], Any]:
    import shapely

    project = to_wgs84(crs)
    return lambda poly: shapely.transform(poly, project)


def _coords(poly: Any, integral: bool) -> list[Any]:
    rings = [poly.exterior, *poly.interiors]
    if integral:
        return [np.rint(np.asarray(r.coords)).astype(np.int64).tolist() for r in rings]
    return [np.asarray(r.coords).tolist() for r in rings]


def write_class_regions(
    classes: Any,
    geojson: str | os.PathLike[str],
    *,
    transform: Sequence[float],
    class_names: Sequence[str],
    skip: Sequence[int] = (0,),
    crs: str | None = None,
    wgs84: bool = False,
    vector: str | os.PathLike[str] | None = None,
    seed: str = "",
    block: int = REGION_BLOCK,
    batch: int = 4096,
) -> dict[str, Any]:
    """Polygonize ``classes`` (:func:`iter_regions`) into ``geojson`` and ``vector``; summarise.

    ``classes`` is a 2-D array-like or the path of a single-band raster GDAL reads (read
    window by window; e.g. ``classes.tif``, whose nodata value then belongs in ``skip``).
    ``transform`` (GDAL order) maps class-map pixels to reference coordinates: use the
    image's ``pixel_transform(level)``. ``crs`` (WKT or "EPSG:n") is the CRS of those
    coordinates for a georeferenced image (None: pixels, QuPath's frame). ``wgs84``
    reprojects the GeoJSON to longitude/latitude (RFC 7946). ``vector`` (``.gpkg`` or
    ``.fgb``) also writes the polygons in ``crs`` with fields ``class``, ``class_name``,
    ``area`` (reference units²) and ``pixels``. Feature UUIDs are uuid5 of ``seed`` and the
    feature's number, so a rerun writes the same file. Each file is written under a
    temporary name and renamed into place when complete.

    Returns ``{"count": {name: regions}, "area": {name: reference units²}}`` for the classes
    with at least one region.
    """
    if wgs84 and not crs:
        raise InputError("wgs84 needs the CRS to reproject from")
    features = _Features(GeoTransform.from_gdal(transform), class_names, crs, wgs84, seed)
    source: Any = classes
    opened = None
    if isinstance(classes, (str, os.PathLike)):
        source = opened = _RasterBand(Path(classes))
    try:
        layer = None
        if vector is not None:
            layer = VectorLayer(
                vector,
                layer="classes",
                fields=_FIELDS,
                geometry_type="Polygon",
                crs=crs,
                batch=batch,
            )
        with contextlib.ExitStack() as stack:
            if layer is not None:
                stack.callback(layer.discard)  # a no-op once the layer is in place
            with GeoJSONStream(geojson, crs=None if wgs84 else crs) as out:
                for region in iter_regions(source, skip=skip, block=block):
                    ref = features.to_ref(region.polygon)
                    out.write(features.feature(region, ref, out.count))
                    if layer is not None:
                        layer.add(ref, *features.row(region))
            if layer is not None:
                layer.close()
    finally:
        if opened is not None:
            opened.close()
    return {"count": features.count, "area": features.area}


#: The fields of the vector layer of class regions.
_FIELDS = [("class", np.int32), ("class_name", object), ("area", np.float64), ("pixels", np.int64)]


class _Features:
    """Class regions as features: reference coordinates, GeoJSON features, layer rows, and the
    count and area per class name of those made."""

    def __init__(
        self,
        gt: GeoTransform,
        class_names: Sequence[str],
        crs: str | None,
        wgs84: bool,
        seed: str,
    ) -> None:
        self.to_ref = _to_reference(gt)
        self.integral = crs is None and all(v.is_integer() for v in gt)
        self.project = _to_wgs84(crs) if wgs84 and crs else None
        self.px_area = gt.pixel_area
        self.palette = DEFAULT_PALETTE.tolist()
        self.names = [str(n) for n in class_names]
        self.seed = seed
        self.count: dict[str, int] = {}
        self.area: dict[str, float] = {}

    def name(self, c: int) -> str:
        return self.names[c] if 0 <= c < len(self.names) else f"class {c}"

    def feature(self, region: Region, ref: Any, number: int) -> dict[str, Any]:
        """The GeoJSON feature of ``region`` (``ref``: its polygon in reference coordinates),
        the ``number``-th written; counted."""
        import shapely

        c, name = region.cls, self.name(region.cls)
        out = shapely.orient_polygons(self.project(ref)) if self.project is not None else ref
        props = {
            "objectType": "annotation",
            "classification": {"name": name, "color": self.palette[c % len(self.palette)]},
            "class": c,
            "area": region.pixels * self.px_area,
            "pixels": region.pixels,
        }
        self.count[name] = self.count.get(name, 0) + 1
        self.area[name] = self.area.get(name, 0.0) + region.pixels * self.px_area
        return {
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{self.seed}:classes:{number}")),
            "geometry": {"type": "Polygon", "coordinates": _coords(out, self.integral)},
            "properties": props,
        }

    def row(self, region: Region) -> tuple[int, str, float, int]:
        """The vector layer's values (:data:`_FIELDS`) of ``region``."""
        c = region.cls
        return (c, self.name(c), region.pixels * self.px_area, region.pixels)
