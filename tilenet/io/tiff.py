"""TIFF and BigTIFF reader: tifffile for the structure, its zarr store for the tiles.

A window read goes through ``series.aszarr(level=...)`` opened with zarr, which decodes only
the tiles (or strips) the window intersects. Uncompressed contiguous pages, which tifffile
stores as one strip by default, are memory-mapped instead, so a window never decodes the
whole strip. Pyramids are found as tifffile series levels (OME SubIFDs, COG reduced pages,
SVS) or, for libvips-style files that store each level as its own page, as a run of
following series with the same layout and decreasing size.

Every storage layout is presented as (h, w, C): interleaved (``YXS``), planar (``SYX``), OME
channels (``CYX``) and multi-page channel stacks (``QYX``) alike.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilenet.config import ReaderConfig
from tilenet.errors import (
    CorruptImageError,
    InputError,
    TilenetError,
    UnsupportedFormatError,
    first_line,
    one_line,
)
from tilenet.geometry import Window
from tilenet.io.base import LazyImage, Level
from tilenet.io.raster import is_geotiff
from tilenet.io.sniff import check_chunk, check_pixels, slide_downsample
from tilenet.io.source import EncodedTile, EncodedWindow
from tilenet.io.storage import is_url, open_file, read_range, redact
from tilenet.io.tiffmeta import pixel_size, svs_extras

__all__ = ["TILE_CACHE_BYTES", "TiffImage", "open_tiff", "openslide_vendor", "tile_cache_bytes"]

#: Budget of the process-wide cache of decoded tiles, shared by all open TIFFs, so many open
#: images (a training set) cost no more than one.
TILE_CACHE_BYTES = 32 * 2**20

_MAX_CHANNELS = 4096
# TIFF compression enum names -> the names tilenet reports (and accepts in convert).
_COMPRESSION_NAMES = {
    "NONE": None,
    "ADOBE_DEFLATE": "deflate",
    "DEFLATE": "deflate",
    "LZW": "lzw",
    "ZSTD": "zstd",
    "JPEG": "jpeg",
    "OJPEG": "jpeg",
    "PACKBITS": "packbits",
    "WEBP": "webp",
    "JPEG2000": "jpeg2000",
    "APERIO_JP2000_YCBC": "jpeg2000",
    "APERIO_JP2000_RGB": "jpeg2000",
    "LZMA": "lzma",
    "JPEGXL": "jpegxl",
}
# TIFF compressions whose stored tiles an EncodedWindow carries -> its codec name.
_RAW_CODECS = {
    "NONE": "none",
    "JPEG": "jpeg",
    "ADOBE_DEFLATE": "deflate",
    "DEFLATE": "deflate",
    "LZW": "lzw",
    "ZSTD": "zstd",
}
_RAW_JPEG_PHOTOMETRIC = frozenset({"minisblack", "rgb", "ycbcr", "separated"})
# Vendor TIFFs that only OpenSlide reads faithfully (overlapping or sparse tiles, vendor
# pyramids, JPEG strips with restart markers): tifffile flag -> OpenSlide's vendor name.
_OPENSLIDE_ONLY = {
    "is_ndpi": "hamamatsu",
    "is_scn": "leica",
    "is_philips": "philips",
    "is_bif": "ventana",
}


@dataclass(frozen=True)
class _Layout:
    """How one level's series axes map onto (h, w, C)."""

    index: tuple[Any, ...]  # per series axis: "y", "x", slice(None) for channels, or 0
    perm: tuple[int, ...]  # transposes the indexed result to (Y, X, channel axes...)
    height: int
    width: int
    channels: int


