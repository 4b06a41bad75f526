"""Format detection by content, header guards shared by the readers, and input fingerprints.

The format of a file is decided by its first bytes, never by its name: a text file renamed
``.tif`` is reported as what it is. Every reader checks the sizes a header claims with
:func:`check_pixels` and :func:`check_chunk` *before* it allocates anything, so a crafted
header cannot make tilenet allocate memory it claims to need.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Literal

from tilenet.errors import (
    CorruptImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    UnsupportedFormatError,
)
from tilenet.io.storage import head, info, is_url, join, redact, remote_fingerprint

__all__ = [
    "MAX_CHUNK_BYTES",
    "Format",
    "check_chunk",
    "check_pixels",
    "fingerprint",
    "level_downsample",
    "slide_downsample",
    "sniff",
]

Format = Literal["tiff", "zarr", "pil", "raster", "slide"]

#: Largest single storage chunk (tile or strip), decoded, a reader will decode. A window read
#: decodes whole chunks, so this bounds the memory of one read independently of the window.
MAX_CHUNK_BYTES = 512 * 2**20

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Formats Pillow reads and tilenet accepts (magic prefix -> name, for messages only).
_PIL_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"RIFF": "WEBP",
    b"P1": "PNM",
    b"P2": "PNM",
    b"P3": "PNM",
    b"P4": "PNM",
    b"P5": "PNM",
    b"P6": "PNM",
}
# Formats only GDAL reads (through rasterio), recognised by their magic: JPEG 2000 (JP2 box
# and raw codestream), GDAL's VRT (XML), ERDAS Imagine. Only these: GDAL also accepts plain
# text (e.g. XYZ grids), so handing it any unknown content would take garbage for an image.
_RASTER_MAGIC = {
    b"\x00\x00\x00\x0cjP  \r\n\x87\n": "JPEG 2000",
    b"\xff\x4f\xff\x51": "JPEG 2000",
    b"<VRTDataset": "VRT",
    b"EHFA_HEADER_TAG": "ERDAS Imagine",
}
# Whole-slide formats only OpenSlide reads, by content: DICOM (the "DICM" preamble at byte
# 128), Sakura SVSLIDE (an SQLite database), Hamamatsu VMS/VMU (an ini file). MIRAX is a
# ``.mrxs`` file beside its data folder: OpenSlide itself knows it by that name only.
_SLIDE_MAGIC = {
    b"SQLite format 3\x00": "Sakura SVSLIDE",
    b"[Virtual Microscope Specimen]": "Hamamatsu VMS",
    b"[Uncompressed Virtual Microscope Specimen]": "Hamamatsu VMU",
}
_ZARR_META = (".zarray", ".zgroup", "zarr.json")
_FINGERPRINT_META = (".zarray", ".zgroup", ".zattrs", ".zmetadata", "zarr.json")
_MiB = 2**20


def sniff(path: str | os.PathLike[str]) -> Format:
    """Return which reader handles ``path``, judged by content (magic bytes), not by name.

    ``"raster"`` (rasterio) is for formats only GDAL reads; a georeferenced TIFF is
    ``"tiff"`` here and sent to rasterio by :func:`tilenet.io.open_image` after its header.
    ``"slide"`` (OpenSlide) is for whole-slide formats that are not TIFF: DICOM files or a
    directory of them, SVSLIDE, VMS/VMU and MIRAX ``.mrxs``; vendor TIFFs (NDPI, SCN, BIF,
    Philips, Trestle) are ``"tiff"`` here and sent on by ``open_image``.

    Raises :class:`ImageNotFoundError` for a missing path and :class:`UnsupportedFormatError`
    for an empty file, a directory that is not a zarr store, or unknown content.
    """
    if is_url(path):
        return _sniff_url(str(path))
    p = Path(path)
    if not p.exists():
        raise ImageNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        if any((p / name).is_file() for name in _ZARR_META):
            return "zarr"
        if _holds_dicom(p):
            return "slide"  # a DICOM-WSI series: one file per level
        raise UnsupportedFormatError(
            f"{p}: is a directory but neither a zarr store (no .zarray, .zgroup or zarr.json) "
            "nor a DICOM series (no .dcm files)"
        )
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise ImageNotFoundError(f"{p}: cannot be read ({exc.strerror or exc})") from exc
    if not head:
        raise UnsupportedFormatError(f"{p}: empty file (0 bytes)")
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[128:132] == b"DICM" or p.suffix.lower() == ".mrxs":
        return "slide"
    if any(head.startswith(magic) for magic in _SLIDE_MAGIC):
        return "slide"
    if any(head.lstrip().startswith(magic) for magic in _RASTER_MAGIC):
        return "raster"
    for magic in _PIL_MAGIC:
        if head.startswith(magic):
            return "pil"
    hint = ""
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".zarr"):
        hint = f" despite its {suffix} name"
    raise UnsupportedFormatError(
        f"{p}: not a TIFF, zarr, PNG, JPEG, JPEG 2000, VRT or whole-slide image{hint} (starts with {head[:8]!r})"
    )


def _holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` holds DICOM files (a ``.dcm`` name, or the DICM preamble; only
    the first 16 entries are looked at, so a huge folder costs nothing)."""
    for f in itertools.islice(folder.iterdir(), 16):
        if f.suffix.lower() == ".dcm":
            return True
        try:
            if f.is_file():
                with f.open("rb") as fh:
                    if fh.read(132)[128:132] == b"DICM":
                        return True
        except OSError:
            continue
    return False


