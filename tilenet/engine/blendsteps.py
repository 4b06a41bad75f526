"""Blend modes resumable by time: resume points recorded while the one band runs.

Blend modes (gaussian, linear) run an image as one band, its tiles in the stitcher's order
(:func:`tilenet.engine.stitch.strip_order`), and a chunk of the output is written once its
last tile is added. Every ``budget_s`` seconds of work (:data:`~tilenet.engine.pace.CHECKPOINT_S`)
the writer thread, right after the chunks it finished are written, records a progress
marker (:meth:`tilenet.outputs.outputset.OutputSet.mark_progress`): ``added``, the tiles
taken so far, and ``restart``, where a rerun starts: the last batch start
(:func:`~tilenet.engine.tiles.batch_starts`) at or before the first tile of the first
chunk still unfinished (:meth:`~tilenet.engine.stitch.BlendStitcher.restart`), about two
tile rows back. Chunks that wait for the next vertical strip are spilled to a store in the
resume state (:meth:`~tilenet.outputs.outputset.OutputSet.spill_store`), so a rerun takes
their sums up from there instead of going back a whole strip.

A rerun keeps the chunks finished at ``added`` and runs the tiles from ``restart``; what
they add to kept chunks is dropped. It ends bit-identical to an uninterrupted run: every
unfinished chunk sums all of its tiles, from zero, in the same order, and the model sees the
same batches (a rerun from a batch start batches the rest as the whole run does). A kill
loses at most the work since the last marker and the tiles between its ``restart`` and
``added``.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tilenet.engine.pace import add_step
from tilenet.engine.predictor import Predictor, RunStats
from tilenet.engine.stitch import BlendStitcher
from tilenet.engine.tiles import batch_starts
from tilenet.geometry import Tile, TileGrid
from tilenet.outputs.outputset import OutputSet
from tilenet.outputs.sink import OutputSink

__all__ = ["run_blend", "step_record"]

log = logging.getLogger(__name__)

#: Keys of a progress marker that say where a blend run stands (not in a band's record).
_POSITION = ("added", "restart")


def step_record(stats: RunStats, sink: OutputSink, predictor: Predictor) -> dict[str, Any]:
    """What a run of tiles did, as a band record's fields (:func:`~tilenet.engine.pace.add_step`)."""
    return {
        "tiles": stats.tiles,
        "tiles_run": stats.tiles_run,
        "area": [int(a) for a in sink.area],
        "nodata_px": int(sink.nodata),
        "seconds": round(stats.seconds, 3),
        "cpu_s": round(stats.cpu_s, 3),
        "model_s": round(stats.model_s, 3),
        "read_wait_s": round(stats.read_wait_s, 3),
        "heap_trims": stats.heap_trims,
        "heap_flat_after": stats.heap_flat_after,
        "device": str(predictor.device),
        "exact": predictor.run_is_exact,
        "precision": predictor.precision,
        "decode": stats.decode,
        "device_s": round(stats.device_s, 3),
    }


class _Marking:
    """A blend stitcher that calls ``mark(added, restart)`` after a tile when ``budget_s``
    seconds have passed since the last resume point and the restart has moved on."""

    def __init__(
        self,
        stitcher: BlendStitcher,
        starts: list[int],
        budget_s: float,
        mark: Callable[[int, int], None],
    ) -> None:
        self.stitcher, self.starts, self.budget_s, self.mark = stitcher, starts, budget_s, mark
        self.restart = stitcher.added
        self.since = time.perf_counter()
        self.marks = 0
        #: The longest stretch of work between two resume points so far (seconds).
        self.max_gap = 0.0

    def add(self, tile: Tile, probs: np.ndarray) -> None:
        self.stitcher.add(tile, probs)  # the chunks it finishes are written when it returns
        now = time.perf_counter()
        added = self.stitcher.added
        if now - self.since < self.budget_s or added >= len(self.stitcher.order):
            return
        first = self.stitcher.restart(added)
        restart = self.starts[bisect.bisect_right(self.starts, first) - 1]
        if restart <= self.restart:
            return
        self.mark(added, restart)
        self.max_gap = max(self.max_gap, now - self.since)
        self.since, self.restart = now, restart
        self.marks += 1

    def close(self) -> None:
        self.stitcher.close()
        self.max_gap = max(self.max_gap, time.perf_counter() - self.since)


