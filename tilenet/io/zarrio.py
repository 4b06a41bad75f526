"""zarr reader: v2 and v3 arrays, and OME-Zarr multiscale groups (NGFF 0.4 and 0.5).

OME-Zarr groups give the levels (``datasets``), the axis names (which axis is c, y, x) and
scale transforms (downsample factors and pixel size). A plain array is read as (H, W),
(H, W, C) or (C, H, W), told apart by its dimension names when it has them, else by shape:
a small axis (<= 16) next to two large ones is the channel axis.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilenet.config import ReaderConfig
from tilenet.errors import CorruptImageError, TilenetError, UnsupportedFormatError, one_line
from tilenet.geometry import GeoTransform, Window
from tilenet.io.base import LazyImage, Level
from tilenet.io.crs import zarr_georef
from tilenet.io.sniff import check_chunk, check_pixels, level_downsample
from tilenet.io.storage import is_url, zarr_store

__all__ = ["ZarrImage", "open_zarr"]

_MAX_GUESSED_CHANNELS = 16
_CHANNEL_NAMES = ("c", "ch", "channel", "channels", "band", "bands", "s", "rgb")
# OME-NGFF space-axis units -> micrometres; an axis without a unit has no physical size.
_UNIT_UM = {
    "angstrom": 1e-4,
    "picometer": 1e-6,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}


def _roles(path: object, names: list[str] | None, shape: tuple[int, ...]) -> str:
    """One letter per axis: 'y', 'x', 'c' (channels) or '.' (read at index 0)."""
    if names and len(names) == len(shape):
        low = [str(n).lower() for n in names]
        if "y" in low and "x" in low:
            return "".join(
                "y" if n == "y" else "x" if n == "x" else "c" if n in _CHANNEL_NAMES else "."
                for n in low
            )
    # No usable names: drop leading singleton axes, then judge by shape.
    lead = 0
    while len(shape) - lead > 3 and shape[lead] == 1:
        lead += 1
    core = shape[lead:]
    small = _MAX_GUESSED_CHANNELS
    if len(core) == 2:
        guess = "yx"
    elif len(core) == 3 and core[2] <= small < core[0]:
        guess = "yxc"
    elif len(core) == 3 and core[0] <= small < core[2]:
        guess = "cyx"
    else:
        raise UnsupportedFormatError(
            f"{path}: cannot tell which axes of a zarr array of shape {shape} are y, x and "
            "channels; store it as (H, W), (H, W, C) or (C, H, W) with C <= 16, or as "
            "OME-Zarr with named axes"
        )
    return "." * lead + guess


@dataclass
class ZarrImage(LazyImage):
    """A zarr array or OME-Zarr multiscale group read lazily, chunk by chunk."""

    _arrays: list[Any] = field(default_factory=list, repr=False)
    _roles: str = field(default="", repr=False)

    def _read(self, window: Window, level: int) -> np.ndarray:
        ys, xs = slice(window.y, window.y1), slice(window.x, window.x1)
        index = tuple(
            ys if r == "y" else xs if r == "x" else slice(None) if r == "c" else 0
            for r in self._roles
        )
        data = np.asarray(self._arrays[level][index])
        kept = [r for r in self._roles if r != "."]
        perm = [kept.index("y"), kept.index("x")] + [i for i, r in enumerate(kept) if r == "c"]
        data = data.transpose(perm).reshape(window.h, window.w, self.channels)
        return data.astype(self.dtype, copy=False)


def _compression(arr: Any) -> str | None:
    comps = getattr(arr, "compressors", ()) or ()
    if not comps:
        return None
    c = comps[0]
    name = getattr(c, "codec_id", None) or type(c).__name__.lower().removesuffix("codec")
    cname = getattr(c, "cname", None)
    cname = getattr(cname, "value", cname)
    return f"{name}-{cname}" if cname else str(name)


def _dimension_names(arr: Any) -> list[str] | None:
    names = getattr(arr.metadata, "dimension_names", None)
    if names and all(n is not None for n in names):
        return [str(n) for n in names]
    dims = arr.attrs.get("_ARRAY_DIMENSIONS")
    return [str(n) for n in dims] if isinstance(dims, list) else None


def _multiscale(p: Any, group: Any) -> tuple[list[Any], list[str] | None, list[Any]]:
    attrs = dict(group.attrs)
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not ms:
        members = sorted(name for name, _ in group.arrays())
        hint = f"; open one of its arrays directly: {', '.join(members[:5])}" if members else ""
        raise UnsupportedFormatError(
            f"{p}: zarr group without OME-Zarr 'multiscales' metadata{hint}"
        )
    m = ms[0]
    axes = m.get("axes")
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes] if axes else None
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes] if axes else []
    arrays, scales = [], []
    for ds in m.get("datasets") or []:
        arrays.append(group[ds["path"]])
        scale = next(
            (
                t.get("scale")
                for t in ds.get("coordinateTransformations", [])
                if t.get("type") == "scale"
            ),
            None,
        )
        scales.append(scale)
    if not arrays:
        raise CorruptImageError(f"{p}: OME-Zarr multiscales lists no datasets")
    return arrays, names, [scales, units]


def open_zarr(
    path: str | os.PathLike[str], *, max_pixels: int | None = ReaderConfig.max_pixels
) -> ZarrImage:
    """Open a zarr array or OME-Zarr group lazily; only metadata is read."""
    import zarr

    p: Any = str(path) if is_url(path) else Path(path)
    try:
        # A URL: zarr's own FsspecStore, chunk by chunk (object by object) from storage.
        node = zarr.open(zarr_store(p, read_only=True) if is_url(p) else p, mode="r")
    except Exception as exc:
        raise CorruptImageError(
            f"{p}: not a readable zarr store: {one_line(exc, typed=False)}"
        ) from exc
    try:
        return _describe(p, node, zarr, max_pixels=max_pixels)
    except TilenetError:
        raise
    except Exception as exc:
        raise CorruptImageError(
            f"{p}: corrupt zarr metadata: {one_line(exc, typed=False)}"
        ) from exc


def _describe(p: Any, node: Any, zarr: Any, *, max_pixels: int | None) -> ZarrImage:
    scales: list[Any] = []
    units: list[Any] = []
    if isinstance(node, zarr.Group):
        arrays, names, (scales, units) = _multiscale(p, node)
        fmt = "ome-zarr"
    else:
        arrays, names, fmt = [node], _dimension_names(node), "zarr"
    a0 = arrays[0]
    roles = _roles(p, names, tuple(a0.shape))
    if roles.count("y") != 1 or roles.count("x") != 1:
        raise UnsupportedFormatError(f"{p}: zarr axes {names} need exactly one y and one x")
    dtype = np.dtype(a0.dtype)
    if dtype.kind not in "uifb" or dtype.itemsize > 8:
        raise UnsupportedFormatError(f"{p}: unsupported zarr data type {a0.dtype}")
    iy, ix = roles.index("y"), roles.index("x")
    channels = math.prod(n for n, r in zip(a0.shape, roles, strict=True) if r == "c")
    h0, w0 = int(a0.shape[iy]), int(a0.shape[ix])
    check_pixels(p, h0, w0, max_pixels=max_pixels)
    levels = []
    for i, arr in enumerate(arrays):
        if arr.ndim != a0.ndim or np.dtype(arr.dtype) != dtype:
            raise CorruptImageError(f"{p}: multiscale level {i} disagrees with level 0")
        ch = math.prod(n for n, r in zip(arr.shape, roles, strict=True) if r == "c")
        if ch != channels:
            raise CorruptImageError(f"{p}: multiscale level {i} has {ch} channels, not {channels}")
        check_chunk(p, tuple(arr.chunks), dtype.itemsize)
        shape = (int(arr.shape[iy]), int(arr.shape[ix]))
        if min(shape) <= 0:
            raise CorruptImageError(f"{p}: multiscale level {i} is empty: {arr.shape}")
        ds = level_downsample((h0, w0), shape)
        sc, sc0 = (scales[i], scales[0]) if scales else (None, None)
        if sc and sc0 and len(sc) == arr.ndim and min(sc0[iy], sc0[ix]) > 0:
            ds = (float(sc[iy]) / float(sc0[iy]), float(sc[ix]) / float(sc0[ix]))
        levels.append(Level(shape, ds, (int(arr.chunks[iy]), int(arr.chunks[ix]))))
    pixel_size = None
    if scales and scales[0] and units:
        uy, ux = (_UNIT_UM.get(str(units[j]).lower()) if j < len(units) else None for j in (iy, ix))
        if uy is not None and ux is not None:
            size = (float(scales[0][iy]) * uy, float(scales[0][ix]) * ux)
            pixel_size = size if all(math.isfinite(v) and v > 0 for v in size) else None
    crs, transform, nodata = (
        zarr_georef(node.attrs) if isinstance(node, zarr.Group) else (None,) * 3
    )
    return ZarrImage(
        path=p,
        format=fmt,
        crs=crs,
        transform=GeoTransform(*transform) if transform else None,
        nodata=nodata,
        dtype=dtype if dtype.kind != "b" else np.dtype(np.uint8),
        channels=int(channels),
        levels=levels,
        compression=_compression(a0),
        pixel_size=pixel_size,
        metadata={"axes": roles, "zarr_format": int(a0.metadata.zarr_format)},
        _arrays=arrays,
        _roles=roles,
    )
