"""Tile sources: ``encoded(window)`` decoded by every path equals ``read(window)``, bit for bit.

One test class runs over every stored layout: JPEG (YCbCr 4:2:0, 4:2:2, 4:4:4; RGB with an
Adobe marker; Aperio's RGB with shared tables and neither JFIF nor Adobe marker; YCbCr with
shared tables; grayscale; progressive; restart markers; an Aperio SVS from the slide
writers, levels 0 and 1), deflate, LZW, zstd (big-endian uint16), uncompressed float32 and
sparse tiles; and the layouts the CPU decoder sends to imagecodecs (12-bit, CMYK and
lossless JPEG). Windows cross tile edges, the image edge, lie outside it, or repeat.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image
from slidewriters import write_aperio_svs

from tilenet.config import ResolutionConfig
from tilenet.engine.decode import ADOBE_RGB, DECODERS, decode_jpegs, jpeg_stream
from tilenet.geometry import Window
from tilenet.io import LazyImage, open_image
from tilenet.io.resolution import at_resolution
from tilenet.io.source import CODECS, EncodedWindow, TileSource, decode_window

H, W, T = 70, 100, 32  # 3 x 4 tiles; the last row and column are partial
SIZE = (40, 50)  # every test window's shape, so that a list of them is one batch


def _image(h: int = H, w: int = W) -> np.ndarray:
    """Smooth RGB (JPEG keeps it close), different in every channel."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [yy * 3, xx * 2, 128 + 60 * np.sin(yy / 9.0) * np.cos(xx / 7.0)], axis=-1
    ).astype(np.uint8)


def _tiles(a: np.ndarray) -> Iterator[np.ndarray]:
    """``a``'s T x T tiles, row-major, the edge ones padded with zeros (as TIFF stores them)."""
    for y in range(0, a.shape[0], T):
        for x in range(0, a.shape[1], T):
            t = np.zeros((T, T, *a.shape[2:]), a.dtype)
            part = a[y : y + T, x : x + T]
            t[: part.shape[0], : part.shape[1]] = part
            yield t


def _abbreviate(stream: bytes, *, aperio: bool) -> tuple[bytes, bytes]:
    """Split a whole JPEG into (tables, tile) as scanners store it: quantisation and Huffman
    tables go to the shared tables, APPn markers (JFIF, Adobe) are dropped, and ``aperio``
    renumbers the components 0, 1, 2 (Aperio's ids, which libjpeg takes for YCbCr)."""
    tables, tile, pos = bytearray(b"\xff\xd8"), bytearray(b"\xff\xd8"), 2
    while True:
        marker, n = stream[pos + 1], int.from_bytes(stream[pos + 2 : pos + 4], "big")
        seg = bytearray(stream[pos : pos + 2 + n])
        if marker in (0xDB, 0xC4):  # DQT, DHT
            tables += seg
        elif marker == 0xDA:  # SOS: component ids, then the entropy-coded data to EOI
            for i in range(seg[4] if aperio else 0):
                seg[5 + 2 * i] = i
            tile += seg + stream[pos + 2 + n :]
            return bytes(tables + b"\xff\xd9"), bytes(tile)
        elif not 0xE0 <= marker <= 0xEF:  # SOF (and anything else but APPn)
            for i in range(seg[9] if aperio and marker == 0xC0 else 0):
                seg[10 + 3 * i] = i
            tile += seg
        pos += 2 + n


def _write_tables(path: Path, *, aperio: bool) -> None:
    kw: dict[str, Any] = {"outcolorspace": "RGB", "subsampling": "444"} if aperio else {}
    parts = [
        _abbreviate(imagecodecs.jpeg8_encode(t, level=90, **kw), aperio=aperio)
        for t in _tiles(_image())
    ]
    assert len({tables for tables, _ in parts}) == 1  # one set of tables for the level
    tifffile.imwrite(
        path,
        iter([tile for _, tile in parts]),
        shape=(H, W, 3),
        dtype=np.uint8,
        tile=(T, T),
        compression="jpeg",
        jpegtables=parts[0][0],
        photometric="rgb" if aperio else "ycbcr",
        subsampling=(1, 1) if aperio else (2, 2),
        compressionargs={"outcolorspace": "RGB"} if aperio else None,
    )


def _write_pillow(path: Path, **options: Any) -> None:
    """JPEG tiles encoded by Pillow (progressive, restart markers), stored as they are."""

    def encode(t: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, "JPEG", quality=90, **options)
        return buf.getvalue()

    streams = [encode(t) for t in _tiles(_image())]
    tifffile.imwrite(path, iter(streams), shape=(H, W, 3), dtype=np.uint8, tile=(T, T),
                     photometric="rgb", compression="jpeg")  # fmt: skip


