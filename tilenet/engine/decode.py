"""Decoders: a batch of :class:`~tilenet.io.source.EncodedWindow` -> one (B, C, h, w) tensor.

Reader threads fetch stored tile bytes only (``image.encoded(window, level)``); a decoder
turns a batch into pixels on a device, decoding each distinct tile of the batch once
(overlapping read windows share tiles). Decoders plug in by name (:data:`DECODERS`,
:func:`register_decoder`) and say which codecs they take; every one must equal
:func:`tilenet.io.source.decode_window`, which is what ``read`` returns.

The ``cpu`` decoder sends 8-bit baseline/progressive JPEG with 1 or 3 components through
libjpeg-turbo in torchvision (the decoder a GPU one replaces) and the rest (12-bit, CMYK,
lossless JPEG; deflate, LZW, zstd, none) through imagecodecs. Two stream fixes make a TIFF
tile a JPEG file any decoder reads as tifffile does:

* the level's JPEG tables (quantisation and Huffman) go in front of each tile's stream;
* an RGB-tagged stream without a JFIF or Adobe marker (Aperio) gets an Adobe APP14 marker
  with transform 0. libjpeg guesses the colour space from the stream alone, and takes
  component ids 0, 1, 2 for YCbCr: without it the colours are wrong (off by up to ~250).

The ``cuda-jpeg`` decoder takes JPEG only: the distinct tiles of a batch go to the model's
device in one batched :func:`decode_jpegs` call (nvJPEG on CUDA, the same call on
libjpeg-turbo on the CPU) and the windows are assembled there. nvJPEG upsamples 4:2:0 and
4:2:2 chroma differently from libjpeg-turbo, so on CUDA it equals ``read`` within
torchvision's own bound (mean |diff| < 2), not bit for bit. :func:`choose_decoder` is the
rule ``InferConfig.decode`` (``--decode auto|cpu|gpu``) applies per image.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from tilenet.errors import InputError
from tilenet.geometry import Window
from tilenet.io.source import EncodedWindow, decode_tile

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADOBE_RGB",
    "DECODERS",
    "CpuDecoder",
    "Decoder",
    "DeviceJpegDecoder",
    "choose_decoder",
    "decode_jpegs",
    "decode_summary",
    "decoder_for",
    "jpeg_frame",
    "jpeg_stream",
    "register_decoder",
]

#: Adobe APP14 segment, transform 0: the three components are RGB, not YCbCr.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# Start-of-frame markers libjpeg-turbo in torchvision decodes: baseline, extended, progressive
# (Huffman). SOF3 (lossless) and arithmetic coding go to imagecodecs.
_TORCHVISION_SOF = frozenset({0xC0, 0xC1, 0xC2})


class Decoder(Protocol):
    """Turns a batch of encoded windows (all the same shape) into (B, C, h, w) pixels."""

    codecs: ClassVar[frozenset[str]]

    def decode(self, batch: Sequence[EncodedWindow], device: Any = "cpu") -> torch.Tensor: ...


#: Decoders by name: what ``InferConfig.decode`` will name.
DECODERS: dict[str, Callable[[], Decoder]] = {}


def register_decoder(name: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: register a :class:`Decoder` class under ``name``."""

    def add(cls: type[Any]) -> type[Any]:
        if name in DECODERS:
            raise ValueError(f"decoder {name!r} is registered already")
        DECODERS[name] = cls
        return cls

    return add


