"""Image IO: :func:`open_image` for every readable format, and the writers.

``open_image`` decides the format from the file's content (magic bytes), never from its
name, and returns a :class:`LazyImage`: shape, dtype, pyramid and pixel size from the header,
pixels only when a window is read.
"""

from __future__ import annotations

import os
from typing import Any

from tilenet.config import ReaderConfig
from tilenet.errors import UnsupportedFormatError
from tilenet.io.base import LazyImage, Level
from tilenet.io.sniff import fingerprint, sniff
from tilenet.io.storage import is_url, local_path, redact
from tilenet.io.view import View, view

# isort: split
# -- writers (maintained with tilenet/io/writers.py and tilenet/io/convert.py) ----------------
from tilenet.io.convert import convert
from tilenet.io.writers import OmeZarrWriter, build_pyramid, write_ome_tiff, write_preview_png

# -- end writers ---------------------------------------------------------------------------------

__all__ = [
    "LazyImage",
    "Level",
    "OmeZarrWriter",
    "View",
    "build_pyramid",
    "convert",
    "fingerprint",
    "open_image",
    "view",
    "write_ome_tiff",
    "write_preview_png",
]


def open_image(
    path: str | os.PathLike[str],
    *,
    max_pixels_eager: int | None = ReaderConfig.max_pixels_eager,
    max_pixels: int | None = ReaderConfig.max_pixels,
) -> LazyImage:
    """Open an image lazily: TIFF/BigTIFF/OME-TIFF, zarr/OME-Zarr, PNG/JPEG (via Pillow),
    a georeferenced raster (GeoTIFF, COG, JPEG 2000, VRT: via rasterio, with its CRS), or a
    whole-slide image (Aperio SVS via tifffile; NDPI, VMS/VMU, SCN, MRXS, Philips TIFF,
    SVSLIDE, Trestle, BIF and DICOM-WSI via OpenSlide).

    Only the header is read here. ``max_pixels`` refuses headers that claim more pixels
    (before anything is allocated). ``max_pixels_eager`` limits formats that must be decoded
    whole (PNG, JPEG); ``None`` lifts it (``tilenet convert`` uses that). The keyword options
    are the fields of :class:`~tilenet.config.ReaderConfig` (defaults there;
    ``open_image(p, **asdict(cfg.reader))``). Errors are
    :class:`~tilenet.errors.TilenetError` subclasses with a one-line message naming the file.
    """
    p: Any = str(path) if is_url(path) else local_path(path)  # URLs stay strings (fsspec)
    kind = sniff(p)
    if kind == "pil" and is_url(p):
        raise UnsupportedFormatError(
            f"{redact(p)}: PNG/JPEG are decoded whole, so tilenet does not read them from "
            "storage; copy the file locally, or convert it to a tiled OME-TIFF (tilenet convert)"
        )
    if kind == "tiff":
        from tilenet.io.tiff import open_tiff, openslide_vendor

        if not is_url(p) and openslide_vendor(p):
            # NDPI, SCN, BIF, Philips, Trestle: OpenSlide reads them faithfully (local files
            # only: from storage they stay on tifffile, which reads them by range requests)
            kind = "slide"
    if kind == "slide":
        from tilenet.io.slide import open_slide

        return open_slide(p, max_pixels=max_pixels)
    if kind == "tiff":
        img = open_tiff(p, max_pixels=max_pixels)
        if not img.metadata.get("georeferenced"):
            return img  # plain TIFFs stay on tifffile (faster than GDAL here)
        img.close()
        kind = "raster"
    if kind == "raster":
        from tilenet.io.raster import open_raster

        return open_raster(p, max_pixels=max_pixels)
    if kind == "zarr":
        from tilenet.io.zarrio import open_zarr

        return open_zarr(p, max_pixels=max_pixels)
    from tilenet.io.pil import open_pil

    return open_pil(p, max_pixels_eager=max_pixels_eager, max_pixels=max_pixels)