def _write(path: Path, data: np.ndarray, **kw: Any) -> None:
    tifffile.imwrite(path, data, tile=(T, T), metadata=None, **kw)


def _sparse(a: np.ndarray) -> Iterator[np.ndarray | None]:
    for i, t in enumerate(_tiles(a)):
        yield None if i in (1, 5) else t  # tiles (0, 1) and (1, 1) are not stored


def _noise(dtype: Any, channels: int, top: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, top, size=(H, W, channels)).astype(dtype)


def _svs(path: Path) -> None:
    write_aperio_svs(path, _image(300, 520), mpp=0.5, levels=(4,))


@dataclass(frozen=True)
class Layout:
    write: Callable[[Path], None]
    codec: str
    photometric: str
    route: str = "torchvision"  # which path of the cpu decoder takes its tiles
    level: int = 0


_JPEG: dict[str, Any] = {"compression": "jpeg", "photometric": "rgb"}
LAYOUTS = {
    "jpeg-ycbcr420": Layout(lambda p: _write(p, _image(), **_JPEG), "jpeg", "ycbcr"),
    "jpeg-ycbcr422": Layout(
        lambda p: _write(p, _image(), subsampling=(2, 1), **_JPEG), "jpeg", "ycbcr"
    ),
    "jpeg-ycbcr444": Layout(
        lambda p: _write(p, _image(), subsampling=(1, 1), **_JPEG), "jpeg", "ycbcr"
    ),
    "jpeg-rgb-adobe": Layout(
        lambda p: _write(
            p, _image(), subsampling=(1, 1), compressionargs={"outcolorspace": "RGB"}, **_JPEG
        ),
        "jpeg",
        "rgb",
    ),
    "jpeg-aperio-tables": Layout(lambda p: _write_tables(p, aperio=True), "jpeg", "rgb"),
    "jpeg-ycbcr-tables": Layout(lambda p: _write_tables(p, aperio=False), "jpeg", "ycbcr"),
    "jpeg-gray": Layout(
        lambda p: _write(p, _image()[..., 2], compression="jpeg"), "jpeg", "minisblack"
    ),
    "jpeg-progressive": Layout(lambda p: _write_pillow(p, progressive=True), "jpeg", "ycbcr"),
    "jpeg-restart": Layout(lambda p: _write_pillow(p, restart_marker_rows=1), "jpeg", "ycbcr"),
    "svs": Layout(_svs, "jpeg", "ycbcr"),
    "svs-level1": Layout(_svs, "jpeg", "ycbcr", level=1),
    "deflate": Layout(
        lambda p: _write(p, _image(), compression="zlib"), "deflate", "rgb", "imagecodecs"
    ),
    "lzw": Layout(lambda p: _write(p, _image(), compression="lzw"), "lzw", "rgb", "imagecodecs"),
    "zstd-uint16-bigendian": Layout(
        lambda p: _write(p, _noise(np.uint16, 3, 60000), compression="zstd", byteorder=">"),
        "zstd",
        "rgb",
        "imagecodecs",
    ),
    "none-float32": Layout(
        lambda p: _write(p, _noise(np.float32, 1, 1000)[..., 0]),
        "none",
        "minisblack",
        "imagecodecs",
    ),
    "sparse-deflate": Layout(
        lambda p: tifffile.imwrite(
            p,
            _sparse(_image()),
            shape=(H, W, 3),
            dtype=np.uint8,
            tile=(T, T),
            photometric="rgb",
            compression="zlib",
        ),
        "deflate",
        "rgb",
        "imagecodecs",
    ),
    # Not for libjpeg in torchvision: 12-bit, CMYK, lossless.
    "jpeg-12bit": Layout(
        lambda p: _write(p, _noise(np.uint16, 3, 4096), bitspersample=12, **_JPEG),
        "jpeg",
        "ycbcr",
        "imagecodecs",
    ),
    "jpeg-cmyk": Layout(
        lambda p: _write(p, _noise(np.uint8, 4, 256), photometric="separated", compression="jpeg"),
        "jpeg",
        "separated",
        "imagecodecs",
    ),
    "jpeg-lossless": Layout(
        lambda p: _write(p, _image(), compressionargs={"lossless": True}, **_JPEG),
        "jpeg",
        "ycbcr",
        "imagecodecs",
    ),
}