# -- JPEG streams -----------------------------------------------------------------------------
def _segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment after SOI, up to and including SOS or EOI.

    Walks lengths, never searches for a marker: FF D9 can occur inside a table.
    """
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return  # not a marker where one must be: a corrupt stream; the decoder says so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == _EOI or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            yield marker, pos, pos + 2
            if marker == _EOI:
                return
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        yield marker, pos, end
        if marker == _SOS:
            return
        pos = end


def jpeg_frame(stream: bytes) -> tuple[int, int, int, bool]:
    """(SOF marker, precision, components, colour marker) of a JPEG stream or tile.

    The colour marker is a JFIF APP0 or an Adobe APP14, which fix the colour space. A stream
    without a frame header gives (0, 0, 0, marker).
    """
    colour = False
    for marker, start, end in _segments(stream):
        body = stream[start + 4 : end]
        if (marker == 0xE0 and body.startswith(b"JFIF\x00")) or (
            marker == 0xEE and body.startswith(b"Adobe")
        ):
            colour = True
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, body[0], body[5], colour
    return 0, 0, 0, colour


def jpeg_stream(tables: bytes | None, tile: bytes, photometric: str) -> bytes:
    """A stored JPEG tile as a standalone JPEG file that decodes as tifffile decodes it.

    The tables' segments go between SOI and the tile's own (which still override them, as in
    an abbreviated stream); an RGB stream without a JFIF/Adobe marker gets :data:`ADOBE_RGB`.
    """
    if tile[:2] != b"\xff\xd8":
        raise ValueError("a JPEG tile must start with SOI (FF D8)")
    stream = tile
    if tables:
        end = next((s for m, s, _ in _segments(tables) if m == _EOI), len(tables))
        stream = tables[:end] + tile[2:]
    if photometric == "rgb":
        _, _, components, colour = jpeg_frame(stream)
        if components == 3 and not colour:
            stream = stream[:2] + ADOBE_RGB + stream[2:]
    return stream


def decode_jpegs(streams: Sequence[bytes], device: Any = "cpu") -> list[torch.Tensor]:
    """Decode whole JPEG files to (C, H, W) uint8 tensors: the one call of torchvision's
    ``decode_jpeg`` (deprecated in favour of TorchCodec; change it here only)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    with warnings.catch_warnings():  # torchvision 0.29 warns on every call
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        images = list(decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=device))
    dev = torch.device(device)
    if dev.type == "cuda":
        # Some torchvision releases make the legacy default stream, not the current one,
        # wait for nvJPEG's stream: the current stream waits for the default one as well.
        current, default = torch.cuda.current_stream(dev), torch.cuda.default_stream(dev)
        if current != default:
            current.wait_stream(default)
    return images


# -- the CPU decoder --------------------------------------------------------------------------
@register_decoder("cpu")
class CpuDecoder:
    """libjpeg-turbo (torchvision) for 8-bit JPEG, imagecodecs for the rest; then to ``device``.

    ``tiles`` counts the distinct tiles decoded by each path ("torchvision", "imagecodecs").
    """

    codecs: ClassVar[frozenset[str]] = frozenset({"jpeg", "deflate", "lzw", "zstd", "none"})

    def __init__(self) -> None:
        self.tiles: Counter[str] = Counter()

    def decode(self, batch: Sequence[EncodedWindow], device: Any = "cpu") -> torch.Tensor:
        """(B, C, h, w) pixels of ``batch`` (channels_last memory) on ``device``."""
        import torch

        first = _check_batch(batch, self.codecs)
        dtype = first.dtype.newbyteorder("=")
        decoded = self._tiles(batch)
        out = torch.from_numpy(np.zeros((len(batch), *first.shape), dtype=dtype))
        for b, ew in enumerate(batch):
            for tile in ew.tiles:
                seg = decoded[tile.key]
                out[(b, *tile.dst.slices)] = seg[tile.src.slices]
        # NHWC viewed as NCHW is channels_last: no copy, as the predictor's own input.
        return out.to(device).permute(0, 3, 1, 2)

    def _tiles(self, batch: Sequence[EncodedWindow]) -> dict[Hashable, torch.Tensor]:
        """Each distinct tile of ``batch`` decoded once, as (th, tw, C)."""
        import torch

        todo = _distinct(batch)
        done = _decode_streams(todo, "cpu", self.tiles)
        for key, (ew, data) in todo.items():
            if key not in done:
                done[key] = torch.from_numpy(decode_tile(ew, data))
                self.tiles["imagecodecs"] += 1
        return done


