"""Writers: tiled pyramidal OME-TIFF and PNG previews, chunk by chunk; OME-Zarr from
:mod:`tilenet.io.omezarr` (re-exported here).

Nothing here holds a full-resolution image: level 0 is written (or streamed) one chunk/tile
at a time and each pyramid level is made from the level above it, one output chunk at a time
(an input block of 2x2 chunks), so memory is bounded by the chunk size.

Downsampling is :func:`tilenet.io.omezarr.downsample2` (``mean``, ``nearest`` or ``mode``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from tilenet.errors import InputError, UnsupportedFormatError
from tilenet.fsutil import atomic_output, remove_path
from tilenet.geometry import Window, iter_blocks
from tilenet.io.base import LazyImage
from tilenet.io.omezarr import (
    DownsampleMethod,
    OmeZarrWriter,
    build_pyramid,
    check_method,
    create_ome_zarr,
    downsample2,
    finish_ome_zarr,
    pyramid_shapes,
    zarr_compressor,
)

__all__ = [
    "DEFAULT_PALETTE",
    "DownsampleMethod",
    "OmeZarrWriter",
    "build_pyramid",
    "create_ome_zarr",
    "downsample2",
    "finish_ome_zarr",
    "pyramid_shapes",
    "write_ome_tiff",
    "write_preview_png",
]

#: Colours for class overlays (index = class id; class 0 is never drawn).
DEFAULT_PALETTE: np.ndarray = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (255, 225, 25),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (170, 110, 40),
        (128, 0, 0),
        (0, 0, 128),
        (128, 128, 128),
    ],
    dtype=np.uint8,
)


# -- lazy sources ------------------------------------------------------------------------------
class _Source:
    """A uniform (h, w, C) window reader over LazyImage, zarr arrays/groups and numpy arrays."""

    pixel_size: tuple[float, float] | None = None

    def __init__(self, levels: list[Any], axes: str, dtype: Any, label: str) -> None:
        self._levels = levels
        self.axes = axes
        self.dtype = np.dtype(dtype)
        self.label = label
        shp = dict(zip(axes, levels[0].shape, strict=True))
        self.channels = int(shp.get("c", 1))
        self.level_shapes = [
            tuple(int(s) for s, a in zip(lv.shape, axes, strict=True) if a != "c") for lv in levels
        ]

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w = self.level_shapes[0]
        return (h, w, self.channels)

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        arr = self._levels[level]
        ys, xs = slice(window.y, window.y1), slice(window.x, window.x1)
        if self.axes == "yx":
            return np.asarray(arr[ys, xs])[:, :, None]
        if self.axes == "yxc":
            return np.asarray(arr[ys, xs, :])
        return np.moveaxis(np.asarray(arr[:, ys, xs]), 0, 2)


class _LazySource(_Source):
    def __init__(self, img: LazyImage) -> None:
        self.img = img
        self.axes = "yxc"
        self.dtype = np.dtype(img.dtype)
        self.label = str(img.path)
        self.channels = img.channels
        self.level_shapes = [tuple(lv.shape) for lv in img.levels]
        self.pixel_size = img.pixel_size

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        return self.img.read(window, level)


def _guess_axes(shape: tuple[int, ...], attrs: Any, axes: str | None, label: str) -> str:
    if axes is not None:
        if axes not in ("yx", "yxc", "cyx") or len(axes) != len(shape):
            raise InputError(f"{label}: axes {axes!r} do not fit an array of shape {shape}")
        return axes
    dims = attrs.get("_ARRAY_DIMENSIONS") if attrs is not None else None
    if dims and "".join(dims) in ("yx", "yxc", "cyx"):
        return "".join(dims)
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3 and shape[2] <= 4 < shape[0]:
        return "yxc"
    if len(shape) == 3 and shape[0] <= 64 < min(shape[1:]):
        return "cyx"
    raise InputError(
        f"{label}: cannot tell the axes of an array of shape {shape}; pass axes='yxc' or 'cyx'"
    )


def _as_source(source: Any, axes: str | None = None) -> _Source:
    if isinstance(source, _Source):
        return source
    if isinstance(source, LazyImage):
        return _LazySource(source)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.is_dir():
            raise UnsupportedFormatError(f"{p}: not a zarr store; pass an opened image instead")
        source = zarr.open(p, mode="r")
    if isinstance(source, zarr.Group):
        ms: Any = source.attrs.get("multiscales")
        if not ms:
            raise UnsupportedFormatError(f"{source.store}: zarr group without OME multiscales")
        names = "".join(a["name"] if isinstance(a, dict) else a for a in ms[0]["axes"])
        if names not in ("yx", "cyx", "yxc"):
            raise UnsupportedFormatError(f"{source.store}: unsupported OME-Zarr axes {names!r}")
        levels: list[Any] = [source[d["path"]] for d in ms[0]["datasets"]]
        src = _Source(levels, names, levels[0].dtype, str(source.store))
        units = [a.get("unit") for a in ms[0]["axes"] if isinstance(a, dict)]
        scale = ms[0]["datasets"][0].get("coordinateTransformations", [{}])[0].get("scale")
        if "micrometer" in units and scale and len(scale) >= 2:
            src.pixel_size = (float(scale[-2]), float(scale[-1]))
        return src
    if isinstance(source, (zarr.Array, np.ndarray)):
        label = "array"
        attrs = source.attrs if isinstance(source, zarr.Array) else None
        ax = _guess_axes(tuple(source.shape), attrs, axes, label)
        return _Source([source], ax, source.dtype, label)
    raise InputError(f"cannot write from a {type(source).__name__}; pass a LazyImage or array")


# -- OME-TIFF ----------------------------------------------------------------------------------
_TIFF_COMPRESSIONS = ("none", "zlib", "deflate", "lzw", "zstd", "jpeg")


def _tiff_compression(compression: str | None, dtype: np.dtype[Any], channels: int) -> str | None:
    if compression is None:
        compression = "jpeg" if dtype == np.uint8 and channels == 3 else "zlib"
    name = compression.lower()
    if name not in _TIFF_COMPRESSIONS:
        raise InputError(
            f"TIFF compression must be one of {', '.join(_TIFF_COMPRESSIONS)}, got {compression!r}"
        )
    if name == "jpeg" and not (dtype == np.uint8 and channels in (1, 3)):
        raise InputError(
            f"jpeg compression needs 8-bit grey or RGB, not {dtype} with {channels} channels; "
            "use --compression zlib"
        )
    return {"none": None, "deflate": "zlib"}.get(name, name)


def write_ome_tiff(
    path: str | os.PathLike[str],
    source: Any,
    *,
    tile: int = 512,
    compression: str | None = None,
    pixel_size: tuple[float, float] | None = None,
    method: DownsampleMethod = "mean",
    min_side: int = 256,
    channel_names: Sequence[str] | None = None,
    axes: str | None = None,
    overwrite: bool = True,
    extratags: Sequence[tuple[int, str, int, Any, bool]] = (),
) -> Path:
    """Write ``source`` as a tiled pyramidal OME-TIFF (BigTIFF, levels in SubIFDs).

    ``source`` is a :class:`LazyImage`, an OME-Zarr group or path, or a zarr/numpy array
    (``axes`` "yx", "yxc" or "cyx"; guessed when omitted). Level 0 is streamed tile by tile
    from the source; while it streams, level 1 is accumulated into a temporary zarr next to
    the output and each further level is made from the one above. Default compression: jpeg
    (quality 90) for 8-bit RGB, zlib otherwise. Written to a temporary name, then renamed.
    ``extratags`` go on the level-0 page (e.g. :func:`tilenet.io.crs.geotiff_tags`).
    """
    src = _as_source(source, axes)
    check_method(method)
    if not isinstance(tile, int) or tile < 16 or tile % 16:
        raise InputError(f"tile must be a positive multiple of 16, got {tile!r}")
    h, w, c = src.shape
    comp = _tiff_compression(compression, src.dtype, c)
    shapes = pyramid_shapes((h, w), min_side=min_side)
    pixel_size = pixel_size or src.pixel_size
    options = _tiff_options(tile, src.dtype, c, comp)
    metadata: dict[str, Any] = {"axes": "YXS" if c > 1 else "YX"}
    if pixel_size:
        metadata.update(
            PhysicalSizeY=pixel_size[0],
            PhysicalSizeX=pixel_size[1],
            PhysicalSizeYUnit="µm",
            PhysicalSizeXUnit="µm",
        )
    if channel_names:
        metadata["Channel"] = {"Name": list(channel_names)}
    final = Path(path)
    with atomic_output(final, overwrite=overwrite) as tmp:
        levels_store = tmp.with_name(tmp.name + ".levels.zarr")
        remove_path(levels_store)
        try:
            levels = _level_arrays(levels_store, shapes, tile, c, src.dtype)
            _write_tiff_levels(
                tmp, src, levels, shapes, tile, method, metadata, options, pixel_size, extratags
            )
        finally:
            remove_path(levels_store)
    return final


def _tiff_options(tile: int, dtype: np.dtype[Any], c: int, comp: str | None) -> dict[str, Any]:
    """tifffile's write options for every level."""
    rgb = c == 3 and dtype in (np.uint8, np.uint16)
    workers = min(4, os.cpu_count() or 1)
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "dtype": dtype,
        "photometric": "rgb" if rgb else "minisblack",
        "compression": comp,
        "maxworkers": workers,
        # tifffile buffers up to `buffersize` bytes of tiles per batch (512 MiB by default):
        # keep a few tiles per worker so memory stays bounded by the tile.
        "buffersize": 4 * workers * tile * tile * c * dtype.itemsize,
    }
    if c > 1:
        options["planarconfig"] = "contig"
    if comp == "jpeg":
        options["compressionargs"] = {"level": 90}
    return options


