"""Polygons from label maps, and the feature files they are written to.

Tracing: :func:`trace` outlines objects of a label map by exact pixel-edge tracing (no
contour library is a dependency): every pixel side between an object and something else is
a directed edge, edges are linked at their end vertices (vectorised, with a fixed rule where
an object holds two diagonal pixels) and cut into rings by list ranking; only corner vertices
are kept. The polygons therefore cover exactly the object's pixels (shoelace area = pixel
count). :func:`polygonize` is GDAL's polygonizer over one block of a class map (what the
class regions use; it gives the same regions as :func:`trace`, its own vertex order).

Writing: :class:`GeoJSONStream` writes a FeatureCollection one feature at a time and
:class:`VectorLayer` a GeoPackage or FlatGeobuf layer in batches (pyogrio); each writes under
a temporary name and renames it into place when complete, so memory holds one batch, never
the collection. The instance polygons and the class regions write through them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tilenet.errors import InputError
from tilenet.fsutil import atomic_output, remove_path
from tilenet.geometry import GeoTransform
from tilenet.io.crs import ogc_name

__all__ = ["VECTOR_DRIVERS", "GeoJSONStream", "VectorLayer", "mask_polygons", "polygonize", "trace"]

#: Vector layer formats by file suffix.
VECTOR_DRIVERS = {".gpkg": "GPKG", ".fgb": "FlatGeobuf"}


# -- tracing -----------------------------------------------------------------------------------
# Directed pixel edges: 0 = +x (top side of a pixel), 1 = +y (right), 2 = -x (bottom),
# 3 = -y (left). Walking them keeps the object on the right in image (y-down) coordinates, so
# an outer ring has a positive shoelace area and a hole a negative one.
_DX = np.array([1, 0, -1, 0], np.int64)
_DY = np.array([0, 1, 0, -1], np.int64)


def _owners(pad: np.ndarray) -> np.ndarray:
    """Edge-connected (4-) components of equal non-zero values: 1.. per component, 0 = none."""
    idx = np.arange(pad.size, dtype=np.int64).reshape(pad.shape)
    src, dst = [], []
    for a, b, ia, ib in (
        (pad[:, :-1], pad[:, 1:], idx[:, :-1], idx[:, 1:]),
        (pad[:-1], pad[1:], idx[:-1], idx[1:]),
    ):
        m = (a == b) & (a > 0)
        src.append(ia[m])
        dst.append(ib[m])
    s, d = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(s.size, np.int8), (s, d)), shape=(pad.size, pad.size))
    _, comp = connected_components(graph, directed=False)
    fgm = pad.ravel() > 0
    # renumber so that background is 0 and components are 1..n
    _, inv = np.unique(comp[fgm], return_inverse=True)
    out = np.zeros(pad.size, np.int64)
    out[fgm] = inv + 1
    return out.reshape(pad.shape)


def trace(
    labels: np.ndarray,
    keep: np.ndarray,
    *,
    origin: tuple[int, int] = (0, 0),
    step: int = 1,
    scale: float = 1,
    affine: GeoTransform | None = None,
) -> Iterator[tuple[int, list[list[list[list[Any]]]]]]:
    """Exact pixel-edge polygons of the objects ``keep`` (sorted ids) in ``labels``.

    Yields ``(id, polygons)`` in id order; each polygon is a list of closed rings of [x, y]
    vertices (corners only), the outer ring first, then its holes. Pixel (r, c) of
    ``labels`` covers x in ``origin[0] + c * step + [0, step]`` (same for y), and every
    coordinate is multiplied by ``scale``, or with ``affine`` pixel corner (x, y) goes to map
    coordinates instead. An
    object is one polygon per edge-connected piece: pieces that only touch diagonally (8-
    connected objects) are separate polygons meeting at a corner, and a hole that touches
    its outer ring diagonally touches it at one vertex, so the rings are simple (valid OGC).
    """
    pad = np.pad(np.where(np.isin(labels, keep), labels, 0), 1)
    if not pad.any():
        return
    own = _owners(pad)
    # each owner's object id
    flat_own, flat_lab = own.ravel(), pad.ravel()
    owner_id = np.zeros(int(own.max()) + 1, np.int64)
    owner_id[flat_own] = flat_lab
    sx, sy, dr, ow, ex, ey, nxt = _edges(own)
    n = nxt.size
    graph = coo_matrix((np.ones(n, np.int8), (np.arange(n), nxt)), shape=(n, n))
    nrings, ring = connected_components(graph, directed=True, connection="weak")
    # order each ring from its lowest edge: list ranking by pointer doubling (log n steps)
    first = _group_min(ring, np.arange(n, dtype=np.int64), nrings)
    succ = np.where(nxt == first[ring], -1, nxt)
    dist = (succ >= 0).astype(np.int64)
    p = succ
    while (p >= 0).any():
        act = p >= 0
        safe = np.where(act, p, 0)
        dist = dist + np.where(act, dist[safe], 0)
        p = np.where(act, p[safe], -1)
    seq = np.lexsort((-dist, ring))
    ring_s, dir_s = ring[seq], dr[seq]
    bounds = np.flatnonzero(np.diff(ring_s)) + 1
    ring_start = np.concatenate([[0], bounds])
    prev = np.arange(n) - 1
    prev[ring_start] = np.concatenate([bounds, [n]]) - 1  # first edge's predecessor: the last
    corner = dir_s != dir_s[prev]
    area2 = np.bincount(ring, weights=sx * ey - ex * sy, minlength=nrings)
    ring_owner = ow[first]
    ring_id = owner_id[ring_owner]
    cs = np.flatnonzero(corner)
    cut = np.searchsorted(ring_s[cs], np.arange(nrings + 1)).tolist()
    # level coordinates, undoing the padding; converted to Python numbers once
    vx = (sx[seq][cs] - 1) * step + origin[0]
    vy = (sy[seq][cs] - 1) * step + origin[1]
    if affine is None:
        pts = (np.stack([vx, vy], axis=1) * scale).tolist()
    else:
        pts = np.stack(affine(vx, vy), axis=1).tolist()
    order = np.lexsort((-area2, ring_owner, ring_id)).tolist()  # per owner: outer ring first
    yield from _group(pts, cut, order, ring_id.tolist(), ring_owner.tolist())


def _edges(own: np.ndarray) -> tuple[np.ndarray, ...]:
    """The directed boundary edges of the owners in ``own`` (padded), sorted by start vertex
    and direction: start (x, y), direction, owner, end (x, y), and each edge's successor."""
    w = own.shape[1]
    starts_x, starts_y, dirs, owner = [], [], [], []
    inner = own[1:-1, 1:-1]
    neighbours = (own[:-2, 1:-1], own[1:-1, 2:], own[2:, 1:-1], own[1:-1, :-2])
    offsets = ((0, 0), (1, 0), (1, 1), (0, 1))  # edge start relative to the pixel's corner
    for d, (nb, (ox, oy)) in enumerate(zip(neighbours, offsets, strict=True)):
        m = (inner > 0) & (nb != inner)
        r, c = np.nonzero(m)
        starts_x.append(c + (ox + 1))
        starts_y.append(r + (oy + 1))
        dirs.append(np.full(r.size, d, np.int64))
        owner.append(inner[r, c])
    sx, sy = np.concatenate(starts_x), np.concatenate(starts_y)
    dr, ow = np.concatenate(dirs), np.concatenate(owner)
    stride = w + 1
    key = (sy * stride + sx) * 4 + dr
    order = np.argsort(key)
    sx, sy, dr, ow, key = sx[order], sy[order], dr[order], ow[order], key[order]
    n = key.size
    ex, ey = sx + _DX[dr], sy + _DY[dr]
    nxt = np.full(n, -1, np.int64)
    # At a vertex an owner has one outgoing edge, or two where it holds two diagonal pixels:
    # then turn so that the two pixels join (preference: that turn, straight on, other turn).
    for turn in (3, 0, 1):
        todo = nxt < 0
        cand = (ey * stride + ex) * 4 + (dr + turn) % 4
        pos = np.minimum(np.searchsorted(key, cand), n - 1)
        ok = todo & (key[pos] == cand) & (ow[pos] == ow)
        nxt[ok] = pos[ok]
    assert (nxt >= 0).all(), "pixel boundary is not closed"
    return sx, sy, dr, ow, ex, ey, nxt


