"""Streaming training data: patch stores (fast) or random crops of large images (no store).

:class:`PatchStoreDataset` reads whole zarr chunks (``chunk_patches`` contiguous patches, one
decode each), shuffles them through a buffer and shards the chunks across DataLoader
workers and DDP ranks, so each patch is delivered exactly once per epoch across all of them
(unless ``class_balance`` repeats rare-class patches on purpose). With ``batch_size`` it
yields whole batches, which is what makes thousands of patches per second possible in Python:
normalisation and flips run once per batch, not once per patch.

Yields, in both datasets:

* ``batch_size=None``: ``(image, mask)`` = float32 (C, P, P), int64 (P, P);
* ``batch_size=B``: ``(images, masks)`` = float32 (B, C, P, P), int64 (B, P, P); the last
  batch of a worker may be smaller. Use ``DataLoader(ds, batch_size=None)``.

Masks are 0 where no labels exist; pixels that augmentation brings in from outside a
patch, and the image's nodata pixels, are 255 (the training ``ignore_index``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tilenet.config import AugmentConfig, DataConfig, ResolutionConfig
from tilenet.errors import InputError
from tilenet.geometry import Window, iter_bands
from tilenet.io.base import IGNORE_INDEX, nodata_mask
from tilenet.io.location import location
from tilenet.io.resolution import (
    at_resolution,
    check_resolution,
    label_view,
    pixel_record,
    training_resolution,
)
from tilenet.normalize import Normalizer, channel_stats, normalize_
from tilenet.patches.augment import build_augment
from tilenet.patches.patchstore import IMAGES, LABELS, open_store, read_attrs

__all__ = [
    "PatchStoreDataset",
    "RandomCropDataset",
    "build_loader",
    "normalize_batch",
    "repeat_factors",
    "store_stats",
]

PathLike = str | os.PathLike[str]
Batch = tuple[torch.Tensor, torch.Tensor]


def _as_list(paths: PathLike | Sequence[PathLike]) -> list[Any]:
    """Paths as ``Path``; URLs (patch stores or images in object storage) stay strings."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    return [location(p).local or str(p) for p in paths]


def _store_attrs(path: Any) -> dict[str, Any] | None:
    """A patch store's attributes (``path`` from :func:`_as_list`: a URL is a str), or None."""
    if isinstance(path, Path) and not (path / "zarr.json").is_file():
        return None  # an image or a directory of images: no zarr open attempted
    return read_attrs(path)


def _shard(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """This (rank, DataLoader worker)'s share of ``items``: disjoint, together complete.

    Rank ``r`` owns every ``world_size``-th item from ``r``; its workers deal those out again.
    """
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return items[rank::world_size][wid::nw]


def _worker_id(rank: int) -> int:
    info = get_worker_info()
    return rank * (info.num_workers if info else 1) + (info.id if info else 0)


def _seed_worker_rng(seed: int, epoch: int, rank: int) -> None:
    """In a DataLoader worker, reseed torch's RNG (augmentation) from (seed, epoch, worker).

    Persistent workers keep their RNG from epoch to epoch, so without this an epoch's
    augmentation would depend on every epoch before it and a resumed run could not replay
    it. In the main process (``num_workers=0``) the RNG belongs to the trainer: untouched.
    """
    if get_worker_info() is not None:
        ss = np.random.SeedSequence([seed, epoch, _worker_id(rank), 2])
        torch.manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))