def _layout(path: object, axes: str, shape: tuple[int, ...]) -> _Layout:
    if "Y" not in axes or "X" not in axes:
        raise UnsupportedFormatError(f"{path}: TIFF series with axes {axes!r} has no Y and X")
    iy, ix = axes.index("Y"), axes.index("X")
    others = [i for i in range(len(axes)) if i not in (iy, ix)]
    chan = [i for i in others if axes[i] in "SC"]
    extra = [i for i in others if i not in chan and shape[i] > 1]
    if not chan and len(extra) == 1:
        # A stack of single-channel pages (tifffile calls the page axis Q or I): channels.
        chan = extra
    index: list[Any] = []
    kept: list[int] = []
    for i in range(len(axes)):
        if i in (iy, ix) or i in chan:
            index.append("y" if i == iy else "x" if i == ix else slice(None))
            kept.append(i)
        else:
            index.append(0)  # further planes (Z, T, ...): the first one is the image
    perm = tuple(kept.index(i) for i in (iy, ix, *chan))
    channels = math.prod(shape[i] for i in chan)
    if channels > _MAX_CHANNELS:
        raise UnsupportedFormatError(
            f"{path}: {channels} channels (axes {axes!r}, shape {shape}) is not an image layout "
            "tilenet reads"
        )
    return _Layout(tuple(index), perm, int(shape[iy]), int(shape[ix]), int(channels))


class _Collect(logging.Handler):
    """Collects tifffile's log records from one thread (tifffile logs, not raises, some
    structural problems, e.g. a cyclic IFD chain, which it then stops following)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_log() -> Any:
    logger = logging.getLogger("tifffile")
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _pyramid(tf: Any) -> list[Any]:
    """The levels of the first series; separate same-layout smaller series count as levels."""
    s0 = tf.series[0]
    levels = list(s0.levels)
    if len(levels) > 1 or len(tf.series) < 2 or s0.kind == "svs":
        return levels  # an SVS's other series are its thumbnail, label and macro
    iy, ix = s0.axes.index("Y"), s0.axes.index("X")
    fixed = [n for i, n in enumerate(s0.shape) if i not in (iy, ix)]
    for s in tf.series[1:]:
        prev = levels[-1]
        if (
            s.axes != s0.axes
            or s.dtype != s0.dtype
            or len(s.levels) != 1
            or [n for i, n in enumerate(s.shape) if i not in (iy, ix)] != fixed
            or not (s.shape[iy] < prev.shape[iy] and s.shape[ix] < prev.shape[ix])
        ):
            break  # e.g. a slide's label or macro image, not a level
        levels.append(s)
    return levels


def _check_pages(path: object, level: Any, file_size: int) -> None:
    """Tile tables must match the image size and point inside the file."""
    for page in level.pages:
        if page is None:
            continue
        keyframe = page.keyframe
        expected = math.prod(keyframe.chunked)
        offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
        counts = np.asarray(page.databytecounts, dtype=np.uint64)
        if len(offsets) != expected or len(counts) != expected:
            raise CorruptImageError(
                f"{path}: page of {keyframe.imagelength} x {keyframe.imagewidth} pixels needs "
                f"{expected:,} tiles/strips but lists {len(offsets):,} offsets and "
                f"{len(counts):,} byte counts; the header is corrupt"
            )
        if expected and int((offsets + counts).max()) > file_size:
            raise CorruptImageError(
                f"{path}: tile data extends to byte {int((offsets + counts).max()):,} but the "
                f"file has {file_size:,} bytes; it is truncated or its tile offsets are corrupt"
            )


def openslide_vendor(path: str | os.PathLike[str]) -> str | None:
    """OpenSlide's vendor name for a TIFF that only OpenSlide reads faithfully, else None.

    Hamamatsu NDPI, Leica SCN, Philips TIFF, Ventana BIF and Trestle are; Aperio SVS, OME-TIFF,
    generic tiled TIFF are not (tifffile reads them, and faster). Reads the first page only.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            for flag, vendor in _OPENSLIDE_ONLY.items():
                if getattr(tf, flag, False):
                    return vendor
            if str(getattr(tf.pages[0], "software", "") or "").startswith("MedScan"):
                return "trestle"
    except Exception:
        return None  # not a TIFF tifffile parses: open_tiff says why
    return None


