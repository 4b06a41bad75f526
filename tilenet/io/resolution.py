"""Working at a target pixel size: microns per pixel (slides) or ground sample distance
(georeferenced rasters), one mechanism for both.

:func:`at_resolution` picks the pyramid level closest to the target at or finer than it and
returns a lazy view of it resampled by the remaining factor ``f``; a level within
``tolerance`` of the target is used as is (``f`` = 1, no resampling). The view is a
:class:`~tilenet.io.base.LazyImage`: its level 0 is the resampled grid, its further levels
are the source's coarser levels (downsample relative to the view's level 0, so foreground
masks and previews keep working), and its ``pixel_size``, ``transform``,
``reference_scale`` and so ``pixel_transform(level)`` are the effective ones: they map view
pixels to the file's level-0 pixels (QuPath's coordinates) or to CRS coordinates.

Resampling is per window and seam-free by construction: view pixel ``i`` (per axis) covers
source pixels ``[i*f, (i+1)*f)`` of the chosen level, and its weights and source indices are
computed from ``i`` alone (global coordinates), then applied separably (rows, then columns)
in a fixed order of taps with elementwise arithmetic. A view pixel therefore has the same
value bit for bit whatever window it is read in.

* Images, ``f`` >= 1: area averaging (each source pixel weighted by the fraction of it the
  view pixel covers; exact block means for integer ``f``). This is antialiased and never
  overshoots, so integer images are rounded and stay in their range.
* Images, ``f`` < 1 (a target finer than level 0): linear interpolation, edges replicated;
  refused beyond ``max_upsample`` (2x by default: a file whose pixel-size tags are wrong,
  or a model trained at another scale, would otherwise plan a huge output).
* Label images (:func:`label_view`): nearest (the source pixel under the view pixel's
  centre), never interpolated; class values stay class values.
* Nodata: where the image declares ``nodata``, nodata samples get no weight; a view sample
  is the weighted mean of the valid samples under it, or nodata when they cover less than
  half of it. Nodata never bleeds into valid values, and nodata areas keep their outline.
* Dataset masks (an alpha band, a GDAL mask, OpenSlide's unscanned areas: the source's
  :meth:`~tilenet.io.base.LazyImage.read_masked` mask): the same rule. Samples without data
  get no weight in the pixels; the view has a dataset mask of its own, and a view pixel has
  no data when the source's pixels with data cover less than half of it (its value there is
  nodata where the image declares one, else the plain mean of what the file holds, e.g. a
  slide's background). Mask and pixels come from the same taps, so they are seam-free too.
  A view of an image without a dataset mask reads exactly as before (no mask is computed).

A read decodes the source window under the view window (about ``f``² times its pixels).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from tilenet.config import ResolutionConfig
from tilenet.errors import ConfigError, InputError
from tilenet.geometry import GeoTransform, Window
from tilenet.io.base import LazyImage, Level
from tilenet.io.crs import describe_georef

__all__ = [
    "ResampledImage",
    "Resolution",
    "at_resolution",
    "check_resolution",
    "label_view",
    "pixel_record",
    "plan_resolution",
    "training_resolution",
]

log = logging.getLogger(__name__)


def check_resolution(cfg: ResolutionConfig, *, level: int = 0) -> None:
    """Refuse ambiguous or impossible settings (one-line :class:`ConfigError`).

    >>> check_resolution(ResolutionConfig(mpp=0.5, gsd=10.0))
    Traceback (most recent call last):
    ...
    tilenet.errors.ConfigError: give one target pixel size: mpp=0.5 and gsd=10.0 were both given
    """
    given = {k: v for k in ("mpp", "gsd", "magnification") if (v := getattr(cfg, k)) is not None}
    if len(given) > 1:
        both = " and ".join(f"{k}={v!r}" for k, v in given.items())
        raise ConfigError(f"give one target pixel size: {both} were both given")
    for key in ("mpp", "gsd", "magnification", "assume_mpp"):
        v = getattr(cfg, key)
        if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ConfigError(f"resolution.{key} must be a positive number, got {v!r}")
    if not 0 <= cfg.tolerance < 0.5:
        raise ConfigError(f"resolution.tolerance must be in [0, 0.5), got {cfg.tolerance!r}")
    if given and level != 0:
        (k, v), *_ = given.items()
        raise ConfigError(
            f"{k}={v!r} chooses the pyramid level itself; it cannot be combined with level "
            f"{level} (leave the level at 0, or drop {k})"
        )


@dataclass(frozen=True)
class Resolution:
    """How a view was made: the source level read, the factor it is resampled by.

    ``scale`` is the size (y, x) of a view pixel in the source file's level-0 pixels.
    """

    #: What was asked, e.g. {"mpp": 1.0}.
    requested: dict[str, float]
    source_level: int
    source_downsample: tuple[float, float]
    #: Remaining resampling factor (y, x) applied to the source level (1, 1: as is).
    factor: tuple[float, float]
    used_as_is: bool
    scale: tuple[float, float]
    shape: tuple[int, int]
    #: Effective µm per pixel (y, x) where known (or assumed), else None.
    pixel_size: tuple[float, float] | None = None
    #: The pixel size came from ``assume_mpp``, not from the file.
    assumed: bool = False
    #: Effective ground sample distance (y, x) in CRS units (georeferenced), else None.
    gsd: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``summary.json`` and store attributes."""
        d: dict[str, Any] = {
            "requested": dict(self.requested),
            "source_level": self.source_level,
            "source_downsample": list(self.source_downsample),
            "factor": list(self.factor),
            "used_as_is": self.used_as_is,
            "scale": list(self.scale),
            "shape": list(self.shape),
            "pixel_size": list(self.pixel_size) if self.pixel_size else None,
            "pixel_size_assumed": self.assumed,
            "gsd": list(self.gsd) if self.gsd else None,
        }
        if self.used_as_is:
            d["note"] = "level used as is"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Resolution:
        """The inverse of :meth:`to_dict` (extra keys ignored).

        >>> r = Resolution({"mpp": 1.0}, 0, (1.0, 1.0), (2.0, 2.0), False, (2.0, 2.0), (4, 5))
        >>> Resolution.from_dict(r.to_dict()) == r
        True
        """

        def pair(v: Any) -> Any:
            return (float(v[0]), float(v[1])) if v else None

        return cls(
            requested={str(k): float(v) for k, v in d["requested"].items()},
            source_level=int(d["source_level"]),
            source_downsample=pair(d["source_downsample"]),
            factor=pair(d["factor"]),
            used_as_is=bool(d["used_as_is"]),
            scale=pair(d["scale"]),
            shape=(int(d["shape"][0]), int(d["shape"][1])),
            pixel_size=pair(d.get("pixel_size")),
            assumed=bool(d.get("pixel_size_assumed")),
            gsd=pair(d.get("gsd")),
        )


