"""How much of a band runs between two resume points: about :data:`CHECKPOINT_S` of work.

A band of grid rows (:func:`tilenet.engine.infer.bands_of`, about ``region_tiles`` tiles) is
the unit of parallel work in batch jobs. Inside it, crop mode runs *steps* of whole grid rows
and records each one when its chunks are on disk (a progress marker beside the band markers,
:meth:`tilenet.outputs.outputset.OutputSet.mark_progress`), so a kill loses at most the step
under way, whatever the band's size. :class:`Pace` sizes the steps by time: the first step of
a process is one row, which measures the seconds per tile; later steps take as many rows as
fit :data:`CHECKPOINT_S` at that rate. A step is never less than one row: batches never span
grid rows, which keeps a resumed run bit-identical, so a row that alone takes longer than the
budget is still one step. Blend modes (one band, stitched across rows) run in one go and
record a resume point about every ``budget_s`` seconds instead
(:mod:`tilenet.engine.blendsteps`): a rerun starts about two tile rows before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["CHECKPOINT_S", "SUMMED", "Pace", "add_step", "tiles_here", "timings"]

#: Seconds of work between two resume points: half a minute at the measured rate, so that a
#: kill loses at most about a minute even where the rate halves within a step.
CHECKPOINT_S = 30.0

#: Fields of a band record that are sums over its steps.
SUMMED = (
    "tiles",
    "nodata_px",
    "tiles_run",
    "seconds",
    "cpu_s",
    "model_s",
    "read_wait_s",
    "device_s",
    "heap_trims",
)


@dataclass
class Pace:
    """Seconds per tile measured in this process, and the rows of the next step.

    One Pace serves the bands a process runs one after another (``infer_image``), so only
    its very first step is a single row.
    """

    budget_s: float = CHECKPOINT_S
    tiles: int = 0
    seconds: float = 0.0

    def add(self, tiles: int, seconds: float) -> None:
        """Count a finished step of ``tiles`` tiles that took ``seconds``."""
        self.tiles += tiles
        self.seconds += seconds

    def rows(self, cols: int, left: int) -> int:
        """Grid rows of ``cols`` tiles for the next step, at most ``left``: one until a rate
        is measured, then as many as fit ``budget_s`` (at least one).

        >>> p = Pace(budget_s=60.0)
        >>> p.rows(10, 50)
        1
        >>> p.add(10, 2.0)  # 0.2 s a tile: 2 s a row of 10
        >>> p.rows(10, 50), p.rows(10, 7), p.rows(1000, 50)
        (30, 7, 1)
        """
        if self.tiles <= 0:
            return 1
        per_row = self.seconds / self.tiles * max(1, cols)
        fit = int(self.budget_s // per_row) if per_row > 0 else left
        return max(1, min(left, fit))


def add_step(total: dict[str, Any] | None, step: dict[str, Any]) -> dict[str, Any]:
    """A band record with one more step: :data:`SUMMED` fields and class areas added, the
    longest step kept, exactness of all steps, the rest from ``step``.

    >>> a = add_step(None, {"tiles": 4, "area": [3, 1], "seconds": 2.0, "exact": True})
    >>> b = add_step(a, {"tiles": 2, "area": [0, 2], "seconds": 1.0, "exact": True})
    >>> b["tiles"], b["area"], b["max_step_s"], b["steps"]
    (6, [3, 3], 2.0, 2)
    """
    if total is None:
        return {**step, "max_step_s": float(step.get("seconds", 0.0)), "steps": 1}
    out = {**total, **step}
    for k in SUMMED:
        if k in total or k in step:
            out[k] = total.get(k, 0) + step.get(k, 0)
    out["area"] = [int(a) + int(b) for a, b in zip(total["area"], step["area"], strict=True)]
    out["max_step_s"] = max(float(total.get("max_step_s", 0.0)), float(step.get("seconds", 0)))
    out["steps"] = int(total.get("steps", 1)) + 1
    out["exact"] = bool(total.get("exact")) and bool(step.get("exact"))
    if total.get("decode") and step.get("decode"):  # tiles per decode path, over all steps
        tiles = dict(total["decode"].get("tiles", {}))
        for path, n in step["decode"].get("tiles", {}).items():
            tiles[path] = tiles.get(path, 0) + int(n)
        out["decode"] = {**step["decode"], "tiles": tiles}
    flat = total.get("heap_flat_after")
    out["heap_flat_after"] = flat if flat is not None else step.get("heap_flat_after")
    return out


def timings(
    records: list[dict[str, Any]],
    *,
    t0: float,
    setup_s: float | None,
    finalize_s: float,
    cog_s: float,
) -> dict[str, Any]:
    """The summary's ``timings``: the band records' sums (of every run that contributed one,
    when resumed), the longest step, finalize, and the whole run since ``t0`` (``time.time()``)."""

    def total(key: str) -> float:
        return round(sum(float(r.get(key, 0.0)) for r in records), 3)

    return {
        **({"setup_s": round(setup_s, 3)} if setup_s is not None else {}),
        "tiles_s": total("seconds"),
        # CPU seconds of all threads in the tile phase (robust to a busy machine).
        "tiles_cpu_s": total("cpu_s"),
        "model_s": total("model_s"),
        "read_wait_s": total("read_wait_s"),
        "device_s": total("device_s"),  # GPU time in the model (CUDA events); 0 on the CPU
        "heap_trims": int(total("heap_trims")),
        # Bands whose reuse heap reached its ceiling and finished flat (tilenet.runtime).
        "heap_went_flat": sum(r.get("heap_flat_after") is not None for r in records),
        # The longest run of tiles between two resume points: what a kill could have lost.
        "max_step_s": round(max((float(r.get("max_step_s", 0.0)) for r in records), default=0), 3),
        "finalize_s": round(finalize_s, 3),
        "cog_s": round(cog_s, 3),  # classes.tif and probabilities.tif, in finalize
        "total_s": round(time.time() - t0, 3),
    }


def tiles_here(records: list[dict[str, Any]], resumed: list[int]) -> tuple[int, int]:
    """Tiles this run put through the model, and tiles it kept from an interrupted run:
    bands ``resumed`` whole, and the rows of others kept from their progress
    (``tiles_kept``, of which ``tiles_run_kept`` went through the model).

    >>> tiles_here([{"tiles": 4, "tiles_run": 4}, {"tiles": 6, "tiles_run": 5,
    ...     "tiles_kept": 2, "tiles_run_kept": 2}], resumed=[0])
    (3, 6)
    """
    run = kept = 0
    for i, r in enumerate(records):
        if i in resumed:
            kept += int(r["tiles"])
        else:
            kept += int(r.get("tiles_kept", 0))
            run += int(r["tiles_run"]) - int(r.get("tiles_run_kept", 0))
    return run, kept