def _group(
    pts: list[Any], cut: list[int], order: list[int], ids: list[int], owners: list[int]
) -> Iterator[tuple[int, list[list[list[list[Any]]]]]]:
    """Rings (``pts[cut[r]:cut[r + 1]]``, taken in ``order``) closed and grouped into one
    list of polygons per object id."""
    polys: list[list[list[list[Any]]]] = []
    cur_id = cur_owner = -1
    for rid in order:
        ring = pts[cut[rid] : cut[rid + 1]]
        ring.append(ring[0])
        if ids[rid] != cur_id:
            if polys:
                yield cur_id, polys
            polys, cur_id, cur_owner = [], ids[rid], -1
        if owners[rid] != cur_owner:
            polys.append([ring])
            cur_owner = owners[rid]
        else:
            polys[-1].append(ring)
    if polys:
        yield cur_id, polys


def _group_min(groups: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    res = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(res, groups, values)
    return res


def mask_polygons(
    mask: np.ndarray, scale: tuple[float, float], shape: tuple[int, int]
) -> Iterator[list[list[list[Any]]]]:
    """The pieces of a low-resolution boolean ``mask`` as polygons in level-0 pixels, as
    :func:`trace` gives them (one per edge-connected piece; the outline, then its holes).

    Mask pixel (r, c) covers level-0 ``[r * scale[0], (r + 1) * scale[0])`` x ``[c *
    scale[1], (c + 1) * scale[1])`` (a :class:`tilenet.tissue.TissueMask`); rings end at the
    image's level-0 ``shape`` (H, W) where the last mask row or column reaches past it.
    """
    sy, sx = scale
    h, w = shape
    to_level0 = GeoTransform(0.0, float(sx), 0.0, 0.0, 0.0, float(sy))
    for _, polygons in trace(np.asarray(mask).astype(np.uint8), np.array([1]), affine=to_level0):
        for poly in polygons:
            yield [[[min(x, w), min(y, h)] for x, y in ring] for ring in poly]


def polygonize(
    block: np.ndarray, mask: np.ndarray, origin: tuple[int, int]
) -> Iterator[tuple[int, Any]]:
    """GDAL's polygonizer (4-connected) over ``block`` where ``mask``: ``(value, polygon)``
    per region, a shapely Polygon in pixel coordinates of the whole map (the block's corner
    at ``origin`` = (x, y)), holes kept, corner vertices only.

    >>> b = np.array([[1, 1], [0, 1]], np.uint8)
    >>> [(v, p.area) for v, p in polygonize(b, b > 0, (10, 0))]
    [(1, 3.0)]
    """
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    at = Affine.translation(*origin)
    for geom, value in shapes(block, mask=mask, connectivity=4, transform=at):
        # GDAL puts a vertex at every pixel step; keep only the corners (exact: tolerance
        # 0 drops collinear vertices), which is what bounds the seam union's memory.
        yield int(value), shapely.simplify(shapely.geometry.shape(geom), 0.0)


# -- writing -----------------------------------------------------------------------------------
class GeoJSONStream:
    """A GeoJSON FeatureCollection at ``path``, written one feature at a time::

        with GeoJSONStream(path, crs=crs) as out:
            out.write({"type": "Feature", ...})

    ``crs`` (WKT or "EPSG:n"; None: none, as RFC 7946 wants for longitude/latitude) is named
    in the collection's ``crs`` member. Written to a temporary name, renamed when the block
    ends without an error.
    """

    def __init__(self, path: str | os.PathLike[str], *, crs: str | None = None) -> None:
        self.path = Path(path)
        self.head: dict[str, Any] = {"type": "FeatureCollection"}
        if crs:
            self.head["crs"] = {"type": "name", "properties": {"name": ogc_name(crs)}}
        self.count = 0
        self._stack = contextlib.ExitStack()
        self._file: TextIO | None = None

    def __enter__(self) -> GeoJSONStream:
        with self._stack as stack:
            tmp = stack.enter_context(atomic_output(self.path))
            self._file = stack.enter_context(open(tmp, "w", encoding="utf-8"))
            self._file.write(json.dumps(self.head)[:-1] + ', "features": [\n')
            self._stack = stack.pop_all()
        return self

    def write(self, feature: dict[str, Any]) -> None:
        """Append one feature (a GeoJSON Feature as a dict)."""
        assert self._file is not None, "write inside the with block"
        self._file.write((",\n" if self.count else "") + json.dumps(feature))
        self.count += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if kind is None and self._file is not None:
            self._file.write("\n]}\n")
        return self._stack.__exit__(kind, exc, tb)


class VectorLayer:
    """A GeoPackage or FlatGeobuf layer at ``path``, written ``batch`` features at a time.

    ``fields`` are (name, dtype) pairs; :meth:`add` takes a shapely geometry and one value per
    field. The file is built under a temporary name (the drivers want their own extension on
    it) and renamed into place by :meth:`close`; :meth:`discard` drops it. As a context
    manager: closed on success, discarded on an error. An empty layer is still written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layer: str,
        fields: Sequence[tuple[str, Any]],
        geometry_type: str,
        crs: str | None,
        driver: str | None = None,
        batch: int = 4096,
    ) -> None:
        self.path = Path(path)
        drv = driver or VECTOR_DRIVERS.get(self.path.suffix.lower())
        if drv is None:
            raise InputError(
                f"{self.path}: vector output must end in {' or '.join(VECTOR_DRIVERS)}"
            )
        self.driver, self.layer, self.fields = drv, layer, list(fields)
        self.geometry_type, self.crs, self.batch = geometry_type, crs, batch
        self.count = 0
        self._rows: list[tuple[Any, ...]] = []
        self._flushed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial-{os.getpid()}{self.path.suffix}")
        remove_path(self.tmp)

    def add(self, geom: Any, *values: Any) -> None:
        """Queue one feature; a full batch is written."""
        self._rows.append((geom, *values))
        self.count += 1
        if len(self._rows) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        import pyogrio.raw
        import shapely

        rows = self._rows
        data = [
            np.array([r[k + 1] for r in rows], dtype) for k, (_, dtype) in enumerate(self.fields)
        ]
        pyogrio.raw.write(
            str(self.tmp),
            shapely.to_wkb(np.array([r[0] for r in rows], dtype=object)),
            data,
            [name for name, _ in self.fields],
            layer=self.layer,
            driver=self.driver,
            geometry_type=self.geometry_type,
            crs=self.crs,
            append=self._flushed,
        )
        self._flushed = True
        rows.clear()

    def close(self) -> None:
        """Write what is queued (or the empty layer) and rename the file into place."""
        if self._rows or not self.count:
            self._flush()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Drop the partial file."""
        remove_path(self.tmp)

    def __enter__(self) -> VectorLayer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            try:
                self.close()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()
