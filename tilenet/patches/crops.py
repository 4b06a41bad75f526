"""Random crops read lazily from large images (label images or vector labels); no store."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from tilenet.config import AugmentConfig, ResolutionConfig
from tilenet.errors import InputError
from tilenet.geometry import GeoTransform, Window
from tilenet.io.base import IGNORE_INDEX
from tilenet.io.resolution import (
    check_resolution,
    label_view,
    pixel_record,
    training_resolution,
)
from tilenet.io.view import view
from tilenet.normalize import fill_nodata
from tilenet.patches.augment import build_augment
from tilenet.patches.stats import store_stats
from tilenet.patches.stream import (
    BatchEmitter,
    EpochMixin,
    PatchNormalize,
    PathLike,
    seed_worker_rng,
    shard,
)

__all__ = ["RandomCropDataset"]


class RandomCropDataset(EpochMixin, IterableDataset):
    """Random ``patch`` x ``patch`` crops read lazily from large images; no store needed.

    Crops are drawn uniformly over each image (images chosen in proportion to their area),
    at pyramid ``level``; ``samples_per_epoch`` crops are split across ranks and workers.
    Reads go through :func:`tilenet.io.open_image`, so only the crop is decoded.

    With ``vector`` (a :class:`tilenet.io.vector.VectorLabelPlan`: QuPath annotations or a
    vector file) the masks are the polygons rasterized per crop, and crops are centred on
    points drawn uniformly inside the annotated regions (images in proportion to their
    annotated area); images the polygons miss are left out (with a warning). Pixels outside
    every polygon are 255 or 0 (``vector.outside``), nodata pixels 255 (their pixels are
    :data:`~tilenet.normalize.NODATA_FILL`, as in a patch store).
    """

    def __init__(
        self,
        images: Sequence[PathLike],
        labels: Sequence[PathLike] | None,
        *,
        patch: int,
        samples_per_epoch: int,
        batch_size: int | None = None,
        level: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: AugmentConfig | None = None,
        normalize: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        vector: Any = None,
        bands: Sequence[int] | None = None,
        resolution: ResolutionConfig | None = None,
    ) -> None:
        super().__init__()
        from tilenet.io import open_image

        self.bands = list(bands) if bands else None
        if resolution is not None:
            check_resolution(resolution, level=level)
        self.target = resolution
        self.level = int(level)
        self.images = [Path(p) for p in images]
        self.vector_labels: list[Any] | None = None
        if vector is not None:
            if labels is not None:
                raise InputError("give label images or vector labels, not both")
            self.images, self.vector_labels = _open_vector_labels(
                self.images, vector, lambda p: self._open_at(open_image(p))[0]
            )
            self.class_names = list(vector.class_names)
        self.labels = [Path(p) for p in labels] if labels is not None else None
        if not self.images:
            raise InputError("RandomCropDataset needs at least one image")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise InputError(f"{len(self.labels)} label images for {len(self.images)} images")
        self.patch = int(patch)
        self.samples_per_epoch = int(samples_per_epoch)
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.augment_cfg = augment
        self._init_epoch()
        self.shapes = []
        #: The level each image is read at: ``level``, or 0 of its resampled view.
        self._levels: list[int] = []
        pixels = []
        for i, p in enumerate(self.images):
            img, lv = self._open_at(open_image(p))
            with img:  # the level exists: view checked it
                self.shapes.append(img.levels[lv].shape)
                self._levels.append(lv)
                self.channels = img.channels
                pixels.append(pixel_record(img, lv))
                if "resolution" in img.metadata:  # the file's extent, for the label check
                    img = img.source
            if self.labels is not None:
                with open_image(self.labels[i]) as lab:
                    if lab.shape[:2] != img.shape[:2]:
                        raise InputError(
                            f"{self.labels[i]}: label image is {lab.shape[0]}x{lab.shape[1]} "
                            f"but {p} is {img.shape[0]}x{img.shape[1]}"
                        )
        if normalize and (mean is None or std is None):
            st = store_stats(self.images, bands=self.bands)
            mean, std = st["mean"], st["std"]
        self.mean, self.std = (mean, std) if normalize else (None, None)
        self._open: dict[int, tuple[Any, Any]] = {}
        #: The crops' pixel size where all images agree (what a checkpoint records).
        self.resolution = training_resolution(pixels)

    def _open_at(self, img: Any) -> tuple[Any, int]:
        """``img`` (its ``bands``) at the target pixel size (a resampled view) and the level
        to read."""
        try:
            v = view(img, bands=self.bands, resolution=self.target, level=self.level)
        except BaseException:
            img.close()
            raise
        return v.image, v.level

    def __len__(self) -> int:
        n = len(range(self.rank, self.samples_per_epoch, self.world_size))
        return n if self.batch_size is None else math.ceil(n / self.batch_size)

    def _handles(self, i: int) -> tuple[Any, Any]:
        from tilenet.io import open_image

        if i not in self._open:
            img, _ = self._open_at(open_image(self.images[i]))
            lab = open_image(self.labels[i]) if self.labels is not None else None
            self._open[i] = (img, label_view(lab, img) if lab is not None else None)
        return self._open[i]

    def windows(self, epoch: int | None = None) -> list[tuple[int, Window]]:
        """All crops of an epoch as (image index, window at ``level``), before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, 7])
        if self.vector_labels is not None:
            return self._annotated_windows(rng)
        area = np.array([h * w for h, w in self.shapes], dtype=np.float64)
        which = rng.choice(len(self.images), size=self.samples_per_epoch, p=area / area.sum())
        out = []
        for i in which:
            h, w = self.shapes[i]
            y = int(rng.integers(0, max(h - self.patch, 0) + 1))
            x = int(rng.integers(0, max(w - self.patch, 0) + 1))
            out.append((int(i), Window(y, x, self.patch, self.patch)))
        return out

    def _annotated_windows(self, rng: np.random.Generator) -> list[tuple[int, Window]]:
        """Crops centred on points drawn uniformly inside the polygons."""
        import shapely

        assert self.vector_labels is not None
        areas = [np.abs(shapely.area(lab.geoms)) for lab in self.vector_labels]
        per_image = np.array(
            [
                a.sum() / _pixel_area(lab, lv)
                for a, lab, lv in zip(areas, self.vector_labels, self._levels, strict=True)
            ]
        )
        which = rng.choice(
            len(self.images), size=self.samples_per_epoch, p=per_image / per_image.sum()
        )
        out = []
        for i in which:
            lab = self.vector_labels[i]
            k = int(rng.choice(len(areas[i]), p=areas[i] / areas[i].sum()))
            x, y = _point_in(lab.geoms[k], rng)
            row, col = _to_pixel(lab.pixel_transform(self._levels[i]), x, y)
            h, w = self.shapes[i]
            y0 = int(np.clip(round(row - self.patch / 2), 0, max(h - self.patch, 0)))
            x0 = int(np.clip(round(col - self.patch / 2), 0, max(w - self.patch, 0)))
            out.append((int(i), Window(y0, x0, self.patch, self.patch)))
        return out

    def __iter__(self) -> Iterator[Any]:
        mine = shard(self.windows(), self.rank, self.world_size)
        seed_worker_rng(self.seed, self.epoch, self.rank)
        emit = BatchEmitter(
            self.batch_size,
            PatchNormalize(self.mean, self.std),
            build_augment(self.augment_cfg, channels=self.channels),
            self.stain,
        )
        step = self.batch_size or 16
        for s in range(0, len(mine), step):
            crops, masks = [], np.zeros((len(mine[s : s + step]), self.patch, self.patch), np.uint8)
            for j, (i, win) in enumerate(mine[s : s + step]):
                img, lab = self._handles(i)
                lv = self._levels[i]
                pixels, valid = img.read_masked(win, lv)
                if self.vector_labels is not None:
                    masks[j] = self.vector_labels[i].read(win, lv, fill=IGNORE_INDEX)[..., 0]
                elif lab is not None:
                    masks[j] = lab.read(win, lv)[..., 0]
                if valid is not None:  # no data (nodata, alpha 0, masked): ignored by the loss
                    masks[j][~valid] = IGNORE_INDEX
                crops.append(fill_nodata(pixels, valid))  # as a stored patch holds
            yield from emit.feed(np.stack(crops), masks, np.arange(len(crops)))
        yield from emit.flush()


