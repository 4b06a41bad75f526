"""Training: ``python -m tilenet.train conf=conf/X.yaml [key=value ...]`` (or ``tilenet train``).

Streams patches from patch stores (or random crops of large images) through
:func:`tilenet.patches.data.build_loader`, trains a registry model with AdamW or SGD, a cosine
(with warmup), one-cycle or constant schedule, mixed precision (bf16, or fp16 with a
GradScaler), channels_last, gradient accumulation and clipping, and optional
``torch.compile``. Validation on held-out patches every ``train.val_every`` steps gives
per-class Dice and IoU from an all-reduced confusion matrix; whole held-out images
(``train.val_images``) are scored through the tiled inference engine
(:func:`tilenet.engine.infer.infer_image`), stitched exactly as ``tilenet infer`` would.

One module per job::

    setup        the run from the config: data, model, spec, optimiser, schedule, scaler, loss
    state        TrainState (step, best, data position + RNG per rank); resume and checkpoints
    distributed  DDP: the process group, broadcast/gather/all-reduce, wrap and rewrap
    loop         fit(): the steps, with validation, checkpoints and the log as hooks
    validate     held-out patches, and held-out images through the engine's Predictor
    runlog       metrics.jsonl, TensorBoard, curves.png
    losses, metrics

Run directory (``train.out_dir``, default ``runs/<timestamp>``)::

    config.yaml     the resolved config
    metrics.jsonl   one JSON object per line: training lines (step, loss, lr,
                    patches_per_s), validation lines (step, val_dice = mean foreground
                    Dice, val_iou, per-class values), held-out image lines (heldout_dice)
    last.pt         the latest checkpoint; best.pt the best by ``train.best_metric``
    curves.png      loss and metric curves, drawn at the end
    tb/             TensorBoard events, when tensorboard is installed

Exact resume: each epoch's data order and augmentation are a function of (seed, epoch,
rank); a checkpoint stores the position in the epoch and every RNG state, so a resumed
run replays the interrupted epoch up to that position (reading, not training) and then
continues bit for bit. Under ``torchrun`` each rank trains on its shard (DDP: NCCL on GPU,
gloo on CPU), metrics are all-reduced and only rank 0 writes.

Importing this package is cheap (no torch): the ``tilenet`` CLI builds its ``train``
subcommand from :data:`HELP` and :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from tilenet.train.distributed import Dist
    from tilenet.train.setup import prepare_demo_data, training_bands
    from tilenet.train.validate import evaluate_images

__all__ = [
    "HELP",
    "add_arguments",
    "evaluate_images",
    "main",
    "parse_items",
    "prepare_demo_data",
    "run_training",
    "train",
    "training_bands",
]

HELP = """\
Train a segmentation model on streamed patches.

Arguments are `conf=FILE` (a YAML config) and any number of `key=value` overrides in
omegaconf dotlist form (section.key=value), applied in order on top of the defaults and
the file. Unknown keys are errors that list the valid ones. Config sections:

  data    training data: patch stores (data.stores, data.val_stores), or image and label
          directories read lazily (data.images, data.labels), or the synthetic demo
          dataset (data.synth_dir: generated with a fixed seed when missing); patch,
          batch_size, num_workers, augment.*, class_names
  model   registry model: name, in_channels, num_classes, kwargs.*, weights, encoder_weights,
          allow_download (encoder_weights=imagenet), normalization (data | encoder), pixel_max
  train   loop: steps, lr, optimizer (adamw|sgd), schedule (cosine|onecycle|constant),
          warmup_steps, loss (ce|dice|ce+dice), class_weights, ignore_index, precision
          (fp32|bf16|fp16), device, channels_last, compile, grad_accum, grad_clip,
          val_every, val_images/val_labels, best_metric, early_stop_patience, out_dir,
          resume (true or a checkpoint path), deterministic, seed; for smp.* models
          encoder_lr, freeze_encoder_steps
  infer   tile/mode/batch used to score whole held-out images (train.val_images)
  tiling, reader, jobs: read by tilenet tile, infer and info, not by training

Every key with its default: conf/default.yaml (or --print-config with no arguments).
"""

EPILOG = """\
examples:
  python -m tilenet.train conf=conf/demo.yaml
  python -m tilenet.train conf=conf/pathology.yaml train.steps=5000 train.precision=bf16
  python -m tilenet.train conf=conf/demo.yaml train.out_dir=runs/a train.resume=true
  torchrun --nproc_per_node=4 -m tilenet.train conf=conf/pathology.yaml

