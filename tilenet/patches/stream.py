"""What both training datasets share: worker sharding, the epoch, seeding, batching.

Helpers of :mod:`tilenet.patches.storedata` and :mod:`tilenet.patches.crops`: the share of
a (rank, DataLoader worker), an epoch counter that reaches persistent workers, the per-worker
augmentation seed, and the emitter that turns patches into normalised, augmented batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from tilenet.io.location import location
from tilenet.normalize import Normalizer, normalize_

__all__ = [
    "Batch",
    "BatchEmitter",
    "EpochMixin",
    "PatchNormalize",
    "PathLike",
    "as_paths",
    "model_input",
    "normalize_batch",
    "seed_worker_rng",
    "shard",
    "worker_id",
]

PathLike = str | os.PathLike[str]
Batch = tuple[torch.Tensor, torch.Tensor]


def as_paths(paths: PathLike | Sequence[PathLike]) -> list[Any]:
    """Paths as ``Path``; URLs (patch stores or images in object storage) stay strings."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    return [location(p).local or str(p) for p in paths]


def shard(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """This (rank, DataLoader worker)'s share of ``items``: disjoint, together complete.

    Rank ``r`` owns every ``world_size``-th item from ``r``; its workers deal those out again.
    """
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return items[rank::world_size][wid::nw]


def worker_id(rank: int) -> int:
    info = get_worker_info()
    return rank * (info.num_workers if info else 1) + (info.id if info else 0)


def seed_worker_rng(seed: int, epoch: int, rank: int) -> None:
    """In a DataLoader worker, reseed torch's RNG (augmentation) from (seed, epoch, worker).

    Persistent workers keep their RNG from epoch to epoch, so without this an epoch's
    augmentation would depend on every epoch before it and a resumed run could not replay
    it. In the main process (``num_workers=0``) the RNG belongs to the trainer: untouched.
    """
    if get_worker_info() is not None:
        ss = np.random.SeedSequence([seed, epoch, worker_id(rank), 2])
        torch.manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))


class EpochMixin:
    """An epoch counter shared with DataLoader worker processes.

    It lives in shared memory created before the workers start, so :meth:`set_epoch` in the
    main process reaches ``persistent_workers=True`` workers too (a plain attribute would
    stay at its value from when the workers were started).
    """

    _epoch_value: Any
    #: A stain normaliser (:mod:`tilenet.stain`) for uint8 RGB batches, applied before
    #: augmentation (``data.stain``); None: off.
    stain: Any = None

    def _init_epoch(self) -> None:
        import multiprocessing as mp

        self._epoch_value = mp.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return int(self._epoch_value.value)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same order on every rank: call it on all of them)."""
        self._epoch_value.value = int(epoch)


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


def model_input(x: torch.Tensor, dataset: Any) -> torch.Tensor:
    """A loader batch as the model takes it, normalised where it now is (on the device).

    A ``output="uint8"`` dataset yields raw uint8 batches: they are normalised with the
    dataset's own mean and std (as its float batches would be: :func:`normalize_batch`), or
    made float32 where it does not normalise. A float batch is returned as it is.
    """
    if x.dtype != torch.uint8:
        return x
    if getattr(dataset, "normalize", False) and getattr(dataset, "mean", None) is not None:
        return normalize_batch(x, dataset.mean, dataset.std)
    return x.to(torch.float32)


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


class PatchNormalize:
    """uint8 (B, C, P, P) tensor -> float32 (B, C, P, P), (x - mean) / std (or raw values)."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        self.norm = None if mean is None or std is None else Normalizer(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = _empty(tuple(x.shape), torch.float32)
        out.copy_(x)  # one pass: uint8 (any strides) -> contiguous float32
        return out if self.norm is None else self.norm(out)


class BatchEmitter:
    """Turns buffers (images (n,P,P,C), masks (n,P,P), order) into samples or batches.

    A batch is gathered straight from the buffer in the shuffled order (one copy), so
    shuffling costs nothing extra; batches may span buffers.
    """

    def __init__(
        self, batch_size: int | None, norm: PatchNormalize | None, augment: Any, stain: Any = None
    ) -> None:
        self.batch_size = batch_size
        self.norm = norm  # None: raw uint8 images and uint8 masks
        self.augment = augment
        self.stain = stain
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n = 0

    def _finish(self, images: np.ndarray, masks: np.ndarray) -> Batch:
        # NHWC -> NCHW is a view (channels-last strides); copied only where needed.
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        m = torch.from_numpy(masks)
        if self.stain is not None:
            x = self.stain(x.contiguous())
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
        if self.norm is None and self.augment is None and self.stain is None:
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
