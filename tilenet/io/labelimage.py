"""A label image made of polygons, rasterized one window at a time.

:class:`VectorLabelImage` is what :meth:`tilenet.io.vector.VectorLabels.for_image` returns:
a one-channel uint8 :class:`~tilenet.io.base.LazyImage` with the image's pyramid. A read
rasterizes, with ``rasterio.features.rasterize`` (GDAL, pixel-centre rule), only the polygons
an STRtree finds in the window, in fixed 256² blocks of a global grid through
``pixel_transform(level)``: a pixel's label is computed the same way whichever window it is
read in, and never for the whole image at once. shapely and rasterio are imported lazily.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tilenet.geometry import GeoTransform, Window
from tilenet.io.base import IGNORE_INDEX, LazyImage

__all__ = ["VectorLabelImage", "footprints"]

_BLOCK = 256  # side of the global rasterization blocks
_CACHE_BLOCKS = 64  # rasterized blocks kept per label image (64 * 64 KiB)


# -- geometry helpers ----------------------------------------------------------------------
def _affine(gt: GeoTransform) -> Any:
    """rasterio's ``Affine`` for ``gt`` (what ``rasterize`` takes)."""
    from affine import Affine

    return Affine.from_gdal(*gt.to_gdal())


def footprints(gt: GeoTransform, boxes: np.ndarray) -> Any:
    """Polygons of pixel boxes (n, 4: y, x, h, w) in reference coordinates."""
    import shapely

    y, x, h, w = (boxes[:, i].astype(np.float64) for i in range(4))
    cols = np.stack([x, x + w, x + w, x, x], axis=1)
    rows = np.stack([y, y, y + h, y + h, y], axis=1)
    return shapely.polygons(np.stack(gt(cols, rows), axis=-1))


@dataclass
class VectorLabelImage(LazyImage):
    """A label image made of polygons (:meth:`VectorLabels.for_image`); nothing is
    rasterized until a window is read, and then only that window's 256² blocks of a global
    grid. ``geoms`` are in the image's reference frame (``pixel_transform``), ``values``
    their labels; later polygons are drawn over earlier ones."""

    geoms: Any = None
    values: Any = None
    #: The label of pixels outside every polygon (:data:`IGNORE_INDEX` or 0).
    outside: int = IGNORE_INDEX
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._setup()

    def _setup(self) -> None:
        import shapely

        self.geoms = np.asarray(self.geoms if self.geoms is not None else [], dtype=object)
        self.values = np.asarray(self.values if self.values is not None else [], dtype=np.uint8)
        self._tree = shapely.STRtree(self.geoms)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: the tree is rebuilt there
        state = dict(self.__dict__)
        for k in ("_tree", "_cache", "_lock"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    @property
    def empty(self) -> bool:
        """No polygon overlaps the image (a scene to skip)."""
        return len(self.geoms) == 0

    def candidates(self, windows: Sequence[Window], level: int = 0) -> np.ndarray:
        """Which ``windows`` (pixels of ``level``) touch a polygon: a boolean array."""
        hit = np.zeros(len(windows), dtype=bool)
        if not len(windows) or self.empty:
            return hit
        boxes = np.array([(w.y, w.x, w.h, w.w) for w in windows], dtype=np.int64)
        idx = self._tree.query(
            footprints(self.pixel_transform(level), boxes), predicate="intersects"
        )
        hit[np.unique(idx[0])] = True
        return hit

    def annotated_fraction(self, window: Window, level: int = 0) -> float:
        """The share of ``window``'s pixels inside the image and inside some polygon."""
        h, w = self.levels[level].shape
        inside = window.clip(h, w)
        if not inside.area or self.empty:
            return 0.0
        return float((self._raw(inside, level) != IGNORE_INDEX).sum()) / window.area

    def _block(self, level: int, by: int, bx: int) -> np.ndarray:
        key = (level, by, bx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        from rasterio.features import rasterize

        gt = self.pixel_transform(level)
        box = np.array([[by * _BLOCK, bx * _BLOCK, _BLOCK, _BLOCK]], dtype=np.int64)
        idx = np.sort(self._tree.query(footprints(gt, box)[0], predicate="intersects"))
        if len(idx):
            out = rasterize(
                zip(self.geoms[idx], self.values[idx].tolist(), strict=True),
                out_shape=(_BLOCK, _BLOCK),
                fill=IGNORE_INDEX,
                transform=_affine(gt.shifted(by * _BLOCK, bx * _BLOCK)),
                all_touched=False,
                dtype="uint8",
            )
        else:
            out = np.full((_BLOCK, _BLOCK), IGNORE_INDEX, dtype=np.uint8)
        with self._lock:
            self._cache[key] = out
            while len(self._cache) > _CACHE_BLOCKS:
                self._cache.popitem(last=False)
        return out

    def _raw(self, window: Window, level: int) -> np.ndarray:
        """Labels of ``window`` with :data:`IGNORE_INDEX` outside every polygon."""
        out = np.full((window.h, window.w), IGNORE_INDEX, dtype=np.uint8)
        if self.empty:
            return out
        for by in range(window.y // _BLOCK, (window.y1 - 1) // _BLOCK + 1):
            for bx in range(window.x // _BLOCK, (window.x1 - 1) // _BLOCK + 1):
                blk = Window(by * _BLOCK, bx * _BLOCK, _BLOCK, _BLOCK)
                part = blk.intersect(window)
                out[part.relative_to(window).slices] = self._block(level, by, bx)[
                    part.relative_to(blk).slices
                ]
        return out

    def _read(self, window: Window, level: int) -> np.ndarray:
        out = self._raw(window, level)
        if self.outside != IGNORE_INDEX:
            out[out == IGNORE_INDEX] = self.outside
        return out