def _sniff_url(url: str) -> Format:
    """:func:`sniff` for a URL: a prefix holding zarr metadata, or an object's first bytes."""
    shown = redact(url)
    if info(url).get("type") == "directory":
        for name in _ZARR_META:
            try:
                head(join(url, name), 1)
                return "zarr"
            except ImageNotFoundError:
                continue
        raise UnsupportedFormatError(f"{shown}: is a prefix but not a zarr store")
    first = head(url, 32)
    if not first:
        raise UnsupportedFormatError(f"{shown}: empty object (0 bytes)")
    if first[:4] in _TIFF_MAGIC:
        return "tiff"
    if any(first.lstrip().startswith(magic) for magic in _RASTER_MAGIC):
        return "raster"
    if any(first.startswith(magic) for magic in _PIL_MAGIC):
        return "pil"
    name = url.split("?", 1)[0].lower()
    if name.endswith((".mrxs", ".vms", ".vmu", ".dcm", ".scn", ".bif", ".vsi", ".svslide")):
        raise UnsupportedFormatError(
            f"{shown}: OpenSlide reads only local files; copy the slide to local disk, or "
            "convert it once with `tilenet convert SLIDE out.ome.tif` and read that from storage"
        )
    raise UnsupportedFormatError(
        f"{shown}: not a TIFF, zarr, PNG, JPEG, JPEG 2000 or VRT image (starts with {first[:8]!r})"
    )


def check_pixels(path: object, h: int, w: int, *, max_pixels: int | None) -> None:
    """Refuse a header whose level-0 size is non-positive or above ``max_pixels``."""
    if h <= 0 or w <= 0:
        raise CorruptImageError(f"{path}: header claims an empty image of {h} x {w} pixels")
    if max_pixels is not None and h * w > max_pixels:
        raise ImageTooLargeError(
            f"{path}: header claims {h} x {w} = {h * w:,} pixels, above the limit of "
            f"{max_pixels:,}; if the file is genuine, raise max_pixels"
        )


def check_chunk(path: object, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse storage chunks so large that decoding one would be an allocation hazard."""
    n = itemsize
    for s in shape:
        if s <= 0:
            raise CorruptImageError(f"{path}: invalid chunk shape {tuple(shape)}")
        n *= int(s)
    if n > MAX_CHUNK_BYTES:
        raise ImageTooLargeError(
            f"{path}: one storage chunk {tuple(shape)} would decode to {n / _MiB:,.0f} MiB "
            f"(limit {MAX_CHUNK_BYTES // _MiB} MiB); re-save the image tiled, e.g. as a "
            "tiled TIFF with 512x512 tiles"
        )


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap content fingerprint (hex sha256) that changes when the input changes.

    Files: the size plus the first and last MiB. Directories (zarr stores): the sorted
    relative paths and contents of their metadata files. Cheap by design: a change confined
    to the middle of a large file, or to zarr chunk data only, goes unnoticed.
    """
    if is_url(path):  # size + ETag/mtime (or zarr metadata) from the store, not the content
        return remote_fingerprint(str(path), _FINGERPRINT_META)
    p = Path(path)
    if not p.exists():
        raise ImageNotFoundError(f"{p}: no such file or directory")
    digest = hashlib.sha256()
    if p.is_dir():
        digest.update(b"dir\0")
        metas = sorted(f for f in p.rglob("*") if f.name in _FINGERPRINT_META and f.is_file())
        for f in metas:
            digest.update(f.relative_to(p).as_posix().encode() + b"\0")
            digest.update(f.read_bytes())
            digest.update(b"\0")
        return digest.hexdigest()
    size = p.stat().st_size
    digest.update(f"file\0{size}\0".encode())
    with p.open("rb") as fh:
        digest.update(fh.read(_MiB))
        if size > _MiB:
            fh.seek(max(_MiB, size - _MiB))
            digest.update(fh.read(_MiB))
    return digest.hexdigest()


def slide_downsample(shape0: tuple[int, int], shape: tuple[int, int]) -> tuple[float, float]:
    """A slide level's downsample as OpenSlide reports it (``level_downsamples``): the mean of
    the height and width ratios of level 0 to the level, on both axes. A scanner's level of
    ``ceil(H / 4)`` rows is not exactly a quarter, and OpenSlide says so.

    >>> slide_downsample((1001, 700), (251, 175))
    (3.99402390438247, 3.99402390438247)
    """
    d = (shape0[0] / shape[0] + shape0[1] / shape[1]) / 2
    return (d, d)


def level_downsample(shape0: tuple[int, int], shape: tuple[int, int]) -> tuple[float, float]:
    """Downsample factors (y, x) of a pyramid level from its shape and level 0's.

    A level made with an integer factor ``f`` has ``ceil(H / f)`` or ``H // f`` rows; that
    ``f`` is returned exactly, so rounding at odd sizes does not blur the factor.

    >>> level_downsample((1001, 700), (501, 350))
    (2.0, 2.0)
    """
    out = []
    for n0, n in zip(shape0, shape, strict=True):
        ratio = n0 / n
        f = max(1, round(ratio))
        out.append(float(f) if n in (-(-n0 // f), n0 // f) else ratio)
    return (out[0], out[1])
