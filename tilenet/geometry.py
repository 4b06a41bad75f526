"""Pure tile geometry: windows, grids, halos, stride alignment, pyramid levels.

No IO and no torch here. The tiler, the training sampler and the inference engine all cut
images with :class:`TileGrid`, so training patches and inference tiles are cut the same way.

Vocabulary
----------
*core*
    The region of the image a tile owns in the output. Cores partition the image exactly.
*halo*
    Extra context read around the core on every side (the model's receptive field in
    inference, half the overlap in the tiler).
*read window*
    core grown by the halo, then moved to respect the edge policy. This is what is read
    from the image and fed to the model.
*geotransform*
    The affine map from pixel (col, row) of one level to reference coordinates (a CRS's, or
    the file's level-0 pixels): :class:`GeoTransform`, in GDAL's order.
*extent*
    The image size rounded up to a multiple of ``align``. With ``align`` = the model's total
    stride, a model accepts any window of the extent whose origin and size are multiples of
    ``align``; the (at most ``align - 1``) rows and columns past the image are zero-filled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from tilenet.errors import InputError

__all__ = [
    "EdgePolicy",
    "GeoTransform",
    "Tile",
    "TileGrid",
    "Window",
    "ceil_to",
    "coerce_pair",
    "iter_bands",
    "iter_blocks",
    "spans",
]

EdgePolicy = Literal["clamp", "pad"]


def ceil_to(value: int, multiple: int) -> int:
    """Round ``value`` up to a multiple of ``multiple``.

    >>> ceil_to(100, 32), ceil_to(96, 32), ceil_to(0, 8)
    (128, 96, 0)
    """
    return -(-value // multiple) * multiple


def coerce_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """Normalise an int or a pair to an ``(y, x)`` tuple of ints (the public edge).

    >>> coerce_pair(256, "tile"), coerce_pair((128, 64), "tile")
    ((256, 256), (128, 64))
    """
    if isinstance(value, bool):
        raise InputError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        y, x = value
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (y, x)):
        raise InputError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (int(y), int(x))


def spans(length: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` pieces of ``step`` covering ``0..length``; the last one is cut short.

    The one edge rule of block and band iteration: ``ceil(length / step)`` pieces, none past
    ``length``, none empty.

    >>> spans(10, 4), spans(8, 4), spans(0, 4)
    ([(0, 4), (4, 8), (8, 10)], [(0, 4), (4, 8)], [])
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise InputError(f"step must be a positive int, got {step!r}")
    return [(s, min(s + step, length)) for s in range(0, max(length, 0), step)]


def iter_blocks(
    shape: tuple[int, int] | Sequence[int], block: int | tuple[int, int] | list[int]
) -> Iterator[Window]:
    """The ``block``-sized windows covering an image of ``shape`` = (H, W), row-major.

    ``ceil(H / bh) * ceil(W / bw)`` windows; those on the last row and column are clipped at
    the image edge, so the blocks partition the image (a zarr array's chunks, for
    ``block = arr.chunks``).

    >>> [(b.y, b.x, b.h, b.w) for b in iter_blocks((5, 7), 4)]
    [(0, 0, 4, 4), (0, 4, 4, 3), (4, 0, 1, 4), (4, 4, 1, 3)]
    """
    h, w = (int(v) for v in shape[:2])
    by, bx = coerce_pair(block, "block")
    if by < 1 or bx < 1:
        raise InputError(f"block must be positive, got {block!r}")
    cols = spans(w, bx)
    for y0, y1 in spans(h, by):
        for x0, x1 in cols:
            yield Window(y0, x0, y1 - y0, x1 - x0)


def iter_bands(shape: tuple[int, int] | Sequence[int], rows: int) -> Iterator[Window]:
    """Full-width bands of ``rows`` rows covering an image of ``shape``, top to bottom.

    >>> [(b.y, b.h, b.w) for b in iter_bands((5, 7), 2)]
    [(0, 2, 7), (2, 2, 7), (4, 1, 7)]
    """
    h, w = (int(v) for v in shape[:2])
    for y0, y1 in spans(h, rows):
        yield Window(y0, 0, y1 - y0, w)


@dataclass(frozen=True, order=True)
class Window:
    """A rectangle ``[y, y+h) x [x, x+w)`` in pixel coordinates of one pyramid level.

    Origins may be negative or reach past the image (a padded read); sizes may not be negative.

    >>> w = Window(10, 20, 30, 40)
    >>> w.y1, w.x1, w.slices
    (40, 60, (slice(10, 40, None), slice(20, 60, None)))
    >>> w.intersect(Window(0, 0, 25, 25))
    Window(y=10, x=20, h=15, w=5)
    """

    y: int
    x: int
    h: int
    w: int

    def __post_init__(self) -> None:
        for name in ("y", "x", "h", "w"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise InputError(f"Window.{name} must be an int, got {v!r}")
        if self.h < 0 or self.w < 0:
            raise InputError(f"Window size must be non-negative, got h={self.h}, w={self.w}")

    @property
    def y1(self) -> int:
        return self.y + self.h

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def shape(self) -> tuple[int, int]:
        return (self.h, self.w)

    @property
    def area(self) -> int:
        return self.h * self.w

    @property
    def slices(self) -> tuple[slice, slice]:
        """Slices for numpy/zarr indexing; only meaningful for a window inside the array."""
        return (slice(self.y, self.y1), slice(self.x, self.x1))

    def intersect(self, other: Window) -> Window:
        """The overlap of two windows (size 0 when they do not overlap)."""
        y0, x0 = max(self.y, other.y), max(self.x, other.x)
        y1, x1 = min(self.y1, other.y1), min(self.x1, other.x1)
        return Window(y0, x0, max(0, y1 - y0), max(0, x1 - x0))

    def clip(self, height: int, width: int) -> Window:
        """The part of this window inside an image of ``height`` x ``width``."""
        return self.intersect(Window(0, 0, height, width))

    def inside(self, height: int, width: int) -> bool:
        """Whether the window lies entirely in ``[0, height) x [0, width)``."""
        return self.y >= 0 and self.x >= 0 and self.y1 <= height and self.x1 <= width

    def contains(self, other: Window) -> bool:
        return (
            other.y >= self.y and other.x >= self.x and other.y1 <= self.y1 and other.x1 <= self.x1
        )

    def shift(self, dy: int, dx: int) -> Window:
        return Window(self.y + dy, self.x + dx, self.h, self.w)

    def relative_to(self, outer: Window) -> Window:
        """This window in the coordinates of ``outer`` (whose origin becomes (0, 0))."""
        return self.shift(-outer.y, -outer.x)

    def grow(self, dy: int, dx: int | None = None) -> Window:
        """Grow by ``dy`` rows and ``dx`` columns on every side.

        >>> Window(8, 8, 4, 4).grow(2)
        Window(y=6, x=6, h=8, w=8)
        """
        dx = dy if dx is None else dx
        return Window(self.y - dy, self.x - dx, self.h + 2 * dy, self.w + 2 * dx)

    def to_level(self, downsample: float | tuple[float, float]) -> Window:
        """Map a level-0 window to a level with the given downsample factor.

        The result is the smallest window at that level covering this one.

        >>> Window(100, 50, 300, 30).to_level(4)
        Window(y=25, x=12, h=75, w=8)
        """
        fy, fx = (downsample, downsample) if isinstance(downsample, int | float) else downsample
        y0, x0 = math.floor(self.y / fy), math.floor(self.x / fx)
        y1, x1 = math.ceil(self.y1 / fy), math.ceil(self.x1 / fx)
        return Window(y0, x0, y1 - y0, x1 - x0)

    def from_level(self, downsample: float | tuple[float, float]) -> Window:
        """Map a window at a level with the given downsample factor back to level 0.

        >>> Window(25, 12, 75, 8).from_level(4)
        Window(y=100, x=48, h=300, w=32)
        """
        fy, fx = (downsample, downsample) if isinstance(downsample, int | float) else downsample
        y0, x0 = math.floor(self.y * fy), math.floor(self.x * fx)
        y1, x1 = math.ceil(self.y1 * fy), math.ceil(self.x1 * fx)
        return Window(y0, x0, y1 - y0, x1 - x0)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    ``read`` is what to read (it may reach past the image in ``pad`` mode, or past the image
    into the aligned extent by less than ``align``); ``core`` is what the tile owns.
    ``core_in_read`` is ``core`` in the coordinates of the read window, i.e. the crop to keep
    from the model's output.
    """

    index: tuple[int, int]
    read: Window
    core: Window

    @property
    def core_in_read(self) -> Window:
        return self.core.relative_to(self.read)


