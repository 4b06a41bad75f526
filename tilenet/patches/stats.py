"""Statistics of training data: per-channel mean/std and classes of stores or images, and
the repeat factors that balance rare classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tilenet.errors import InputError
from tilenet.geometry import iter_bands
from tilenet.normalize import channel_stats
from tilenet.patches.patchstore import read_attrs
from tilenet.patches.stream import PathLike, as_paths

__all__ = ["repeat_factors", "store_stats"]


def _store_attrs(path: Any) -> dict[str, Any] | None:
    """A patch store's attributes (``path`` from :func:`as_paths`: a URL is a str), or None."""
    if isinstance(path, Path) and not (path / "zarr.json").is_file():
        return None  # an image or a directory of images: no zarr open attempted
    return read_attrs(path)


def store_stats(
    stores: PathLike | Sequence[PathLike], *, bands: Sequence[int] | None = None
) -> dict[str, Any]:
    """Per-channel mean/std, class names and channel count of patch stores or image dirs.

    For stores these come from the attributes the tiler wrote (combined, weighted by pixel
    count). For images (files or directories) they are computed from a low-resolution
    level, so this stays cheap for gigapixel images, over ``bands`` (1-based; all when None)
    and leaving out nodata pixels.
    """
    paths = as_paths(stores)
    if not paths:
        raise InputError("no patch stores or images given")
    found = [_store_attrs(p) for p in paths]  # read once: a URL's costs a request
    if all(at is not None for at in found):
        s, ss, n, chans = None, None, 0.0, None
        names: list[str] = []
        for p, at in zip(paths, found, strict=True):
            assert at is not None
            if chans is not None and at["channels"] != chans:
                raise InputError(f"{p}: has {at['channels']} channels, other stores {chans}")
            chans = at["channels"]
            npix = sum(src["npix"] for src in at["sources"]) or 1.0
            mean, std = np.asarray(at["mean"]), np.asarray(at["std"])
            s = (s if s is not None else 0) + mean * npix
            ss = (ss if ss is not None else 0) + (std**2 + mean**2) * npix
            n += npix
            names = names or list(at.get("class_names") or [])
        assert s is not None and ss is not None and chans is not None
        mean, std = channel_stats(s, ss, n)
        return {"mean": mean.tolist(), "std": std.tolist(), "class_names": names, "channels": chans}
    return _image_stats(paths, bands=bands)


def _image_stats(
    paths: list[Path], *, max_side: int = 1024, bands: Sequence[int] | None = None
) -> dict[str, Any]:
    from tilenet.io import open_image
    from tilenet.io.paths import resolve_images

    s = ss = None
    n = 0
    chans = None
    for path in resolve_images([str(p) for p in paths]):
        with open_image(path).select_bands(bands) as img:
            lv = next(
                (i for i, v in enumerate(img.levels) if max(v.shape) <= max_side),
                len(img.levels) - 1,
            )
            h, w = img.levels[lv].shape
            step = max(1, math.ceil(max(h, w) / max_side))
            band = step * max(1, 512 // step)
            for win in iter_bands((h, w), band):
                px, valid = img.read_masked(win, lv)
                px = px[::step, ::step]
                px = px[valid[::step, ::step]] if valid is not None else px
                px = px.reshape(-1, img.channels).astype(np.float64)
                s = px.sum(0) + (s if s is not None else 0)
                ss = (px * px).sum(0) + (ss if ss is not None else 0)
                n += px.shape[0]
            chans = img.channels
    assert s is not None and ss is not None
    mean, std = channel_stats(s, ss, n)
    return {"mean": mean.tolist(), "std": std.tolist(), "class_names": [], "channels": chans}


def repeat_factors(
    class_patches: Sequence[int] | np.ndarray, total: int, *, threshold: float = 0.3
) -> np.ndarray:
    """Repeat factor per class: ``max(1, sqrt(threshold / f_c))``, f_c = share of patches with c.

    Repeat-factor sampling (Gupta et al., LVIS 2019): a patch is repeated by the largest
    factor of the classes it contains, so rare classes are seen more often while common
    ones keep their rate.

    >>> repeat_factors([100, 100, 1], 100).round(2).tolist()
    [1.0, 1.0, 5.48]
    """
    f = np.asarray(class_patches, dtype=np.float64) / max(total, 1)
    with np.errstate(divide="ignore"):
        r = np.sqrt(threshold / np.where(f > 0, f, np.inf))
    return np.maximum(1.0, r)
