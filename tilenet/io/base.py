"""The lazy image interface every reader implements.

A :class:`LazyImage` knows its shape, dtype and pyramid without decoding pixels; ``read``
decodes only what a window touches. Windows may reach outside the image: the part outside is
filled with ``fill`` (zeros by default), so callers never special-case the edge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tilenet.errors import CorruptImageError, InputError, TilenetError, one_line
from tilenet.geometry import GeoTransform, Window, spans
from tilenet.io.crs import describe_georef
from tilenet.io.source import EncodedWindow

__all__ = ["IGNORE_INDEX", "BandSelection", "LazyImage", "Level", "nodata_mask", "valid_mask"]

_Derived = TypeVar("_Derived", bound="LazyImage")


#: The label of pixels without one (``train.ignore_index``'s default): nodata pixels, pixels
#: outside every annotation, the part of a window outside the image.
IGNORE_INDEX = 255


def nodata_mask(pixels: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """True where every channel of ``pixels`` (h, w, C) is ``nodata`` (NaN matches NaN);
    None when there is no nodata value.

    >>> nodata_mask(np.array([[[0, 0], [0, 5]]]), 0).tolist()
    [[True, False]]
    """
    if nodata is None:
        return None
    px = pixels if pixels.ndim == 3 else pixels[..., None]
    if np.isnan(nodata):
        return np.isnan(px).all(-1) if px.dtype.kind == "f" else np.zeros(px.shape[:2], bool)
    return np.asarray(np.asarray(px == nodata).all(-1))


def valid_mask(
    pixels: np.ndarray, nodata: float | None, mask: np.ndarray | None
) -> np.ndarray | None:
    """The one validity rule: True where a pixel has data; None when every pixel has.

    A pixel has no data where every channel of ``pixels`` is ``nodata``
    (:func:`nodata_mask`) or where the dataset ``mask`` (an alpha band or a GDAL mask,
    (h, w), 0 = no data) is 0.

    >>> valid_mask(np.array([[[0], [5], [5]]]), 0, np.array([[255, 255, 0]])).tolist()
    [[False, True, False]]
    >>> valid_mask(np.zeros((1, 2, 1)), None, None) is None
    True
    """
    none = nodata_mask(pixels, nodata)
    if mask is not None:
        off = np.asarray(mask) == 0
        none = off if none is None else none | off
    return None if none is None else ~none


@dataclass(frozen=True)
class Level:
    """One pyramid level: its (H, W) and its downsample factors (y, x) relative to level 0."""

    shape: tuple[int, int]
    downsample: tuple[float, float] = (1.0, 1.0)
    #: (tile_h, tile_w) of the storage chunking, or None for untiled/striped data.
    chunks: tuple[int, int] | None = None


@dataclass
class LazyImage(ABC):
    """A lazily read image (H, W, C). Subclasses implement :meth:`_read`."""

    path: Path
    format: str
    dtype: np.dtype[Any]
    channels: int
    levels: list[Level]
    compression: str | None = None
    #: Physical pixel size (y, x) in micrometres at level 0, where the file says it.
    pixel_size: tuple[float, float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Georeferencing (georeferenced rasters only, else None): the CRS as WKT, and the
    #: geotransform of level 0 (:class:`~tilenet.geometry.GeoTransform`, GDAL order).
    crs: str | None = None
    transform: GeoTransform | None = None
    #: The value that marks pixels without data, where the file declares one.
    nodata: float | None = None
    #: One name per channel, where the file names them.
    band_names: list[str] | None = None
    #: Whole-slide images: the scanner vendor (OpenSlide's name, e.g. "aperio"), the
    #: objective power the slide was scanned at, and the associated images (label, macro,
    #: thumbnail: name -> (H, W)), which are never pyramid levels.
    vendor: str | None = None
    objective_power: float | None = None
    associated_images: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: The size (y, x) of this image's level-0 pixel in level-0 pixels of the file it comes
    #: from: (1, 1) for a file; larger for a view resampled to a coarser pixel size.
    reference_scale: tuple[float, float] = (1.0, 1.0)

    # -- description --------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of level 0."""
        h, w = self.levels[0].shape
        return (h, w, self.channels)

    @property
    def chunks(self) -> tuple[int, int] | None:
        return self.levels[0].chunks

    def pixel_transform(self, level: int = 0) -> GeoTransform:
        """The GDAL-order geotransform from pixels of ``level`` to reference coordinates.

        Reference coordinates are the CRS's for a georeferenced image (``transform`` scaled
        to the level) and the file's level-0 pixels otherwise (what QuPath annotations use).

        >>> from pathlib import Path
        >>> class Img(LazyImage):
        ...     def _read(self, window, level): ...
        >>> img = Img(Path("x"), "t", np.dtype("uint8"), 3, [Level((8, 8)), Level((4, 4), (2.0, 2.0))])
        >>> img.pixel_transform(1).to_gdal()
        (0.0, 2.0, 0.0, 0.0, 0.0, 2.0)
        """
        sy, sx = self.levels[level].downsample
        if self.transform is not None:
            return GeoTransform(*self.transform).scaled((sy, sx))
        ry, rx = self.reference_scale
        return GeoTransform(0.0, sx * rx, 0.0, 0.0, 0.0, sy * ry)

    def replace(self, cls: type[_Derived], **changes: Any) -> _Derived:
        """A ``cls`` image (a view: bands, resolution, labels) carrying this image's header.

        Every :class:`LazyImage` field is copied (its containers shallowly, so the view's
        metadata can change without touching the source's), then ``changes`` apply; the one
        way a derived image is built, so a field added here reaches every view.

        >>> from pathlib import Path
        >>> class Img(LazyImage):
        ...     def _read(self, window, level): ...
        >>> img = Img(Path("x"), "t", np.dtype("uint8"), 3, [Level((8, 8))], vendor="aperio")
        >>> view = img.replace(Img, channels=1, metadata={"bands": [2]})
        >>> view.vendor, view.channels, view.levels == img.levels, view.levels is img.levels
        ('aperio', 1, True, False)
        """
        header = {f.name: getattr(self, f.name) for f in fields(LazyImage)}
        for name, value in header.items():
            if isinstance(value, list | dict):
                header[name] = value.copy()
        return cls(**{**header, **changes})

    def level_for_downsample(self, factor: float) -> int:
        """The finest level whose downsample is <= ``factor`` (level 0 at worst)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if max(lv.downsample) <= factor * 1.001:
                best = i
        return best

    def info(self) -> dict[str, Any]:
        """A JSON-ready description (used by ``tilenet info --json``)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "shape": list(self.shape),
            "dtype": str(np.dtype(self.dtype)),
            "channels": self.channels,
            "levels": [list(lv.shape) for lv in self.levels],
            "downsamples": [list(lv.downsample) for lv in self.levels],
            "chunks": [list(lv.chunks) if lv.chunks else None for lv in self.levels],
            "compression": self.compression,
            "pixel_size": list(self.pixel_size) if self.pixel_size else None,
            # Whole-slide terms: microns per pixel (y, x) of level 0 and of every level.
            "mpp": list(self.pixel_size) if self.pixel_size else None,
            "level_mpp": (
                [
                    [self.pixel_size[0] * ds[0], self.pixel_size[1] * ds[1]]
                    for ds in (lv.downsample for lv in self.levels)
                ]
                if self.pixel_size
                else None
            ),
            "vendor": self.vendor,
            "objective_power": self.objective_power,
            "associated_images": {k: list(v) for k, v in self.associated_images.items()},
            **self._geo_info(),
        }

    def _geo_info(self) -> dict[str, Any]:
        geo: dict[str, Any] = {"crs": self.crs, "epsg": None, "crs_units": None}
        geo["transform"] = list(self.transform) if self.transform else None
        geo["gsd"] = None
        if self.crs is not None or self.transform is not None:
            geo.update(describe_georef(self.crs, self.transform))
        geo["nodata"] = self.nodata
        geo["bands"] = list(self.band_names) if self.band_names else None
        return geo

    # -- reading ------------------------------------------------------------------------
    def read(self, window: Window, level: int = 0, *, fill: float = 0) -> np.ndarray:
        """Decode ``window`` of ``level`` as a numpy array (h, w, C).

        Only the storage tiles that intersect the window are decoded. The part of the window
        outside the image is ``fill``.
        """
        if not 0 <= level < len(self.levels):
            raise InputError(
                f"{self.path}: level {level} does not exist; the image has levels "
                f"0..{len(self.levels) - 1}"
            )
        h, w = self.levels[level].shape
        inside = window.clip(h, w)
        if inside.area == window.area:
            return self._checked_read(window, level)
        out = np.full((window.h, window.w, self.channels), fill, dtype=self.dtype)
        if inside.area:
            rel = inside.relative_to(window)
            out[rel.slices] = self._checked_read(inside, level)
        return out

    @property
    def masked(self) -> bool:
        """Whether some pixels may have no data: the image declares ``nodata`` or has a
        dataset mask (alpha band, GDAL mask). When False, :meth:`read_masked` costs nothing
        more than :meth:`read` and its mask is None."""
        return self.nodata is not None or self._has_dataset_mask()

    def read_masked(
        self, window: Window, level: int = 0, *, fill: float = 0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(pixels, valid)``: :meth:`read`'s pixels and where they have data.

        ``valid`` (h, w) bool is :func:`valid_mask` of the pixels, the ``nodata`` value and the
        dataset mask; the part of ``window`` outside the image is not valid. It is None when
        the image has no nodata value nor dataset mask (:attr:`masked`): every pixel has data.
        """
        pixels = self.read(window, level, fill=fill)
        if not self.masked:
            return pixels, None
        return pixels, self._valid_of(pixels, window, level)

    def valid(self, window: Window, level: int = 0) -> np.ndarray | None:
        """Where ``window`` of ``level`` has data (:meth:`read_masked`'s mask); None when every
        pixel of the image has (no pixels are read then)."""
        return self.read_masked(window, level)[1] if self.masked else None

    def _valid_of(self, pixels: np.ndarray, window: Window, level: int) -> np.ndarray:
        h, w = self.levels[level].shape
        inside = window.clip(h, w)
        mask = None
        if self._has_dataset_mask():
            mask = np.zeros(window.shape, np.uint8)
            if inside.area:
                rel = inside.relative_to(window).slices
                mask[rel] = self._dataset_mask(inside, level, pixels[rel])
        valid = valid_mask(pixels, self.nodata, mask)
        if valid is None:
            valid = np.ones(window.shape, bool)
        if inside.area != window.area:
            keep = np.zeros(window.shape, bool)
            if inside.area:
                keep[inside.relative_to(window).slices] = True
            valid &= keep
        return valid

    def _has_dataset_mask(self) -> bool:
        """Whether :meth:`_dataset_mask` has a mask to give (readers with one override both)."""
        return False

    def _dataset_mask(self, window: Window, level: int, pixels: np.ndarray) -> np.ndarray:
        """The dataset mask (h, w) of a window inside level ``level`` whose ``pixels`` (all
        bands) are read: 0 where a pixel has no data (an alpha band, a GDAL mask)."""
        raise NotImplementedError

    def _checked_read(self, window: Window, level: int) -> np.ndarray:
        try:
            data = self._read(window, level)
        except InputError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except TilenetError:  # a StorageError (object storage): one line naming the URL
            raise
        except Exception as exc:
            raise CorruptImageError(
                f"{self.path}: cannot decode window {window} at level {level}: "
                f"{one_line(exc, typed=False)}"
            ) from exc
        if data.ndim == 2:
            data = data[:, :, None]
        if data.shape != (window.h, window.w, self.channels):
            raise CorruptImageError(
                f"{self.path}: decoded {data.shape} for window {window} at level {level}, "
                f"expected {(window.h, window.w, self.channels)}"
            )
        return data

    def encoded(self, window: Window, level: int = 0) -> EncodedWindow | None:
        """``window``'s stored tiles, undecoded (:mod:`tilenet.io.source`), or None where this
        image has no raw path for it (the default): :meth:`read` it."""
        return None

    @abstractmethod
    def _read(self, window: Window, level: int) -> np.ndarray:
        """Decode a window that lies inside level ``level``; return (h, w, C) or (h, w)."""

    def to_dask(self, level: int = 0, chunks: tuple[int, int] | None = None) -> Any:
        """A lazy dask array (H, W, C) of ``level``; each block is one :meth:`read`."""
        import dask.array as da

        h, w = self.levels[level].shape
        ch, cw = chunks or self.levels[level].chunks or (1024, 1024)
        ch, cw = max(ch, 256), max(cw, 256)
        ych = tuple(b - a for a, b in spans(h, ch))
        xch = tuple(b - a for a, b in spans(w, cw))

        def block(block_info: Any = None) -> np.ndarray:
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            return self.read(Window(y0, x0, y1 - y0, x1 - x0), level)

        return da.map_blocks(
            block, dtype=self.dtype, chunks=(ych, xch, (self.channels,)), meta=np.empty((0, 0, 0))
        )

    def select_bands(self, bands: Sequence[int] | None) -> LazyImage:
        """A view with the channels ``bands`` (1-based, GDAL's numbering), in that order; the
        image itself when ``bands`` is None or empty (all bands, as configs say it)."""
        if not bands:
            return self
        bands = list(bands)
        n = self.channels
        bad = [b for b in bands if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n]
        if bad:
            names = f" ({', '.join(self.band_names)})" if self.band_names else ""
            raise InputError(
                f"{self.path}: bands {bad or bands} do not exist; the image has bands 1..{n}{names}"
            )
        return self.replace(
            BandSelection,
            channels=len(bands),
            metadata={**self.metadata, "bands": list(bands)},
            band_names=[self.band_names[b - 1] for b in bands] if self.band_names else None,
            source=self,
            indices=[b - 1 for b in bands],
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class BandSelection(LazyImage):
    """Some channels of another image, in a chosen order (:meth:`LazyImage.select_bands`).

    Reads decode the source's window with all its channels, then keep the chosen ones.
    Closing the selection closes the source.
    """

    source: LazyImage | None = field(default=None, repr=False)
    indices: list[int] = field(default_factory=list)

    def _read(self, window: Window, level: int) -> np.ndarray:
        assert self.source is not None
        return self.source.read(window, level)[:, :, self.indices]

    @property
    def masked(self) -> bool:
        return self.source is not None and self.source.masked

    def _has_dataset_mask(self) -> bool:
        return self.source is not None and self.source._has_dataset_mask()

    def read_masked(
        self, window: Window, level: int = 0, *, fill: float = 0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The source's pixels and mask (all of its bands decide, an alpha band left out
        included), then the chosen channels."""
        assert self.source is not None
        pixels, valid = self.source.read_masked(window, level, fill=fill)
        return pixels[:, :, self.indices], valid

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
