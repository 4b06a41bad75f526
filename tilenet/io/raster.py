"""Georeferenced rasters through rasterio (GDAL): the reader, and the Cloud-Optimized GeoTIFF.

:func:`open_raster` reads what GDAL reads (GeoTIFF, COG, JPEG 2000, VRT, ...) window by
window: ``dataset.read(window=...)`` decodes only the blocks a window touches, and overviews
are the pyramid levels (each opened with ``overview_level``). The image carries the CRS (WKT),
the geotransform, nodata and band names. ``open_image`` sends a TIFF here only when it is
georeferenced (:func:`is_geotiff`); plain TIFFs stay on tifffile, which is faster.

:func:`write_cog` writes a 2-D array-like (a zarr array) as a COG out of core: block by block
into a temporary tiled GeoTIFF, then laid out by GDAL's own COG driver (overviews, tile
order, ``LAYOUT=COG``), and published by rename.

rasterio is imported lazily: importing :mod:`tilenet.io` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
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
    one_line,
)
from tilenet.fsutil import atomic_output, remove_path, tmp_sibling
from tilenet.geometry import GeoTransform, Window, iter_blocks
from tilenet.io.base import LazyImage, Level
from tilenet.io.crs import describe_georef  # re-exported: engine/infer.py, outputs/outputset.py
from tilenet.io.sniff import check_chunk, check_pixels, level_downsample
from tilenet.io.storage import gdal_options, gdal_path, is_url

__all__ = [
    "GDAL_CACHE_BYTES",
    "GEOTIFF_TAGS",
    "RasterImage",
    "describe_georef",
    "gsd_of",
    "is_geotiff",
    "open_raster",
    "scaled_transform",
    "write_cog",
]

#: TIFF tags that make a TIFF georeferenced: ModelPixelScale, ModelTiepoint,
#: ModelTransformation, GeoKeyDirectory.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)

#: GDAL's block cache for tilenet's reads and writes (GDAL's default is 5 % of RAM), set once
#: before the first raster is opened unless ``GDAL_CACHEMAX`` is set in the environment.
GDAL_CACHE_BYTES = 64 * 2**20
_CACHE_SET = False

#: Block size of the COGs written (and of the temporary GeoTIFF they are made from).
_COG_BLOCK = 512


@contextlib.contextmanager
def _quiet_georef() -> Iterator[None]:
    """No NotGeoreferencedWarning: a raster without a transform is fine (``transform`` None)."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def _gdal_name(path: Any) -> Any:
    """What rasterio opens for ``path``: GDAL's virtual path for a URL (``/vsis3/...``)."""
    return gdal_path(path) if is_url(path) else path


def _remote_env(path: Any) -> contextlib.AbstractContextManager[Any]:
    """GDAL's options for a URL (endpoint, timeouts, retries) around a remote open or read."""
    if not is_url(path):
        return contextlib.nullcontext()
    import rasterio

    return rasterio.Env(**gdal_options(path))


def is_geotiff(tags: Any) -> bool:
    """Whether a TIFF page's tags (codes or a tifffile ``TiffTags``) georeference it."""
    return any(code in tags for code in GEOTIFF_TAGS)


def scaled_transform(transform: tuple[float, ...], downsample: tuple[float, float]) -> GeoTransform:
    """``GeoTransform(*transform).scaled(downsample)``: kept for callers of the GDAL tuple.

    >>> scaled_transform((500000.0, 10.0, 0.0, 4e6, 0.0, -10.0), (2.0, 2.0)).to_gdal()
    (500000.0, 20.0, 0.0, 4000000.0, 0.0, -20.0)
    """
    return GeoTransform(*transform).scaled(downsample)


def gsd_of(transform: tuple[float, ...]) -> tuple[float, float]:
    """``GeoTransform(*transform).gsd``: kept for callers of the GDAL tuple."""
    return GeoTransform(*transform).gsd