@dataclass(frozen=True)
class TileGrid:
    """A grid of tiles with halos over an image of ``shape`` = (H, W).

    Each tile's core is ``core = tile - 2 * halo`` pixels on a side; core origins sit at
    multiples of ``core``, so along an axis of length ``n`` there are ``ceil(n / core)``
    tiles and ``len(grid) == ceil(H / core_h) * ceil(W / core_w)``. The last core on each
    axis is cut at the image edge, so the cores partition the image exactly.

    The read window of a tile is its core grown by ``halo``. Edge policy:

    * ``"clamp"``: read windows are shifted to lie inside the *extent* ``[0, ceil_to(H, align))``
      (the image itself when ``align == 1``), keeping their full ``tile`` size; where the
      extent is smaller than a tile, the read window is the whole extent. Nothing past the
      image is invented except the < ``align`` alignment rows.
    * ``"pad"``: read windows keep their place (core grown by ``halo``); they may reach
      ``halo`` pixels before the image and, on the last tile, up to ``tile - 1`` pixels past
      it; the reader fills that area.

    With ``align = s`` (a model's total stride), ``tile`` and ``halo`` must be multiples of
    ``s``; then every read origin and every read size is a multiple of ``s`` in ``clamp``
    mode, which is what makes tiled inference of a stride-``s`` network exact.

    >>> g = TileGrid((100, 70), tile=64, halo=16)
    >>> len(g), g.counts
    (12, (4, 3))
    >>> t = g[0, 2]
    >>> t.core, t.read
    (Window(y=0, x=64, h=32, w=6), Window(y=0, x=6, h=64, w=64))
    """

    shape: tuple[int, int]
    tile: tuple[int, int]
    halo: tuple[int, int] = (0, 0)
    align: int = 1
    edge: EdgePolicy = "clamp"
    _core: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        shape: tuple[int, int],
        tile: int | tuple[int, int],
        halo: int | tuple[int, int] = 0,
        *,
        align: int = 1,
        edge: EdgePolicy = "clamp",
    ) -> None:
        object.__setattr__(self, "shape", coerce_pair(tuple(shape), "shape"))  # type: ignore[arg-type]
        object.__setattr__(self, "tile", coerce_pair(tile, "tile"))
        object.__setattr__(self, "halo", coerce_pair(halo, "halo"))
        object.__setattr__(self, "align", align)
        object.__setattr__(self, "edge", edge)
        self.__post_init__()

    def __post_init__(self) -> None:
        h, w = self.shape
        if h <= 0 or w <= 0:
            raise InputError(f"image shape must be positive, got {self.shape!r}")
        if not isinstance(self.align, int) or self.align < 1:
            raise InputError(f"align must be a positive int, got {self.align!r}")
        if self.edge not in ("clamp", "pad"):
            raise InputError(f"edge must be 'clamp' or 'pad', got {self.edge!r}")
        for name, pair in (("tile", self.tile), ("halo", self.halo)):
            if pair[0] < 0 or pair[1] < 0:
                raise InputError(f"{name} must be non-negative, got {pair!r}")
            if pair[0] % self.align or pair[1] % self.align:
                raise InputError(
                    f"{name}={pair!r} must be a multiple of align={self.align} "
                    f"(the model's total stride); try {ceil_to(max(pair), self.align)}"
                )
        core = (self.tile[0] - 2 * self.halo[0], self.tile[1] - 2 * self.halo[1])
        if core[0] <= 0 or core[1] <= 0:
            raise InputError(
                f"tile={self.tile!r} leaves no core after a halo of {self.halo!r} on each side; "
                f"use a tile larger than {2 * max(self.halo) + self.align}"
            )
        object.__setattr__(self, "_core", core)

    @classmethod
    def for_patches(
        cls,
        shape: tuple[int, int],
        patch: int | tuple[int, int],
        overlap: int | tuple[int, int] = 0,
        *,
        align: int = 1,
    ) -> TileGrid:
        """The tiler's grid: ``patch``-sized read windows that overlap by ``overlap`` pixels.

        ``overlap = 2 * halo``, so patch origins step by ``patch - overlap`` and the last
        patch on each axis is clamped inside the image (use :meth:`windows` for the patches).

        >>> g = TileGrid.for_patches((300, 256), 256, 32)
        >>> [(w.y, w.x) for w in g.windows()]
        [(0, 0), (44, 0)]
        """
        py, px = coerce_pair(patch, "patch")
        oy, ox = coerce_pair(overlap, "overlap")
        if oy % 2 or ox % 2 or oy < 0 or ox < 0:
            raise InputError(
                f"overlap must be a non-negative even number of pixels (it is 2 x halo), "
                f"got {overlap!r}; try {ceil_to(max(oy, ox, 0), 2)}"
            )
        if oy >= py or ox >= px:
            raise InputError(f"overlap={overlap!r} must be smaller than patch={patch!r}")
        return cls(shape, (py, px), (oy // 2, ox // 2), align=align, edge="clamp")

    # -- sizes --------------------------------------------------------------------------
    @property
    def core(self) -> tuple[int, int]:
        """Core size (y, x) = tile - 2 * halo."""
        return self._core

    @property
    def extent(self) -> tuple[int, int]:
        """Image size rounded up to ``align``: the area read windows may cover in clamp mode."""
        return (ceil_to(self.shape[0], self.align), ceil_to(self.shape[1], self.align))

    @property
    def counts(self) -> tuple[int, int]:
        """Tiles per axis: ``ceil(H / core_h), ceil(W / core_w)``."""
        return (-(-self.shape[0] // self._core[0]), -(-self.shape[1] // self._core[1]))

    def __len__(self) -> int:
        ny, nx = self.counts
        return ny * nx

    # -- tiles --------------------------------------------------------------------------
    def _axis(self, i: int, axis: int) -> tuple[int, int, int, int]:
        """(core_start, core_len, read_start, read_len) of tile ``i`` along ``axis``."""
        n, c, t, h = self.shape[axis], self._core[axis], self.tile[axis], self.halo[axis]
        c0 = i * c
        clen = min(c, n - c0)
        r0, rlen = c0 - h, t
        if self.edge == "clamp":
            ext = self.extent[axis]
            if ext <= t:
                r0, rlen = 0, ext
            else:
                r0 = min(max(r0, 0), ext - t)
        return c0, clen, r0, rlen

    def __getitem__(self, index: tuple[int, int]) -> Tile:
        iy, ix = index
        ny, nx = self.counts
        if not (0 <= iy < ny and 0 <= ix < nx):
            raise IndexError(f"tile index {index!r} outside grid of {self.counts!r}")
        cy, ch, ry, rh = self._axis(iy, 0)
        cx, cw, rx, rw = self._axis(ix, 1)
        return Tile(index=(iy, ix), read=Window(ry, rx, rh, rw), core=Window(cy, cx, ch, cw))

    def __iter__(self) -> Iterator[Tile]:
        """Tiles in row-major order."""
        ny, nx = self.counts
        for iy in range(ny):
            for ix in range(nx):
                yield self[iy, ix]

    def windows(self) -> list[Window]:
        """The distinct read windows in row-major order.

        In clamp mode two neighbouring tiles near the far edge can clamp to the same read
        window (their cores differ); a tiler wants each window once.
        """
        return list(dict.fromkeys(t.read for t in self))

    def row(self, iy: int) -> list[Tile]:
        """All tiles of grid row ``iy`` (one band of cores)."""
        return [self[iy, ix] for ix in range(self.counts[1])]


class GeoTransform(NamedTuple):
    """Pixels -> reference coordinates, in GDAL order: pixel (col, row)'s corner is at

    ``x = x0 + col*dx + row*rx``, ``y = y0 + col*ry + row*dy``.

    A tuple of the six numbers (as ``affine.Affine`` is a tuple of its nine), so code that
    unpacks, indexes, compares or serialises a GDAL-order tuple keeps working; the maths
    every module needs lives here. Construct it with :meth:`from_gdal`, which checks it.

    >>> gt = GeoTransform.from_gdal([500000, 10, 0, 4e6, 0, -10])
    >>> gt(2, 1)
    (500020.0, 3999990.0)
    >>> gt.to_gdal() == (500000.0, 10.0, 0.0, 4e6, 0.0, -10.0), list(gt) == list(gt.to_gdal())
    (True, True)
    """

    x0: float
    dx: float
    rx: float
    y0: float
    ry: float
    dy: float

    @classmethod
    def from_gdal(cls, t: Sequence[float]) -> GeoTransform:
        """Six finite numbers in GDAL order forming an invertible map; InputError otherwise.

        >>> GeoTransform.from_gdal((0, 1, 0, 0, 0, 1)).is_identity
        True
        >>> GeoTransform.from_gdal((0, 1, 0, 0, 0, 0))
        Traceback (most recent call last):
        ...
        tilenet.errors.InputError: transform must be 6 GDAL-order numbers, invertible: (0, 1, 0, 0, 0, 0)
        """
        try:
            vals = [float(v) for v in t]
        except (TypeError, ValueError):
            vals = []
        gt = cls(*vals) if len(vals) == 6 else None
        if gt is None or not all(math.isfinite(v) for v in vals) or gt.determinant == 0:
            raise InputError(f"transform must be 6 GDAL-order numbers, invertible: {t}")
        return gt

    def to_gdal(self) -> tuple[float, float, float, float, float, float]:
        """The six numbers as a plain tuple (x0, dx, rx, y0, ry, dy)."""
        return (self.x0, self.dx, self.rx, self.y0, self.ry, self.dy)

    def __call__(self, col: Any, row: Any) -> tuple[Any, Any]:
        """(x, y) of pixel coordinates (col, row): numbers or numpy arrays alike.

        >>> GeoTransform(10.0, 2.0, 0.0, 20.0, 0.0, -2.0)(3, 4)
        (16.0, 12.0)
        """
        return (self.x0 + col * self.dx + row * self.rx, self.y0 + col * self.ry + row * self.dy)

    def pixel_of(self, x: Any, y: Any) -> tuple[Any, Any]:
        """(col, row) of reference point (x, y): the inverse map, solved directly (exact
        where ``(~self)(x, y)`` would round its inverted coefficients first).

        >>> GeoTransform(10.0, 2.0, 0.0, 20.0, 0.0, -2.0).pixel_of(16.0, 12.0)
        (3.0, 4.0)
        """
        det = self.determinant
        ex, ey = x - self.x0, y - self.y0
        return ((self.dy * ex - self.rx * ey) / det, (self.dx * ey - self.ry * ex) / det)

    def __invert__(self) -> GeoTransform:
        """The inverse map, reference coordinates -> pixels (InputError if singular).

        >>> gt = GeoTransform(10.0, 2.0, 0.0, 20.0, 0.0, -2.0)
        >>> (~gt).to_gdal(), (~gt)(*gt(3, 4))
        ((-5.0, 0.5, 0.0, 10.0, 0.0, -0.5), (3.0, 4.0))
        """
        det = self.determinant
        if det == 0:
            raise InputError(f"transform is not invertible: {self.to_gdal()}")
        dx, rx, ry, dy = self.dy / det, -self.rx / det, -self.ry / det, self.dx / det
        return GeoTransform(
            -(self.x0 * dx + self.y0 * rx), dx, rx, -(self.x0 * ry + self.y0 * dy), ry, dy
        )

    def scaled(self, downsample: tuple[float, float]) -> GeoTransform:
        """The transform of pixels ``downsample`` = (y, x) times larger (a coarser level).

        >>> GeoTransform(500000.0, 10.0, 0.0, 4e6, 0.0, -10.0).scaled((2.0, 4.0)).to_gdal()
        (500000.0, 40.0, 0.0, 4000000.0, 0.0, -20.0)
        """
        sy, sx = downsample
        return GeoTransform(
            self.x0, self.dx * sx, self.rx * sy, self.y0, self.ry * sx, self.dy * sy
        )

    def shifted(self, row: float, col: float) -> GeoTransform:
        """The transform of the pixels from (``row``, ``col``) on (a window's origin).

        >>> GeoTransform(0.0, 2.0, 0.0, 0.0, 0.0, 2.0).shifted(1, 3).to_gdal()
        (6.0, 2.0, 0.0, 2.0, 0.0, 2.0)
        """
        x, y = self(col, row)
        return GeoTransform(x, self.dx, self.rx, y, self.ry, self.dy)

    @property
    def determinant(self) -> float:
        """``dx*dy - rx*ry``: the signed area of a pixel; 0 for a singular map."""
        return self.dx * self.dy - self.rx * self.ry

    @property
    def pixel_area(self) -> float:
        """The area of one pixel in reference units squared.

        >>> GeoTransform(0.0, 10.0, 0.0, 0.0, 0.0, -20.0).pixel_area
        200.0
        """
        return abs(self.dx * self.dy - self.rx * self.ry)

    @property
    def gsd(self) -> tuple[float, float]:
        """Ground sample distance (y, x): the length of a pixel's sides in reference units.

        >>> GeoTransform(500000.0, 10.0, 0.0, 4e6, 0.0, -20.0).gsd
        (20.0, 10.0)
        """
        return (math.hypot(self.rx, self.dy), math.hypot(self.dx, self.ry))

    @property
    def is_identity(self) -> bool:
        """Whether pixels are reference coordinates (no shift, unit scale, no rotation).

        >>> GeoTransform(0.0, 1.0, 0.0, 0.0, 0.0, 1.0).is_identity
        True
        """
        return self.to_gdal() == (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
