"""Tissue detection on a low-resolution level: which parts of a slide hold tissue.

:func:`detect_tissue` reads a thumbnail of the image at about ``mpp`` µm per pixel (the
coarsest pyramid level at least that fine, area-averaged by the rest, band by band: never a
full-resolution read where the file has a pyramid) and returns a :class:`TissueMask`: the
boolean mask, its scale to level-0 pixels and the tissue fraction of any level-0 window.

The default method is the CLAM recipe (Lu et al. 2021, ``WholeSlideImage.segmentTissue``):
HSV saturation, Otsu threshold, median filter, morphological closing, area filters (the
median filter is applied as a majority vote of the thresholded saturation, which equals
thresholding the median-filtered saturation; Otsu's statistics are taken before the
filter); with three changes for its known failures:

- **Pale tissue.** Otsu between white glass and dense tissue puts the threshold above pale
  tissue (fat, mucus, faint eosin). The threshold used is the lower of Otsu's and the
  background's own spread: median + 5 robust SD (MAD) of the saturation below Otsu's
  threshold, at least ``min_saturation``. Where the class below Otsu's threshold is not
  glass (its median saturation is above ``background_saturation``: a crop entirely of
  tissue) the threshold is ``min_saturation``.
- **Small fragments.** Areas are in µm² (CLAM's are in level pixels times 512² reference
  patches, 1.6 mm² by default); the default drops specks below 0.01 mm² only.
- **Pen marks and black borders** are not tissue: pixels whose hue is green to blue
  (60°..235°: ``G >= R``, which neither haematoxylin, whose hue is blue-violet, 240°..300°,
  nor eosin reaches) at saturation >= ``pen_saturation``, and dark pixels (value <
  ``dark_value``: black ink, scanner borders, slide edges), dilated by one pixel to catch
  their blended rims. They are also left out of the Otsu statistics. Red ink is not told
  apart from eosin.

Areas: tissue pieces smaller than ``min_tissue_um2`` are dropped; holes smaller than
``min_hole_um2`` are filled (larger ones, lumens or fat, stay holes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from tilenet.errors import InputError
from tilenet.geometry import Window, iter_bands

__all__ = [
    "DEFAULT_MPP",
    "TissueMask",
    "detect_tissue",
    "otsu",
    "overview",
    "rgb_to_hsv",
    "thumbnail",
    "tissue_rgb",
]

#: µm per pixel of the thumbnail tissue is detected on (CLAM runs at ~16 µm/px: 64x down of
#: a 40x scan; 8 keeps fragments of a few tens of µm).
DEFAULT_MPP = 8.0
#: The level-0 pixel size assumed for an image whose file states none (20x).
ASSUMED_MPP = 0.5

Method = Literal["otsu"]


# -- numerics ----------------------------------------------------------------------------------
def otsu(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values``: foreground is ``values > otsu(values)``.

    Maximises the between-class variance over the 256 grey levels (as scikit-image's
    ``threshold_otsu`` does on a uint8 image).

    >>> otsu(np.array([10] * 50 + [200] * 50, np.uint8)) in range(10, 200)
    True
    """
    v = np.asarray(values)
    if v.dtype != np.uint8:
        raise InputError(f"otsu needs uint8 values, got {v.dtype}")
    hist = np.bincount(v.ravel(), minlength=256).astype(np.float64)
    if hist.sum() == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    lo, hi = int(np.flatnonzero(hist)[0]), int(np.flatnonzero(hist)[-1])
    if lo == hi:
        return lo
    return lo + int(np.argmax(between[lo:hi]))


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees, 0..360), saturation and value (uint8, 0..255) of uint8 RGB (..., 3).

    Saturation is ``(max - min) / max`` scaled to 255 (OpenCV's, which CLAM uses); black has
    saturation 0.
    """
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    mx = np.maximum(np.maximum(r, g), b)  # not max(-1): a reduction over 3 is slow
    d = mx - np.minimum(np.minimum(r, g), b)
    sat = np.round(255 * d / np.maximum(mx, 1)).astype(np.uint8)  # 0 where mx = 0 (d = 0)
    safe = np.maximum(d, 1)
    hue = np.where(
        mx == r,
        60 * ((g - b) / safe % 6),
        np.where(mx == g, 60 * ((b - r) / safe + 2), 60 * ((r - g) / safe + 4)),
    )
    hue[d == 0] = 0
    return hue, sat, mx.astype(np.uint8)


# -- the mask ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TissueMask:
    """A low-resolution boolean tissue mask of an image.

    Mask pixel (r, c) covers level-0 pixels ``[r * scale[0], (r + 1) * scale[0])`` x
    ``[c * scale[1], (c + 1) * scale[1])``; ``shape`` is the image's level-0 (H, W).
    """

    mask: np.ndarray
    #: Level-0 pixels per mask pixel (y, x).
    scale: tuple[float, float]
    #: The image's level-0 (H, W).
    shape: tuple[int, int]
    #: µm per mask pixel (y, x); assumed from :data:`ASSUMED_MPP` where ``mpp_assumed``.
    mpp: tuple[float, float]
    mpp_assumed: bool = False
    #: The method, its parameters and what it chose (the saturation threshold...).
    params: dict[str, Any] = field(default_factory=dict)
    #: The RGB thumbnail the mask was found on (``keep_thumbnail=True``), else None.
    thumbnail: np.ndarray | None = field(default=None, repr=False)

    @cached_property
    def _integral(self) -> np.ndarray:
        out = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
        out[1:, 1:] = self.mask.astype(np.float64).cumsum(0).cumsum(1)
        return out

    def fraction(self, y0: float, x0: float, h: float, w: float) -> float:
        """The tissue fraction of the level-0 window at (``y0``, ``x0``) of size ``h`` x ``w``
        (its part inside the image; 0 for a window off the image).

        Area-weighted: a mask pixel partly under the window counts by the part it covers.
        """
        return float(self.fractions([(y0, x0, h, w)])[0])

    def fractions(
        self,
        windows: Sequence[Window] | Sequence[tuple[float, float, float, float]],
        downsample: tuple[float, float] = (1.0, 1.0),
    ) -> np.ndarray:
        """:meth:`fraction` of each window (a :class:`~tilenet.geometry.Window` or a
        (y, x, h, w) tuple) given at a level with ``downsample`` (y, x) to level 0."""
        if not len(windows):
            return np.zeros(0, np.float64)
        a = np.array(
            [(w.y, w.x, w.h, w.w) if isinstance(w, Window) else tuple(w) for w in windows],
            np.float64,
        )
        y0, y1 = a[:, 0] * downsample[0], (a[:, 0] + a[:, 2]) * downsample[0]
        x0, x1 = a[:, 1] * downsample[1], (a[:, 1] + a[:, 3]) * downsample[1]
        y0, y1 = np.clip(y0, 0, self.shape[0]), np.clip(y1, 0, self.shape[0])
        x0, x1 = np.clip(x0, 0, self.shape[1]), np.clip(x1, 0, self.shape[1])
        area = (y1 - y0) * (x1 - x0)
        # The integral of a piecewise-constant mask is bilinear in each cell: interpolating
        # the summed-area table gives the exact covered area at fractional coordinates.
        a11, a01 = self._area_to(y1, x1), self._area_to(y0, x1)
        s = a11 - a01 - self._area_to(y1, x0) + self._area_to(y0, x0)
        cell = self.scale[0] * self.scale[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(area > 0, s * cell / np.where(area > 0, area, 1), 0.0)
        return np.clip(frac, 0.0, 1.0)

    def _area_to(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Tissue (in mask pixels) in [0, y) x [0, x), y and x in level-0 pixels."""
        table = self._integral
        my = np.clip(y / self.scale[0], 0, self.mask.shape[0])
        mx = np.clip(x / self.scale[1], 0, self.mask.shape[1])
        iy = np.minimum(np.floor(my).astype(np.int64), self.mask.shape[0] - 1)
        ix = np.minimum(np.floor(mx).astype(np.int64), self.mask.shape[1] - 1)
        fy, fx = my - iy, mx - ix
        return (
            table[iy, ix] * (1 - fy) * (1 - fx)
            + table[iy + 1, ix] * fy * (1 - fx)
            + table[iy, ix + 1] * (1 - fy) * fx
            + table[iy + 1, ix + 1] * fy * fx
        )

    @property
    def tissue_fraction(self) -> float:
        """The fraction of the image that is tissue."""
        return self.fraction(0, 0, *self.shape)

    @property
    def area_um2(self) -> float:
        """The tissue area in µm² (from an assumed pixel size where ``mpp_assumed``)."""
        return float(self.mask.sum()) * self.mpp[0] * self.mpp[1]

    def describe(self) -> dict[str, Any]:
        """A JSON-ready record: method, parameters, threshold, scale, pixel size, fraction."""
        return {
            **self.params,
            "mask_shape": list(self.mask.shape),
            "scale": list(self.scale),
            "mask_mpp": list(self.mpp),
            "mpp_assumed": self.mpp_assumed,
            "tissue_fraction": round(self.tissue_fraction, 6),
            "tissue_area_um2": round(self.area_um2, 1),
        }


# -- reading -----------------------------------------------------------------------------------
def thumbnail(
    image: Any, *, mpp: float = DEFAULT_MPP, level0_mpp: float | None = None
) -> tuple[np.ndarray, tuple[float, float], float, bool]:
    """An RGB uint8 thumbnail of ``image`` (a :class:`~tilenet.io.LazyImage`) at about
    ``mpp`` µm/px: ``(rgb, scale, level0_mpp, assumed)``, ``scale`` in level-0 pixels per
    thumbnail pixel.

    Reads the coarsest pyramid level at least as fine as ``mpp`` and averages k x k blocks
    of it, band by band (memory: one band, never the level). ``level0_mpp`` overrides the
    file's pixel size; without either :data:`ASSUMED_MPP` is used (``assumed`` True).
    """
    assumed = False
    if level0_mpp is None:
        ps = getattr(image, "pixel_size", None)
        if ps:
            level0_mpp = float(ps[0] + ps[1]) / 2
        else:
            level0_mpp, assumed = ASSUMED_MPP, True
    if not (mpp > 0 and level0_mpp > 0):
        raise InputError(f"{image.path}: tissue mpp must be positive, got {mpp!r}/{level0_mpp!r}")
    factor = max(1.0, mpp / level0_mpp)
    level = image.level_for_downsample(factor)
    ds = image.levels[level].downsample
    k = max(1, round(factor / max(ds)))
    h, w = image.levels[level].shape
    rows = []
    band = k * max(1, 2048 // k)
    for win in iter_bands((h, w), band):
        rows.append(_block_mean(_as_rgb8(image.read(win, level), image), k))
    rgb = np.concatenate(rows, axis=0)
    return rgb, (ds[0] * k, ds[1] * k), level0_mpp, assumed


def overview(image: Any, *, max_pixels: int = 4_000_000) -> np.ndarray:
    """``image`` whole as RGB uint8, block-averaged to at most about ``max_pixels``
    pixels (a small reference region comes back as it is)."""
    h, w = image.levels[0].shape
    factor = max(1.0, math.sqrt(h * w / max_pixels))
    return thumbnail(image, mpp=factor, level0_mpp=1.0)[0]


def tissue_rgb(image: Any, *, min_pixels: int = 64) -> np.ndarray:
    """The tissue of ``image`` as RGB uint8 (1, N, 3): the pixels of its thumbnail under
    its tissue mask (the whole thumbnail where fewer than ``min_pixels`` are tissue). What
    a stain normaliser's slide-wide source is estimated from::

        make_stain("macenko", overview(ref)).with_source(tissue_rgb(image))
    """
    found = detect_tissue(image, keep_thumbnail=True)
    assert found.thumbnail is not None
    if found.mask.sum() < min_pixels:
        return found.thumbnail.reshape(1, -1, 3)
    return found.thumbnail[found.mask][None]


def _block_mean(block: np.ndarray, k: int) -> np.ndarray:
    """Mean of k x k blocks (the last partial block padded with its edge)."""
    if k == 1:
        return block
    h, w = block.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        block = np.pad(block, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = block.shape[0] // k, block.shape[1] // k
    out = block.reshape(hh, k, ww, k, 3).astype(np.float32).mean(axis=(1, 3))
    return np.round(out).astype(np.uint8)


def _as_rgb8(px: np.ndarray, image: Any) -> np.ndarray:
    """Pixels as RGB uint8: grey repeated, alpha dropped, 16-bit and float scaled."""
    if px.ndim == 2:
        px = px[..., None]
    c = px.shape[-1]
    if c == 1:
        px = np.repeat(px, 3, axis=-1)
    elif c == 4:
        px = px[..., :3]
    elif c != 3:
        raise InputError(
            f"{image.path}: tissue detection needs RGB (or grey) images, this one has {c} "
            "channels; pick three with --bands"
        )
    if px.dtype == np.uint8:
        return px
    if np.issubdtype(px.dtype, np.integer):
        top = float(np.iinfo(px.dtype).max)
        return np.round(px.astype(np.float32) * (255.0 / top)).astype(np.uint8)
    return np.round(np.clip(px.astype(np.float32), 0, 1) * 255).astype(np.uint8)


# -- detection ---------------------------------------------------------------------------------
def detect_tissue(
    image: Any,
    *,
    mpp: float = DEFAULT_MPP,
    level0_mpp: float | None = None,
    min_tissue_um2: float = 10_000.0,
    min_hole_um2: float = 20_000.0,
    method: Method = "otsu",
    median_um: float = 56.0,
    close_um: float = 32.0,
    min_saturation: int = 8,
    background_saturation: int = 25,
    pen_saturation: int = 40,
    dark_value: int = 50,
    keep_thumbnail: bool = False,
) -> TissueMask:
    """The tissue mask of ``image`` (a :class:`~tilenet.io.LazyImage`), detected on a
    thumbnail at about ``mpp`` µm/px (see the module's docstring for the method).

    ``level0_mpp`` overrides the file's pixel size (µm); an image stating none is taken as
    :data:`ASSUMED_MPP` with a warning (the areas are then approximate). ``median_um`` and
    ``close_um`` size the median filter and the closing; saturations and values are 0..255.
    ``keep_thumbnail`` keeps the RGB thumbnail in the mask (for overlays).
    """
    if method != "otsu":
        raise InputError(f"tissue method must be 'otsu', got {method!r}")
    rgb, scale, m0, assumed = thumbnail(image, mpp=mpp, level0_mpp=level0_mpp)
    if assumed:
        warnings.warn(
            f"{image.path}: states no pixel size; tissue areas assume {ASSUMED_MPP} µm/px "
            "(tilenet tissue --level0-mpp gives it)",
            stacklevel=2,
        )
    px_mpp = (m0 * scale[0], m0 * scale[1])
    mask, chosen = _segment(
        rgb,
        mpp=math.sqrt(px_mpp[0] * px_mpp[1]),
        min_tissue_um2=min_tissue_um2,
        min_hole_um2=min_hole_um2,
        median_um=median_um,
        close_um=close_um,
        min_saturation=min_saturation,
        background_saturation=background_saturation,
        pen_saturation=pen_saturation,
        dark_value=dark_value,
    )
    params = {
        "method": method,
        "mpp": mpp,
        "min_tissue_um2": min_tissue_um2,
        "min_hole_um2": min_hole_um2,
        "median_um": median_um,
        "close_um": close_um,
        "min_saturation": min_saturation,
        "background_saturation": background_saturation,
        "pen_saturation": pen_saturation,
        "dark_value": dark_value,
        **chosen,
    }
    h0, w0 = image.levels[0].shape
    return TissueMask(
        mask, scale, (h0, w0), px_mpp, assumed, params, rgb if keep_thumbnail else None
    )


def _segment(
    rgb: np.ndarray,
    *,
    mpp: float,
    min_tissue_um2: float,
    min_hole_um2: float,
    median_um: float,
    close_um: float,
    min_saturation: int,
    background_saturation: int,
    pen_saturation: int,
    dark_value: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The tissue mask of an RGB uint8 thumbnail at ``mpp`` µm/px, and the thresholds it
    chose (see :func:`detect_tissue`)."""
    from scipy import ndimage as ndi

    hue, sat, val = rgb_to_hsv(rgb)
    k = max(3, 2 * round(median_um / mpp / 2) + 1)  # odd
    pen = (hue >= 60) & (hue <= 235) & (sat >= pen_saturation)
    artefact = ndi.binary_dilation(pen | (val < dark_value), iterations=1)
    sat = np.where(artefact, 0, sat).astype(np.uint8)  # artefacts count as glass
    sample = sat[~artefact]
    chosen: dict[str, Any] = {"median_px": k, "artefact_fraction": float(artefact.mean())}
    if sample.size == 0:
        return np.zeros(rgb.shape[:2], bool), {**chosen, "otsu": None, "threshold": None}
    t_otsu = otsu(sample)
    below = sample[sample <= t_otsu].astype(np.float64)
    med = float(np.median(below)) if below.size else 0.0
    if med > background_saturation:  # no glass below Otsu's threshold: all of it is tissue
        thr = min_saturation
    else:
        mad = 1.4826 * float(np.median(np.abs(below - med))) if below.size else 0.0
        thr = int(min(t_otsu, max(min_saturation, math.ceil(med + 5 * max(mad, 1.0)))))
    # A pixel at an edge is part glass: keep it where it is at least half as saturated as
    # the tissue around it (half-maximum), not wherever it passes a threshold set for pale
    # tissue, which would grow dense tissue by its blended rim.
    above = sat > thr
    near = ndi.uniform_filter(np.where(above, sat, 0).astype(np.float32), size=5)
    near /= np.maximum(ndi.uniform_filter(above.astype(np.float32), size=5), 1e-6)
    above &= 2 * sat >= near  # near: the mean saturation of the tissue pixels around
    # median(k x k) > thr  <=>  more than half of the window is > thr: a box filter's
    # majority vote, exact and O(1) per pixel (scipy's rank filter is O(k^2)).
    votes = ndi.uniform_filter(above.astype(np.float32), size=k, mode="nearest")
    tissue = (votes > 0.5) & ~artefact
    r = max(1, round(close_um / mpp / 2))
    disk = _disk(r)
    # closing with a margin, so tissue at the border is not eaten by the erosion
    tissue = ndi.binary_closing(np.pad(tissue, r), structure=disk)[r:-r, r:-r]
    tissue &= ~artefact
    px_area = mpp * mpp
    tissue = _drop_small(tissue, min_tissue_um2 / px_area)
    tissue = _fill_holes(tissue, min_hole_um2 / px_area)
    chosen.update(otsu=t_otsu, threshold=thr, background_median=med, close_px=r)
    return tissue, chosen


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(yy * yy + xx * xx <= r * r + r)


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` without its 8-connected pieces smaller than ``min_px`` pixels."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return np.asarray(keep[lab])


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """``mask`` with its holes (4-connected background pieces off the border) smaller than
    ``max_px`` pixels filled."""
    from scipy import ndimage as ndi

    padded, n = ndi.label(~np.pad(mask, 1))  # the padding joins every border piece into one
    lab = padded[1:-1, 1:-1]
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    fill = sizes < max_px
    fill[0] = False
    fill[padded[0, 0]] = False
    return np.asarray(mask | fill[lab])