def _open_vector_labels(
    images: list[Path], vector: Any, opener: Callable[[Path], Any]
) -> tuple[list[Path], list[Any]]:
    """The images the polygons overlap, and their label images (on the grid of the image
    ``opener`` gives: a band selection, a resampled view)."""
    kept, labs = [], []
    for i, p in enumerate(images):
        with opener(p) as img:
            lab = vector.open(i, img)
        if not lab.empty:  # a scene the labels miss: warned when opened
            kept.append(p)
            labs.append(lab)
    if not kept:
        raise InputError(f"no image overlaps the vector labels {vector.files[0]}")
    return kept, labs


def _pixel_area(lab: Any, level: int) -> float:
    """Reference-coordinate area of one pixel of ``level``."""
    return float(lab.pixel_transform(level).pixel_area)


def _to_pixel(gt: Sequence[float], x: float, y: float) -> tuple[float, float]:
    """(row, col) of reference point (x, y) under GDAL-order geotransform ``gt``."""
    col, row = GeoTransform(*gt).pixel_of(x, y)
    return (row, col)


def _point_in(geom: Any, rng: np.random.Generator) -> tuple[float, float]:
    """A point drawn uniformly inside ``geom`` (rejection in its bounds; a point on its
    surface when that keeps missing, e.g. for a thin sliver)."""
    import shapely

    x0, y0, x1, y1 = geom.bounds
    for _ in range(8):
        xs = rng.uniform(x0, x1, 64)
        ys = rng.uniform(y0, y1, 64)
        hit = np.flatnonzero(shapely.contains_xy(geom, xs, ys))
        if len(hit):
            return float(xs[hit[0]]), float(ys[hit[0]])
    pt = shapely.point_on_surface(geom)
    return float(pt.x), float(pt.y)