def _level_arrays(
    store: Path, shapes: list[tuple[int, int]], tile: int, c: int, dtype: np.dtype[Any]
) -> list[Any]:
    """Temporary zarr arrays for levels 1.. (none for a single level)."""
    levels: list[Any] = []
    if len(shapes) > 1:
        # Level k is stored with chunks of tile/2 so that each level-0 tile maps onto
        # exactly one level-1 chunk (no read-modify-write).
        group = zarr.open_group(store, mode="w", zarr_format=2)
        half = tile // 2
        for k, (lh, lw) in enumerate(shapes[1:], start=1):
            levels.append(
                group.create_array(
                    str(k),
                    shape=(lh, lw, c),
                    chunks=(half, half, c),
                    dtype=dtype,
                    fill_value=0,
                    compressors=zarr_compressor("lz4"),
                )
            )
    return levels


def _write_tiff_levels(
    tmp: Path,
    src: _Source,
    levels: list[Any],
    shapes: list[tuple[int, int]],
    tile: int,
    method: DownsampleMethod,
    metadata: dict[str, Any],
    options: dict[str, Any],
    pixel_size: tuple[float, float] | None,
    extratags: Sequence[tuple[int, str, int, Any, bool]] = (),
) -> None:
    """Stream level 0 from ``src`` into ``tmp`` (filling level 1 as it goes), then make and
    write each further level from the one above."""
    import tifffile

    h, w, c = src.shape

    def resolution(k: int) -> dict[str, Any]:
        if not pixel_size:
            return {}
        f = 2.0**k
        return {
            "resolution": (1e4 / (pixel_size[1] * f), 1e4 / (pixel_size[0] * f)),
            "resolutionunit": "CENTIMETER",
        }

    def tile_shape(shape: tuple[int, int]) -> tuple[int, ...]:
        return (*shape, c) if c > 1 else shape

    def level0_tiles() -> Iterator[np.ndarray]:
        for win in iter_blocks((h, w), tile):
            data = src.read(win, 0)
            if levels:
                y, x = win.y // 2, win.x // 2
                small = downsample2(data, method)
                levels[0][y : y + small.shape[0], x : x + small.shape[1]] = small
            yield data if c > 1 else data[:, :, 0]

    def level_tiles(arr: Any) -> Iterator[np.ndarray]:
        lh, lw = arr.shape[:2]
        for win in iter_blocks((lh, lw), tile):
            data = np.asarray(arr[win.slices])
            yield data if c > 1 else data[:, :, 0]

    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        tif.write(
            level0_tiles(),
            shape=tile_shape((h, w)),
            subifds=len(shapes) - 1,
            metadata=metadata,
            extratags=list(extratags),
            **resolution(0),
            **options,
        )
        for k in range(1, len(levels)):
            _downsample_level(levels[k - 1], levels[k], method)
        for k, arr in enumerate(levels, start=1):
            tif.write(
                level_tiles(arr),
                shape=tile_shape(shapes[k]),
                subfiletype=1,
                **resolution(k),
                **options,
            )