class _TileCache:
    """A process-wide LRU of decoded tiles, bounded in bytes. Neighbouring windows (overlap,
    halo, windows not aligned to tiles) share edge tiles that would otherwise be decoded
    again; the cached arrays are read-only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[int, int]) -> tuple[bool, np.ndarray | None]:
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key]

    def put(self, key: tuple[int, int], seg: np.ndarray | None) -> None:
        if seg is not None:
            seg.flags.writeable = False
        with self._lock:
            if key in self._items:
                return
            self._items[key] = seg
            self._bytes += seg.nbytes if seg is not None else 0
            while self._bytes > TILE_CACHE_BYTES and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes if old is not None else 0


_TILE_CACHE = _TileCache()


def tile_cache_bytes() -> int:
    """Bytes of decoded tiles held by the process-wide tile cache (at most TILE_CACHE_BYTES)."""
    return _TILE_CACHE._bytes


_TOKENS = itertools.count()


class _Tiles:
    """Tile grid of one single-page level, decoded tile by tile with tifffile's decoder.

    Faster than the zarr view, and it scales with reader threads: zarr 3 runs every store
    read, and so tifffile's decoding, on its one event-loop thread.
    """

    def __init__(self, page: Any, planes: int, spp: int) -> None:
        self.page, self.planes, self.spp = page, planes, spp
        self.token = next(_TOKENS)  # cache key; unlike id(), never reused
        self.th, self.tw = int(page.chunks[0]), int(page.chunks[1])
        self.ny = -(-int(page.imagelength) // self.th)
        self.nx = -(-int(page.imagewidth) // self.tw)
        self.jpegtables = getattr(page, "jpegtables", None)
        self.jpegheader = getattr(page, "jpegheader", None)
        if len(page.dataoffsets) != planes * self.ny * self.nx:
            raise CorruptImageError(f"{page.parent.filehandle.path}: tile table does not match")


@dataclass
class TiffImage(LazyImage):
    """A TIFF or BigTIFF image read lazily through tifffile."""

    _tf: Any = field(default=None, repr=False)
    _series: list[Any] = field(default_factory=list, repr=False)
    _layouts: list[_Layout] = field(default_factory=list, repr=False)
    _arrays: dict[int, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fd: int | None = field(default=None, repr=False)
    #: Tiles this image has decoded so far (cache hits excluded): what a window read cost.
    tiles_decoded: int = field(default=0, repr=False)
    _raw: dict[int, tuple[str, str] | None] = field(default_factory=dict, repr=False)
    #: The channel holding alpha (ExtraSamples: associated or unassociated), if any.
    _alpha: int | None = field(default=None, repr=False)
    #: Per level with missing tiles (byte count 0, a sparse slide): (tile size, missing grid).
    _missing: dict[int, tuple[tuple[int, int], np.ndarray]] = field(
        default_factory=dict, repr=False
    )

    def _has_dataset_mask(self) -> bool:
        return self._alpha is not None or bool(self._missing)

    def _dataset_mask(self, window: Window, level: int, pixels: np.ndarray) -> np.ndarray:
        """0 where there is no data: the alpha channel of the pixels read, and the tiles the
        file leaves out (byte count 0: OpenSlide shows them transparent), else 255."""
        if self._alpha is not None:
            mask = pixels[:, :, self._alpha]
        else:
            mask = np.full(window.shape, 255, np.uint8)
        missing = self._missing.get(level)
        if missing is not None:
            (th, tw), grid = missing
            ty = np.arange(window.y, window.y1) // th
            tx = np.arange(window.x, window.x1) // tw
            mask = np.where(grid[ty][:, tx], 0, mask)
        return mask

    def _array(self, level: int) -> Any:
        """The level as an indexable array: a read-only memmap or a zarr view of the tiles."""
        with self._lock:
            arr = self._arrays.get(level)
            if arr is None:
                arr = self._arrays[level] = self._open_level(level)
            return arr

    def _open_level(self, level: int) -> Any:
        series = self._series[level]
        page = series.keyframe
        single = len(series.pages) == 1 and series.pages[0] is page
        if single and not page.is_tiled and page.compression == 1 and page.is_memmappable:
            dtype = np.dtype(series.dtype).newbyteorder(self._tf.byteorder)
            return np.memmap(
                self.path,
                dtype=dtype,
                mode="r",
                offset=int(page.dataoffsets[0]),
                shape=tuple(series.shape),
            )
        planes, depth, _, _, spp = page.shaped
        if single and depth == 1 and planes * spp == self._layouts[level].channels:
            return _Tiles(page, planes, spp)
        import zarr

        # level=0 of a level series is itself; without it a pyramid opens as a zarr group.
        return zarr.open_array(series.aszarr(level=0), mode="r")

    def _read(self, window: Window, level: int) -> np.ndarray:
        arr = self._array(level)
        if isinstance(arr, _Tiles):
            return self._read_tiles(arr, window).astype(self.dtype, copy=False)
        lay = self._layouts[level]
        ys, xs = slice(window.y, window.y1), slice(window.x, window.x1)
        index = tuple(ys if i == "y" else xs if i == "x" else i for i in lay.index)
        data = np.asarray(arr[index])
        data = data.transpose(lay.perm).reshape(window.h, window.w, lay.channels)
        # Native byte order (memmapped big-endian files) and bool -> uint8.
        return data.astype(self.dtype, copy=False)

    def _read_tiles(self, t: _Tiles, window: Window) -> np.ndarray:
        """Decode the tiles (or strips) that ``window`` intersects, and only those."""
        out = np.zeros((window.h, window.w, t.planes, t.spp), dtype=t.page.dtype)
        ty0, ty1 = window.y // t.th, (window.y1 - 1) // t.th
        tx0, tx1 = window.x // t.tw, (window.x1 - 1) // t.tw
        for plane in range(t.planes):
            for ty in range(ty0, ty1 + 1):
                for tx in range(tx0, tx1 + 1):
                    index = (plane * t.ny + ty) * t.nx + tx
                    seg = self._cached_tile(t, index)
                    if seg is None:
                        continue  # sparse tile: stays zero
                    y0, x0 = ty * t.th, tx * t.tw
                    ya, yb = max(window.y, y0), min(window.y1, y0 + seg.shape[1])
                    xa, xb = max(window.x, x0), min(window.x1, x0 + seg.shape[2])
                    out[ya - window.y : yb - window.y, xa - window.x : xb - window.x, plane] = seg[
                        0, ya - y0 : yb - y0, xa - x0 : xb - x0
                    ]
        return out.reshape(window.h, window.w, t.planes * t.spp)

    def _cached_tile(self, t: _Tiles, index: int) -> np.ndarray | None:
        hit, seg = _TILE_CACHE.get((t.token, index))
        if not hit:
            seg = self._decode_tile(t, index)
            _TILE_CACHE.put((t.token, index), seg)
        return seg

    def _decode_tile(self, t: _Tiles, index: int) -> np.ndarray | None:
        self.tiles_decoded += 1
        count = int(t.page.databytecounts[index])
        if count == 0:
            return None
        data = self._read_bytes(int(t.page.dataoffsets[index]), count)
        seg, _, _ = t.page.decode(data, index, jpegtables=t.jpegtables, jpegheader=t.jpegheader)
        return seg

    def encoded(self, window: Window, level: int = 0) -> EncodedWindow | None:
        """The stored tiles ``window`` touches, undecoded (:mod:`tilenet.io.source`).

        Tiled, chunky levels in JPEG, deflate, LZW, zstd or no compression only; None for
        strips, planar storage, TIFF predictors, packed bits and JPEG with extra samples.
        """
        if not 0 <= level < len(self.levels):
            raise InputError(f"{self.path}: level {level} does not exist")
        t = self._array(level)
        if not isinstance(t, _Tiles):
            return None
        if level not in self._raw:
            self._raw[level] = self._raw_format(t)
        fmt = self._raw[level]
        if fmt is None:
            return None
        tiles = []
        inside = window.clip(*self.levels[level].shape)
        rows = range(inside.y // t.th, -(-inside.y1 // t.th)) if inside.area else range(0)
        for ty in rows:
            for tx in range(inside.x // t.tw, -(-inside.x1 // t.tw)):
                index = ty * t.nx + tx
                count = int(t.page.databytecounts[index])
                if count == 0:
                    continue  # sparse: stays zero, as read() leaves it
                stored = Window(ty * t.th, tx * t.tw, t.th, t.tw)
                part = inside.intersect(stored)
                data = self._read_bytes(int(t.page.dataoffsets[index]), count)
                key = (t.token, index)
                tiles.append(
                    EncodedTile(key, data, part.relative_to(stored), part.relative_to(window))
                )
        page = t.page
        return EncodedWindow(
            window=window,
            level=level,
            codec=fmt[0],
            photometric=fmt[1],
            tables=t.jpegtables if fmt[0] == "jpeg" else None,
            tile_shape=(t.th, t.tw),
            dtype=np.dtype(page.dtype).newbyteorder(self._tf.byteorder),
            samples=t.spp,
            bits=int(page.bitspersample),
            tiles=tuple(tiles),
        )

    def _raw_format(self, t: _Tiles) -> tuple[str, str] | None:
        """(codec, photometric) of a level whose tiles an EncodedWindow can carry, or None."""
        page = t.page
        codec = _RAW_CODECS.get(page.compression.name)
        photometric = page.photometric.name.lower()
        if codec is None or not page.is_tiled or t.planes != 1 or t.jpegheader is not None:
            return None
        if codec == "jpeg":  # tifffile ignores predictor and fill order for JPEG
            if page.extrasamples or photometric not in _RAW_JPEG_PHOTOMETRIC:
                return None
            # tifffile's rule (TiffPage.is_jfif: the first tile): JFIF samples are YCbCr.
            first, count = int(page.dataoffsets[0]), int(page.databytecounts[0])
            if photometric == "rgb" and first and count >= 11:
                photometric = "ycbcr" if self._read_bytes(first + 6, 4) == b"JFIF" else "rgb"
            return codec, photometric
        itembits = np.dtype(page.dtype).itemsize * 8
        if page.predictor != 1 or page.fillorder != 1 or page.bitspersample != itembits:
            return None
        return (codec, photometric) if photometric != "ycbcr" else None

    def _read_bytes(self, offset: int, count: int) -> bytes:
        if is_url(self.path):  # one range request: only this tile's bytes are fetched
            data = read_range(str(self.path), offset, count)
        elif hasattr(os, "pread"):
            # pread needs no seek, so reader threads never wait for each other here.
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
                fd = self._fd
            data = os.pread(fd, count, offset)
        else:  # pragma: no cover - Windows
            fh = self._tf.filehandle
            with fh.lock:
                fh.seek(offset)
                data = fh.read(count)
        if len(data) != count:
            raise CorruptImageError(
                f"{redact(str(self.path))}: tile at byte {offset:,} is cut short ({len(data)} of {count} bytes)"
            )
        return data

    def close(self) -> None:
        with self._lock:
            self._arrays.clear()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._tf is not None:
            self._tf.close()


def open_tiff(
    path: str | os.PathLike[str], *, max_pixels: int | None = ReaderConfig.max_pixels
) -> TiffImage:
    """Open a TIFF/BigTIFF lazily; only its header and tile tables are read."""
    import tifffile

    p: Any = str(path) if is_url(path) else Path(path)
    name: Any = redact(p) if is_url(p) else p  # what messages show: no credentials
    with _tifffile_log() as messages:
        try:
            # A URL: tifffile on a remote file; range requests for the header and tile tables.
            tf = (
                tifffile.TiffFile(open_file(p), name=p.rsplit("/", 1)[-1])
                if is_url(p)
                else (tifffile.TiffFile(p))
            )
        except Exception as exc:
            raise CorruptImageError(
                f"{name}: not a readable TIFF: {one_line(exc, typed=False)}"
            ) from exc
        try:
            img = _describe(p, name, tf, max_pixels=max_pixels)
            if any("circular" in m for m in messages):
                raise CorruptImageError(
                    f"{name}: corrupt TIFF: its chain of IFDs (pages) is cyclic"
                )
        except TilenetError:
            tf.close()
            raise
        except Exception as exc:
            tf.close()
            raise CorruptImageError(
                f"{name}: corrupt TIFF structure: {one_line(exc, typed=False)}"
            ) from exc
    if messages:
        img.metadata["warnings"] = [first_line(m) for m in messages]
    return img


def _gdal_nodata(page: Any) -> float | None:
    """GDAL's nodata tag (42113, as GDAL and tilenet's class maps write it), if readable."""
    tag = page.tags.get(42113)
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip("\x00 "))
    except ValueError:
        return None


def _missing_tiles(levels: list[Any]) -> dict[int, tuple[tuple[int, int], np.ndarray]]:
    """Per single-page tiled level: its tile size and the (ny, nx) grid of tiles whose byte
    count is 0 in every plane (left out of a sparse slide), where there are any."""
    out = {}
    for i, lv in enumerate(levels):
        page = lv.keyframe
        if len(lv.pages) != 1 or not page.is_tiled:
            continue
        counts = np.asarray(lv.pages[0].databytecounts)
        if counts.all():
            continue
        th, tw = int(page.tilelength), int(page.tilewidth)
        ny, nx = -(-int(page.imagelength) // th), -(-int(page.imagewidth) // tw)
        if counts.size % (ny * nx) == 0 and int(page.tiledepth) == 1:
            out[i] = ((th, tw), (counts.reshape(-1, ny, nx) == 0).all(0))
    return out


def _alpha_channel(page: Any, channels: int) -> int | None:
    """The channel of an interleaved page's alpha sample (ExtraSamples 1 or 2), if any."""
    extra = [int(e) for e in np.atleast_1d(getattr(page, "extrasamples", None) or ())]
    if not extra or int(page.samplesperpixel) != channels:
        return None
    alpha = [i for i, kind in enumerate(extra) if kind in (1, 2)]
    return channels - len(extra) + alpha[0] if alpha else None