def _target_scale(image: LazyImage, cfg: ResolutionConfig) -> tuple[tuple[float, float], bool]:
    """The target pixel size in the image's level-0 pixels (y, x), and whether it is assumed."""
    path = image.path
    if cfg.gsd is not None:
        if image.transform is None:
            raise InputError(
                f"{path}: has no georeferencing (geotransform), so gsd {cfg.gsd!r} cannot be "
                "met; run at a pyramid level with --level N instead"
            )
        gy, gx = GeoTransform(*image.transform).gsd
        return (cfg.gsd / gy, cfg.gsd / gx), False
    if cfg.magnification is not None:
        # mpp = level-0 mpp * objective power / magnification: in level-0 pixels, power / M.
        power = image.objective_power
        if not power:
            raise InputError(
                f"{path}: states no objective power, so magnification {cfg.magnification!r} "
                "cannot be met; use --mpp UM or --level N"
            )
        t = power / cfg.magnification
        return (t, t), False
    base = image.pixel_size
    assumed = False
    if base is None and cfg.assume_mpp is not None:
        base, assumed = (cfg.assume_mpp, cfg.assume_mpp), True
    if base is None:
        raise InputError(
            f"{path}: has no pixel size (µm per pixel), so mpp {cfg.mpp!r} cannot be met; "
            "run at a pyramid level with --level N, or state the scan's pixel size with "
            "--assume-mpp UM"
        )
    assert cfg.mpp is not None
    return (cfg.mpp / base[0], cfg.mpp / base[1]), assumed


