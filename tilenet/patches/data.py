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

The datasets live in :mod:`tilenet.patches.storedata` and :mod:`tilenet.patches.crops`,
statistics in :mod:`tilenet.patches.stats`, what they share in :mod:`tilenet.patches.stream`;
this module builds the loader and re-exports them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from tilenet.config import DataConfig, ResolutionConfig
from tilenet.errors import InputError
from tilenet.patches.crops import RandomCropDataset
from tilenet.patches.stats import repeat_factors, store_stats
from tilenet.patches.storedata import PatchStoreDataset
from tilenet.patches.stream import model_input, normalize_batch

__all__ = [
    "PatchStoreDataset",
    "RandomCropDataset",
    "build_loader",
    "model_input",
    "normalize_batch",
    "repeat_factors",
    "store_stats",
]


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
    order, unaugmented; with ``stain`` both are stain-normalised (before augmentation).
    The synthetic dataset of ``synth_dir`` is made into stores before,
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
        ds = _crop_dataset(cfg, cfg.images, seed, rank, world_size, resolution)
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
    if cfg.stain:
        ds.stain = _stain(cfg)
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        # set_epoch reaches persistent workers through shared memory (see EpochMixin)
        persistent_workers=cfg.num_workers > 0,
    )


def _stain(cfg: DataConfig) -> Any:
    """``data.stain``'s normaliser: ``data.stain_method`` fitted to the reference image
    (each patch is then normalised with its own stain estimate)."""
    from tilenet.io import open_image
    from tilenet.stain import make_stain
    from tilenet.tissue import overview

    assert cfg.stain
    with open_image(cfg.stain) as ref:
        return make_stain(cfg.stain_method, overview(ref))


def _crop_dataset(
    cfg: DataConfig,
    paths: str,
    seed: int,
    rank: int,
    world_size: int,
    resolution: ResolutionConfig | None,
) -> RandomCropDataset:
    """Random crops of the images ``paths`` (``cfg.images``) with their label images or
    vector labels."""
    from tilenet.io.paths import match_labels, resolve_images

    images = resolve_images([paths])
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
    return RandomCropDataset(
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
