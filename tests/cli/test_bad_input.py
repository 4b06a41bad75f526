"""Bad input: every broken file gives one clear line on stderr and exit code 2, fast, and
without allocating what a crafted header claims."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tilenet.cli import main
from tilenet.errors import ImageTooLargeError
from tilenet.geometry import Window
from tilenet.io import open_image

# Nothing may hang on a broken file (a cyclic IFD chain, a truncated stream): fail fast.
pytestmark = pytest.mark.timeout(60)


def _small_tiff(path: Path) -> Path:
    data = np.random.default_rng(1).integers(0, 255, (256, 256), dtype=np.uint8)
    tifffile.imwrite(path, data, tile=(128, 128), compression="zlib", metadata=None)
    return path


def _overwrite_tags(path: Path, **values: object) -> None:
    with tifffile.TiffFile(path, mode="r+b") as tf:
        for name, value in values.items():
            tf.pages[0].tags[name].overwrite(value)


def bad_zero_byte(tmp: Path) -> Path:
    p = tmp / "empty.tif"
    p.write_bytes(b"")
    return p


def bad_text_named_tif(tmp: Path) -> Path:
    p = tmp / "notes.tif"
    p.write_text("these are not pixels\n")
    return p


def bad_missing(tmp: Path) -> Path:
    return tmp / "missing.tif"


def bad_plain_directory(tmp: Path) -> Path:
    p = tmp / "folder.zarr"
    p.mkdir()
    (p / "readme.txt").write_text("no zarr metadata here")
    return p


def bad_truncated_tiff(tmp: Path) -> Path:
    p = _small_tiff(tmp / "truncated.tif")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def bad_header_only_tiff(tmp: Path) -> Path:
    p = tmp / "header.tif"
    p.write_bytes(b"II*\x00\x00\x10\x00\x00")  # first IFD offset points past the end
    return p


def bad_tile_offsets_past_end(tmp: Path) -> Path:
    p = _small_tiff(tmp / "offsets.tif")
    _overwrite_tags(p, TileOffsets=(10**9,) * 4)
    return p


def bad_cyclic_ifd_chain(tmp: Path) -> Path:
    p = _small_tiff(tmp / "cyclic.tif")
    data = bytearray(p.read_bytes())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    struct.pack_into("<I", data, ifd + 2 + 12 * n, ifd)  # next IFD = this IFD
    p.write_bytes(bytes(data))
    return p


def bad_claims_1e6_squared(tmp: Path) -> Path:
    """A 256x256 file whose header is patched to claim 10^6 x 10^6 pixels."""
    p = _small_tiff(tmp / "claims_huge.tif")
    _overwrite_tags(p, ImageWidth=10**6, ImageLength=10**6)
    return p


def bad_absurd_tile_size(tmp: Path) -> Path:
    """A consistent 2x2 tile table, but each tile would decode to 625 MB."""
    p = _small_tiff(tmp / "big_tiles.tif")
    _overwrite_tags(p, ImageWidth=50_016, ImageLength=50_016, TileWidth=25_008, TileLength=25_008)
    return p


def bad_absurd_tag_counts(tmp: Path) -> Path:
    """Raw-patched IFD: 2^32-1 x 2^32-1 pixels and 2^32-1 tile offsets (32 GiB of table)."""
    p = _small_tiff(tmp / "counts.tif")
    data = bytearray(p.read_bytes())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for i in range(n):
        entry = ifd + 2 + 12 * i
        tag, typ = struct.unpack_from("<HH", data, entry)
        if tag in (324, 325):  # TileOffsets, TileByteCounts: the count
            struct.pack_into("<I", data, entry + 4, 2**32 - 1)
        if tag in (256, 257) and typ == 4:  # ImageWidth, ImageLength (LONG): the value
            struct.pack_into("<I", data, entry + 8, 2**32 - 1)
    p.write_bytes(bytes(data))
    return p


def bad_png_bomb(tmp: Path) -> Path:
    """A small PNG whose IHDR (with a valid CRC) claims 100000 x 100000 pixels."""
    p = tmp / "bomb.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(p)
    data = bytearray(p.read_bytes())
    struct.pack_into(">II", data, 16, 100_000, 100_000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    p.write_bytes(bytes(data))
    return p


def bad_truncated_png(tmp: Path) -> Path:
    p = tmp / "cut.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return p


def bad_unknown_compression(tmp: Path) -> Path:
    """Compression 52479, as OpenSlide's unopenable.tiff has: tifffile has no name for it."""
    p = _small_tiff(tmp / "unopenable.tif")
    _overwrite_tags(p, Compression=52479)
    return p


BAD: dict[str, Callable[[Path], Path]] = {
    name.removeprefix("bad_"): fn for name, fn in globals().items() if name.startswith("bad_")
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_cli_info_bad_input_one_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = BAD[name](tmp_path)
    tracemalloc.start()
    try:
        rc = main(["info", str(path)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert path.name in lines[0]
    assert "Traceback" not in err
    assert "object has no attribute" not in err  # a bug's text, not the file's problem
    assert peak < 32 * 2**20


def test_huge_png_refused_by_eager_limit_before_decoding(tmp_path: Path) -> None:
    """Below Pillow's bomb limit but above tilenet's eager limit: refused from the header."""
    p = tmp_path / "wide.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(p)
    data = bytearray(p.read_bytes())
    struct.pack_into(">II", data, 16, 12_000, 12_000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    p.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match="tilenet convert"):
            open_image(p, max_pixels_eager=100_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_sparse_1e6_squared_tiff_stays_lazy(tmp_path: Path) -> None:
    """A consistent header for 10^6 x 10^6 pixels (all tiles sparse): it opens and reads a
    window without allocating anything near its 1 TB size."""
    n = (-(-(10**6) // 4096)) ** 2
    p = tmp_path / "sparse.tif"
    tifffile.imwrite(
        p,
        iter([b""] * n),
        shape=(10**6, 10**6),
        dtype=np.uint8,
        tile=(4096, 4096),
        compression="zlib",
        bigtiff=True,
    )
    tracemalloc.start()
    try:
        with open_image(p) as img:
            assert img.shape == (10**6, 10**6, 1)
            win = img.read(Window(500_000, 700_000, 256, 256))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert win.shape == (256, 256, 1) and not win.any()
    assert peak < 64 * 2**20
    with pytest.raises(ImageTooLargeError, match="above the limit"):
        open_image(p, max_pixels=10**11)
