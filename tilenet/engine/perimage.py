"""What a run keeps per image, once per image and process: the tiles it skips (foreground
and tissue masks on a thumbnail) and the stain normaliser of the slide.

The bands of one image (run here, or on a dask worker) share these instead of reading the
low-resolution level again for each band; a new image (``key``) replaces them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from tilenet.config import InferConfig
from tilenet.errors import InputError
from tilenet.geometry import Tile

__all__ = ["skip_mask", "slide_stain", "stain_for"]

#: The last image's masks: [(image key, which masks), (foreground, tissue)].
_MASK: list[Any] = [None, None]
#: The last image's stain normaliser: [(image key, reference, method), normaliser].
_STAIN: list[Any] = [None, None]


def skip_mask(
    key: tuple[Any, ...], cfg: InferConfig, image: Any, tiles: list[Tile]
) -> np.ndarray | None:
    """Tiles whose low-resolution foreground fraction is below ``cfg.min_foreground`` or whose
    tissue fraction (:func:`tilenet.tissue.detect_tissue`) is below ``cfg.tissue`` (None:
    neither is asked for). ``key`` identifies the image."""
    if cfg.min_foreground <= 0 and cfg.tissue <= 0:
        return None
    from tilenet.io.foreground import foreground_fractions, foreground_mask
    from tilenet.tissue import detect_tissue

    full = (*key, cfg.min_foreground > 0, cfg.tissue > 0)
    if _MASK[0] != full:
        fg = foreground_mask(image) if cfg.min_foreground > 0 else None
        _MASK[:] = [full, (fg, detect_tissue(image) if cfg.tissue > 0 else None)]
    fg, tissue = _MASK[1]
    ds = image.levels[cfg.level].downsample
    cores = [t.core for t in tiles]
    skip = np.zeros(len(tiles), dtype=bool)
    if fg is not None:
        skip |= foreground_fractions(cores, fg[0], fg[1], ds) < cfg.min_foreground
    if tissue is not None:
        skip |= tissue.fractions(cores, ds) < cfg.tissue
    return skip


def slide_stain(
    image: Any, reference: str | None, method: str, *, state: Mapping[str, Any] | None = None
) -> Any:
    """A stain normaliser (:mod:`tilenet.stain`) fitted once to the image at ``reference``
    (an overview of it), or the fitted one ``state`` describes (a model's or an embedding's:
    :func:`tilenet.stain.stain_from_state`), its source estimated once from ``image``'s
    tissue: one transform for every tile or patch of a slide, so tiles meet without seams."""
    if np.dtype(image.dtype) != np.uint8 or image.channels != 3:
        raise InputError(
            f"{image.path}: stain normalisation needs RGB uint8 images, this one is "
            f"{image.channels} x {np.dtype(image.dtype)}"
            + ("" if reference else " (the model was trained with data.stain; --stain none)")
        )
    from tilenet.io import open_image
    from tilenet.stain import make_stain, stain_from_state
    from tilenet.tissue import overview, tissue_rgb

    if reference:
        with open_image(reference) as ref:
            normaliser = make_stain(method, overview(ref))
    elif state is not None:
        normaliser = stain_from_state(dict(state))
    else:
        raise InputError("slide_stain: give a reference image or a fitted state")
    return normaliser.with_source(tissue_rgb(image))


def stain_for(
    key: tuple[Any, ...], cfg: InferConfig, image: Any, state: Mapping[str, Any] | None = None
) -> Any:
    """The stain normaliser for the image of ``key``: ``cfg.stain``'s reference when one is
    named, else the model's fitted one (``state``: ``spec.stain``, stored by training with
    ``data.stain``); None: off (neither, or ``cfg.stain`` is ``"none"``)."""
    if cfg.stain == "none" or not (cfg.stain or state):
        return None
    if cfg.stain:
        from tilenet.io.sniff import fingerprint

        # the reference's content, not only its name
        full: tuple[Any, ...] = (*key, fingerprint(cfg.stain), cfg.stain_method)
    else:
        full = (*key, "model", json.dumps(state, sort_keys=True))
    if _STAIN[0] != full:
        _STAIN[:] = [full, slide_stain(image, cfg.stain, cfg.stain_method, state=state)]
    return _STAIN[1]
