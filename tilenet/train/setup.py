"""Everything a training run needs, built once from the config: :func:`build` returns a :class:`Run`.

Data (the demo dataset made on first use, the training and validation loaders, held-out image
pairs), the model (registry, encoder and start weights, normalisation), its
:class:`~tilenet.models.ModelSpec`, the optimiser (one parameter group, or the rest and the
encoder), the schedule, the GradScaler, the loss and the run directory. Nothing here trains.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tilenet.config import DataConfig
from tilenet.errors import ConfigError
from tilenet.train.distributed import Dist, broadcast

if TYPE_CHECKING:
    from tilenet.models import ModelSpec

__all__ = [
    "Run",
    "build",
    "prepare_demo_data",
    "seed_everything",
    "training_bands",
]

_DEMO_OVERLAP = 0  # demo patches tile the images edge to edge; flips/rot90 add variety

_BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
)


@dataclass
class Run:
    """A training run as built from its config: what the loop, validation and checkpoints use.

    ``cfg`` is the resolved config (with the demo data filled in); ``fetched`` the published
    encoder weights' name, mean and std (None: none fetched); ``encoder_bns`` the encoder's
    BatchNorms when it starts frozen (``train.freeze_encoder_steps``), else empty.
    """

    cfg: DictConfig
    dist: Dist
    device: torch.device
    run_dir: Path
    loader: Any
    val_loader: Any
    held_out: list[tuple[Path | str, Path]]
    resolution: Any
    train_bands: tuple[int, ...] | None
    class_names: list[str]
    model: torch.nn.Module
    spec: ModelSpec
    fetched: dict[str, Any] | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    encoder_bns: list[torch.nn.Module]

    @property
    def tc(self) -> Any:
        """The ``train`` section."""
        return self.cfg.train


@dataclass
class _Data:
    """The data half of a run: loaders, statistics, names."""

    loader: Any
    val_loader: Any
    held_out: list[tuple[Path | str, Path]]
    resolution: Any
    train_bands: tuple[int, ...] | None
    channels: int
    mean: list[float]
    std: list[float]
    class_names: list[str]


def build(cfg: DictConfig, d: Dist, device: torch.device) -> Run:
    """Build the run ``cfg`` describes on this rank (collective under DDP: every rank calls it).

    Seeds every RNG with ``train.seed`` just before the model is made, so the initial weights
    depend on the seed alone.
    """
    from tilenet.train.losses import build_loss

    tc = cfg.train
    if tc.resume is True and not tc.out_dir:
        raise ConfigError(
            "train.resume=true continues the run in train.out_dir; set train.out_dir=DIR "
            "or give the checkpoint: train.resume=DIR/last.pt"
        )
    data = _build_data(cfg, d)
    seed_everything(int(tc.seed))
    _set_determinism(bool(tc.deterministic), device)
    model, spec, fetched = _build_model(cfg, data, device)
    optimizer = _build_optimizer(_param_groups(model, tc), tc)
    freeze = int(tc.freeze_encoder_steps)
    encoder_bns: list[torch.nn.Module] = [
        m
        for m in getattr(model, "encoder", torch.nn.Identity()).modules()
        if freeze and isinstance(m, _BATCH_NORMS)
    ]
    scheduler = _build_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    loss_fn = build_loss(
        tc.loss,
        num_classes=int(cfg.model.num_classes),
        class_weights=list(tc.class_weights) or None,
        ignore_index=int(tc.ignore_index),
    ).to(device)
    run_dir = Path(broadcast(str(_new_run_dir(tc.out_dir)) if d.main else None, d))
    return Run(
        cfg=cfg,
        dist=d,
        device=device,
        run_dir=run_dir,
        loader=data.loader,
        val_loader=data.val_loader,
        held_out=data.held_out,
        resolution=data.resolution,
        train_bands=data.train_bands,
        class_names=data.class_names,
        model=model,
        spec=spec,
        fetched=fetched,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loss_fn=loss_fn,
        encoder_bns=encoder_bns,
    )


# -- data -------------------------------------------------------------------------------------
def _build_data(cfg: DictConfig, d: Dist) -> _Data:
    """The loaders (rank 0 makes the demo data; the others wait for it), checked against the
    model section: channels, class names."""
    from tilenet.patches.data import build_loader

    tc, mc = cfg.train, cfg.model
    if cfg.data.synth_dir and not cfg.data.stores and not cfg.data.images:
        prepared = prepare_demo_data(cfg.data) if d.main else None
        prepared = broadcast(prepared, d)
        assert prepared is not None
        cfg.data.stores = prepared["stores"]
        if not cfg.data.val_stores:
            cfg.data.val_stores = prepared["val_stores"]
        if not tc.val_images:
            tc.val_images = prepared["val_images"]
            tc.val_labels = prepared["val_labels"]
    held_out = _held_out_pairs(list(tc.val_images), list(tc.val_labels))
    data_cfg: DataConfig = OmegaConf.to_object(cfg.data)  # type: ignore[assignment]
    res_cfg: Any = OmegaConf.to_object(cfg.resolution) if "resolution" in cfg else None
    loader = build_loader(
        data_cfg, train=True, rank=d.rank, world_size=d.world, seed=int(tc.seed),
        resolution=res_cfg,
    )  # fmt: skip
    ds: Any = loader.dataset
    train_bands = training_bands(data_cfg)
    channels = int(ds.channels)
    if channels != int(mc.in_channels):
        raise ConfigError(
            f"model.in_channels={mc.in_channels} but the training data has {channels} "
            f"channels; set model.in_channels={channels}"
        )
    mean = list(ds.mean) if getattr(ds, "mean", None) is not None else [0.0] * channels
    std = list(ds.std) if getattr(ds, "std", None) is not None else [1.0] * channels
    k = int(mc.num_classes)
    names = list(cfg.data.class_names) or list(getattr(ds, "class_names", None) or [])
    if names and len(names) != k:
        raise ConfigError(
            f"model.num_classes={k} but the data names {len(names)} classes {names}; "
            f"set model.num_classes={len(names)}"
        )
    names = names or [f"class_{i}" for i in range(k)]
    val_loader = None
    if data_cfg.val_stores:
        val_loader = build_loader(
            data_cfg, train=False, rank=d.rank, world_size=d.world, seed=int(tc.seed)
        )
        # Validation patches are normalised with the training statistics, as in inference.
        val_ds: Any = val_loader.dataset
        val_ds.mean, val_ds.std = mean, std
    return _Data(loader, val_loader, held_out, res_cfg, train_bands, channels, mean, std, names)


def prepare_demo_data(data_cfg: Any) -> dict[str, list[str]]:
    """Make the synthetic demo dataset in ``data_cfg.synth_dir`` if missing, then tile it.

    ``synth_count`` training images (seed ``data.seed``) go to ``SYNTH_DIR/images`` and one
    held-out image (seed ``data.seed + 1``) to ``SYNTH_DIR/val/images``; each set is tiled
    into ``patches_<patch>.zarr`` beside it (rerunning skips work already done). Returns
    ``{"stores", "val_stores", "val_images", "val_labels"}`` as lists of paths. The one
    place the demo data is made: :func:`tilenet.train.train` (when ``data.synth_dir`` is the
    only data) and ``tilenet demo`` call it; :func:`tilenet.patches.data.build_loader` only
    reads stores.
    """
    from tilenet.patches.synth import synthesize
    from tilenet.patches.tiler import tile_images

    if not data_cfg.synth_dir:
        raise ConfigError("data.synth_dir is not set; nothing to prepare")
    root = Path(data_cfg.synth_dir)
    out: dict[str, list[str]] = {"stores": [], "val_stores": [], "val_images": [], "val_labels": []}
    for sub, count, seed, key in (
        (root, int(data_cfg.synth_count), int(data_cfg.seed), "stores"),
        (root / "val", 1, int(data_cfg.seed) + 1, "val_stores"),
    ):
        # classes.json is written last by synthesize: its presence means the set is complete.
        n_have = len(list((sub / "images").glob("synth_*.tif")))
        if not (sub / "classes.json").is_file() or n_have < count:
            synthesize(sub, size=int(data_cfg.synth_size), count=count, seed=seed)
        images = [sub / "images" / f"synth_{i:03d}.tif" for i in range(count)]
        labels = [sub / "labels" / f"synth_{i:03d}.tif" for i in range(count)]
        store = sub / f"patches_{int(data_cfg.patch)}.zarr"
        tile_images(
            [str(p) for p in images],
            labels=[str(p) for p in labels],
            out=store,
            patch=int(data_cfg.patch),
            overlap=_DEMO_OVERLAP,
            workers=2,
            progress=False,
        )
        out[key] = [str(store)]
        if key == "val_stores":
            out["val_images"] = [str(p) for p in images]
            out["val_labels"] = [str(p) for p in labels]
    return out


def _held_out_pairs(images: Sequence[str], labels: Sequence[str]) -> list[tuple[Path | str, Path]]:
    """``train.val_images`` (files, dirs, globs) paired with ``train.val_labels``.

    ``val_labels`` is one label file per image, or a single directory/pattern matched by name.
    """
    from tilenet.io.paths import match_labels, resolve_images

    if not images:
        return []
    imgs = resolve_images(list(images))
    if not labels:
        raise ConfigError("train.val_images is set but train.val_labels is empty; give labels")
    if len(labels) == 1 and (len(imgs) > 1 or Path(labels[0]).is_dir()):
        labs = match_labels(imgs, labels[0])
    else:
        labs = [Path(p) for p in labels]
        if len(labs) != len(imgs):
            raise ConfigError(
                f"train.val_labels has {len(labs)} entries for {len(imgs)} validation images; "
                "give one label file per image or one directory"
            )
    return list(zip(imgs, labs, strict=True))


def training_bands(data: DataConfig) -> tuple[int, ...] | None:
    """The input bands (1-based) the training data was picked from, for the checkpoint.

    ``data.bands`` for random crops of ``data.images``; for patch stores, the ``bands`` they
    were tiled with (``tilenet tile --bands``; None: all). Stores with different bands are
    refused in one line (their channels would not mean the same).
    """
    from tilenet.patches.patchstore import read_attrs

    if not data.stores:
        return tuple(int(b) for b in data.bands) if data.images and data.bands else None
    found: dict[str, tuple[int, ...] | None] = {}
    for path in data.stores:
        raw = (read_attrs(path) or {}).get("bands")
        found[str(path)] = tuple(int(b) for b in raw) if raw else None
    if len(set(found.values())) > 1:
        seen = "; ".join(f"{p}: {','.join(map(str, b)) if b else 'all'}" for p, b in found.items())
        raise ConfigError(f"data.stores were tiled with different bands ({seen}); use one set")
    return next(iter(found.values()))


# -- model ------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # Some CUDA kernels (e.g. bilinear upsampling backward) have no deterministic
        # version: warn there rather than refuse to train. CPU kernels all have one.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _build_model(
    cfg: DictConfig, data: _Data, device: torch.device
) -> tuple[torch.nn.Module, ModelSpec, dict[str, Any] | None]:
    """The model with its start weights, on ``device``; its spec; the fetched encoder weights."""
    from tilenet.engine.checkpoint import (
        is_pretrained_name,
        load_encoder_weights,
        load_pretrained_encoder,
        load_weights,
    )
    from tilenet.models import ModelSpec, create_model_from_config

    tc, mc = cfg.train, cfg.model
    mean, std = data.mean, data.std
    model = create_model_from_config(mc)
    # Published encoder weights fetched: their name and the mean/std that came with them.
    fetched: dict[str, Any] | None = None
    if mc.encoder_weights and is_pretrained_name(mc.encoder_weights):
        mean_std = load_pretrained_encoder(
            model, str(mc.encoder_weights), allow_download=bool(mc.allow_download)
        )
        fetched = {"weights": str(mc.encoder_weights), "mean": mean_std[0], "std": mean_std[1]}
    elif mc.encoder_weights:
        load_encoder_weights(model, mc.encoder_weights)
    if mc.weights:
        load_weights(model, mc.weights)
    if mc.normalization == "encoder":
        # The encoder's statistics replace the data's, in training, validation and the spec.
        mean, std = _encoder_stats(
            model, mc, data.channels, fetched and (fetched["mean"], fetched["std"])
        )
        dsets: list[Any] = [data.loader.dataset]
        if data.val_loader is not None:
            dsets.append(data.val_loader.dataset)
        for dset in dsets:
            dset.mean, dset.std = mean, std
            if hasattr(dset, "normalize"):
                dset.normalize = True
    model = model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = ModelSpec.from_model(model, mean=mean, std=std, class_names=data.class_names)
    ds: Any = data.loader.dataset
    if getattr(ds, "resolution", None):  # the training data's pixel size: infer's default
        spec = dataclasses.replace(spec, resolution=ds.resolution)
    if data.train_bands:  # the bands the training data was picked from: infer's default too
        spec = dataclasses.replace(spec, bands=data.train_bands)
    if getattr(ds, "stain", None) is not None:  # data.stain's fitted normaliser: infer's too
        from tilenet.stain import plain_state

        spec = dataclasses.replace(spec, stain=plain_state(ds.stain))
    return model, spec, fetched


def _encoder_stats(
    model: Any, mc: Any, channels: int, came_with: Any = None
) -> tuple[list[float], list[float]]:
    """``model.normalization=encoder``: the encoder's pretraining mean/std in raw pixel units
    (``came_with``: those that came with fetched weights, else timm's/smp's tables)."""
    from tilenet.models.smp_models import SmpModel, encoder_normalization

    if not isinstance(model, SmpModel):
        raise ConfigError(
            f"model.normalization=encoder needs an smp.* model with a pretrained encoder, "
            f"not {mc.name!r}; use model.normalization=data"
        )
    scale = float(mc.pixel_max)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"model.pixel_max must be a positive number, got {mc.pixel_max!r}")
    try:
        mean, std = came_with or encoder_normalization(model.encoder_name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if len(mean) != channels:
        raise ConfigError(
            f"model.normalization=encoder: encoder {model.encoder_name!r} has statistics for "
            f"{len(mean)} channels but the data has {channels}; use model.normalization=data"
        )
    return [m * scale for m in mean], [v * scale for v in std]


# -- optimisation -----------------------------------------------------------------------------
def _build_optimizer(params: Any, tc: Any) -> torch.optim.Optimizer:
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(
        params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=True
    )


def _param_groups(model: torch.nn.Module, tc: Any) -> list[dict[str, Any]]:
    """One group, or (with encoder fine-tuning options) the rest first, then the encoder."""
    encoder = getattr(model, "encoder", None)
    if tc.encoder_lr is None and not int(tc.freeze_encoder_steps):
        return [{"params": list(model.parameters())}]
    if not isinstance(encoder, torch.nn.Module):
        raise ConfigError(
            "train.encoder_lr and train.freeze_encoder_steps need a model with an encoder "
            "(smp.* models)"
        )
    if int(tc.freeze_encoder_steps) < 0:
        raise ConfigError(
            f"train.freeze_encoder_steps must be >= 0, got {tc.freeze_encoder_steps!r}"
        )
    if int(tc.freeze_encoder_steps) and tc.schedule == "onecycle":
        raise ConfigError("train.freeze_encoder_steps needs train.schedule cosine or constant")
    mine = {id(p) for p in encoder.parameters()}
    rest = [p for p in model.parameters() if id(p) not in mine]
    lr = float(tc.lr if tc.encoder_lr is None else tc.encoder_lr)
    return [{"params": rest}, {"params": list(encoder.parameters()), "lr": lr}]


def _build_scheduler(opt: torch.optim.Optimizer, tc: Any) -> Any:
    total = max(1, int(tc.steps))
    warmup = max(0, min(int(tc.warmup_steps), total - 1))
    freeze = int(tc.freeze_encoder_steps)
    if tc.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[float(g["lr"]) for g in opt.param_groups],
            total_steps=total,
            pct_start=max(warmup / total, 0.05) if warmup else 0.3,
            cycle_momentum=tc.optimizer == "sgd",
        )
    cosine = tc.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine:
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    def encoder_factor(step: int) -> float:
        return 0.0 if step < freeze else factor(step)

    # Closures, not callable objects: LambdaLR's state_dict then stores no function state,
    # only counters (plain data).
    if len(opt.param_groups) == 1:
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, [factor, encoder_factor])


# -- run directory ----------------------------------------------------------------------------
def _new_run_dir(out_dir: str | None) -> Path:
    """``out_dir``, or a new ``runs/<UTC timestamp>[-n]``."""
    if out_dir:
        return Path(out_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / stamp
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{stamp}-{n}")
        n += 1
    return path
