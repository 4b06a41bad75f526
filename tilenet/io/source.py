"""Tile sources: a window as decoded pixels (``read``) or as the stored tile bytes (``encoded``).

A reader whose storage tiles can be handed over undecoded returns an :class:`EncodedWindow`
from ``encoded(window, level)``: the bytes of every stored tile the window touches (each
once), the codec, the colour space and where each tile's part lands in the window. A decoder
(``tilenet.engine.decode``: on the CPU, or a GPU one that plugs in by codec) turns a batch of
them into pixels; :func:`decode_window` is the CPU reference it must equal, pixel for pixel,
``read`` of the same window. ``encoded`` returns None when the raw path cannot express the
window (resampled views, band selections, TIFF predictors, planar or strip storage): read it.

This module knows no reader and no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tilenet.geometry import Window

__all__ = ["CODECS", "EncodedTile", "EncodedWindow", "TileSource", "decode_tile", "decode_window"]

#: The codecs an :class:`EncodedWindow` may name.
CODECS = frozenset({"jpeg", "deflate", "lzw", "zstd", "none"})


@dataclass(frozen=True)
class EncodedTile:
    """One stored tile, undecoded, and the part of it a window takes.

    ``src`` is that part in the decoded tile's pixels, ``dst`` where it lands in the window
    (same size). ``key`` names the stored tile: equal keys are the same bytes, so a batch
    decodes each distinct tile once.
    """

    key: Hashable
    data: bytes
    src: Window
    dst: Window


@dataclass(frozen=True)
class EncodedWindow:
    """A window of one level as the stored tiles it touches (decoded: (h, w, samples)).

    ``codec`` is one of :data:`CODECS`. ``photometric`` is the colour space of the coded
    samples as TIFF names it ("minisblack", "rgb", "ycbcr", "separated", ...); a JFIF JPEG is
    "ycbcr" whatever its tag says, as libjpeg decodes it. ``tables`` are the JPEG tables
    (quantisation and Huffman, SOI..EOI) shared by the tiles, or None. ``tile_shape`` is the
    stored tile size (edge tiles are stored whole), ``dtype`` the stored sample type in the
    file's byte order, ``bits`` the bits per sample (12 for 12-bit JPEG in uint16). Pixels of
    the window no tile covers (outside the image, sparse tiles) are 0; no tiles at all means
    the whole window is 0.
    """

    window: Window
    level: int
    codec: str
    photometric: str
    tables: bytes | None
    tile_shape: tuple[int, int]
    dtype: np.dtype[Any]
    samples: int
    bits: int
    tiles: tuple[EncodedTile, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(h, w, samples) of the decoded window."""
        return (self.window.h, self.window.w, self.samples)

    @property
    def nbytes(self) -> int:
        """Encoded bytes carried (what a reader thread fetched)."""
        return sum(len(t.data) for t in self.tiles)


@runtime_checkable
class TileSource(Protocol):
    """Pixels of a window, or its stored tiles (every :class:`~tilenet.io.base.LazyImage`)."""

    def read(self, window: Window, level: int = 0, *, fill: float = 0) -> np.ndarray: ...

    def encoded(self, window: Window, level: int = 0) -> EncodedWindow | None: ...


# Colour spaces for imagecodecs.jpeg_decode as tifffile chooses them from the tags
# (tifffile.jpeg_decode_colorspace): (colorspace, outcolorspace); None leaves libjpeg's.
_JPEG_COLORSPACE: dict[str, tuple[int | None, int | None]] = {
    "minisblack": (None, None),
    "rgb": (2, 2),  # no JFIF: the samples are RGB (Aperio), not what libjpeg would guess
    "ycbcr": (None, 2),
    "separated": (None, 4),
}


def decode_tile(ew: EncodedWindow, data: bytes) -> np.ndarray:
    """One stored tile of ``ew`` decoded with imagecodecs: (th, tw, samples), native order."""
    import imagecodecs

    th, tw = ew.tile_shape
    if ew.codec == "jpeg":
        colorspace, outcolorspace = _JPEG_COLORSPACE[ew.photometric]
        arr = imagecodecs.jpeg_decode(
            data,
            tables=ew.tables,
            colorspace=colorspace,
            outcolorspace=outcolorspace,
            bitspersample=ew.bits,
            shape=(th, tw),
        )
    else:
        codecs: dict[str, Callable[[bytes], Any]] = {
            "deflate": imagecodecs.zlib_decode,
            "lzw": imagecodecs.lzw_decode,
            "zstd": imagecodecs.zstd_decode,
            "none": bytes,
        }
        raw = codecs[ew.codec](data)
        arr = np.frombuffer(raw, dtype=ew.dtype, count=th * tw * ew.samples)
    return np.asarray(arr).reshape(th, tw, ew.samples).astype(ew.dtype.newbyteorder("="))


def decode_window(ew: EncodedWindow) -> np.ndarray:
    """The window's pixels (h, w, samples), decoded on the CPU with imagecodecs.

    The reference every decoder must equal, and the fallback for streams others cannot
    decode (12-bit, CMYK, lossless JPEG).
    """
    out = np.zeros(ew.shape, dtype=ew.dtype.newbyteorder("="))
    for tile in ew.tiles:
        out[tile.dst.slices] = decode_tile(ew, tile.data)[tile.src.slices]
    return out