@dataclass
class RasterImage(LazyImage):
    """A raster read through rasterio; one GDAL dataset handle per thread and level.

    GDAL handles are not thread-safe, so each reading thread opens its own (reader threads
    are few and long-lived); :meth:`close` closes them all.
    """

    _overviews: list[int] = field(default_factory=list, repr=False)
    #: Whether GDAL gives the dataset a mask of its own: an alpha band or an internal or
    #: sidecar (``.msk``) mask; a nodata value is applied from the pixels instead.
    _gdal_mask: bool = field(default=False, repr=False)
    _handles: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _dataset(self, level: int) -> Any:
        import rasterio

        key = (threading.get_ident(), level)
        with self._lock:
            ds = self._handles.get(key)
        if ds is None:
            kw = {"overview_level": self._overviews[level - 1]} if level else {}
            with _quiet_georef(), _remote_env(self.path):
                ds = rasterio.open(_gdal_name(self.path), **kw)
            with self._lock:
                self._handles[key] = ds
        return ds

    def _read(self, window: Window, level: int) -> np.ndarray:
        from rasterio.windows import Window as RioWindow

        ds = self._dataset(level)
        with _remote_env(self.path):
            data = ds.read(window=RioWindow(window.x, window.y, window.w, window.h))
        return np.moveaxis(data, 0, -1).astype(self.dtype, copy=False)

    def _has_dataset_mask(self) -> bool:
        return self._gdal_mask

    def _dataset_mask(self, window: Window, level: int, pixels: np.ndarray) -> np.ndarray:
        """GDAL's mask of band 1 (per dataset, or the alpha band): 0 where there is no data."""
        from rasterio.windows import Window as RioWindow

        ds = self._dataset(level)
        with _remote_env(self.path):
            return ds.read_masks(1, window=RioWindow(window.x, window.y, window.w, window.h))

    def close(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for ds in handles:
            ds.close()


def open_raster(
    path: str | os.PathLike[str], *, max_pixels: int | None = ReaderConfig.max_pixels
) -> RasterImage:
    """Open a raster GDAL reads, lazily; only its header (and its overviews' headers)."""
    import rasterio

    p: Any = str(path) if is_url(path) else Path(path)
    _bound_gdal_cache()
    try:
        with _quiet_georef(), _remote_env(p):
            ds = rasterio.open(_gdal_name(p))
    except Exception as exc:
        raise CorruptImageError(
            f"{p}: not a raster GDAL can read: {one_line(exc, typed=False)}"
        ) from exc
    try:
        with ds, _quiet_georef(), _remote_env(p):
            return _describe(p, ds, rasterio, max_pixels=max_pixels)
    except TilenetError:
        raise
    except Exception as exc:
        raise CorruptImageError(
            f"{p}: corrupt raster header: {one_line(exc, typed=False)}"
        ) from exc


def _chunks(ds: Any) -> tuple[int, int] | None:
    """The block (tile) shape; None for strips (full-width blocks), as the TIFF reader says."""
    bh, bw = ds.block_shapes[0]
    return None if bw >= ds.width and bh < ds.height else (int(bh), int(bw))


def _describe(p: Any, ds: Any, rasterio: Any, *, max_pixels: int | None) -> RasterImage:
    if ds.count < 1:
        raise UnsupportedFormatError(f"{p}: raster has no bands")
    dtypes = set(ds.dtypes)
    if len(dtypes) != 1:
        raise UnsupportedFormatError(f"{p}: bands of different types {sorted(dtypes)}")
    dtype = np.dtype(ds.dtypes[0])
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise UnsupportedFormatError(f"{p}: unsupported raster sample type {dtype}")
    h0, w0 = int(ds.height), int(ds.width)
    check_pixels(p, h0, w0, max_pixels=max_pixels)
    check_chunk(p, tuple(ds.block_shapes[0]), dtype.itemsize * ds.count)
    levels = [Level((h0, w0), (1.0, 1.0), _chunks(ds))]
    factors = list(ds.overviews(1))
    for i in range(len(factors)):
        with rasterio.open(_gdal_name(p), overview_level=i) as ov:
            shape = (int(ov.height), int(ov.width))
            check_chunk(p, tuple(ov.block_shapes[0]), dtype.itemsize * ds.count)
            levels.append(Level(shape, level_downsample((h0, w0), shape), _chunks(ov)))
    crs = ds.crs.to_wkt() if ds.crs else None
    georef = crs is not None or not ds.transform.is_identity
    comp = ds.tags(ns="IMAGE_STRUCTURE").get("COMPRESSION")
    names = []
    for i, (desc, ci) in enumerate(zip(ds.descriptions, ds.colorinterp, strict=True)):
        interp = getattr(ci, "name", "undefined")
        names.append(desc or (interp if interp not in ("undefined", "alpha") else f"band{i + 1}"))
    if ds.colorinterp and getattr(ds.colorinterp[-1], "name", "") == "alpha":
        names[-1] = ds.descriptions[-1] or "alpha"
    return RasterImage(
        path=p,
        format="geotiff" if ds.driver == "GTiff" else str(ds.driver).lower(),
        dtype=dtype,
        channels=int(ds.count),
        levels=levels,
        compression=comp.lower() if comp else None,
        pixel_size=None,  # a ground sample distance is not a microscope pixel: see transform
        metadata={"driver": ds.driver},
        crs=crs,
        transform=GeoTransform(*(float(v) for v in ds.transform.to_gdal())) if georef else None,
        nodata=float(ds.nodata) if ds.nodata is not None else None,
        band_names=names,
        _overviews=list(range(len(factors))),
        _gdal_mask=_has_gdal_mask(ds),
    )


def _has_gdal_mask(ds: Any) -> bool:
    """Whether band 1's GDAL mask is an alpha band or a per-dataset mask (not nodata-made)."""
    from rasterio.enums import MaskFlags

    flags = ds.mask_flag_enums[0]
    return MaskFlags.per_dataset in flags or MaskFlags.alpha in flags


def write_cog(
    path: str | os.PathLike[str],
    array: Any,
    *,
    crs: str | None,
    transform: tuple[float, ...] | None,
    nodata: float | None = None,
    nodata_mask: Callable[[Window], np.ndarray] | None = None,
    histogram: np.ndarray | None = None,
    resampling: str = "mode",
    compress: str = "deflate",
    band_names: list[str] | None = None,
    scale: float | None = None,
    level: int | None = None,
) -> Path:
    """Write a 2-D array-like (numpy, zarr) as a Cloud-Optimized GeoTIFF, out of core.

    A 3-D (bands, H, W) array-like becomes a multi-band COG (``band_names`` its band
    descriptions; ``scale`` each band's GDAL scale, i.e. value = stored * scale). ``level``
    is the compression level (GDAL's default when None).

    ``transform`` is in GDAL order. The array is copied block by block into a temporary tiled
    GeoTIFF beside ``path``; there ``nodata_mask(window)`` (a bool (h, w) array, True where
    the pixel has no data), when given, sets pixels to ``nodata``; ``histogram`` (integer,
    one bin per value of an unsigned ``array``), when given, counts the values written, nodata
    included. GDAL's COG driver then lays
    it out (tiles, overviews made with ``resampling`` that skip nodata, ``LAYOUT=COG``) under
    a temporary name renamed into place on success. GDAL makes overviews down to one
    block, so an image within 512 x 512 pixels has none. Memory: one 512 x 512 block, plus
    GDAL's block cache.
    """
    import rasterio
    import rasterio.shutil
    from affine import Affine
    from rasterio.windows import Window as RioWindow

    final = Path(path)
    if len(array.shape) not in (2, 3):
        raise InputError(f"{final}: write_cog takes a 2-D or 3-D array, got shape {array.shape}")
    if nodata_mask is not None and nodata is None:
        raise InputError(f"{final}: a nodata mask needs a nodata value")
    bands = len(array.shape) == 3
    count = int(array.shape[0]) if bands else 1
    h, w = (int(n) for n in array.shape[-2:])
    dtype = np.dtype(array.dtype)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": h,
        "width": w,
        "count": count,
        "dtype": dtype.name,
        "tiled": True,
        "blockxsize": _COG_BLOCK,
        "blockysize": _COG_BLOCK,
        "compress": "zstd",
        "zstd_level": 1,
        "bigtiff": "if_safer",
        "crs": crs,
        "transform": Affine.from_gdal(*transform) if transform else None,
        "nodata": nodata,
    }
    staging = tmp_sibling(final.with_name(final.name + ".staging.tif"))
    remove_path(staging)
    _bound_gdal_cache()
    try:
        with rasterio.open(staging, "w", **profile) as dst:
            if band_names:
                dst.descriptions = tuple(band_names)
            if scale is not None:
                dst.scales = (scale,) * count
            for window in iter_blocks((h, w), _COG_BLOCK):
                if bands:
                    block = np.array(array[(slice(None), *window.slices)], dtype=dtype)
                else:
                    block = np.array(array[window.slices], dtype=dtype)
                if nodata_mask is not None:
                    block[..., nodata_mask(window)] = nodata
                if histogram is not None:
                    histogram += np.bincount(block.ravel(), minlength=len(histogram))
                rio = RioWindow(window.x, window.y, window.w, window.h)
                dst.write(block, None if bands else 1, window=rio)
        with atomic_output(final) as tmp:
            rasterio.shutil.copy(
                staging,
                tmp,
                driver="COG",
                blocksize=_COG_BLOCK,
                compress=compress,
                **({"level": level} if level is not None else {}),
                overview_resampling=resampling,
                bigtiff="if_safer",
            )
    finally:
        remove_path(staging)
    return final


def _bound_gdal_cache() -> None:
    """Cap GDAL's block cache (default: 5 % of RAM) at :data:`GDAL_CACHE_BYTES`, unless the
    user set ``GDAL_CACHEMAX``. GDAL reads the setting once, before its first block IO."""
    global _CACHE_SET
    if _CACHE_SET or "GDAL_CACHEMAX" in os.environ:
        return
    from rasterio.env import set_gdal_config

    set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)
    _CACHE_SET = True