def _upsample_refused(image: LazyImage, cfg: ResolutionConfig, factor: float) -> str:
    """The one line refusing an upsample beyond ``cfg.max_upsample``: the file, both pixel
    sizes, the factor and the setting that allows it."""
    if cfg.gsd is not None and image.transform is not None:
        gy, gx = GeoTransform(*image.transform).gsd
        sizes = f"gsd {cfg.gsd:g} asked, the file's level 0 is {min(gy, gx):.4g}"
    elif cfg.magnification is not None:
        sizes = f"{cfg.magnification:g}x asked, the file's objective is {image.objective_power:g}x"
    else:
        base = image.pixel_size or (cfg.assume_mpp, cfg.assume_mpp)
        sizes = f"{cfg.mpp:g} µm/px asked, the file's level 0 is {min(base):.4g} µm/px"  # type: ignore[type-var]
    return (
        f"{image.path}: {sizes}: that is a {factor:.3g}x upsample, beyond the "
        f"{cfg.max_upsample:g}x allowed (it would plan a {factor:.3g}x larger output); check "
        "the file's pixel size (--assume-mpp) or allow it with --max-upsample / "
        "resolution.max_upsample"
    )


def _requested(cfg: ResolutionConfig) -> dict[str, float]:
    return {
        k: float(v) for k in ("mpp", "gsd", "magnification") if (v := getattr(cfg, k)) is not None
    }


def plan_resolution(
    image: LazyImage, cfg: ResolutionConfig, *, level: int = 0
) -> Resolution | None:
    """The level and factor that meet ``cfg`` on ``image``, or None when nothing is asked."""
    check_resolution(cfg, level=level)
    if cfg.mpp is None and cfg.gsd is None and cfg.magnification is None:
        return None
    (ty, tx), assumed = _target_scale(image, cfg)
    tol = float(cfg.tolerance)
    # The coarsest level at or finer than the target (within the tolerance); level 0 else.
    src = 0
    for i, lv in enumerate(image.levels):
        dy, dx = lv.downsample
        if dy <= ty * (1 + tol) and dx <= tx * (1 + tol):
            src = i
    dy, dx = image.levels[src].downsample
    fy, fx = ty / dy, tx / dx
    as_is = abs(fy - 1) <= tol and abs(fx - 1) <= tol
    if as_is:
        fy = fx = 1.0
    elif 1 / min(fy, fx) > cfg.max_upsample * (1 + tol):
        raise InputError(_upsample_refused(image, cfg, 1 / min(fy, fx)))
    elif fy < 1 or fx < 1:
        log.warning(
            "%s: the target pixel size is finer than level 0 by %.3gx; upsampling it",
            image.path,
            1 / min(fy, fx),
        )
    h, w = image.levels[src].shape
    shape = (max(1, math.floor(h / fy + 1e-9)), max(1, math.floor(w / fx + 1e-9)))
    scale = (dy * fy, dx * fx)
    base = image.pixel_size
    if base is None and cfg.assume_mpp is not None:
        base = (cfg.assume_mpp, cfg.assume_mpp)
    ref = image.reference_scale
    return Resolution(
        requested=_requested(cfg),
        source_level=src,
        source_downsample=(float(dy), float(dx)),
        factor=(float(fy), float(fx)),
        used_as_is=as_is,
        scale=(float(scale[0] * ref[0]), float(scale[1] * ref[1])),
        shape=shape,
        pixel_size=(base[0] * scale[0], base[1] * scale[1]) if base else None,
        assumed=assumed or (image.pixel_size is None and base is not None),
        gsd=tuple(g * s for g, s in zip(GeoTransform(*image.transform).gsd, scale, strict=True))  # type: ignore[arg-type]
        if image.transform is not None
        else None,
    )


def at_resolution(
    image: LazyImage, cfg: ResolutionConfig, *, level: int = 0
) -> tuple[LazyImage, Resolution | None]:
    """``image`` at the pixel size ``cfg`` asks for: ``(view, resolution)``.

    Without a target in ``cfg`` the image is returned as is with ``None`` (read it at
    ``level``); with one, ``level`` must be 0 and the view is read at its level 0. Errors:
    :class:`ConfigError` for ambiguous settings, :class:`InputError` when the image lacks what
    the target needs (a pixel size for ``mpp``, a geotransform for ``gsd``).
    """
    res = plan_resolution(image, cfg, level=level)
    if res is None:
        return image, None
    return ResampledImage.of(image, res), res


Kind = Literal["image", "labels"]