class _EpochMixin:
    """An epoch counter shared with DataLoader worker processes.

    It lives in shared memory created before the workers start, so :meth:`set_epoch` in the
    main process reaches ``persistent_workers=True`` workers too (a plain attribute would
    stay at its value from when the workers were started).
    """

    _epoch_value: Any

    def _init_epoch(self) -> None:
        import multiprocessing as mp

        self._epoch_value = mp.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return int(self._epoch_value.value)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same order on every rank: call it on all of them)."""
        self._epoch_value.value = int(epoch)


# -- statistics --------------------------------------------------------------------------
def store_stats(
    stores: PathLike | Sequence[PathLike], *, bands: Sequence[int] | None = None
) -> dict[str, Any]:
    """Per-channel mean/std, class names and channel count of patch stores or image dirs.

    For stores these come from the attributes the tiler wrote (combined, weighted by pixel
    count). For images (files or directories) they are computed from a low-resolution
    level, so this stays cheap for gigapixel images, over ``bands`` (1-based; all when None)
    and leaving out nodata pixels.
    """
    paths = _as_list(stores)
    if not paths:
        raise InputError("no patch stores or images given")
    found = [_store_attrs(p) for p in paths]  # read once: a URL's costs a request
    if all(at is not None for at in found):
        s, ss, n, chans = None, None, 0.0, None
        names: list[str] = []
        for p, at in zip(paths, found, strict=True):
            assert at is not None
            if chans is not None and at["channels"] != chans:
                raise InputError(f"{p}: has {at['channels']} channels, other stores {chans}")
            chans = at["channels"]
            npix = sum(src["npix"] for src in at["sources"]) or 1.0
            mean, std = np.asarray(at["mean"]), np.asarray(at["std"])
            s = (s if s is not None else 0) + mean * npix
            ss = (ss if ss is not None else 0) + (std**2 + mean**2) * npix
            n += npix
            names = names or list(at.get("class_names") or [])
        assert s is not None and ss is not None and chans is not None
        mean, std = channel_stats(s, ss, n)
        return {"mean": mean.tolist(), "std": std.tolist(), "class_names": names, "channels": chans}
    return _image_stats(paths, bands=bands)


def _image_stats(
    paths: list[Path], *, max_side: int = 1024, bands: Sequence[int] | None = None
) -> dict[str, Any]:
    from tilenet.io import open_image
    from tilenet.io.paths import resolve_images

    s = ss = None
    n = 0
    chans = None
    for path in resolve_images([str(p) for p in paths]):
        with open_image(path).select_bands(bands) as img:
            lv = next(
                (i for i, v in enumerate(img.levels) if max(v.shape) <= max_side),
                len(img.levels) - 1,
            )
            h, w = img.levels[lv].shape
            step = max(1, math.ceil(max(h, w) / max_side))
            band = step * max(1, 512 // step)
            for win in iter_bands((h, w), band):
                px = img.read(win, lv)[::step, ::step]
                none = nodata_mask(px, img.nodata)
                px = px[~none] if none is not None else px
                px = px.reshape(-1, img.channels).astype(np.float64)
                s = px.sum(0) + (s if s is not None else 0)
                ss = (px * px).sum(0) + (ss if ss is not None else 0)
                n += px.shape[0]
            chans = img.channels
    assert s is not None and ss is not None
    mean, std = channel_stats(s, ss, n)
    return {"mean": mean.tolist(), "std": std.tolist(), "class_names": [], "channels": chans}


def repeat_factors(
    class_patches: Sequence[int] | np.ndarray, total: int, *, threshold: float = 0.3
) -> np.ndarray:
    """Repeat factor per class: ``max(1, sqrt(threshold / f_c))``, f_c = share of patches with c.

    Repeat-factor sampling (Gupta et al., LVIS 2019): a patch is repeated by the largest
    factor of the classes it contains, so rare classes are seen more often while common
    ones keep their rate.

    >>> repeat_factors([100, 100, 1], 100).round(2).tolist()
    [1.0, 1.0, 5.48]
    """
    f = np.asarray(class_patches, dtype=np.float64) / max(total, 1)
    with np.errstate(divide="ignore"):
        r = np.sqrt(threshold / np.where(f > 0, f, np.inf))
    return np.maximum(1.0, r)


# -- normalisation ------------------------------------------------------------------------
def normalize_batch(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a (B, C, H, W) batch, as a new float32 tensor.

    For ``output="uint8"`` datasets: move the uint8 batch to the GPU first, then normalise
    there (4x less to copy, and the CPU workers are spared the float conversion). The
    arithmetic is :func:`tilenet.normalize.normalize_`'s, as for float batches and inference.
    """
    return normalize_(x.to(torch.float32, copy=True), mean, std)


