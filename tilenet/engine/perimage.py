"""What a run keeps per image, once per image and process: the tiles it skips (foreground
and tissue masks on a thumbnail) and the stain normaliser of the slide.

The bands of one image (run here, or on a dask worker) share these instead of reading the
low-resolution level again for each band; a new image (``key``) replaces them.
"""

from __future__ import annotations

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


def slide_stain(image: Any, reference: str, method: str) -> Any:
    """A stain normaliser (:mod:`tilenet.stain`) fitted once to the image at ``reference``
    (an overview of it), its source estimated once from ``image``'s tissue: one transform for
    every tile or patch of a slide, so tiles meet without seams."""
    if np.dtype(image.dtype) != np.uint8 or image.channels != 3:
        raise InputError(
            f"{image.path}: --stain needs RGB uint8 images, this one is {image.channels} "
            f"x {np.dtype(image.dtype)}"
        )
    from tilenet.io import open_image
    from tilenet.stain import make_stain
    from tilenet.tissue import overview, tissue_rgb

    with open_image(reference) as ref:
        normaliser = make_stain(method, overview(ref))
    return normaliser.with_source(tissue_rgb(image))


def stain_for(key: tuple[Any, ...], cfg: InferConfig, image: Any) -> Any:
    """The stain normaliser of ``cfg.stain`` for the image of ``key`` (None: off)."""
    if not cfg.stain:
        return None
    from tilenet.io.sniff import fingerprint

    # the reference's content, not only its name
    full = (*key, fingerprint(cfg.stain), cfg.stain_method)
    if _STAIN[0] != full:
        _STAIN[:] = [full, slide_stain(image, cfg.stain, cfg.stain_method)]
    return _STAIN[1]