# -- the device decoder -----------------------------------------------------------------------
@register_decoder("cuda-jpeg")
class DeviceJpegDecoder:
    """8-bit JPEG tiles decoded on the model's device by one batched call per batch.

    On CUDA that call is nvJPEG (:func:`decode_jpegs`); on the CPU it is the same call, on
    libjpeg-turbo (equal to ``read`` bit for bit). What it cannot decode (12-bit, CMYK,
    lossless JPEG) is decoded by imagecodecs on the host and copied over. The windows are
    assembled on the device, so only the compressed bytes cross the bus. ``tiles`` counts
    the distinct tiles per path: "torchvision" (CPU), "nvjpeg" (CUDA), "imagecodecs".
    """

    codecs: ClassVar[frozenset[str]] = frozenset({"jpeg"})

    def __init__(self) -> None:
        self.tiles: Counter[str] = Counter()

    def decode(self, batch: Sequence[EncodedWindow], device: Any = "cpu") -> torch.Tensor:
        """(B, C, h, w) pixels of ``batch`` (channels_last memory), made on ``device``."""
        import torch

        first = _check_batch(batch, self.codecs)
        device = torch.device(device)
        todo = _distinct(batch)
        done = _decode_streams(todo, device, self.tiles)
        pin = device.type == "cuda"
        for key, (ew, data) in todo.items():
            if key not in done:
                pixels = torch.from_numpy(decode_tile(ew, data))
                done[key] = pixels.pin_memory().to(device, non_blocking=True) if pin else pixels
                self.tiles["imagecodecs"] += 1
        dtype = torch.from_numpy(np.zeros(0, first.dtype.newbyteorder("="))).dtype
        out = torch.zeros((len(batch), *first.shape), dtype=dtype, device=device)
        for b, ew in enumerate(batch):
            for tile in ew.tiles:
                seg = done[tile.key]
                out[(b, *tile.dst.slices)] = seg[tile.src.slices]
        return out.permute(0, 3, 1, 2)


def choose_decoder(mode: str, device: Any, sample: EncodedWindow | None) -> tuple[str | None, str]:
    """What ``InferConfig.decode`` (``auto``, ``cpu``, ``gpu``) runs for one image.

    Returns (a :data:`DECODERS` name, or None for the reader's ``read`` in reader threads,
    and why). ``sample`` is the image's ``encoded`` of one window (None: no raw path). The
    device decoder is taken for 8-bit 1- or 3-component JPEG on a CUDA device; everything
    else (JPEG 2000, deflate, LZW, zstd, 12-bit or CMYK JPEG) is read on the CPU. ``gpu``
    off CUDA is an error: the caller asked for what this machine cannot do.
    """
    device_type = getattr(device, "type", str(device).split(":")[0])
    if mode == "cpu":
        return None, "asked for: decode=cpu"
    if device_type != "cuda":
        if mode == "gpu":
            raise InputError(
                f"--decode gpu needs the model on a CUDA device, and it runs on {device}; "
                "use --decode auto or cpu (or --device cuda on a machine with a GPU)"
            )
        return None, f"the model runs on {device_type}: no device decoder"
    if sample is None:
        return None, (
            "no raw tile path (JPEG 2000 or another codec tiles cannot be handed over in, "
            "strips, a predictor, a band selection or a resampled view)"
        )
    if sample.codec not in DeviceJpegDecoder.codecs:
        return None, f"{sample.codec} tiles decode on the CPU"
    if sample.bits != 8 or sample.photometric not in ("minisblack", "rgb", "ycbcr"):
        return None, f"{sample.bits}-bit {sample.photometric} JPEG: not for nvJPEG"
    return "cuda-jpeg", "8-bit JPEG tiles on a CUDA device"


def decoder_for(
    image: Any, level: int, mode: str, device: Any
) -> tuple[Decoder | None, dict[str, Any]]:
    """The decoder :func:`choose_decoder` picks for ``image`` at ``level`` (None: its
    ``read``) and the record of it (``summary.json``'s ``decode``). The image's codec is
    probed (one tile's bytes) only where the device decoder could run."""
    import logging

    sample = None
    device_type = getattr(device, "type", str(device).split(":")[0])
    if mode != "cpu" and device_type == "cuda" and hasattr(image, "encoded"):
        sample = image.encoded(Window(0, 0, 1, 1), level)
    name, why = choose_decoder(mode, device, sample)
    if name is None and mode == "gpu":
        logging.getLogger(__name__).warning(
            "%s: --decode gpu: %s; read on the CPU", getattr(image, "path", "image"), why
        )
    return (DECODERS[name]() if name else None), {"decoder": name or "read", "reason": why}