def _downsample_level(prev: Any, out: Any, method: str) -> None:
    """Fill ``out`` (h, w, C) from ``prev`` (2h, 2w, C), one output chunk at a time."""
    oh, ow = out.shape[:2]
    ch, cw = out.chunks[:2]
    for win in iter_blocks((oh, ow), (ch, cw)):
        y, x = win.y, win.x
        # the source block is read unclipped (2 x the full chunk), as zarr clips it itself
        block = np.asarray(prev[2 * y : 2 * (y + ch), 2 * x : 2 * (x + cw)])
        out[win.slices] = downsample2(block, method)


# -- PNG preview -------------------------------------------------------------------------------
def _read_small(src: _Source, max_side: int) -> np.ndarray:
    """Read ``src`` at no more than ~2x ``max_side`` per side, from a pyramid level or strided."""
    # The coarsest level still at least max_side (so the final resize only shrinks).
    level = 0
    for k, (lh, lw) in enumerate(src.level_shapes):
        if max(lh, lw) >= max_side:
            level = k
    lh, lw = src.level_shapes[level]
    step = max(1, math.ceil(max(lh, lw) / (2 * max_side)))
    if step == 1:
        return src.read(Window(0, 0, lh, lw), level)
    # No suitable level: keep every step-th pixel, reading blocks of ~1024 px aligned to step.
    block = step * max(1, 1024 // step)
    out = np.empty((-(-lh // step), -(-lw // step), src.channels), dtype=src.dtype)
    for win in iter_blocks((lh, lw), block):
        sub = src.read(win, level)[::step, ::step]
        y, x = win.y // step, win.x // step
        out[y : y + sub.shape[0], x : x + sub.shape[1]] = sub
    return out


def _to_display(data: np.ndarray) -> np.ndarray:
    """(h, w, C) of any dtype -> uint8 (h, w) grey or (h, w, 3) RGB."""
    data = data[:, :, :3] if data.shape[2] >= 3 else data[:, :, :1]
    if data.dtype == bool:
        data = data.astype(np.uint8) * 255
    elif data.dtype != np.uint8:
        f = data.astype(np.float32)
        finite = f[np.isfinite(f)]
        lo, hi = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1
        data = (np.clip((np.nan_to_num(f) - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)
    return data[:, :, 0] if data.shape[2] == 1 else data


def write_preview_png(
    path: str | os.PathLike[str],
    source: Any,
    *,
    max_side: int = 1024,
    overlay: Any = None,
    alpha: float = 0.4,
    palette: np.ndarray | Sequence[Sequence[int]] | None = None,
    axes: str | None = None,
) -> Path:
    """A downsampled PNG of ``source`` (longer side <= ``max_side``), optionally with a class map.

    ``overlay`` is a class map (same kinds of source as ``source``, same level-0 size); each
    class > 0 is blended with its ``palette`` colour at ``alpha``. Only a pyramid level near
    ``max_side`` (or a strided subsample) is read.
    """
    from PIL import Image

    if max_side < 1:
        raise InputError(f"max_side must be >= 1, got {max_side!r}")
    src = _as_source(source, axes)
    img = Image.fromarray(_to_display(_read_small(src, max_side)))
    h, w = src.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.resize(size, Image.Resampling.BOX).convert("RGB")
    if overlay is not None:
        ov = _as_source(overlay)
        if ov.shape[:2] != (h, w):
            raise InputError(f"overlay size {ov.shape[:2]} differs from image size {(h, w)}")
        classes = _read_small(ov, max_side)[:, :, 0]
        cls = Image.fromarray(classes.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
        cls_arr = np.asarray(cls)
        pal = np.asarray(DEFAULT_PALETTE if palette is None else palette, dtype=np.uint8)
        colours = pal[cls_arr % len(pal)].astype(np.float32)
        base = np.asarray(img).astype(np.float32)
        blend = (1 - alpha) * base + alpha * colours
        mask = (cls_arr > 0)[:, :, None]
        img = Image.fromarray(np.where(mask, blend, base).round().astype(np.uint8))
    final = Path(path)
    with atomic_output(final) as tmp:
        img.save(tmp, format="PNG")
    return final
