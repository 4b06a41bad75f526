"""The one way to derive the image a stage runs on: bands, then resolution, then level.

The tiler, the training data, inference and validation each take an opened image and the
options of their config; :func:`view` turns them into a :class:`View` in one fixed order
(bands are picked first, so resampling reads only those; the level is the view's own), and
returns a view it is given unchanged. An image already derived so (its bands picked, or
resampled) is not derived again, so a stage may hand the image it opened or the one it
derived to the next step alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tilenet.config import ResolutionConfig
from tilenet.errors import InputError
from tilenet.io.base import LazyImage
from tilenet.io.resolution import ResampledImage, Resolution, at_resolution

__all__ = ["View", "view"]


@dataclass(frozen=True)
class View:
    """``image`` as a stage runs it, read at pyramid ``level``; ``resolution`` says how it
    was resampled (None: the file's own pixels)."""

    image: LazyImage
    level: int = 0
    resolution: Resolution | None = None


def view(
    image: LazyImage | View,
    *,
    bands: Sequence[int] | None = None,
    resolution: ResolutionConfig | None = None,
    level: int = 0,
) -> View:
    """``image`` with ``bands`` picked (1-based; None: all), at the pixel size
    ``resolution`` asks for (:func:`~tilenet.io.resolution.at_resolution`; then ``level``
    must be 0 and the view is read at its level 0), read at ``level``.

    ``bands`` are the file's bands: an image whose bands are already those is not picked
    again, and one already resampled is not resampled again (at its level 0). A
    :class:`View` is returned as it is: a view is derived once, so options given with one are
    an :class:`~tilenet.errors.InputError`.
    """
    if isinstance(image, View):
        if bands or resolution is not None or level:
            raise InputError(
                f"{image.image.path}: is already a view; derive it once, from the opened image"
            )
        return image
    if not 0 <= level < len(image.levels):
        raise InputError(
            f"{image.path}: level {level} does not exist; the image has levels "
            f"0..{len(image.levels) - 1}"
        )
    picked = image
    if not bands or image.metadata.get("bands") != list(bands):
        picked = image.select_bands(bands)
    if resolution is None:
        return View(picked, level, None)
    if isinstance(picked, ResampledImage):
        return View(picked, 0, picked.resolution)
    out, res = at_resolution(picked, resolution, level=level)
    return View(out, level if res is None else 0, res)
