"""Stream patches from patch stores: whole chunks, shuffled through a buffer, sharded across
DataLoader workers and DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
from torch.utils.data import IterableDataset

from tilenet.config import AugmentConfig
from tilenet.errors import InputError
from tilenet.io.resolution import training_resolution
from tilenet.patches.augment import build_augment
from tilenet.patches.patchstore import IMAGES, LABELS, open_store
from tilenet.patches.stats import repeat_factors, store_stats
from tilenet.patches.stream import (
    BatchEmitter,
    EpochMixin,
    PatchNormalize,
    PathLike,
    as_paths,
    seed_worker_rng,
    shard,
    worker_id,
)

__all__ = ["PatchStoreDataset"]


class PatchStoreDataset(EpochMixin, IterableDataset):
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
        self.paths = as_paths(stores)
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
        mine = shard(self._order(), self.rank, self.world_size)
        rng = np.random.default_rng([self.seed, self.epoch, worker_id(self.rank), 1])
        seed_worker_rng(self.seed, self.epoch, self.rank)
        emit = BatchEmitter(
            self.batch_size,
            self._norm(),
            build_augment(self.augment_cfg, channels=self.channels),
            self.stain,
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

    def _norm(self) -> PatchNormalize | None:
        if self.output == "uint8":
            return None
        return PatchNormalize(self.mean, self.std) if self.normalize else PatchNormalize(None, None)

    def _balanced(self, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices with each patch repeated by its stochastically rounded repeat factor."""
        r = self.class_repeat
        factors = np.ones(len(masks))
        for c in np.flatnonzero(r > 1):
            has = (masks == c).reshape(len(masks), -1).any(1)
            factors = np.where(has, np.maximum(factors, r[c]), factors)
        reps = np.floor(factors + rng.random(len(masks))).astype(np.int64)
        return np.repeat(np.arange(len(masks)), reps)
