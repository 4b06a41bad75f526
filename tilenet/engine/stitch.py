"""Stitching tile predictions into full-size outputs without holding a full-size array.

Two stitchers share one :class:`Sink` (the output set's ``tilenet.outputs.sink.OutputSink``)
that writes finished regions to the level-0 zarr arrays (probabilities, argmax classes) and
counts class areas:

* :class:`CropStitcher` (crop mode): each tile's core goes straight to the sink. The output
  chunks are the grid's cores, so every chunk is written exactly once, by one writer.
* :class:`BlendStitcher` (gaussian / linear): weighted sums over overlapping read windows, as
  nnU-Net and MONAI do, but out of core. The output chunks are again the grid's cores; a
  chunk's sum and weight live in memory only while it is *open* (touched by a processed tile
  and waiting for more) and are finalised (sum / weight -> sink) when its last tile arrives.
  Tiles are processed in vertical strips (row-major inside a strip), so the open set is
  O(strip x 2 tile rows), never O(image width); chunks on a strip boundary that wait for
  the next strip are spilled to a temporary zarr and read back later. Only the one writer
  thread touches the accumulators, so no chunk is read-modified-written from two places.
  A chunk's sum takes its tiles in the order they come, so a run resumed from any position
  at or before the first tile of every unfinished chunk (:meth:`BlendStitcher.restart`),
  keeping the chunks finished before, sums each chunk exactly as a run from the start does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from tilenet.geometry import Tile, TileGrid, Window, spans

__all__ = [
    "STITCHERS",
    "BlendStitcher",
    "CropStitcher",
    "Sink",
    "Stitcher",
    "StitcherFactory",
    "blend_weights",
    "strip_order",
]

BlendMode = Literal["gaussian", "linear"]


class Sink(Protocol):
    """Where finished float32 probability regions (C, h, w) go; it counts class areas.

    NaN probabilities mark pixels without data (the engine sets them from the input's
    validity mask); both stitchers carry them through unchanged, since every tile covering
    a pixel agrees on its mask (``docs/nodata.md``).
    """

    num_classes: int
    area: np.ndarray

    def write(self, window: Window, probs: np.ndarray) -> None: ...


class Stitcher(Protocol):
    """Takes each tile's probabilities and writes finished regions to a :class:`Sink`.

    Only the one writer thread calls it. ``close`` is called once, after the last tile; it
    raises if a tile is missing.
    """

    def add(self, tile: Tile, probs: np.ndarray) -> None: ...

    def close(self) -> None: ...


class StitcherFactory(Protocol):
    """Builds a stitcher for a grid: its sink, local ``scratch`` space for spills, and the
    width of the vertical strips its tiles come in (:func:`strip_order`)."""

    def __call__(
        self,
        grid: TileGrid,
        sink: Sink,
        scratch: str | os.PathLike[str],
        *,
        strip_tiles: int = 8,
    ) -> Stitcher: ...


def blend_weights(shape: tuple[int, int], mode: BlendMode, *, ramp: int = 0) -> np.ndarray:
    """Per-pixel blending weight of a tile of ``shape`` (float32, all > 0, max 1).

    ``gaussian``: nnU-Net's importance map, sigma = 1/8 of the tile side per axis, with its
    tiny tails lifted to the smallest positive value so every pixel has some weight.
    ``linear``: 1 in the middle, falling linearly to ``1 / (ramp + 1)`` over the ``ramp``
    pixels next to each edge (pytorch-toolbelt's "linear" blend).

    >>> w = blend_weights((5, 6), "linear", ramp=2)
    >>> [round(float(v), 3) for v in w[2]]
    [0.333, 0.667, 1.0, 1.0, 0.667, 0.333]
    >>> float(blend_weights((64, 64), "gaussian").max())
    1.0
    """
    axes = []
    for n in shape:
        i = np.arange(n, dtype=np.float64)
        if mode == "gaussian":
            sigma = max(n / 8.0, 1e-3)
            w = np.exp(-0.5 * ((i - (n - 1) / 2.0) / sigma) ** 2)
        elif mode == "linear":
            w = np.minimum(1.0, (np.minimum(i, n - 1 - i) + 1) / (ramp + 1))
        else:
            raise ValueError(f"unknown blend mode {mode!r}")
        axes.append(w)
    out = np.outer(axes[0], axes[1])
    out /= out.max()
    tiny = out[out > 0].min() if (out > 0).any() else 1.0
    return np.maximum(out, max(tiny, 1e-6)).astype(np.float32)


def strip_order(grid: TileGrid, strip_tiles: int) -> list[Tile]:
    """The grid's tiles in vertical strips of ``strip_tiles`` columns, row-major in a strip.

    >>> g = TileGrid((64, 96), tile=32)
    >>> [t.index for t in strip_order(g, 2)]
    [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)]
    """
    ny, nx = grid.counts
    step = max(1, strip_tiles)
    return [grid[iy, ix] for x0, x1 in spans(nx, step) for iy in range(ny) for ix in range(x0, x1)]


class CropStitcher:
    """Crop mode: ``add(tile, core_probs)`` writes the core straight to the sink."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def add(self, tile: Tile, probs: np.ndarray) -> None:
        self.sink.write(tile.core, probs)

    def close(self) -> None:
        """Nothing is buffered in crop mode."""


