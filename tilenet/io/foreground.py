"""Foreground (tissue) detection on a low-resolution level: Otsu mask and window fractions.

Shared by the tiler (which patches to keep) and the inference engine (which tiles to skip),
so both decide "background" the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tilenet.geometry import Window, iter_bands

__all__ = ["foreground_fractions", "foreground_mask", "otsu_threshold"]


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance).

    >>> otsu_threshold(np.array([10.0] * 50 + [200.0] * 50))
    105.0
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centers)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between = between[:-1]
    # Between two separated modes the criterion is flat across the gap: take its middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    i = int(best[len(best) // 2])
    return float(edges[i + 1])


def foreground_mask(image: Any, *, max_side: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """A low-resolution boolean foreground mask and its downsample relative to level 0.

    Uses the finest pyramid level no larger than ``max_side``; without one, a thumbnail is
    made from the coarsest level by striding, band by band (never the whole level at once).
    Foreground is darker than the Otsu threshold of the grey level: tissue on a bright slide.
    """
    levels = image.levels
    pick = next((i for i, lv in enumerate(levels) if max(lv.shape) <= max_side), None)
    level = pick if pick is not None else len(levels) - 1
    h, w = levels[level].shape
    step = 1 if pick is not None else math.ceil(max(h, w) / max_side)
    band = step * max(1, 1024 // step)
    rows = []
    for win in iter_bands((h, w), band):
        block = image.read(win, level)[::step, ::step]
        rows.append(block.astype(np.float32).mean(axis=-1))
    grey = np.concatenate(rows, axis=0)
    thr = otsu_threshold(grey)
    mask = grey < thr if grey.max() > grey.min() else np.ones_like(grey, dtype=bool)
    h0, w0 = levels[0].shape
    return mask, (h0 / mask.shape[0], w0 / mask.shape[1])


def foreground_fractions(
    windows: Sequence[Window],
    mask: np.ndarray,
    mask_ds: tuple[float, float],
    level_ds: tuple[float, float],
) -> np.ndarray:
    """Mean of ``mask`` under each window (given at a level with downsample ``level_ds``).

    Uses an integral image, so it costs O(1) per window whatever the window size.
    """
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    factor = (mask_ds[0] / level_ds[0], mask_ds[1] / level_ds[1])
    out = np.empty(len(windows), dtype=np.float64)
    for i, win in enumerate(windows):
        m = win.to_level(factor).clip(*mask.shape)
        if m.area == 0:
            out[i] = 0.0
            continue
        s = integral[m.y1, m.x1] - integral[m.y, m.x1] - integral[m.y1, m.x] + integral[m.y, m.x]
        out[i] = s / m.area
    return out