def _windows(img: LazyImage, level: int) -> list[Window]:
    """Windows of one shape: over the top-left corner, across a tile corner (twice: a batch
    shares tiles), past the bottom-right edge, inside, and wholly outside the image."""
    (h, w), (th, tw) = img.levels[level].shape, img.levels[level].chunks or (T, T)
    across = Window(th - 20, tw - 25, *SIZE)
    return [
        Window(-5, -7, *SIZE),
        across,
        Window(h - 20, w - 30, *SIZE),
        Window(0, 0, *SIZE),
        across,
        Window(h + 3, 2, *SIZE),
    ]


def _decoded(x: Any) -> np.ndarray:
    """A decoder's (B, C, h, w) tensor as (B, h, w, C) numpy, the layout read() returns."""
    return np.asarray(x.permute(0, 2, 3, 1).cpu().numpy())


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Layout, LazyImage]]:
    lay = LAYOUTS[request.param]
    path = tmp_path_factory.mktemp(request.param) / "image.tif"
    lay.write(path)
    with open_image(path) as img:
        yield lay, img


class TestTileSource:
    def test_encoded_names_codec_colour_and_placement(
        self, layout: tuple[Layout, LazyImage]
    ) -> None:
        lay, img = layout
        assert isinstance(img, TileSource)
        for win in _windows(img, lay.level):
            ew = img.encoded(win, lay.level)
            assert ew is not None and ew.window == win and ew.level == lay.level
            assert (ew.codec, ew.photometric) == (lay.codec, lay.photometric)
            assert ew.codec in CODECS and ew.shape == (*SIZE, img.channels)
            assert len({t.key for t in ew.tiles}) == len(ew.tiles)  # each tile once
            for t in ew.tiles:
                assert t.src.shape == t.dst.shape and t.src.area > 0
                assert Window(0, 0, *ew.tile_shape).contains(t.src)
                assert Window(0, 0, *SIZE).contains(t.dst)

    @pytest.mark.parametrize("name", sorted(DECODERS))  # on the CPU: every one is exact
    def test_decoder_equals_read(self, layout: tuple[Layout, LazyImage], name: str) -> None:
        lay, img = layout
        wins = _windows(img, lay.level)
        batch = [img.encoded(w, lay.level) for w in wins]
        decoder = DECODERS[name]()
        if lay.codec not in decoder.codecs:
            pytest.skip(f"{name} takes no {lay.codec}")
        x = decoder.decode(batch)  # type: ignore[arg-type]
        expected = np.stack([img.read(w, lay.level) for w in wins])
        assert x.shape == (len(wins), img.channels, *SIZE)
        got = _decoded(x)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert set(decoder.tiles) <= {lay.route} and decoder.tiles[lay.route] > 0  # type: ignore[attr-defined]

    def test_batch_decodes_each_distinct_tile_once(self, layout: tuple[Layout, LazyImage]) -> None:
        lay, img = layout
        batch = [img.encoded(w, lay.level) for w in _windows(img, lay.level)]
        decoder = DECODERS["cpu"]()
        decoder.decode(batch)  # type: ignore[arg-type]
        keys = {t.key for ew in batch if ew for t in ew.tiles}
        listed = sum(len(ew.tiles) for ew in batch if ew)
        assert sum(decoder.tiles.values()) == len(keys) < listed  # type: ignore[attr-defined]

    def test_reference_decode_window_equals_read(self, layout: tuple[Layout, LazyImage]) -> None:
        lay, img = layout
        h, w = img.levels[lay.level].shape
        for win in [*_windows(img, lay.level), Window(0, 0, h, w), Window(3, 5, 1, 1)]:
            ew = img.encoded(win, lay.level)
            assert ew is not None
            got, expected = decode_window(ew), img.read(win, lay.level)
            assert got.dtype == expected.dtype and np.array_equal(got, expected)

    def test_window_outside_the_image_carries_no_tiles(
        self, layout: tuple[Layout, LazyImage]
    ) -> None:
        lay, img = layout
        ew = img.encoded(Window(-100, -100, 10, 10), lay.level)
        assert ew is not None and ew.tiles == () and ew.nbytes == 0
        assert not decode_window(ew).any()


@pytest.fixture(scope="module")
def aperio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LazyImage]:
    path = tmp_path_factory.mktemp("aperio") / "aperio.tif"
    _write_tables(path, aperio=True)
    with open_image(path) as img:
        yield img