def _torch_dtype(a: np.ndarray) -> torch.dtype:
    return torch.from_numpy(a[:0]).dtype


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor; inside a DataLoader worker it is made in shared memory.

    Sending a tensor that is already shared to the main process costs no copy (as in
    torch's default_collate); otherwise it is copied into shared memory when sent.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(*shape)


class _Normalize:
    """uint8 (B, C, P, P) tensor -> float32 (B, C, P, P), (x - mean) / std (or raw values)."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        self.norm = None if mean is None or std is None else Normalizer(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = _empty(tuple(x.shape), torch.float32)
        out.copy_(x)  # one pass: uint8 (any strides) -> contiguous float32
        return out if self.norm is None else self.norm(out)


class _Emitter:
    """Turns buffers (images (n,P,P,C), masks (n,P,P), order) into samples or batches.

    A batch is gathered straight from the buffer in the shuffled order (one copy), so
    shuffling costs nothing extra; batches may span buffers.
    """

    def __init__(self, batch_size: int | None, norm: _Normalize | None, augment: Any) -> None:
        self.batch_size = batch_size
        self.norm = norm  # None: raw uint8 images and uint8 masks
        self.augment = augment
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n = 0

    def _finish(self, images: np.ndarray, masks: np.ndarray) -> Batch:
        # NHWC -> NCHW is a view (channels-last strides); copied only where needed.
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        m = torch.from_numpy(masks)
        if self.augment is not None:
            x, m = self.augment(x.contiguous(), m)
        if self.norm is None:
            return x, m
        m64 = _empty(tuple(m.shape), torch.int64)
        m64.copy_(m)
        return self.norm(x), m64

    def feed(self, images: np.ndarray, masks: np.ndarray, order: np.ndarray) -> Iterator[Any]:
        if self.batch_size is None:
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                x, m = self._finish(images[idx], masks[idx])
                yield from zip(x, m, strict=True)
            return
        self._pending.append((images, masks, order))
        self._n += len(order)
        while self._n >= self.batch_size:
            yield self._take(self.batch_size)

    def _pop(self, k: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """Yield ``(images, masks, indices, offset)`` runs from the pending chunks, ``k`` in all."""
        got = 0
        while got < k:
            a, b, idx = self._pending[0]
            t = min(k - got, len(idx))
            if t == len(idx):
                self._pending.pop(0)
            else:
                self._pending[0] = (a, b, idx[t:])
            yield a, b, idx[:t], got
            got += t
        self._n -= k

    def _take(self, k: int) -> Batch:
        if self.norm is None and self.augment is None:
            return self._take_raw(k)
        runs = [(a[idx], b[idx]) for a, b, idx, _ in self._pop(k)]
        if len(runs) == 1:
            return self._finish(*runs[0])
        return self._finish(
            np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])
        )

    def _take_raw(self, k: int) -> Batch:
        """Gather ``k`` raw patches straight into the output tensors (shared in a worker)."""
        a0, b0, _ = self._pending[0]
        x = _empty((k, *a0.shape[1:]), torch.uint8 if a0.dtype == np.uint8 else _torch_dtype(a0))
        m = _empty((k, *b0.shape[1:]), torch.uint8)
        xn, mn = x.numpy(), m.numpy()
        for a, b, idx, got in self._pop(k):
            np.take(a, idx, axis=0, out=xn[got : got + len(idx)])
            np.take(b, idx, axis=0, out=mn[got : got + len(idx)])
        return x.permute(0, 3, 1, 2), m

    def flush(self) -> Iterator[Batch]:
        if self.batch_size is not None and self._n:
            yield self._take(self._n)


# -- patch stores ------------------------------------------------------------------------
class PatchStoreDataset(_EpochMixin, IterableDataset):
    """Stream patches from one or more stores written by :func:`tilenet.patches.tiler.tile_images`.

    Each epoch the chunks of all stores are shuffled with ``(seed, epoch)`` (the same order
    on every rank and worker) and dealt round-robin to the ``world_size x num_workers``
    consumers, so every patch is delivered exactly once per epoch. Within a consumer, about
    ``buffer`` patches (whole chunks) are loaded, permuted and emitted. Call
    :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); ranks may receive
    up to one chunk more or less than each other.

    ``output="uint8"`` yields raw uint8 images (B, C, P, P) (channels-last strides) and uint8
    masks instead, for normalising on the GPU with :func:`normalize_batch` and
    ``ds.mean``/``ds.std``: a quarter of the bytes to move and no float work in the workers.

    ``class_balance`` repeats each patch by the largest repeat factor
    (:func:`repeat_factors`) of the classes it contains, stochastically rounded: rare
    classes are oversampled and exactly-once no longer holds.
    """

    def __init__(
        self,
        stores: PathLike | Sequence[PathLike],
        *,
        batch_size: int | None = None,
        shuffle: bool = True,
        buffer: int = 1024,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: AugmentConfig | None = None,
        normalize: bool = True,
        class_balance: bool = False,
        output: Literal["float", "uint8"] = "float",
    ) -> None:
        super().__init__()
        if output not in ("float", "uint8"):
            raise InputError(f"output must be 'float' or 'uint8', got {output!r}")
        self.output = output
        self.paths = _as_list(stores)
        if not self.paths:
            raise InputError("PatchStoreDataset needs at least one patch store")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch_size must be positive or None, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.buffer = max(1, int(buffer))
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.augment_cfg = augment
        self.class_balance = class_balance
        self._init_epoch()
        self.units: list[tuple[int, int, int]] = []  # (store, lo, hi)
        self.counts: list[int] = []
        self.has_labels: list[bool] = []
        self.patch = None
        class_patches = np.zeros(256)
        pixels: list[dict[str, Any]] = []
        for k, path in enumerate(self.paths):
            at = dict(open_store(path).attrs)
            pixels += list(at.get("sources") or [])
            if self.patch is not None and at["patch"] != self.patch:
                raise InputError(f"{path}: patch {at['patch']} differs from {self.patch}")
            self.patch = at["patch"]
            n, c = int(at["count"]), int(at["chunk_patches"])
            self.counts.append(n)
            self.has_labels.append(bool(at.get("has_labels")))
            self.units += [(k, lo, min(lo + c, n)) for lo in range(0, n, c)]
            cp = at.get("class_patches") or []
            class_patches[: len(cp)] += cp
        stats = store_stats(self.paths)
        self.channels = int(stats["channels"])
        self.class_names = stats["class_names"]
        self.mean, self.std = stats["mean"], stats["std"]
        self.normalize = normalize
        self.class_repeat = repeat_factors(class_patches, sum(self.counts))
        self._groups: list[Any] | None = None
        #: The patches' pixel size where all sources agree (what a checkpoint records).
        self.resolution = training_resolution(pixels)

    def __len__(self) -> int:
        """Patches (or batches) this rank delivers per epoch, summed over its workers.

        Exact for patches; for batches an upper bound (workers may end on a partial batch).
        """
        n = sum(hi - lo for _, lo, hi in self._order()[self.rank :: self.world_size])
        return n if self.batch_size is None else math.ceil(n / self.batch_size)

    @property
    def num_patches(self) -> int:
        return sum(self.counts)

    def _order(self) -> list[tuple[int, int, int]]:
        units = list(self.units)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in perm]
        return units

    def _read(self, unit: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        if self._groups is None:  # opened lazily, once per worker process
            self._groups = []
            for p, labelled in zip(self.paths, self.has_labels, strict=True):
                g = open_store(p)  # a directory, or a URL: zarr's FsspecStore
                self._groups.append((g[IMAGES], g[LABELS] if labelled else None))
        k, lo, hi = unit
        arr_images, arr_labels = self._groups[k]
        images = arr_images[lo:hi]
        if arr_labels is not None:
            masks = arr_labels[lo:hi]
        else:
            masks = np.zeros(images.shape[:3], dtype=np.uint8)
        return images, masks

    def __iter__(self) -> Iterator[Any]:
        mine = _shard(self._order(), self.rank, self.world_size)
        rng = np.random.default_rng([self.seed, self.epoch, _worker_id(self.rank), 1])
        _seed_worker_rng(self.seed, self.epoch, self.rank)
        emit = _Emitter(
            self.batch_size,
            self._norm(),
            build_augment(self.augment_cfg, channels=self.channels),
        )
        i = 0
        while i < len(mine):
            imgs, msks, got = [], [], 0
            while i < len(mine) and (got == 0 or got < self.buffer):
                a, b = self._read(mine[i])
                imgs.append(a)
                msks.append(b)
                got += len(a)
                i += 1
            images = imgs[0] if len(imgs) == 1 else np.concatenate(imgs)
            masks = msks[0] if len(msks) == 1 else np.concatenate(msks)
            order = np.arange(len(images))
            if self.class_balance:
                order = self._balanced(masks, rng)
            if self.shuffle:
                order = rng.permutation(order)
            yield from emit.feed(images, masks, order)
        yield from emit.flush()

    def _norm(self) -> _Normalize | None:
        if self.output == "uint8":
            return None
        return _Normalize(self.mean, self.std) if self.normalize else _Normalize(None, None)

    def _balanced(self, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices with each patch repeated by its stochastically rounded repeat factor."""
        r = self.class_repeat
        factors = np.ones(len(masks))
        for c in np.flatnonzero(r > 1):
            has = (masks == c).reshape(len(masks), -1).any(1)
            factors = np.where(has, np.maximum(factors, r[c]), factors)
        reps = np.floor(factors + rng.random(len(masks))).astype(np.int64)
        return np.repeat(np.arange(len(masks)), reps)