def _describe(p: Any, name: Any, tf: Any, *, max_pixels: int | None) -> TiffImage:
    """The image of ``tf`` opened from ``p``; messages call it ``name`` (redacted)."""
    if not tf.series:
        raise CorruptImageError(
            f"{name}: TIFF contains no readable image (corrupt or truncated header)"
        )
    levels = _pyramid(tf)
    s0 = levels[0]
    dtype = np.dtype(s0.dtype)
    if dtype.kind not in "uifb" or dtype.itemsize > 8:
        raise UnsupportedFormatError(f"{name}: unsupported TIFF sample type {dtype}")
    for lv in levels:  # tifffile gives a bare int for a compression it has no name for
        code = lv.keyframe.compression
        if not hasattr(code, "name"):
            raise UnsupportedFormatError(
                f"{name}: TIFF compression {int(code)} is not one any decoder here knows; "
                "convert the file with the software that wrote it"
            )
    layouts = [_layout(name, lv.axes, tuple(lv.shape)) for lv in levels]
    check_pixels(name, layouts[0].height, layouts[0].width, max_pixels=max_pixels)
    file_size = int(tf.filehandle.size) if is_url(p) else p.stat().st_size
    out_levels = []
    for lv, lay in zip(levels, layouts, strict=True):
        if lay.channels != layouts[0].channels or np.dtype(lv.dtype) != dtype:
            raise CorruptImageError(f"{name}: pyramid levels disagree in channels or dtype")
        page = lv.keyframe
        if page.compression != 1 or page.is_tiled:
            check_chunk(name, tuple(page.chunks), dtype.itemsize)
        _check_pages(name, lv, file_size)
        shape = (lay.height, lay.width)
        chunks = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else None
        out_levels.append(
            Level(shape, slide_downsample((layouts[0].height, layouts[0].width), shape), chunks)
        )
    page0 = s0.keyframe
    comp = _COMPRESSION_NAMES.get(page0.compression.name, page0.compression.name.lower())
    return TiffImage(
        path=p,
        format="ome-tiff" if tf.is_ome else "bigtiff" if tf.is_bigtiff else "tiff",
        dtype=dtype if dtype.kind != "b" else np.dtype(np.uint8),
        channels=layouts[0].channels,
        levels=out_levels,
        compression=comp,
        pixel_size=pixel_size(tf, page0),
        metadata={
            "axes": s0.axes,
            "series_kind": s0.kind,
            "georeferenced": is_geotiff(page0.tags),
        },
        nodata=_gdal_nodata(page0),
        **svs_extras(tf),
        _alpha=_alpha_channel(page0, layouts[0].channels),
        _missing=_missing_tiles(levels),
        _tf=tf,
        _series=levels,
        _layouts=layouts,
    )