def test_aperio_rgb_jpeg_decodes_right_only_with_the_adobe_marker(aperio: LazyImage) -> None:
    """Aperio's RGB tiles (ids 0, 1, 2; no JFIF, no Adobe marker): libjpeg alone takes them
    for YCbCr and gets the colours wrong; with the Adobe transform-0 marker they are read()."""
    win = Window(0, 0, T, T)
    expected = aperio.read(win)
    assert np.abs(expected.astype(int) - _image()[:T, :T]).mean() < 3  # read() is right
    ew = aperio.encoded(win)
    assert ew is not None and ew.photometric == "rgb" and ew.tables is not None
    (tile,) = ew.tiles
    naive = ew.tables[:-2] + tile.data[2:]  # tables spliced, no marker
    fixed = jpeg_stream(ew.tables, tile.data, ew.photometric)
    assert fixed == naive[:2] + ADOBE_RGB + naive[2:]
    wrong, right = (_decoded(x[None])[0] for x in decode_jpegs([naive, fixed]))
    assert np.abs(wrong.astype(int) - expected).max() > 50
    assert np.array_equal(right, expected)


def test_a_window_inside_a_sparse_tile_is_zero(tmp_path: Path) -> None:
    LAYOUTS["sparse-deflate"].write(tmp_path / "s.tif")
    with open_image(tmp_path / "s.tif") as img:
        win = Window(2, T + 2, 20, 20)  # in tile (0, 1), which is not stored
        ew = img.encoded(win)
        assert ew is not None and ew.tiles == ()
        x = DECODERS["cpu"]().decode([ew])
        assert not x.any() and not img.read(win).any()


def test_layouts_without_a_raw_path_say_so(tmp_path: Path) -> None:
    """Strips, TIFF predictors, planar storage, band selections and resampled views:
    encoded() is None."""
    img = _image()
    _write(tmp_path / "pred.tif", img, compression="zlib", predictor=True)
    tifffile.imwrite(tmp_path / "strips.tif", img, compression="zlib", rowsperstrip=16)
    _write(tmp_path / "planar.tif", np.moveaxis(img, -1, 0), photometric="rgb", compression="zlib",
           planarconfig="separate")  # fmt: skip
    for name in ("pred.tif", "strips.tif", "planar.tif"):
        with open_image(tmp_path / name) as im:
            assert im.encoded(Window(0, 0, 8, 8)) is None
            assert im.read(Window(0, 0, 8, 8)).shape == (8, 8, 3)
    with open_image(tmp_path / "pred.tif") as im:
        assert im.select_bands([2, 1]).encoded(Window(0, 0, 8, 8)) is None
    _svs(tmp_path / "s.svs")
    with open_image(tmp_path / "s.svs") as im:
        assert im.encoded(Window(0, 0, 8, 8)) is not None
        view, res = at_resolution(im, ResolutionConfig(mpp=0.8))  # resampled per window
        assert res is not None and view.encoded(Window(0, 0, 8, 8)) is None


def test_encoded_checks_the_level(aperio: LazyImage) -> None:
    from tilenet.errors import InputError

    with pytest.raises(InputError, match="level 3 does not exist"):
        aperio.encoded(Window(0, 0, 8, 8), 3)


def test_an_encoded_window_is_what_a_reader_thread_fetched(aperio: LazyImage) -> None:
    ew = aperio.encoded(Window(0, 0, H, W))
    assert isinstance(ew, EncodedWindow) and len(ew.tiles) == 12
    assert ew.nbytes == sum(len(t.data) for t in ew.tiles) > 0


def test_a_tiff_in_a_bucket_hands_over_the_same_tiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remote reads fetch each tile by a range request, as read() does: same bytes, same
    pixels as the local file."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from tilenet.io.storage import upload

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="tiles")
        _write_tables(tmp_path / "a.tif", aperio=True)
        upload(tmp_path / "a.tif", "s3://tiles/a.tif")
        wins = [Window(-5, -7, *SIZE), Window(T - 20, T - 25, *SIZE)]
        with open_image("s3://tiles/a.tif") as remote, open_image(tmp_path / "a.tif") as local:
            got, want = (img.encoded(w) for img in (remote, local) for w in wins[1:])
            assert got is not None and want is not None
            assert [t.data for t in got.tiles] == [t.data for t in want.tiles]
            x = DECODERS["cpu"]().decode([remote.encoded(w) for w in wins])  # type: ignore[misc]
            assert np.array_equal(_decoded(x), np.stack([remote.read(w) for w in wins]))
    finally:
        server.stop()