The last line printed is `run_dir: DIR`. Exit codes: 0 ok, 2 bad input or config.
"""

_METRICS = ("val_dice", "val_iou", "val_loss", "val_accuracy", "heldout_dice", "heldout_iou")


def __getattr__(name: str) -> Any:
    # Lazy, so `import tilenet.train` stays cheap (the `tilenet` CLI imports it for its help).
    if name in ("prepare_demo_data", "training_bands"):
        from tilenet.train import setup

        return getattr(setup, name)
    if name == "evaluate_images":
        from tilenet.train.validate import evaluate_images

        return evaluate_images
    raise AttributeError(f"module 'tilenet.train' has no attribute {name!r}")


# -- entry points -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training command's arguments: ``conf=FILE | key=value`` items, ``--print-config``."""
    parser.add_argument(
        "items",
        nargs="*",
        metavar="conf=FILE | key=value",
        help="config file, then dotlist overrides such as train.lr=3e-4 data.batch_size=8",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults + file + overrides) as YAML and exit",
    )


def parse_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(conf, overrides)`` from ``conf=FILE`` and ``key=value`` items; anything else is a
    :class:`~tilenet.errors.ConfigError`."""
    from tilenet.config import split_config_args
    from tilenet.errors import ConfigError

    conf, overrides, rest = split_config_args(items)
    if rest:
        raise ConfigError(
            f"argument {rest[0]!r} must be conf=FILE or key=value (e.g. train.lr=1e-3)"
        )
    return conf, overrides


def run_training(conf: str | None, overrides: Sequence[str], *, print_config: bool = False) -> int:
    """Load the config (defaults < ``conf`` < ``overrides``), train, print ``run_dir: DIR``
    (rank 0); with ``print_config``, print the resolved config instead. Returns 0."""
    from tilenet.config import load_config, to_yaml
    from tilenet.train.distributed import rank

    cfg = load_config(conf, list(overrides))
    if print_config:
        print(to_yaml(cfg), end="")
        return 0
    run_dir = train(cfg)
    if rank() == 0:
        print(f"run_dir: {run_dir}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tilenet.train conf=FILE [key=value ...]``; returns the exit code."""
    from tilenet.errors import ConfigError, run_guarded

    parser = argparse.ArgumentParser(
        prog="python -m tilenet.train",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    try:
        conf, overrides = parse_items(args.items)
    except ConfigError as exc:
        parser.error(str(exc))
    return run_guarded(
        lambda: run_training(conf, overrides, print_config=args.print_config), debug=args.debug
    )


# -- training ---------------------------------------------------------------------------------
def train(cfg: Any) -> Path:
    """Train with the config tree ``cfg`` (a :class:`~tilenet.config.Config` or its
    DictConfig); return the run directory (identical on every rank)."""
    from dataclasses import is_dataclass

    import torch
    import torch.distributed as dist
    from omegaconf import DictConfig, OmegaConf

    from tilenet.errors import ConfigError
    from tilenet.train import distributed
    from tilenet.train.state import rng_state, set_rng_state

    if is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"train() needs a tilenet Config, got {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)
    tc = cfg.train
    if tc.best_metric not in _METRICS:
        raise ConfigError(
            f"train.best_metric={tc.best_metric!r} is not a metric; choose from {', '.join(_METRICS)}"
        )
    for key in ("steps", "grad_accum", "val_every", "log_every", "checkpoint_every"):
        if int(tc[key]) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {tc[key]!r}")
    if tc.deterministic:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    outer_rng = rng_state()
    prev_det = torch.are_deterministic_algorithms_enabled()
    had_group = dist.is_available() and dist.is_initialized()
    d, device = distributed.init(str(tc.device))
    own_group = d.enabled and not had_group  # a caller's process group is the caller's
    try:
        return _train(cfg, d, device)
    finally:
        torch.use_deterministic_algorithms(prev_det)
        set_rng_state(outer_rng)
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: DictConfig, d: Dist, device: torch.device) -> Path:
    """Build the run, resume its state, fit; rank 0 saves the resolved config first."""
    from tilenet.config import save_config
    from tilenet.train import loop, setup, state
    from tilenet.train.runlog import RunLog
    from tilenet.train.validate import Validator

    run = setup.build(cfg, d, device)
    ts = state.resume(run)
    if d.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, run.run_dir)
    resume_step = ts.step if ts.resumed_from is not None else None
    log = RunLog(run.run_dir, enabled=d.main, resume_step=resume_step)
    hooks = loop.Hooks(validate=Validator(run), save=state.Saver(run, ts), log=log)
    loop.fit(run, ts, hooks)
    return run.run_dir
