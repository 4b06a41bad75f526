"""The tiles of a run: the grid a model and an image get, the order the engine runs them in,
and how they group into model batches.

:class:`~tilenet.engine.predictor.Predictor` runs these batches; benchmarks time the model on
exactly them (:func:`batch_shapes`), and resumed blend runs restart at one of their starts
(:func:`batch_starts`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tilenet.config import InferConfig
from tilenet.engine.stitch import strip_order
from tilenet.errors import InputError
from tilenet.geometry import Tile, TileGrid, ceil_to
from tilenet.models.spec import ModelSpec

__all__ = [
    "BLEND_STRIP_PX",
    "batch_shapes",
    "batch_starts",
    "batches",
    "plan_grid",
    "strip_tiles",
    "tile_order",
]

#: Width (pixels) of the vertical strips blend mode processes; bounds its open chunks.
BLEND_STRIP_PX = 8192


def plan_grid(
    shape: tuple[int, int], spec: ModelSpec | dict[str, Any], cfg: InferConfig
) -> tuple[TileGrid, int]:
    """The tile grid for an image of ``shape`` and a model ``spec``; returns (grid, halo).

    In crop mode ``cfg.tile`` is the largest read window: the tile shrinks to the smallest
    stride multiple that still covers the image with as many tiles, so the last row and
    column of tiles do not recompute most of their neighbours (e.g. 4096² with a 128 px halo:
    6 x 6 tiles of 1024² = 2.25x the image at most; 944² tiles cover it in the same 36,
    1.91x). Any stride-aligned grid is exact, so this changes the work, not the output.

    >>> spec = {"name": "m", "in_channels": 3, "num_classes": 2, "stride": 16,
    ...         "receptive_field": 40}
    >>> g, halo = plan_grid((1000, 700), spec, InferConfig(tile=256))
    >>> halo, g.tile, g.core, g.counts
    (48, (240, 240), (144, 144), (7, 5))
    >>> g, _ = plan_grid((1000, 700), spec, InferConfig(tile=256, mode="gaussian"))
    >>> g.tile, g.counts
    ((256, 256), (6, 4))
    """
    spec = ModelSpec.coerce(spec)
    stride = max(1, spec.stride)
    if cfg.tile % stride:
        raise InputError(
            f"tile {cfg.tile} must be a multiple of the model's stride {stride}; "
            f"try --tile {ceil_to(cfg.tile, stride)}"
        )
    if cfg.mode == "crop":
        halo = ceil_to(cfg.halo if cfg.halo is not None else spec.receptive_field, stride)
    else:
        halo = ceil_to(round(cfg.overlap * cfg.tile / 2), stride)
    if cfg.tile < 2 * halo + stride:
        suggest = max(ceil_to(4 * halo, stride), 2 * halo + stride)
        why = "the model's receptive field" if cfg.mode == "crop" else "--overlap"
        raise InputError(
            f"tile {cfg.tile} is too small for a halo of {halo} px on each side (from {why}); "
            f"use --tile {suggest} or larger"
        )
    tile = cfg.tile
    if cfg.mode == "crop":
        # The smallest core that keeps each axis's tile count (a stride multiple).
        core_max, core = cfg.tile - 2 * halo, stride
        for side in shape:
            n = math.ceil(side / core_max)
            core = max(core, ceil_to(math.ceil(side / n), stride))
        tile = min(cfg.tile, core + 2 * halo)
    return TileGrid(shape, tile, halo, align=stride, edge="clamp"), halo


def tile_order(grid: TileGrid, mode: str) -> list[Tile]:
    """The order the engine runs ``grid``'s tiles in: row-major (crop), strips (blend)."""
    if mode == "crop":
        return list(grid)
    return strip_order(grid, strip_tiles(grid))


def strip_tiles(grid: TileGrid) -> int:
    """Tile columns in each of blend mode's vertical strips (:data:`BLEND_STRIP_PX` wide)."""
    return max(1, BLEND_STRIP_PX // grid.core[1])


def batch_shapes(grid: TileGrid, cfg: InferConfig) -> list[tuple[int, tuple[int, int]]]:
    """(batch size, read shape) of every model batch the engine runs over ``grid``.

    The engine's own order and grouping (no tiles skipped), for benchmarks that time the
    model alone on exactly the batches a :class:`Predictor` runs.

    >>> spec = {"name": "m", "in_channels": 3, "num_classes": 2, "stride": 16,
    ...         "receptive_field": 40}
    >>> g, _ = plan_grid((1000, 700), spec, InferConfig(tile=256, batch=4))
    >>> batch_shapes(g, InferConfig(tile=256, batch=4))[:3]
    [(4, (240, 240)), (1, (240, 240)), (4, (240, 240))]
    """
    tiles = tile_order(grid, cfg.mode)
    items = (((i, t, False), None) for i, t in enumerate(tiles))
    by_row = cfg.mode == "crop"
    return [(len(b), b[0][0].read.shape) for b in batches(items, cfg.batch, by_row=by_row)]


def batch_starts(
    tiles: Sequence[Tile], skip: np.ndarray | None, size: int, *, by_row: bool = False
) -> list[int]:
    """Positions in ``tiles`` where :meth:`Predictor.run` starts a batch (``skip`` as given
    to it). A run over ``tiles[i:]`` from one of them batches the rest exactly as the run over
    all of ``tiles`` does: the model sees the same batches, so results agree to the bit.

    >>> g = TileGrid((64, 96), tile=32, halo=8)
    >>> batch_starts(list(g), None, 4), batch_starts(list(g), None, 4, by_row=True)[:4]
    ([0, 4, 8, 12, 16, 20], [0, 4, 6, 10])
    """
    flags = np.zeros(len(tiles), bool) if skip is None else skip
    items = (((i, t, bool(flags[i])), None) for i, t in enumerate(tiles))
    starts, pos = [], 0
    for batch in batches(items, size, by_row=by_row):
        starts.append(pos)
        pos += len(batch)
    return starts


def batches(
    items: Iterator[tuple[tuple[int, Tile, bool], Any]],
    size: int,
    *,
    by_row: bool = False,
) -> Iterator[list[tuple[Tile, bool, Any]]]:
    """Group consecutive tiles into batches of equal read shape (skipped tiles pass alone).

    ``by_row``: a batch never spans two grid rows, so a run over a band of whole rows
    batches its tiles exactly as a run over the whole grid does (oneDNN's results can
    depend on the batch size in the last bit; this keeps banded runs bit-identical).
    """
    batch: list[tuple[Tile, bool, Any]] = []
    for (_, tile, skipped), arr in items:
        if batch and (
            len(batch) >= size
            or skipped
            or batch[-1][1]
            or batch[-1][0].read.shape != tile.read.shape
            or (by_row and batch[-1][0].index[0] != tile.index[0])
        ):
            yield batch
            batch = []
        batch.append((tile, skipped, arr))
    if batch:
        yield batch
