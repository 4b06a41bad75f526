"""PNG, JPEG and other Pillow formats: read whole, but only when small.

These formats cannot decode a window without decoding what comes before it, so the reader
decodes the image once, on the first read, and keeps the array. The size is checked from the
header first (``Image.open`` does not decode): above ``max_pixels_eager`` the image is refused
with a pointer to ``tilenet convert``, which opens with ``max_pixels_eager=None``. Pillow's own
decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) still applies in every case.

An alpha channel (modes ``RGBA``, ``RGBa``, ``LA``, ``La``, ``PA``) is the image's dataset
mask, as a TIFF's ExtraSamples alpha is (:mod:`tilenet.io.tiff`): alpha 0 marks a pixel
without data (:func:`~tilenet.io.base.valid_mask`). The alpha stays a channel of the pixels;
pick the colour bands (``--bands 1,2,3``) to leave it out of a model's input, as for a TIFF.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilenet.config import ReaderConfig
from tilenet.errors import CorruptImageError, ImageTooLargeError, UnsupportedFormatError, one_line
from tilenet.geometry import Window
from tilenet.io.base import LazyImage, Level
from tilenet.io.sniff import check_pixels

__all__ = ["PilImage", "open_pil"]

#: Pillow mode -> (numpy dtype, channels) as tilenet presents it.
_MODES: dict[str, tuple[str, int]] = {
    "1": ("uint8", 1),
    "L": ("uint8", 1),
    "P": ("uint8", 1),  # palette indices, as label maps store classes
    "LA": ("uint8", 2),
    "La": ("uint8", 2),
    "PA": ("uint8", 2),
    "RGB": ("uint8", 3),
    "YCbCr": ("uint8", 3),
    "LAB": ("uint8", 3),
    "HSV": ("uint8", 3),
    "RGBA": ("uint8", 4),
    "RGBa": ("uint8", 4),
    "RGBX": ("uint8", 4),
    "CMYK": ("uint8", 4),
    "I;16": ("uint16", 1),
    "I;16L": ("uint16", 1),
    "I;16B": ("uint16", 1),
    "I;16N": ("uint16", 1),
    "I": ("int32", 1),
    "F": ("float32", 1),
}
#: Pillow mode -> the channel holding alpha, for modes that have one.
_ALPHA: dict[str, int] = {"LA": 1, "La": 1, "PA": 1, "RGBA": 3, "RGBa": 3}
_COMPRESSION = {"PNG": "deflate", "JPEG": "jpeg", "WEBP": "webp", "GIF": "lzw"}


@dataclass
class PilImage(LazyImage):
    """An image Pillow decodes whole on first read; the array is kept (it is small)."""

    _data: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: The channel holding alpha (an RGBA or LA image), if any.
    _alpha: int | None = field(default=None, repr=False)

    def _has_dataset_mask(self) -> bool:
        return self._alpha is not None

    def _dataset_mask(self, window: Window, level: int, pixels: np.ndarray) -> np.ndarray:
        """The alpha channel of the pixels read: 0 where there is no data."""
        assert self._alpha is not None
        return pixels[:, :, self._alpha]

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._data is None:
                self._data = self._decode()
            return self._data

    def _decode(self) -> np.ndarray:
        from PIL import Image

        with warnings.catch_warnings():
            # The size was checked against our own limit when the image was opened.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(self.path) as im:
                im.load()
                data = np.array(im)
        h, w = self.levels[0].shape
        if data.shape[:2] != (h, w):
            raise CorruptImageError(f"{self.path}: decoded {data.shape}, header said {h} x {w}")
        return data.reshape(h, w, self.channels).astype(self.dtype, copy=False)

    def _read(self, window: Window, level: int) -> np.ndarray:
        return self._decoded()[window.slices]

    def close(self) -> None:
        with self._lock:
            self._data = None


def open_pil(
    path: str | os.PathLike[str],
    *,
    max_pixels_eager: int | None = ReaderConfig.max_pixels_eager,
    max_pixels: int | None = ReaderConfig.max_pixels,
) -> PilImage:
    """Open a Pillow-readable image; refuse it before decoding if it is too large to hold.

    ``max_pixels_eager=None`` lifts tilenet's limit (used by ``convert``); Pillow's
    decompression-bomb guard still refuses absurd headers.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                mode, fmt = im.mode, im.format or "image"
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{p}: refused as a possible decompression bomb ({one_line(exc, typed=False)}); if the file "
            "is trusted, raise PIL.Image.MAX_IMAGE_PIXELS"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"{p}: not a readable image: {one_line(exc, typed=False)}") from exc
    check_pixels(p, h, w, max_pixels=max_pixels)
    if max_pixels_eager is not None and h * w > max_pixels_eager:
        raise ImageTooLargeError(
            f"{p}: {fmt} of {h} x {w} pixels is too large to read whole (limit "
            f"{max_pixels_eager:,} pixels); convert it to a tiled image first: "
            f"tilenet convert {p} {p.with_suffix('.ome.tif').name}"
        )
    if mode not in _MODES:
        raise UnsupportedFormatError(f"{p}: unsupported {fmt} pixel mode {mode!r}")
    dtype, channels = _MODES[mode]
    # No pixel size: a PNG's pHYs and a JPEG's JFIF density are print resolutions (the 72 or
    # 96 dpi of whatever program saved the file), not the size of what the pixels show.
    return PilImage(
        path=p,
        format=fmt.lower(),
        dtype=np.dtype(dtype),
        channels=channels,
        levels=[Level((h, w))],
        compression=_COMPRESSION.get(fmt),
        pixel_size=None,
        metadata={"mode": mode},
        _alpha=_ALPHA.get(mode),
    )