# -- shared -------------------------------------------------------------------------------------
def _distinct(batch: Sequence[EncodedWindow]) -> dict[Hashable, tuple[EncodedWindow, bytes]]:
    """Each distinct stored tile of ``batch`` (by key) with its window and bytes."""
    todo: dict[Hashable, tuple[EncodedWindow, bytes]] = {}
    for ew in batch:
        for tile in ew.tiles:
            todo.setdefault(tile.key, (ew, tile.data))
    return todo


def _decode_streams(
    todo: dict[Hashable, tuple[EncodedWindow, bytes]], device: Any, counts: Counter[str]
) -> dict[Hashable, torch.Tensor]:
    """The tiles of ``todo`` that libjpeg-turbo/nvJPEG decode as tifffile does, decoded by one
    call of :func:`decode_jpegs` on ``device``, as (th, tw, C); the rest are left out.

    A stream the batched call rejects makes it fail whole: then each is tried alone, and the
    ones that still fail are left to imagecodecs.
    """
    streams = {
        key: jpeg_stream(ew.tables, data, ew.photometric)
        for key, (ew, data) in todo.items()
        if ew.codec == "jpeg" and _torchvision_takes(ew, data)
    }
    if not streams:
        return {}
    try:
        images: list[Any] = decode_jpegs(list(streams.values()), device)
    except RuntimeError:  # a stream the decoder rejects
        images = []
        for s in streams.values():
            try:
                images.append(decode_jpegs([s], device)[0])
            except RuntimeError:
                images.append(None)
    done: dict[Hashable, torch.Tensor] = {}
    for key, img in zip(streams, images, strict=True):
        ew = todo[key][0]
        if img is not None and tuple(img.shape) == (ew.samples, *ew.tile_shape):
            done[key] = img.permute(1, 2, 0)
    route = "nvjpeg" if str(device).startswith("cuda") else "torchvision"
    if done:
        counts[route] += len(done)
    return done


def _torchvision_takes(ew: EncodedWindow, tile: bytes) -> bool:
    """Whether libjpeg-turbo in torchvision decodes this tile as tifffile does."""
    if ew.photometric not in ("minisblack", "rgb", "ycbcr") or ew.bits != 8:
        # CMYK ("separated"): torchvision converts it to RGB the Adobe (inverted) way, and
        # GPU decoders take no CMYK; 12-bit: libjpeg in torchvision and nvJPEG are 8-bit.
        return False
    sof, precision, components, _ = jpeg_frame(tile)
    return sof in _TORCHVISION_SOF and precision == 8 and components in (1, 3)


def _check_batch(batch: Sequence[EncodedWindow], codecs: frozenset[str]) -> EncodedWindow:
    if not batch:
        raise ValueError("cannot decode an empty batch")
    first = batch[0]
    for ew in batch:
        if ew.codec not in codecs:
            raise ValueError(f"codec {ew.codec!r} is not one of {sorted(codecs)}")
        if ew.shape != first.shape or ew.dtype.newbyteorder("=") != first.dtype.newbyteorder("="):
            raise ValueError(
                f"a batch must share shape and dtype: {ew.shape} {ew.dtype} vs "
                f"{first.shape} {first.dtype}"
            )
    return first


def decode_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's ``decode``: the band records' decoders (usually one) with the first band's reason and tiles summed."""
    infos = [r["decode"] for r in records if r.get("decode")]
    if not infos:
        return {"decoder": "read", "reason": "unrecorded"}
    tiles: dict[str, int] = {}
    for info in infos:
        for path, n in info.get("tiles", {}).items():
            tiles[path] = tiles.get(path, 0) + int(n)
    names = sorted({str(i["decoder"]) for i in infos})
    return {"decoder": ",".join(names), "reason": infos[0]["reason"], "tiles": tiles}
