"""Where to cut one image: open it at the target resolution, check its labels, pick windows.

:func:`plan_image` opens an image (and its label image or vector labels) once, checks them
against each other and returns an :class:`ImagePlan`: the patch windows of the grid
:meth:`tilenet.geometry.TileGrid.for_patches` that pass the foreground and annotation
and tissue filters. :mod:`tilenet.patches.tiler` then reads and writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilenet.config import ResolutionConfig
from tilenet.errors import InputError, ShapeMismatchError, one_line
from tilenet.geometry import TileGrid, Window
from tilenet.io.foreground import foreground_fractions, foreground_mask
from tilenet.tissue import detect_tissue

__all__ = ["ImagePlan", "open_at", "plan_image", "plan_or_reason"]


@dataclass
class ImagePlan:
    """What to write for one image."""

    path: Path
    label: Path | None
    shape: tuple[int, int, int]
    dtype: str
    fingerprint: str
    windows: list[Window]
    #: The content fingerprint of its labels (label image or vector file); None: none.
    labels_fingerprint: str | None = None
    start: int = 0
    #: Vector labels (QuPath annotations or a vector file) rasterized per window.
    vector: Any = None
    #: The image's bands to keep (1-based, in this order); None: all.
    bands: tuple[int, ...] | None = None

    #: The pixel size its patches have (``pixel_record``), and how it was resampled.
    pixel: dict[str, Any] | None = None
    resolution: dict[str, Any] | None = None


def open_at(
    path: Path | str,
    limits: dict[str, Any],
    resolution: ResolutionConfig | None,
    level: int,
    bands: Sequence[int] | None = None,
) -> tuple[Any, int]:
    """The image (its ``bands``, 1-based, or all) at ``resolution`` (a resampled view, see
    :mod:`tilenet.io.resolution`) and the level to read it at: ``level`` without a target,
    else the view's level 0."""
    from tilenet.io import open_image
    from tilenet.io.view import view

    img = open_image(path, **limits)
    try:
        v = view(img, bands=bands, resolution=resolution, level=level)
    except BaseException:
        img.close()
        raise
    return v.image, v.level


def plan_or_reason(*args: Any, **kwargs: Any) -> ImagePlan | str:
    """:func:`plan_image`, or the one-line reason it failed (batches go on without it)."""
    try:
        return plan_image(*args, **kwargs)
    except Exception as exc:
        return one_line(exc)


def plan_image(
    path: Path,
    label: Path | None,
    fp: str,
    *,
    patch: int,
    overlap: int,
    level: int,
    min_foreground: float,
    mask_max_side: int,
    limits: dict[str, Any],
    tissue: float = 0.0,
    vector: Any = None,
    vindex: int = 0,
    min_annotated: float = 0.0,
    bands: Sequence[int] | None = None,
    resolution: ResolutionConfig | None = None,
) -> ImagePlan:
    """The plan of one image: checked against its label image (same size, one channel, the
    same pyramid level), its windows on the patch grid filtered by foreground, by tissue
    (at least ``tissue`` of a window on the mask of :func:`tilenet.tissue.detect_tissue`;
    0: off) and, with ``vector`` labels, by annotation (``vindex``: the image's index in
    them)."""
    from tilenet.io import open_image
    from tilenet.io.resolution import ResampledImage, label_view, pixel_record

    img, level = open_at(path, limits, resolution, level, bands)  # the level exists
    with img:
        lh, lw = img.levels[level].shape
        if label is not None:
            with open_image(label, **limits) as lab:
                src = img.source if isinstance(img, ResampledImage) and img.source else img
                if lab.shape[:2] != src.shape[:2]:
                    raise ShapeMismatchError(
                        f"{label}: label image is {lab.shape[0]}x{lab.shape[1]} but {path} is "
                        f"{src.shape[0]}x{src.shape[1]}; labels must have the image's size"
                    )
                lab = label_view(lab, img)  # on a resampled view's grid (nearest)
                if lab.channels != 1:
                    raise InputError(
                        f"{label}: label image has {lab.channels} channels; expected one "
                        "(a class index per pixel)"
                    )
                if level >= len(lab.levels) or lab.levels[level].shape != (lh, lw):
                    raise ShapeMismatchError(
                        f"{label}: has no level {level} of size {lh}x{lw} matching {path}; "
                        "tile at --level 0 or write the labels with the same pyramid"
                    )
        grid = TileGrid.for_patches((lh, lw), patch, overlap)
        # An image smaller than a patch gives one window of the whole image; read it as a
        # full patch (the reader zero-fills past the edge) so every patch is P x P.
        windows = [Window(w.y, w.x, patch, patch) for w in grid.windows()]
        if min_foreground > 0:
            mask, mask_ds = foreground_mask(img, max_side=mask_max_side)
            frac = foreground_fractions(windows, mask, mask_ds, img.levels[level].downsample)
            windows = [w for w, f in zip(windows, frac, strict=True) if f >= min_foreground]
        if tissue > 0:
            frac = detect_tissue(img).fractions(windows, img.levels[level].downsample)
            windows = [w for w, f in zip(windows, frac, strict=True) if f >= tissue]
        vlab = None
        if vector is not None:
            vlab = vector.open(vindex, img)
            windows = _annotated_windows(vlab, windows, level, vector.outside, min_annotated)
        return ImagePlan(
            path=path,
            label=vector.files[vindex] if vector is not None else label,
            shape=tuple(img.shape),
            dtype=str(np.dtype(img.dtype)),
            fingerprint=fp,
            windows=windows,
            vector=vlab,
            bands=tuple(bands) if bands else None,
            pixel=pixel_record(img, level),
            resolution=img.metadata.get("resolution"),
        )


def _annotated_windows(
    lab: Any, windows: list[Window], level: int, outside: str, min_annotated: float
) -> list[Window]:
    """The windows to cut where vector labels are: none for a scene they miss (warned when
    the labels were opened); with outside="ignore" only windows with annotated pixels (and at
    least ``min_annotated`` of them); with outside="background" all, or those with
    ``min_annotated`` > 0 annotated."""
    if lab.empty:
        return []
    if outside == "background" and min_annotated <= 0:
        return windows
    windows = [w for w, hit in zip(windows, lab.candidates(windows, level), strict=True) if hit]
    return [
        w for w in windows if (f := lab.annotated_fraction(w, level)) > 0 and f >= min_annotated
    ]