# -- random crops from large images ------------------------------------------------------
class RandomCropDataset(_EpochMixin, IterableDataset):
    """Random ``patch`` x ``patch`` crops read lazily from large images; no store needed.

    Crops are drawn uniformly over each image (images chosen in proportion to their area),
    at pyramid ``level``; ``samples_per_epoch`` crops are split across ranks and workers.
    Reads go through :func:`tilenet.io.open_image`, so only the crop is decoded.

    With ``vector`` (a :class:`tilenet.io.vector.VectorLabelPlan`: QuPath annotations or a
    vector file) the masks are the polygons rasterized per crop, and crops are centred on
    points drawn uniformly inside the annotated regions (images in proportion to their
    annotated area); images the polygons miss are left out (with a warning). Pixels outside
    every polygon are 255 or 0 (``vector.outside``), nodata pixels 255.
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
            with img:
                if lv >= len(img.levels):
                    raise InputError(f"{p}: has no pyramid level {lv}")
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
        img = img.select_bands(self.bands)
        if self.target is None:
            return img, self.level
        view, res = at_resolution(img, self.target, level=self.level)
        return view, self.level if res is None else 0

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
        mine = _shard(self.windows(), self.rank, self.world_size)
        _seed_worker_rng(self.seed, self.epoch, self.rank)
        emit = _Emitter(
            self.batch_size,
            _Normalize(self.mean, self.std),
            build_augment(self.augment_cfg, channels=self.channels),
        )
        step = self.batch_size or 16
        for s in range(0, len(mine), step):
            crops, masks = [], np.zeros((len(mine[s : s + step]), self.patch, self.patch), np.uint8)
            for j, (i, win) in enumerate(mine[s : s + step]):
                img, lab = self._handles(i)
                lv = self._levels[i]
                crops.append(img.read(win, lv))
                if self.vector_labels is not None:
                    masks[j] = self.vector_labels[i].read(win, lv, fill=IGNORE_INDEX)[..., 0]
                elif lab is not None:
                    masks[j] = lab.read(win, lv)[..., 0]
                none = nodata_mask(crops[-1], img.nodata)
                if none is not None:  # ignored by the loss
                    masks[j][none] = IGNORE_INDEX
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
    _, a, b, _, d, e = lab.pixel_transform(level)
    return abs(a * e - b * d)


def _to_pixel(gt: Sequence[float], x: float, y: float) -> tuple[float, float]:
    """(row, col) of reference point (x, y) under GDAL-order geotransform ``gt``."""
    x0, a, b, y0, d, e = gt
    det = a * e - b * d
    dx, dy = x - x0, y - y0
    return ((a * dy - d * dx) / det, (e * dx - b * dy) / det)


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


# -- loaders -----------------------------------------------------------------------------
def build_loader(
    data_cfg: DataConfig,
    *,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    resolution: ResolutionConfig | None = None,
) -> DataLoader:
    """A DataLoader of batches ``(float32 (B, C, P, P), int64 (B, P, P))`` for ``data_cfg``.

    Train uses ``stores`` (or ``images``/``labels`` via random crops) with shuffling,
    augmentation and optional class balance; validation uses ``val_stores`` in a fixed
    order, unaugmented. The synthetic dataset of ``synth_dir`` is made into stores before,
    by :func:`tilenet.train.prepare_demo_data` (training does it). The dataset is
    ``loader.dataset``: call ``loader.dataset.set_epoch(e)`` each epoch. Workers are
    persistent (started once, not every epoch). ``resolution`` is the pixel size crops
    from ``images`` are read at (:mod:`tilenet.io.resolution`); stores have theirs already.
    """
    cfg = data_cfg
    if not isinstance(cfg, DataConfig):  # an omegaconf section: plain dataclasses pickle to workers
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(cfg)
    seed = int(seed) + int(cfg.seed)
    stores = list(cfg.stores if train else cfg.val_stores)
    ds: IterableDataset
    if stores and cfg.bands:
        raise InputError(
            "data.bands picks the bands of data.images; a patch store holds the bands it was "
            "tiled with (tilenet tile --bands)"
        )
    if stores:
        ds = PatchStoreDataset(
            stores,
            batch_size=cfg.batch_size,
            shuffle=train,
            buffer=cfg.shuffle_buffer,
            seed=seed,
            rank=rank,
            world_size=world_size,
            augment=cfg.augment if train else None,
            normalize=cfg.normalize,
            class_balance=cfg.class_balance and train,
            output=cfg.output,
        )
        if ds.patch != cfg.patch:
            raise InputError(
                f"{stores[0]}: store patches are {ds.patch} px but data.patch is {cfg.patch}"
            )
    elif cfg.images and train:
        from tilenet.io.paths import match_labels, resolve_images

        images = resolve_images([cfg.images])
        labels = match_labels(images, cfg.labels) if cfg.labels else None
        vector = None
        if cfg.annotations or cfg.vector_labels:
            from tilenet.io.vector import plan_vector_labels

            if labels is not None:
                raise InputError("set data.labels or data.annotations/vector_labels, not both")
            vector = plan_vector_labels(
                images,
                annotations=cfg.annotations or None,
                vector_labels=cfg.vector_labels or None,
                label_field=cfg.label_field,
                outside=cfg.outside,
                class_map=dict(cfg.class_map),
            )
        ds = RandomCropDataset(
            images,
            labels,
            patch=cfg.patch,
            samples_per_epoch=cfg.samples_per_epoch,
            batch_size=cfg.batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            augment=cfg.augment,
            normalize=cfg.normalize,
            vector=vector,
            bands=cfg.bands,
            resolution=resolution,
        )
    else:
        what = "data.stores or data.images" if train else "data.val_stores"
        hint = (
            " (data.synth_dir is made into stores by tilenet.train.prepare_demo_data first)"
            if cfg.synth_dir
            else ""
        )
        raise InputError(
            f"no {'training' if train else 'validation'} data configured; set {what}{hint}"
        )
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        # set_epoch reaches persistent workers through shared memory (see _EpochMixin)
        persistent_workers=cfg.num_workers > 0,
    )
