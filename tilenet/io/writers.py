"""Writers: OME-Zarr, tiled pyramidal OME-TIFF and PNG previews, all chunk by chunk.

Nothing here holds a full-resolution image: level 0 is written (or streamed) one chunk/tile
at a time and each pyramid level is made from the level above it, one output chunk at a time
(an input block of 2x2 chunks), so memory is bounded by the chunk size.

OME-Zarr is written as NGFF **v0.4** on zarr format 2 (``/`` chunk separator): that is the
version napari (napari-ome-zarr), QuPath and Fiji/MoBIE read today; NGFF 0.5 (zarr v3) readers
are still catching up. Everything is still written through the zarr v3 Python API.

Downsampling halves each side, rounding up (an odd last row/column is averaged with itself):
``mean`` for images and probabilities, ``nearest`` (top-left) or ``mode`` (most frequent of
the 2x2 block, ties to the first in row order) for label and class maps.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from tilenet.errors import InputError, UnsupportedFormatError
from tilenet.fsutil import atomic_output, remove_path, tmp_sibling
from tilenet.geometry import Window, iter_blocks
from tilenet.io.base import LazyImage

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

DownsampleMethod = Literal["mean", "nearest", "mode"]
_METHODS = ("mean", "nearest", "mode")
_NGFF_VERSION = "0.4"
_WRITER_ATTR = "tilenet_writer"

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


# -- downsampling ------------------------------------------------------------------------------
def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise InputError(f"downsample method must be one of {_METHODS}, got {method!r}")
    return method


def pyramid_shapes(shape: tuple[int, int], *, min_side: int = 256) -> list[tuple[int, int]]:
    """(H, W) of every pyramid level: halve (rounding up) until the longer side <= ``min_side``.

    >>> pyramid_shapes((1000, 600), min_side=256)
    [(1000, 600), (500, 300), (250, 150)]
    >>> pyramid_shapes((100, 100), min_side=256)
    [(100, 100)]
    """
    if min_side < 1:
        raise InputError(f"min_side must be >= 1, got {min_side!r}")
    h, w = shape
    shapes = [(h, w)]
    while max(h, w) > min_side:
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w))
    return shapes


def downsample2(block: np.ndarray, method: str = "mean", *, spatial: int = 0) -> np.ndarray:
    """Halve the two spatial axes ``spatial, spatial+1`` of ``block`` (sizes rounded up).

    >>> downsample2(np.array([[0, 2, 4], [2, 4, 8]], np.uint8)).tolist()
    [[2, 6]]
    >>> downsample2(np.array([[1, 2], [2, 3]]), "mode").tolist()
    [[2]]
    """
    _check_method(method)
    a = np.moveaxis(block, (spatial, spatial + 1), (0, 1))
    h, w = a.shape[:2]
    if method == "nearest":
        out = a[::2, ::2]
        return np.ascontiguousarray(np.moveaxis(out, (0, 1), (spatial, spatial + 1)))
    if h % 2 or w % 2:
        # Replicating the odd edge makes the edge pixel the mean/mode of what exists.
        pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (a.ndim - 2)
        a = np.pad(a, pad, mode="edge")
    q = (a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2])
    if method == "mode" or a.dtype == bool:
        counts = [sum((qi == qj).astype(np.uint8) for qj in q) for qi in q]
        best = np.argmax(np.stack(counts), axis=0)
        out = np.choose(best, q)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize <= 2:
        acc = np.int32 if np.issubdtype(a.dtype, np.signedinteger) else np.uint32
        s = q[0].astype(acc) + q[1] + q[2] + q[3]
        out = ((s + 2) // 4).astype(a.dtype)
    elif np.issubdtype(a.dtype, np.integer):
        s = q[0].astype(np.float64) + q[1] + q[2] + q[3]
        out = np.rint(s / 4).astype(a.dtype)
    else:
        out = ((q[0] + q[1]) + (q[2] + q[3])) * a.dtype.type(0.25)
    return np.ascontiguousarray(np.moveaxis(out, (0, 1), (spatial, spatial + 1)))


def _zarr_compressor(compression: str | None, dtype: Any = None) -> Any:
    """The numcodecs compressor for a level-0 store of ``dtype``.

    Default (None): Blosc-zstd for integer data (class maps and labels: long runs, small);
    Blosc-lz4 with bit-shuffle for floating point (probabilities: noisy mantissas that zstd
    barely compresses; measured on softmax maps: ratio 1.22 at ~1 GB/s encode, vs zstd-5
    1.23 at ~0.1 GB/s, which made encoding the largest cost of writing probabilities).
    """
    import numcodecs

    is_float = dtype is not None and np.dtype(dtype).kind == "f"
    name = (compression or ("lz4" if is_float else "blosc")).lower()
    if name == "none":
        return None
    if name in ("blosc", "zstd-blosc"):
        return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    if name == "lz4":
        shuffle = numcodecs.Blosc.BITSHUFFLE if is_float else numcodecs.Blosc.SHUFFLE
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=shuffle)
    if name in ("zlib", "deflate"):
        return numcodecs.Zlib(level=6)
    if name == "zstd":
        return numcodecs.Zstd(level=5)
    raise InputError(
        f"zarr compression must be one of blosc, lz4, zlib, zstd or none, got {compression!r}"
    )


def _create_level(
    group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], like: Any
) -> Any:
    arr = group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=like.dtype,
        fill_value=like.fill_value,
        compressors=like.compressors or None,
        chunk_key_encoding={"name": "v2", "separator": "/"},
        overwrite=True,
    )
    dims = like.attrs.get("_ARRAY_DIMENSIONS")
    if dims:
        arr.attrs["_ARRAY_DIMENSIONS"] = dims
    return arr


def build_pyramid(
    group: zarr.Group, *, method: DownsampleMethod = "mean", min_side: int = 256
) -> list[tuple[int, ...]]:
    """Build levels "1", "2", ... of ``group`` from its level "0", each from the previous.

    The two last axes are y, x. Existing levels >= 1 are replaced (so a resumed writer can
    finalize again). Each output chunk is made from a 2x2-chunk block of the level above, so
    memory is a few chunks. Returns the shapes of all levels.
    """
    _check_method(method)
    for key in list(group.array_keys()):
        if key.isdigit() and key != "0":
            del group[key]
    prev: Any = group["0"]  # zarr types items as Array | Group
    lead = prev.shape[:-2]
    shapes = pyramid_shapes(prev.shape[-2:], min_side=min_side)
    all_shapes: list[tuple[int, ...]] = [tuple(prev.shape)]
    ch, cw = prev.chunks[-2:]
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tilenet-pyramid") as pool:
        for k, (h, w) in enumerate(shapes[1:], start=1):
            arr = _create_level(group, str(k), (*lead, h, w), prev.chunks, prev)

            def chunk(y: int, x: int, src: Any = prev, dst: Any = arr) -> None:
                # One output chunk from a 2x2-chunk block of the level above; chunks are
                # disjoint, so they run in parallel (reads, downsampling and the codecs
                # release the GIL).
                block = src[..., 2 * y : 2 * (y + ch), 2 * x : 2 * (x + cw)]
                dst[..., y : y + ch, x : x + cw] = downsample2(
                    np.asarray(block), method, spatial=len(lead)
                )

            # At most 2 chunks per worker in flight, so queued work (and memory) stays small.
            pending: deque[Future[None]] = deque()
            for blk in iter_blocks((h, w), (ch, cw)):
                pending.append(pool.submit(chunk, blk.y, blk.x))
                if len(pending) >= 2 * workers:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
            all_shapes.append(tuple(arr.shape))
            prev = arr
    return all_shapes


# -- OME-Zarr ----------------------------------------------------------------------------------
def _normalise_axes(axes: str, shape: Sequence[int]) -> tuple[str, tuple[int, int, int]]:
    axes = axes.lower()
    if axes not in ("yx", "cyx", "yxc"):
        raise InputError(f"axes must be 'yx', 'cyx' or 'yxc', got {axes!r}")
    if len(shape) != len(axes):
        raise InputError(f"shape {tuple(shape)!r} does not match axes {axes!r}")
    dims = dict(zip(axes, (int(s) for s in shape), strict=True))
    if any(v < 1 for v in dims.values()):
        raise InputError(f"shape must be positive, got {tuple(shape)!r}")
    return axes, (dims["y"], dims["x"], dims.get("c", 1))


def _multiscales(
    *,
    stored_axes: str,
    nlevels: int,
    pixel_size: tuple[float, float] | None,
    name: str | None,
    method: str,
) -> dict[str, Any]:
    axes: list[dict[str, str]] = []
    for a in stored_axes:
        if a == "c":
            axes.append({"name": "c", "type": "channel"})
        else:
            entry = {"name": a, "type": "space"}
            if pixel_size is not None:
                entry["unit"] = "micrometer"
            axes.append(entry)
    py, px = pixel_size or (1.0, 1.0)
    datasets = []
    for k in range(nlevels):
        f = 2.0**k
        scale = ([1.0] if "c" in stored_axes else []) + [py * f, px * f]
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    ms: dict[str, Any] = {
        "version": _NGFF_VERSION,
        "axes": axes,
        "datasets": datasets,
        "type": method,
        "metadata": {"method": "tilenet.io.writers.build_pyramid", "downsample": method},
    }
    if name:
        ms["name"] = name
    return ms


def _create_level0(
    group: zarr.Group,
    stored_axes: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: Any,
    fill_value: float,
    compressor: Any,
) -> zarr.Group:
    arr = group.create_array(
        "0",
        shape=shape,
        chunks=chunks,
        dtype=np.dtype(dtype),
        fill_value=fill_value,
        compressors=compressor,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    arr.attrs["_ARRAY_DIMENSIONS"] = list(stored_axes)
    return group


def create_ome_zarr(
    store: Any,
    *,
    shape: Sequence[int],
    dtype: Any,
    axes: str = "yx",
    chunks: int = 1024,
    compression: str | None = None,
) -> zarr.Group:
    """An OME-Zarr's group in ``store`` (any zarr store: a folder, a bucket prefix) with its
    level "0" made as :class:`OmeZarrWriter` makes it, and no OME metadata yet: written in
    place chunk by chunk, then completed by :func:`finish_ome_zarr`. Replaces what is there.
    """
    axes, (h, w, c) = _normalise_axes(axes, shape)
    stored_axes = "yx" if axes == "yx" else "cyx"
    stored_shape = (h, w) if stored_axes == "yx" else (c, h, w)
    stored_chunks: tuple[int, ...] = (min(chunks, h), min(chunks, w))
    if stored_axes == "cyx":
        stored_chunks = (c, *stored_chunks)
    compressor = _zarr_compressor(compression, dtype)
    group = zarr.open_group(store, mode="w", zarr_format=2)
    return _create_level0(group, stored_axes, stored_shape, stored_chunks, dtype, 0, compressor)


def finish_ome_zarr(
    group: zarr.Group,
    *,
    method: DownsampleMethod = "mean",
    pixel_size: tuple[float, float] | None = None,
    name: str | None = None,
    channel_names: Sequence[str] | None = None,
    min_side: int = 256,
) -> None:
    """Build the pyramid of ``group``'s level "0" and write its OME metadata (``multiscales``,
    and ``omero`` for channels), replacing its attributes: the last step of an OME-Zarr."""
    shapes = build_pyramid(group, method=method, min_side=min_side)
    level0: Any = group["0"]
    stored_axes = "".join(level0.attrs.get("_ARRAY_DIMENSIONS", ["y", "x"]))
    attrs: dict[str, Any] = {
        "multiscales": [
            _multiscales(
                stored_axes=stored_axes,
                nlevels=len(shapes),
                pixel_size=pixel_size,
                name=name,
                method=method,
            )
        ]
    }
    if stored_axes == "cyx":
        attrs["omero"] = _omero(int(level0.shape[0]), level0.dtype, channel_names)
    group.attrs.put(attrs)


class OmeZarrWriter:
    """Write an OME-Zarr (NGFF 0.4) image chunk by chunk, then build its pyramid.

    The store lives at a temporary sibling of ``path`` until :meth:`finalize` renames it, so
    an interrupted run never leaves something that looks finished. ``shape`` is given in
    ``axes`` order; the store holds ``c, y, x`` (or ``y, x`` for one channel given as "yx").

    Write disjoint regions through :meth:`write` (takes (h, w) or (h, w, C) arrays) or
    directly into :attr:`array` (level 0, stored order). Writes aligned to ``chunks`` touch
    one chunk each and never read back. With ``resumable=True`` an exception inside the
    ``with`` block leaves the partial store for :meth:`open_partial`; the caller keeps its own
    record of which regions are complete (a crash can interrupt a chunk mid-write).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shape: Sequence[int],
        dtype: Any,
        axes: str = "yx",
        chunks: int = 1024,
        pixel_size: tuple[float, float] | None = None,
        name: str | None = None,
        fill_value: float = 0,
        compression: str | None = None,
        channel_names: Sequence[str] | None = None,
        overwrite: bool = False,
        resumable: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise InputError(f"{self.path}: already exists (use --force to overwrite)")
        if not isinstance(chunks, int) or chunks < 1:
            raise InputError(f"chunks must be a positive int, got {chunks!r}")
        axes, (h, w, c) = _normalise_axes(axes, shape)
        self.stored_axes = "yx" if axes == "yx" else "cyx"
        stored_shape = (h, w) if self.stored_axes == "yx" else (c, h, w)
        stored_chunks: tuple[int, ...] = (min(chunks, h), min(chunks, w))
        if self.stored_axes == "cyx":
            stored_chunks = (c, *stored_chunks)
        compressor = _zarr_compressor(compression, dtype)  # validate before creating anything
        self.tmp = tmp_sibling(self.path)
        remove_path(self.tmp)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "final": self.path.name,
            "pixel_size": list(pixel_size) if pixel_size else None,
            "name": name,
            "channel_names": list(channel_names) if channel_names else None,
            "resumable": resumable,
        }
        try:
            group = _create_level0(
                zarr.open_group(self.tmp, mode="w", zarr_format=2),
                self.stored_axes, stored_shape, stored_chunks, dtype, fill_value, compressor,
            )  # fmt: skip
            group.attrs[_WRITER_ATTR] = state
        except BaseException:
            remove_path(self.tmp)
            raise
        self._open(group, state)

    def _open(self, group: zarr.Group, state: dict[str, Any]) -> None:
        self.group = group
        self.array: Any = group["0"]
        dims: Any = self.array.attrs.get("_ARRAY_DIMENSIONS", ["y", "x"])
        self.stored_axes = "".join(dims)
        ps = state.get("pixel_size")
        self.pixel_size: tuple[float, float] | None = (ps[0], ps[1]) if ps else None
        self.name: str | None = state.get("name")
        self.channel_names: list[str] | None = state.get("channel_names")
        self.resumable: bool = bool(state.get("resumable"))

    @classmethod
    def open_partial(cls, path: str | os.PathLike[str]) -> OmeZarrWriter | None:
        """Reopen the unfinished store of an earlier writer of ``path``; None if there is none.

        The newest partial store (of any process) is moved to this process's temporary name.
        """
        final = Path(path)
        pattern = re.compile(rf"^\.{re.escape(final.name)}\.partial-\d+$")
        parent = final.parent if final.parent.exists() else None
        candidates = [p for p in (parent.iterdir() if parent else ()) if pattern.match(p.name)]
        candidates = [p for p in candidates if (p / ".zattrs").is_file() and (p / "0").is_dir()]
        if not candidates:
            return None
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        tmp = tmp_sibling(final)
        if newest != tmp:
            remove_path(tmp)
            os.replace(newest, tmp)
        group = zarr.open_group(tmp, mode="r+", zarr_format=2)
        state: dict[str, Any] = dict(group.attrs.get(_WRITER_ATTR) or {})  # type: ignore[arg-type]
        self = cls.__new__(cls)
        self.path = final
        self.tmp = tmp
        self._open(group, state)
        return self

    # -- description -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of level 0."""
        s = self.array.shape
        return (s[0], s[1], 1) if self.stored_axes == "yx" else (s[1], s[2], s[0])

    @property
    def chunks(self) -> tuple[int, int]:
        ch = self.array.chunks
        return (ch[-2], ch[-1])

    # -- writing ---------------------------------------------------------------------------
    def write(self, y: int, x: int, data: np.ndarray) -> None:
        """Write ``data`` ((h, w) or (h, w, C)) at level-0 position (``y``, ``x``)."""
        data = np.asarray(data)
        if data.ndim == 2:
            data = data[:, :, None]
        h, w = data.shape[:2]
        if self.stored_axes == "yx":
            self.array[y : y + h, x : x + w] = data[:, :, 0]
        else:
            self.array[:, y : y + h, x : x + w] = np.moveaxis(data, 2, 0)

    def read(self, window: Window) -> np.ndarray:
        """Read back a level-0 window as (h, w, C)."""
        data = np.asarray(self.array[..., window.y : window.y1, window.x : window.x1])
        return data[:, :, None] if self.stored_axes == "yx" else np.moveaxis(data, 0, 2)

    def finalize(self, *, method: DownsampleMethod = "mean", min_side: int = 256) -> Path:
        """Build the pyramid, write the ``multiscales`` metadata and rename into place."""
        finish_ome_zarr(
            self.group,
            method=method,
            pixel_size=self.pixel_size,
            name=self.name,
            channel_names=self.channel_names,
            min_side=min_side,
        )  # replaces the writer's private state
        if self.path.exists():
            remove_path(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the partial store."""
        remove_path(self.tmp)

    def __enter__(self) -> OmeZarrWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and not self.resumable:
            self.abort()


def _omero(channels: int, dtype: Any, names: Sequence[str] | None) -> dict[str, Any]:
    dt = np.dtype(dtype)
    hi = float(np.iinfo(dt).max) if np.issubdtype(dt, np.integer) else 1.0
    lo = float(np.iinfo(dt).min) if np.issubdtype(dt, np.integer) else 0.0
    colours = ["FF0000", "00FF00", "0000FF"] if channels == 3 else ["FFFFFF"] * channels
    return {
        "channels": [
            {
                "label": names[i] if names and i < len(names) else f"c{i}",
                "color": colours[i],
                "active": True,
                "window": {"start": lo, "end": hi, "min": lo, "max": hi},
            }
            for i in range(channels)
        ],
        "rdefs": {"model": "color" if channels == 3 else "greyscale"},
    }


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
) -> Path:
    """Write ``source`` as a tiled pyramidal OME-TIFF (BigTIFF, levels in SubIFDs).

    ``source`` is a :class:`LazyImage`, an OME-Zarr group or path, or a zarr/numpy array
    (``axes`` "yx", "yxc" or "cyx"; guessed when omitted). Level 0 is streamed tile by tile
    from the source; while it streams, level 1 is accumulated into a temporary zarr next to
    the output and each further level is made from the one above. Default compression: jpeg
    (quality 90) for 8-bit RGB, zlib otherwise. Written to a temporary name, then renamed.
    """
    import tifffile

    src = _as_source(source, axes)
    _check_method(method)
    if not isinstance(tile, int) or tile < 16 or tile % 16:
        raise InputError(f"tile must be a positive multiple of 16, got {tile!r}")
    h, w, c = src.shape
    dtype = src.dtype
    comp = _tiff_compression(compression, dtype, c)
    shapes = pyramid_shapes((h, w), min_side=min_side)
    pixel_size = pixel_size or src.pixel_size
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

    final = Path(path)
    with atomic_output(final, overwrite=overwrite) as tmp:
        levels_store = tmp.with_name(tmp.name + ".levels.zarr")
        remove_path(levels_store)
        try:
            levels: list[Any] = []
            if len(shapes) > 1:
                # Level k is stored with chunks of tile/2 so that each level-0 tile maps onto
                # exactly one level-1 chunk (no read-modify-write).
                group = zarr.open_group(levels_store, mode="w", zarr_format=2)
                half = tile // 2
                for k, (lh, lw) in enumerate(shapes[1:], start=1):
                    levels.append(
                        group.create_array(
                            str(k),
                            shape=(lh, lw, c),
                            chunks=(half, half, c),
                            dtype=dtype,
                            fill_value=0,
                            compressors=_zarr_compressor("lz4"),
                        )
                    )

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
        finally:
            remove_path(levels_store)
    return final


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
