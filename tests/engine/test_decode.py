"""Decoders: JPEG stream repair, the registry, batches of hand-made encoded windows.

The contract over real TIFF layouts (decoded == read(), bit for bit) is in
tests/io/test_source.py; these tests build EncodedWindows directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
import torch

from tilenet.engine.decode import (
    ADOBE_RGB,
    DECODERS,
    CpuDecoder,
    jpeg_frame,
    jpeg_stream,
    register_decoder,
)
from tilenet.geometry import Window
from tilenet.io.source import EncodedTile, EncodedWindow, decode_window

TILE = Window(0, 0, 16, 16)


def _rgb(h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 30, (h, w, 3))
    return (np.stack([yy * 9, xx * 7, yy * xx], -1) + noise).astype(np.uint8)


def _window(
    tiles: list[tuple[Any, bytes, Window, Window]],
    *,
    window: Window = TILE,
    codec: str = "jpeg",
    photometric: str = "ycbcr",
    samples: int = 3,
    dtype: Any = np.uint8,
    bits: int = 8,
) -> EncodedWindow:
    return EncodedWindow(
        window=window,
        level=0,
        codec=codec,
        photometric=photometric,
        tables=None,
        tile_shape=(16, 16),
        dtype=np.dtype(dtype),
        samples=samples,
        bits=bits,
        tiles=tuple(EncodedTile(*t) for t in tiles),
    )


def test_the_cpu_decoder_is_registered_and_names_are_unique() -> None:
    assert DECODERS["cpu"] is CpuDecoder
    assert {"jpeg", "deflate", "lzw", "zstd", "none"} <= CpuDecoder.codecs
    with pytest.raises(ValueError, match="'cpu' is registered already"):
        register_decoder("cpu")(CpuDecoder)


def test_jpeg_frame_reads_the_frame_header() -> None:
    rgb = _rgb()
    assert jpeg_frame(imagecodecs.jpeg8_encode(rgb)) == (0xC0, 8, 3, True)  # JFIF
    assert jpeg_frame(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb[..., 0]))) == (
        0xC0,
        8,
        1,
        True,
    )
    twelve = imagecodecs.jpeg8_encode(rgb.astype(np.uint16) * 16, bitspersample=12)
    assert jpeg_frame(twelve)[:3] == (0xC1, 12, 3)
    assert jpeg_frame(imagecodecs.jpeg8_encode(rgb, lossless=True))[0] == 0xC3
    adobe = imagecodecs.jpeg8_encode(rgb, outcolorspace="RGB")
    assert jpeg_frame(adobe) == (0xC0, 8, 3, True) and ADOBE_RGB[:11] in adobe
    assert jpeg_frame(b"\xff\xd8\xff\xd9") == (0, 0, 0, False)


def test_jpeg_stream_splices_tables_by_walking_segments() -> None:
    """The tables' EOI is found by segment lengths: FF D9 inside a table is table data."""
    dqt = b"\xff\xdb\x00\x43\x00" + bytes([255, 217] * 32)  # 64 entries, "FF D9" among them
    tables = b"\xff\xd8" + dqt + b"\xff\xd9"
    tile = b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00"
    assert jpeg_stream(tables, tile, "ycbcr") == b"\xff\xd8" + dqt + tile[2:]
    assert jpeg_stream(None, tile, "ycbcr") == tile
    with pytest.raises(ValueError, match="SOI"):
        jpeg_stream(tables, tile[2:], "ycbcr")


def test_jpeg_stream_marks_rgb_only_where_the_stream_does_not_say() -> None:
    rgb = _rgb()
    jfif = imagecodecs.jpeg8_encode(rgb)
    adobe = imagecodecs.jpeg8_encode(rgb, outcolorspace="RGB")
    gray = imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb[..., 0]))
    bare = adobe.replace(b"\xff\xee", b"\xff\xe1", 1)  # the Adobe APP14 becomes an APP1
    assert jpeg_frame(bare)[3] is False
    for stream in (jfif, adobe):
        assert jpeg_stream(None, stream, "rgb") == stream
    assert jpeg_stream(None, gray, "rgb") == gray  # one component: no colour transform
    assert jpeg_stream(None, bare, "ycbcr") == bare
    assert jpeg_stream(None, bare, "rgb") == bare[:2] + ADOBE_RGB + bare[2:]


