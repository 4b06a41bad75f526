"""Whole-slide images in the formats only OpenSlide reads, through openslide-python.

Hamamatsu NDPI/VMS/VMU, Leica SCN, MIRAX MRXS, Philips TIFF, Sakura SVSLIDE, Trestle,
Ventana BIF and DICOM-WSI (a ``.dcm`` file of the series, or its directory) come here;
formats tifffile reads faithfully (Aperio SVS among them, measured faster there:
``scripts/bench_slides.py``) stay on :mod:`tilenet.io.tiff`. ``openslide-bin`` ships the
OpenSlide library as a wheel, so nothing is installed by hand; it is imported only when a slide
is opened.

Pixels and their edge rules:

* OpenSlide returns premultiplied RGBA in which pixels outside the scanned area are fully
  transparent. tilenet returns RGB and composites such pixels onto the slide's
  ``openslide.background-color`` where the file declares one, else onto white (as TIAToolbox
  and QuPath show them): an unscanned area looks like empty glass, not like black tissue.
  The alpha is also the slide's dataset mask (:meth:`~tilenet.io.base.LazyImage.read_masked`):
  a fully transparent pixel (a missing tile of a sparse slide, the space between the regions
  of a multi-region scan) has no data, as alpha 0 of an RGBA TIFF or PNG has. A file does
  not say up front whether it is sparse, so the first time a stage asks
  (:attr:`~tilenet.io.base.LazyImage.masked`): a TIFF container (Philips, Ventana, Leica,
  generic tiled TIFF) is sparse when a tile of any level is stored with byte count 0 (its
  tag arrays are read, no pixels); otherwise the coarsest level is read once. A slide with
  neither is not masked and reads exactly as before (no mask, no nodata tag, skipped tiles
  read nothing); one with either is masked at every level. In other containers (MRXS,
  DICOM) a hole too small to leave a transparent pixel at the coarsest level is not seen
  (its pixels stay composited background, as before).
* ``read_region`` takes the location in level-0 pixels and divides it by the level's
  downsample; where that downsample is not an integer, OpenSlide shifts the level by the
  fraction (a sub-pixel resampling) and the shift depends on where a read starts. To keep a
  pixel's value independent of the window it is read in (seam-free tiling), such levels are
  read in fixed blocks on a grid anchored at the level's origin (cached, LRU, bounded in bytes),
  and windows are cut from the blocks. Levels with integer downsamples (level 0 always) are
  read directly and are the stored pixels.
* One OpenSlide handle serves every reader thread: an ``openslide_t`` may be used concurrently
  from several threads without locking (OpenSlide's README), and ``read_region`` (a ctypes
  call) releases the GIL. A tile that cannot be decoded (a truncated file) fails that read
  with a one-line :class:`~tilenet.errors.CorruptImageError` naming the file.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilenet.config import ReaderConfig
from tilenet.errors import CorruptImageError, ImageNotFoundError, UnsupportedFormatError, one_line
from tilenet.geometry import Window
from tilenet.io.base import LazyImage, Level
from tilenet.io.sniff import check_pixels

__all__ = ["BLOCK_CACHE_BYTES", "SlideImage", "open_slide"]

#: Budget of each slide's cache of decoded blocks (levels with a non-integer downsample).
BLOCK_CACHE_BYTES = 32 * 2**20
_BLOCK = 512
#: The largest coarsest level read whole to find whether a slide is sparse.
_PROBE_PIXELS = 4096 * 4096
_WHITE = (255, 255, 255)
# DICOM transfer syntaxes of tiled slides -> the compression names tilenet reports.
_DICOM_COMPRESSION = {
    "1.2.840.10008.1.2.1": None,
    "1.2.840.10008.1.2.4.50": "jpeg",
    "1.2.840.10008.1.2.4.90": "jpeg2000",
    "1.2.840.10008.1.2.4.91": "jpeg2000",
    "1.2.840.10008.1.2.4.201": "htj2k",
    "1.2.840.10008.1.2.4.202": "htj2k",
    "1.2.840.10008.1.2.4.203": "htj2k",
}


def _float(props: Any, key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _background(props: Any) -> tuple[int, int, int]:
    text = str(props.get("openslide.background-color") or "")
    if len(text) == 6:
        try:
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
        except ValueError:
            pass
    return _WHITE


@dataclass
class SlideImage(LazyImage):
    """A whole-slide image read through OpenSlide; RGB uint8, levels as OpenSlide lists them."""

    _slide: Any = field(default=None, repr=False)
    #: OpenSlide's own downsample per level: what ``read_region`` divides locations by.
    _os_downsamples: list[float] = field(default_factory=list, repr=False)
    _background: tuple[int, int, int] = field(default=_WHITE, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _blocks: OrderedDict[tuple[int, int, int], np.ndarray] = field(
        default_factory=OrderedDict, repr=False
    )
    _block_bytes: int = field(default=0, repr=False)
    #: Per reader thread: the alpha of its last read, (window, level, alpha).
    _alphas: threading.local = field(default_factory=threading.local, repr=False)

    def _region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """``read_region`` of a (h, w) area at level pixel (y, x), as RGB composited on the
        background, and the alpha: (h, w, 4) uint8."""
        ds = self._os_downsamples[level]
        loc = (round(x * ds), round(y * ds))
        rgba = np.asarray(self._slide.read_region(loc, level, (w, h)))
        alpha = rgba[:, :, 3]
        if alpha.min() == 255:
            return rgba
        # openslide-python un-premultiplies; composite the (partly) transparent pixels.
        a = alpha[:, :, None].astype(np.float32) / 255.0
        bg = np.asarray(self._background, np.float32)
        rgb = np.rint(rgba[:, :, :3] * a + bg * (1.0 - a)).astype(np.uint8)
        return np.dstack([rgb, alpha])

    #: Whether the coarsest level has a transparent pixel (None: not probed yet).
    _sparse: bool | None = field(default=None, repr=False)

    def _has_dataset_mask(self) -> bool:
        if self._sparse is None:
            self._sparse = self._probe_sparse()
        return self._sparse

    def _probe_sparse(self) -> bool:
        """Whether the slide has areas without data: a TIFF container (Philips, Ventana,
        Leica, generic tiled TIFF) with a tile of byte count 0 at any level, or OpenSlide's
        coarsest level with a fully transparent pixel (read once; a level too large to read
        whole counts as sparse)."""
        if _tiff_has_missing_tiles(self.path):
            return True
        level = len(self.levels) - 1
        h, w = self.levels[level].shape
        if h * w > _PROBE_PIXELS:
            return True
        rgba = np.asarray(self._slide.read_region((0, 0), level, (w, h)))
        return bool((rgba[:, :, 3] == 0).any())

    def _dataset_mask(self, window: Window, level: int, pixels: np.ndarray) -> np.ndarray:
        """OpenSlide's alpha of the window read: 0 where the slide has no scanned data."""
        last = getattr(self._alphas, "last", None)
        if last is not None and last[0] == window and last[1] == level:
            return np.asarray(last[2])
        return self._rgba(window, level)[:, :, 3]

    def _read(self, window: Window, level: int) -> np.ndarray:
        rgba = self._rgba(window, level)
        self._alphas.last = (window, level, rgba[:, :, 3])
        return rgba[:, :, :3]

    def _rgba(self, window: Window, level: int) -> np.ndarray:
        """``window`` of ``level`` as composited RGB and alpha (h, w, 4)."""
        if float(self._os_downsamples[level]).is_integer():
            return self._region(level, window.y, window.x, window.h, window.w)
        out = np.empty((window.h, window.w, 4), np.uint8)
        lh, lw = self.levels[level].shape
        for by in range(window.y // _BLOCK, (window.y1 - 1) // _BLOCK + 1):
            for bx in range(window.x // _BLOCK, (window.x1 - 1) // _BLOCK + 1):
                y0, x0 = by * _BLOCK, bx * _BLOCK
                block = self._block(level, by, bx, min(_BLOCK, lh - y0), min(_BLOCK, lw - x0))
                ya, yb = max(window.y, y0), min(window.y1, y0 + block.shape[0])
                xa, xb = max(window.x, x0), min(window.x1, x0 + block.shape[1])
                out[ya - window.y : yb - window.y, xa - window.x : xb - window.x] = block[
                    ya - y0 : yb - y0, xa - x0 : xb - x0
                ]
        return out

    def _block(self, level: int, by: int, bx: int, h: int, w: int) -> np.ndarray:
        key = (level, by, bx)
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
        block = self._region(level, by * _BLOCK, bx * _BLOCK, h, w)
        block.flags.writeable = False
        with self._lock:
            if key not in self._blocks:
                self._blocks[key] = block
                self._block_bytes += block.nbytes
                while self._block_bytes > BLOCK_CACHE_BYTES and len(self._blocks) > 1:
                    _, old = self._blocks.popitem(last=False)
                    self._block_bytes -= old.nbytes
        return block

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (``label``, ``macro``, ``thumbnail``...) as RGB, composited."""
        if name not in self.associated_images:
            raise UnsupportedFormatError(
                f"{self.path}: no associated image {name!r}; it has "
                f"{sorted(self.associated_images) or 'none'}"
            )
        rgba = np.asarray(self._slide.associated_images[name].convert("RGBA"))
        a = rgba[:, :, 3:].astype(np.float32) / 255.0
        bg = np.asarray(self._background, np.float32)
        return np.rint(rgba[:, :, :3] * a + bg * (1.0 - a)).astype(np.uint8)

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._block_bytes = 0
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _slide_file(p: Path) -> Path:
    """The file OpenSlide opens: ``p``, or for a DICOM directory one ``.dcm`` file in it."""
    if not p.is_dir():
        return p
    for f in sorted(p.iterdir()):
        if f.is_file() and _is_dicom(f):
            return f
    raise UnsupportedFormatError(f"{p}: directory holds no DICOM file (and is not a zarr store)")


def _is_dicom(f: Path) -> bool:
    try:
        with f.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _tiff_has_missing_tiles(path: Path) -> bool:
    """Whether ``path`` is a TIFF with a tile or strip stored as missing (byte count 0) in
    any page: the tag arrays only, no pixel read. False for other containers
    (MRXS, DICOM) and for a TIFF tifffile cannot parse."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                counts = getattr(page, "databytecounts", None)
                if counts is not None and len(counts) and min(counts) == 0:
                    return True
    except Exception:  # not a TIFF, or one only OpenSlide makes sense of
        return False
    return False


def open_slide(
    path: str | os.PathLike[str], *, max_pixels: int | None = ReaderConfig.max_pixels
) -> SlideImage:
    """Open a whole-slide image with OpenSlide; only its header and tile index are read."""
    p = Path(path)
    if not p.exists():
        raise ImageNotFoundError(f"{p}: no such file or directory")
    if p.suffix.lower() == ".mrxs" and not (p.with_suffix("") / "Slidedat.ini").is_file():
        raise CorruptImageError(
            f"{p}: MIRAX slide without its data folder: expected {p.with_suffix('')}/ with "
            "Slidedat.ini and the Data*.dat files beside the .mrxs file; copy the folder too"
        )
    target = _slide_file(p)
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - a dependency
        raise UnsupportedFormatError(
            f"{p}: reading this slide needs openslide-python and openslide-bin "
            "(pip install openslide-python openslide-bin)"
        ) from exc
    try:
        slide = openslide.OpenSlide(target)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnsupportedFormatError(
            f"{p}: not a whole-slide format OpenSlide reads ({one_line(exc, typed=False) or 'unknown'})"
        ) from exc
    except (openslide.OpenSlideError, OSError) as exc:
        raise CorruptImageError(
            f"{p}: OpenSlide cannot open it: {one_line(exc, typed=False)}"
        ) from exc
    try:
        return _describe(p, slide, max_pixels=max_pixels)
    except BaseException:
        slide.close()
        raise


def _describe(p: Path, slide: Any, *, max_pixels: int | None) -> SlideImage:
    props = slide.properties
    if props.get("openslide.vendor") == "dicom" and props.get("dicom.ImageType[3]") == "RESAMPLED":
        # OpenSlide takes the finest level it finds for level 0; a RESAMPLED one (DICOM's
        # value 4 of ImageType) means the series' full-resolution file is not there.
        raise CorruptImageError(
            f"{p}: DICOM series lacks its full-resolution level: the finest file found is a "
            f"resampled level ({slide.level_dimensions[0][0]} x {slide.level_dimensions[0][1]}); "
            "a file of the series is missing"
        )
    w0, h0 = (int(v) for v in slide.level_dimensions[0])
    check_pixels(p, h0, w0, max_pixels=max_pixels)
    levels = []
    for i, (w, h) in enumerate(slide.level_dimensions):
        tile_h = props.get(f"openslide.level[{i}].tile-height")
        tile_w = props.get(f"openslide.level[{i}].tile-width")
        chunks = (int(tile_h), int(tile_w)) if tile_h and tile_w else None
        ds = float(slide.level_downsamples[i])  # OpenSlide's own: the mean of the two ratios
        levels.append(Level((int(h), int(w)), (ds, ds), chunks))
    mpp_y, mpp_x = _float(props, "openslide.mpp-y"), _float(props, "openslide.mpp-x")
    assoc = {}
    for name in sorted(slide.associated_images.keys()):
        ah = props.get(f"openslide.associated.{name}.height")
        aw = props.get(f"openslide.associated.{name}.width")
        if ah and aw:
            assoc[name] = (int(ah), int(aw))
    vendor = props.get("openslide.vendor")
    return SlideImage(
        path=p,
        format=f"openslide-{vendor}" if vendor else "openslide",
        dtype=np.dtype(np.uint8),
        channels=3,
        levels=levels,
        # Only DICOM names its codec in a property; other vendors' codecs stay unreported.
        compression=_DICOM_COMPRESSION.get(str(props.get("dicom.TransferSyntaxUID")), "vendor"),
        pixel_size=(mpp_y, mpp_x) if mpp_y and mpp_x else None,
        metadata={"openslide_properties": len(props)},
        vendor=vendor,
        objective_power=_float(props, "openslide.objective-power"),
        associated_images=assoc,
        _slide=slide,
        _os_downsamples=[float(d) for d in slide.level_downsamples],
        _background=_background(props),
    )