class BlendStitcher:
    """Gaussian/linear blending, out of core (see the module docstring).

    Tiles must be added in the order of :attr:`order`: vertical strips of ``strip_tiles``
    tile columns (:func:`strip_order`). ``add(tile, probs)`` takes the tile's probabilities
    over ``tile.read`` clipped to the image.

    Spills go to a zarr group in the local ``spill_dir`` (removed by ``close``), or in
    ``spill_store`` (a zarr store that outlives the run: the caller removes it).

    Resuming: ``kept`` tiles of the order were added by an earlier run, and the chunks they
    finished are in the sink already; this one takes tiles from position ``start`` (at most
    ``restart(kept)``), adds nothing more to those chunks, and finishes all the others. With
    a ``spill_store``, a chunk that waited for the next strip resumes from its spilled sums.
    """

    def __init__(
        self,
        grid: TileGrid,
        sink: Sink,
        *,
        mode: BlendMode,
        spill_dir: str | os.PathLike[str] | None = None,
        spill_store: Any = None,
        strip_tiles: int = 8,
        kept: int = 0,
        start: int = 0,
    ) -> None:
        self.grid = grid
        self.order = strip_order(grid, strip_tiles)
        self.sink = sink
        self.mode = mode
        self.ramp = 2 * max(grid.halo)
        if (spill_dir is None) == (spill_store is None):
            raise ValueError("give one of spill_dir and spill_store")
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._store = spill_store
        self.strips = [t.index[1] // max(1, strip_tiles) for t in self.order]
        self._weights: dict[tuple[int, int], np.ndarray] = {}
        # touches[chunk] = positions in ``order`` whose read window overlaps that chunk.
        self._touches: dict[tuple[int, int], list[int]] = {}
        for pos, tile in enumerate(self.order):
            for c in self._chunks_of(tile):
                self._touches.setdefault(c, []).append(pos)
        self._chunks = list(self._touches)
        # First and last position touching each chunk (for restart points), and where its
        # tiles move to the next strip: (chunk, spilled after position, taken up at position).
        spans_ = np.array([(t[0], t[-1]) for t in self._touches.values()], np.int64)
        self._first, self._last = spans_.reshape(-1, 2).T
        hand = [
            (i, t[j - 1], t[j])
            for i, t in enumerate(self._touches.values())
            for j in range(1, len(t))
            if self.strips[t[j]] != self.strips[t[j - 1]]
        ]
        self._handoff = np.array(hand, np.int64).reshape(-1, 3).T
        self._seen: dict[tuple[int, int], int] = {}
        self._open: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._spilled: set[tuple[int, int]] = set()
        self._spill: tuple[Any, Any] | None = None
        self._resume(kept, start)
        #: Most chunks open at once (a test checks it does not grow with the image).
        self.max_open = 0

    def _resume(self, kept: int, start: int) -> None:
        """Go on after ``kept`` tiles of an earlier run, from tile ``start``."""
        if not 0 <= start <= self.restart(kept):
            raise ValueError(f"cannot resume at tile {start}: unfinished chunks start before")
        floors = self._floors(kept)
        #: Chunks an earlier run finished (all their tiles among its first ``kept``).
        self.done = frozenset(
            c for c, last in zip(self._chunks, self._last, strict=True) if last < kept
        )
        # Tiles before from_[c] are in chunk c already (on disk: finished, or spilled).
        self._from = dict.fromkeys(self.done, len(self.order))
        for c, first, floor in zip(self._chunks, self._first, floors, strict=True):
            if floor > first and c not in self.done:
                self._from[c] = int(floor)
                self._seen[c] = sum(p < floor for p in self._touches[c])
                self._spilled.add(c)
        self._pos = start

    # -- geometry -------------------------------------------------------------------------
    def _read_in_image(self, tile: Tile) -> Window:
        return tile.read.clip(*self.grid.shape)

    def _chunks_of(self, tile: Tile) -> list[tuple[int, int]]:
        r = self._read_in_image(tile)
        (ch, cw), (ny, nx) = self.grid.core, self.grid.counts
        ys = range(r.y // ch, min(ny, math.ceil(r.y1 / ch)))
        xs = range(r.x // cw, min(nx, math.ceil(r.x1 / cw)))
        return [(iy, ix) for iy in ys for ix in xs]

    def _chunk_window(self, c: tuple[int, int]) -> Window:
        return self.grid[c].core

    @property
    def added(self) -> int:
        """Tiles of :attr:`order` taken so far (by this run and the earlier one it resumes)."""
        return self._pos

    def restart(self, added: int) -> int:
        """Where a run resuming after the first ``added`` tiles must start: the first tile of
        the first chunk those tiles leave unfinished (``len(order)`` when none is); with a
        ``spill_store``, of a spilled chunk the first tile of the strip that takes it up.

        A tile's read window reaches the chunk rows above and below its own, so a chunk row
        is finished once the tile row below it is, and the restart lags about two tile rows:

        >>> g = TileGrid((64, 96), tile=32, halo=8)  # 4 x 6 tiles, one strip
        >>> st = BlendStitcher(g, None, mode="linear", spill_dir="unused")  # type: ignore[arg-type]
        >>> [st.restart(n) for n in (6, 12, 14, 15, 18, 23, 24)]
        [0, 0, 0, 1, 6, 9, 24]
        """
        open_ = self._last >= added
        return int(self._floors(added)[open_].min()) if open_.any() else len(self.order)

    def _floors(self, added: int) -> np.ndarray:
        """Per chunk, the first tile a run resuming after ``added`` tiles must add to it: its
        first, or with a ``spill_store`` the first of the strip after its last spill."""
        floors = self._first.copy()
        if self._store is not None and self._handoff.size:
            chunk, spilled, taken = self._handoff
            now = spilled < added
            np.maximum.at(floors, chunk[now], taken[now])
        return floors

    def _weight(self, shape: tuple[int, int]) -> np.ndarray:
        if shape not in self._weights:
            self._weights[shape] = blend_weights(shape, self.mode, ramp=self.ramp)
        return self._weights[shape]

    # -- accumulation ---------------------------------------------------------------------
    def add(self, tile: Tile, probs: np.ndarray) -> None:
        pos = self._pos
        if pos >= len(self.order) or self.order[pos] != tile:
            raise ValueError(f"tile {tile.index} added out of the declared order at {pos}")
        self._pos += 1
        read = self._read_in_image(tile)
        k = self.sink.num_classes
        if probs.shape != (k, read.h, read.w):
            raise ValueError(f"tile {tile.index}: probabilities {probs.shape} != read {read}")
        # Weights follow the full read window (the model saw all of it), clipped like probs.
        weight = self._weight(tile.read.shape)[: read.h, : read.w]
        for c in self._chunks_of(tile):
            if pos < self._from.get(c, 0):
                continue
            win = self._chunk_window(c)
            part = win.intersect(read)
            acc, wsum = self._get(c)
            dst, src = part.relative_to(win).slices, part.relative_to(read).slices
            w = weight[src]
            acc[(slice(None), *dst)] += probs[(slice(None), *src)] * w
            wsum[dst] += w
            self._seen[c] = self._seen.get(c, 0) + 1
            touches = self._touches[c]
            if self._seen[c] == len(touches):
                del self._open[c]
                self.sink.write(win, acc / wsum)
            elif self.strips[touches[self._seen[c]]] != self.strips[pos]:
                self._spill_chunk(c)
        self.max_open = max(self.max_open, len(self._open))

    def _get(self, c: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if c in self._open:
            return self._open[c]
        win = self._chunk_window(c)
        if c in self._spilled:
            s_acc, s_w = self._spill_arrays()
            ys, xs = win.slices
            acc, wsum = np.asarray(s_acc[:, ys, xs]), np.asarray(s_w[ys, xs])
            self._spilled.discard(c)
        else:
            acc = np.zeros((self.sink.num_classes, win.h, win.w), np.float32)
            wsum = np.zeros((win.h, win.w), np.float32)
        self._open[c] = (acc, wsum)
        return acc, wsum

    def _spill_arrays(self) -> tuple[Any, Any]:
        """The spill's (sum, weight) arrays, made or opened on first use."""
        if self._spill is None:
            import zarr

            (h, w), (ch, cw) = self.grid.shape, self.grid.core
            k = self.sink.num_classes
            where = self._store
            if where is None:
                assert self.spill_dir is not None
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                where = str(self.spill_dir)
            group = zarr.open_group(where, mode="a")
            s_acc = group.require_array("sum", shape=(k, h, w), chunks=(k, ch, cw), dtype="f4")
            s_w = group.require_array("weight", shape=(h, w), chunks=(ch, cw), dtype="f4")
            self._spill = (s_acc, s_w)
        return self._spill

    def _spill_chunk(self, c: tuple[int, int]) -> None:
        s_acc, s_w = self._spill_arrays()
        acc, wsum = self._open.pop(c)
        ys, xs = self._chunk_window(c).slices
        s_acc[:, ys, xs] = acc
        s_w[ys, xs] = wsum
        self._spilled.add(c)

    def close(self) -> None:
        """Check every chunk was finalised and remove the spill in ``spill_dir``."""
        from tilenet.fsutil import remove_path

        if self.spill_dir is not None:
            remove_path(self.spill_dir)
        if self._pos != len(self.order) or self._open or self._spilled:
            raise RuntimeError(
                f"blend stitcher closed early: {self._pos}/{len(self.order)} tiles added, "
                f"{len(self._open) + len(self._spilled)} chunks unfinished"
            )


def _crop(
    grid: TileGrid, sink: Sink, scratch: str | os.PathLike[str], *, strip_tiles: int = 8
) -> Stitcher:
    return CropStitcher(sink)


def _blend(mode: BlendMode) -> StitcherFactory:
    def make(
        grid: TileGrid, sink: Sink, scratch: str | os.PathLike[str], *, strip_tiles: int = 8
    ) -> Stitcher:
        return BlendStitcher(grid, sink, mode=mode, spill_dir=scratch, strip_tiles=strip_tiles)

    return make


#: Stitchers by ``InferConfig.mode``: crop keeps each tile's core (it takes the core's
#: probabilities), gaussian and linear blend overlapping reads (they take the read window's,
#: clipped to the image).
STITCHERS: dict[str, StitcherFactory] = {
    "crop": _crop,
    "gaussian": _blend("gaussian"),
    "linear": _blend("linear"),
}