@dataclass
class ResampledImage(LazyImage):
    """A view of ``source`` at a :class:`Resolution` (made by :func:`at_resolution` or
    :func:`label_view`). Level 0 is resampled per window; further levels are the source's
    coarser levels as they are. Closing the view closes the source."""

    source: LazyImage | None = field(default=None, repr=False)
    resolution: Resolution | None = None
    kind: Kind = "image"
    #: Source level of each view level.
    source_levels: list[int] = field(default_factory=list)
    #: Per reader thread: the dataset mask its last resampled read made, (window, level,
    #: mask), so the mask of a read costs no second read.
    _masks: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    @classmethod
    def of(cls, source: LazyImage, res: Resolution, kind: Kind = "image") -> ResampledImage:
        """The view of ``source`` at ``res`` (``kind="labels"``: nearest, never interpolated)."""
        sy, sx = res.scale[0] / source.reference_scale[0], res.scale[1] / source.reference_scale[1]
        chunks = source.levels[res.source_level].chunks if res.used_as_is else None
        levels = [Level(res.shape, (1.0, 1.0), chunks)]
        src_levels = [res.source_level]
        for i, lv in enumerate(source.levels):
            if i > res.source_level and lv.downsample[0] > sy and lv.downsample[1] > sx:
                levels.append(
                    Level(lv.shape, (lv.downsample[0] / sy, lv.downsample[1] / sx), lv.chunks)
                )
                src_levels.append(i)
        return source.replace(
            cls,
            levels=levels,
            pixel_size=res.pixel_size if kind == "image" else None,
            metadata={**source.metadata, "resolution": res.to_dict()},
            transform=GeoTransform(*source.transform).scaled((sy, sx))
            if source.transform
            else None,
            reference_scale=res.scale,
            source=source,
            resolution=res,
            kind=kind,
            source_levels=src_levels,
        )

    def _read(self, window: Window, level: int) -> np.ndarray:
        assert self.source is not None
        if self._passes_through(level):
            return self.source.read(window, self.source_levels[level])
        pixels, mask = self._resampled(window, level)
        if mask is not None:
            self._masks.last = (window, level, mask)
        return pixels

    def _resampled(self, window: Window, level: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``window`` of the resampled level 0, and its dataset mask (None without one)."""
        assert self.source is not None and self.resolution is not None
        src_level = self.source_levels[level]
        res = self.resolution
        h, w = self.source.levels[src_level].shape
        if self.kind == "labels":
            # The view's scale relative to the source: labels come from its level 0.
            fy = res.scale[0] / self.source.reference_scale[0]
            fx = res.scale[1] / self.source.reference_scale[1]
            iy, wy = _taps(np.arange(window.y, window.y1), fy, h, "nearest")
            ix, wx = _taps(np.arange(window.x, window.x1), fx, w, "nearest")
        else:
            fy, fx = res.factor
            iy, wy = _taps(np.arange(window.y, window.y1), fy, h, "area" if fy >= 1 else "linear")
            ix, wx = _taps(np.arange(window.x, window.x1), fx, w, "area" if fx >= 1 else "linear")
        y0, y1 = int(iy.min()), int(iy.max()) + 1
        x0, x1 = int(ix.min()), int(ix.max()) + 1
        under = Window(y0, x0, y1 - y0, x1 - x0)
        iy, ix = iy - y0, ix - x0
        if self._has_dataset_mask():
            src, valid = self.source.read_masked(under, src_level)
            assert valid is not None
            return _resample_masked(src, valid, (iy, wy, ix, wx), self.nodata)
        src = self.source.read(under, src_level)
        if self.kind == "labels":
            return src[iy[:, 0]][:, ix[:, 0]], None
        return _resample(src, iy, wy, ix, wx, self.nodata), None

    def _passes_through(self, level: int) -> bool:
        """Whether ``level`` is the source's level as it is (not resampled)."""
        assert self.resolution is not None
        return level > 0 or (self.resolution.used_as_is and self.kind == "image")

    def _has_dataset_mask(self) -> bool:
        """Whether the source has a mask beyond ``nodata`` (alpha, GDAL mask); label views
        have none."""
        return self.kind == "image" and self.source is not None and self.source._has_dataset_mask()

    def read_masked(
        self, window: Window, level: int = 0, *, fill: float = 0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`LazyImage.read_masked`; a level used as is is the source's, mask included."""
        if self.source is not None and self._has_dataset_mask() and self._passes_through(level):
            return self.source.read_masked(window, self.source_levels[level], fill=fill)
        return super().read_masked(window, level, fill=fill)

    def _dataset_mask(self, window: Window, level: int, pixels: np.ndarray) -> np.ndarray:
        """The view's mask of ``window``: 255 where the source's pixels with data cover at
        least half of a view pixel, else 0 (made by the read of ``pixels``)."""
        if self._passes_through(level):
            valid = self.read_masked(window, level)[1]
            assert valid is not None
            return np.where(valid, 255, 0).astype(np.uint8)
        last = getattr(self._masks, "last", None)
        if last is not None and last[0] == window and last[1] == level:
            return np.asarray(last[2])
        mask = self._resampled(window, level)[1]  # not this thread's last read: again
        assert mask is not None
        return mask

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def label_view(labels: LazyImage, like: LazyImage | Resolution) -> LazyImage:
    """``labels`` (a label image of the same file extent as ``like``'s source) on the pixel
    grid of the view ``like`` (or of a :class:`Resolution`), by nearest neighbour from the
    labels' level 0.

    Returns ``labels`` itself when ``like`` is not a :class:`ResampledImage`.
    """
    res = like if isinstance(like, Resolution) else getattr(like, "resolution", None)
    if not isinstance(res, Resolution):
        return labels
    view_res = replace(res, source_level=0, used_as_is=False)
    view = ResampledImage.of(labels, view_res, kind="labels")
    view.levels = view.levels[:1]
    view.source_levels = [0]
    return view


def pixel_record(image: LazyImage, level: int = 0) -> dict[str, Any]:
    """The pixel size of ``level``: ``mpp`` [y, x] (µm) and ``gsd`` [y, x] with
    ``crs_units``, each None where the image does not know it."""
    ds = image.levels[level].downsample
    rec: dict[str, Any] = {"mpp": None, "gsd": None, "crs_units": None}
    if image.pixel_size:
        rec["mpp"] = [image.pixel_size[0] * ds[0], image.pixel_size[1] * ds[1]]
    if image.transform is not None:
        info = describe_georef(image.crs, GeoTransform(*image.transform).scaled(ds))
        rec["gsd"], rec["crs_units"] = info["gsd"], info["crs_units"]
    return rec


def training_resolution(
    records: list[dict[str, Any]], *, rel: float = 0.01
) -> dict[str, Any] | None:
    """What a checkpoint records of its training data's pixel size (``ModelSpec.resolution``).

    ``{"mpp": m}`` when every record (:func:`pixel_record`) has a pixel size and they agree
    within ``rel``; else ``{"gsd": g, "crs_units": u}`` likewise; else None (unknown or mixed).

    >>> training_resolution([{"mpp": [0.5, 0.5]}, {"mpp": [0.501, 0.5]}])
    {'mpp': 0.5}
    >>> training_resolution([{"mpp": [0.5, 0.5]}, {"mpp": None}]) is None
    True
    """
    for key in ("mpp", "gsd"):
        values = [r.get(key) for r in records]
        if not values or any(not v for v in values):
            continue
        flat = [float(x) for v in values for x in (v or ())]
        lo, hi = min(flat), max(flat)
        units = {r.get("crs_units") for r in records}
        if hi > lo * (1 + rel) or (key == "gsd" and len(units) > 1):
            continue
        out: dict[str, Any] = {key: round(flat[0], 6)}
        if key == "gsd":
            out["crs_units"] = units.pop()
        return out
    return None


# -- resampling ----------------------------------------------------------------------------
def _taps(
    out: np.ndarray, f: float, n: int, kind: Literal["area", "linear", "nearest"]
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (both (len(out), K)) of output indices ``out`` on an axis.

    Output pixel ``i`` covers source coordinates ``[i*f, (i+1)*f)``; everything is computed
    from ``i`` itself, so a pixel's taps do not depend on the window it is read in. Indices
    are clipped to ``[0, n)`` (edge replication).

    >>> idx, w = _taps(np.arange(2), 2.0, 4, "area")
    >>> idx.tolist(), w.tolist()
    ([[0, 1, 2], [2, 3, 3]], [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    """
    i = out.astype(np.float64)[:, None]
    if kind == "nearest":
        idx = np.floor((i + 0.5) * f).astype(np.int64)
        return np.clip(idx, 0, n - 1), np.ones(idx.shape)
    if kind == "linear":
        c = (i + 0.5) * f - 0.5
        j0 = np.floor(c)
        t = c - j0
        idx = j0.astype(np.int64) + np.arange(2)
        w = np.concatenate([1 - t, t], axis=1)
        return np.clip(idx, 0, n - 1), w
    lo, hi = i * f, (i + 1) * f
    j0 = np.floor(lo)
    k = math.ceil(f) + 1
    idx = j0 + np.arange(k)
    cover = np.clip(np.minimum(hi, idx + 1) - np.maximum(lo, idx), 0.0, None)
    cover[idx >= n] = 0.0
    w = cover / cover.sum(axis=1, keepdims=True)
    return np.clip(idx.astype(np.int64), 0, n - 1), w


def _apply(a: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int, ft: Any) -> np.ndarray:
    """Weighted sum of ``a``'s slices ``idx`` along ``axis``, taps added in a fixed order."""
    acc: np.ndarray | None = None
    for t in range(idx.shape[1]):
        wt = w[:, t].astype(ft)
        wt = wt[:, None, None] if axis == 0 else wt[None, :, None]
        term = np.take(a, idx[:, t], axis=axis).astype(ft, copy=False) * wt
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc


def _resample(
    src: np.ndarray,
    iy: np.ndarray,
    wy: np.ndarray,
    ix: np.ndarray,
    wx: np.ndarray,
    nodata: float | None,
) -> np.ndarray:
    dtype = src.dtype
    # float32 is exact enough for 8/16-bit samples; wider ones are summed in float64.
    ft: Any = np.float32 if dtype.itemsize <= 2 or dtype == np.float32 else np.float64
    valid = None
    if nodata is not None:
        if np.isnan(nodata):
            valid = ~np.isnan(src) if dtype.kind == "f" else np.ones(src.shape, bool)
        else:
            valid = src != nodata
        src = np.where(valid, src, 0)
    out = _apply(_apply(src, iy, wy, 0, ft), ix, wx, 1, ft)
    if valid is not None:
        cover = _apply(_apply(valid.astype(ft), iy, wy, 0, ft), ix, wx, 1, ft)
        keep = cover >= 0.5
        out = np.where(keep, out / np.where(keep, cover, 1), 0)
    if dtype.kind in "iub":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        out = np.rint(out)
        if info is not None:
            out = np.clip(out, info.min, info.max)
    out = out.astype(dtype)
    if valid is not None:
        assert nodata is not None
        out[~keep] = nodata
    return out


def _resample_masked(
    src: np.ndarray, valid: np.ndarray, taps: tuple[np.ndarray, ...], nodata: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """``src`` (h, w, C) resampled with the samples where ``valid`` (h, w) is False (and, with
    ``nodata``, nodata samples) given no weight; and the view's mask (uint8, 255: has data)
    where the valid pixels cover at least half of a view pixel (the module's rule)."""
    iy, wy, ix, wx = taps
    dtype = src.dtype
    ft: Any = np.float32 if dtype.itemsize <= 2 or dtype == np.float32 else np.float64

    def apply(a: np.ndarray) -> np.ndarray:
        return _apply(_apply(a, iy, wy, 0, ft), ix, wx, 1, ft)

    sample = np.broadcast_to(valid[:, :, None], src.shape)
    if nodata is not None:
        with np.errstate(invalid="ignore"):
            sample = sample & (~np.isnan(src) if np.isnan(nodata) else src != nodata)
    cover = apply(sample.astype(ft))
    keep = cover >= 0.5
    out = apply(np.where(sample, src, 0)) / np.where(keep, cover, 1)
    if not keep.all():
        # no data here: nodata where declared (set below), else what the file holds
        out = np.where(keep, out, 0 if nodata is not None else apply(src))
    if dtype.kind in "iub":
        out = np.rint(out)
        if dtype.kind != "b":
            info = np.iinfo(dtype)
            out = np.clip(out, info.min, info.max)
    out = out.astype(dtype)
    if nodata is not None:
        out[~keep] = nodata
    mask = np.where(apply(valid[:, :, None].astype(ft))[:, :, 0] >= 0.5, 255, 0)
    return out, mask.astype(np.uint8)