def _fits(rec: dict[str, Any], starts: list[int], n: int) -> bool:
    """Whether an earlier run's progress ``rec`` fits a run of ``n`` tiles batched at
    ``starts``: it restarts at one of them, after the first and at most where it stopped."""
    added, restart = rec.get("added"), rec.get("restart")
    if not (isinstance(added, int) and isinstance(restart, int) and 0 < restart <= added < n):
        return False
    i = bisect.bisect_left(starts, restart)
    return i < len(starts) and starts[i] == restart


def _ignored(outputs: OutputSet, band: int) -> None:
    log.warning(
        "%s: progress of band %d does not fit this run; running it whole", outputs.url, band
    )


def run_blend(
    outputs: OutputSet,
    band: int,
    rows: tuple[int, int],
    grid: TileGrid,
    predictor: Predictor,
    image: Any,
    tiles: list[Tile],
    *,
    strip_tiles: int,
    skip: np.ndarray | None,
    stain: Any,
    on_tiles: Callable[[int], None] | None = None,
    budget_s: float,
) -> dict[str, Any]:
    """Run blend-mode ``band`` (``tiles`` in the stitcher's order) into ``outputs``, with a
    resume point about every ``budget_s`` seconds; go on from an earlier run's last one.

    Returns the band's record (not yet marked finished: the caller does, with
    :meth:`~tilenet.outputs.outputset.OutputSet.mark_band`).
    """
    cfg = predictor.config
    flags = np.zeros(len(tiles), bool) if skip is None else skip
    starts = batch_starts(tiles, flags, cfg.batch)
    kept = outputs.band_progress(band, rows)
    if kept is not None and not _fits(kept, starts, len(tiles)):
        _ignored(outputs, band)
        kept = None
    added, start = (int(kept["added"]), int(kept["restart"])) if kept is not None else (0, 0)
    sink = outputs.sink()

    def stitcher_from(kept: int, start: int) -> BlendStitcher:
        return BlendStitcher(
            grid,
            sink,
            mode=cfg.mode,  # type: ignore[arg-type]
            spill_store=outputs.spill_store(),
            strip_tiles=strip_tiles,
            kept=kept,
            start=start,
        )

    try:
        stitcher = stitcher_from(added, start)
    except ValueError:  # chunks it left unfinished start before its restart
        _ignored(outputs, band)
        kept, added, start = None, 0, 0
        stitcher = stitcher_from(0, 0)
    if kept is not None:  # the chunks it finished are on disk: go on from its restart
        kept |= {"tiles_kept": kept["tiles"], "tiles_run_kept": kept["tiles_run"]}
        if on_tiles is not None:
            on_tiles(kept["tiles"])
    t0 = time.perf_counter()
    steps = int(kept.get("steps", 1)) if kept is not None else 0
    longest = float(kept.get("max_step_s", 0.0)) if kept is not None else 0.0

    def mark(added: int, restart: int) -> None:
        snap = {
            "tiles": restart - start,
            "tiles_run": int((~flags[start:restart]).sum()),
            "area": [int(a) for a in sink.area],
            "seconds": round(time.perf_counter() - t0, 3),
            "device": str(predictor.device),
            "exact": predictor.run_is_exact,
            "precision": predictor.precision,
        }
        record = add_step(kept, snap) | {
            "rows": list(rows),
            "added": added,
            "restart": restart,
            "steps": steps + marking.marks + 1,
            "max_step_s": round(
                max(longest, marking.max_gap, time.perf_counter() - marking.since), 3
            ),
        }
        outputs.mark_progress(band, record)

    marking = _Marking(stitcher, starts, budget_s, mark)
    stats = predictor.run(
        image,
        tiles[start:],
        marking,
        grid=grid,
        skip=flags[start:],
        on_tiles=on_tiles,
        stain=stain,
    )
    record = add_step(kept, step_record(stats, sink, predictor)) | {
        "rows": list(rows),
        "steps": steps + marking.marks + 1,
        "max_step_s": round(max(longest, marking.max_gap), 3),
    }
    for k in _POSITION:
        record.pop(k, None)
    return record