def test_a_batch_places_tiles_and_fills_the_rest_with_zeros() -> None:
    rgb = _rgb()
    data = imagecodecs.jpeg8_encode(rgb, level=95)
    expected = imagecodecs.jpeg8_decode(data)
    win = Window(-4, -6, 16, 16)  # the tile covers rows 4.. and columns 6.. of the window
    part = Window(0, 0, 12, 10)
    ew = _window([("t", data, part, part.shift(4, 6))], window=win)
    empty = _window([], window=win)
    decoder = CpuDecoder()
    x = decoder.decode([ew, empty, ew])
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    assert x.is_contiguous(memory_format=torch.channels_last)
    got = x.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got[0, 4:, 6:], expected[:12, :10])
    assert not got[0, :4].any() and not got[0, :, :6].any() and not got[1].any()
    assert np.array_equal(got[0], got[2]) and np.array_equal(got[0], decode_window(ew))
    assert decoder.tiles == {"torchvision": 1}  # the tile of both windows, decoded once


def test_non_jpeg_codecs_and_byte_order() -> None:
    values = np.arange(16 * 16 * 2, dtype=">u2").reshape(16, 16, 2)
    tile = TILE
    for codec, encode in [
        ("deflate", imagecodecs.zlib_encode),
        ("lzw", imagecodecs.lzw_encode),
        ("zstd", imagecodecs.zstd_encode),
        ("none", bytes),
    ]:
        data = encode(values.tobytes())
        ew = _window([(codec, data, tile, tile)], codec=codec, photometric="minisblack",
                     samples=2, dtype=">u2", bits=16)  # fmt: skip
        x = CpuDecoder().decode([ew])
        assert x.dtype == torch.uint16
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy()[0], values.astype("=u2"))


def test_a_batch_must_be_one_shape_dtype_and_known_codec() -> None:
    ew = _window([])
    with pytest.raises(ValueError, match="empty batch"):
        CpuDecoder().decode([])
    with pytest.raises(ValueError, match="share shape"):
        CpuDecoder().decode([ew, _window([], window=Window(0, 0, 8, 16))])
    with pytest.raises(ValueError, match="share shape"):
        CpuDecoder().decode([ew, _window([], dtype=np.uint16)])
    with pytest.raises(ValueError, match="codec 'webp'"):
        CpuDecoder().decode([_window([], codec="webp")])


@pytest.mark.gpu
def test_cpu_decoder_output_goes_to_the_device() -> None:
    data = imagecodecs.jpeg8_encode(_rgb())
    tile = TILE
    ew = _window([("t", data, tile, tile)])
    x = CpuDecoder().decode([ew], device="cuda")
    assert x.device.type == "cuda"
    assert np.array_equal(x.permute(0, 2, 3, 1).cpu().numpy()[0], decode_window(ew))


class _Collect:
    """A stitcher that keeps every tile's probabilities."""

    def __init__(self) -> None:
        self.probs: dict[tuple[int, int], np.ndarray] = {}

    def add(self, tile: Any, probs: np.ndarray) -> None:
        self.probs[tile.index] = probs

    def close(self) -> None:
        pass


class _Partly:
    """An image with a raw path for windows that start left of column 40 only: a batch
    mixes encoded windows and read pixels."""

    def __init__(self, image: Any) -> None:
        self.image, self.dtype = image, image.dtype

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        return np.asarray(self.image.read(window, level))

    def encoded(self, window: Window, level: int = 0) -> EncodedWindow | None:
        return self.image.encoded(window, level) if window.x < 40 else None


@pytest.mark.parametrize("view", ["all", "bands", "partly"])  # bands: no raw path
def test_predictor_with_the_cpu_decoder_is_bit_identical(tmp_path: Path, view: str) -> None:
    """The opt-in hook: readers fetch stored JPEG tiles, the decoder decodes each batch; the
    probabilities equal those of the default read path, bit for bit."""
    import tifffile

    from tilenet.config import InferConfig
    from tilenet.engine.predictor import Predictor
    from tilenet.io import open_image

    tifffile.imwrite(tmp_path / "j.tif", _rgb(90, 110), tile=(32, 32), photometric="rgb",
                     compression="jpeg", metadata=None)  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 1))
    spec = {"name": "m", "in_channels": 3, "num_classes": 2, "stride": 1,
            "receptive_field": 2, "mean": [120.0, 80.0, 60.0], "std": [50.0, 40.0, 30.0]}  # fmt: skip
    predictor = Predictor((model, spec), InferConfig(device="cpu", tile=48, batch=3))
    with open_image(tmp_path / "j.tif") as image:
        source = {"all": image, "bands": image.select_bands([3, 1, 2]), "partly": _Partly(image)}
        grid, _ = predictor.plan(image.levels[0].shape)
        runs = []
        for decoder in (None, CpuDecoder()):
            out = _Collect()
            predictor.run(source[view], list(grid), out, grid=grid, decoder=decoder)
            runs.append(out.probs)
            if decoder is not None:
                # "partly": each batch (a grid row) mixes both, and decode_window fills in.
                assert bool(decoder.tiles) == (view == "all")
    assert runs[0].keys() == runs[1].keys() == {t.index for t in grid}
    for index, probs in runs[0].items():
        assert np.array_equal(probs, runs[1][index])
