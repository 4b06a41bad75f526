"""Training: ``python -m tilenet.train conf=conf/X.yaml [key=value ...]``.

Streams patches from patch stores (or random crops of large images) through
:func:`tilenet.patches.data.build_loader`, trains a registry model with AdamW or SGD, a cosine
(with warmup), one-cycle or constant schedule, mixed precision (bf16, or fp16 with a
GradScaler), channels_last, gradient accumulation and clipping, and optional
``torch.compile``. Validation on held-out patches every ``train.val_every`` steps gives
per-class Dice and IoU from an all-reduced confusion matrix; whole held-out images
(``train.val_images``) are scored through the tiled inference engine
(:func:`tilenet.engine.infer.infer_image`), stitched exactly as ``tilenet infer`` would.

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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tilenet.config import (
    DataConfig,
    InferConfig,
    ResolutionConfig,
    load_config,
    save_config,
    split_config_args,
    to_yaml,
)
from tilenet.errors import CheckpointError, ConfigError, InputError
from tilenet.fsutil import write_text_atomic
from tilenet.runtime import autocast, resolve_device

if TYPE_CHECKING:
    pass

__all__ = ["evaluate_images", "main", "prepare_demo_data", "train", "training_bands"]

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

_DEMO_OVERLAP = 0  # demo patches tile the images edge to edge; flips/rot90 add variety


# -- entry point ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tilenet.train conf=FILE [key=value ...]``; returns the exit code."""
    from tilenet.errors import run_guarded

    parser = argparse.ArgumentParser(
        prog="python -m tilenet.train",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    try:
        conf, overrides, rest = split_config_args(args.items)
    except ConfigError as exc:
        parser.error(str(exc))
    if rest:
        parser.error(f"argument {rest[0]!r} must be conf=FILE or key=value (e.g. train.lr=1e-3)")

    def run() -> int:
        cfg = load_config(conf, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        run_dir = train(cfg)
        if _rank() == 0:
            print(f"run_dir: {run_dir}", flush=True)
        return 0

    return run_guarded(run, debug=args.debug)


# -- distributed ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_name, option="train.device")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local, option="train.device")
    # DDP (and torch.compile) import torch._dynamo, which imports
    # torch.distributed.nn.functional: its functions bind ``group.WORLD`` as a default
    # argument when the module is first imported. Imported after init_process_group, they
    # pin the default group for good: destroy_process_group() then cannot free it, and
    # its gloo threads and sockets live on into interpreter exit, where a rank aborted now
    # and then ("terminate called without an active exception"). Imported now, while there
    # is no default group, they bind None.
    import torch._dynamo
    import torch.distributed.nn

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local), device


def _barrier(d: _Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def _broadcast(obj: Any, d: _Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any, d: _Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _all_reduce_sum(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -- RNG --------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """Every global RNG state as plain data (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": [int(version), [int(v) for v in internal], gauss],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _BatchStream:
    """Endless training batches, epoch after epoch, resumable at any (epoch, position).

    At the start of each epoch the dataset is told the epoch and the global torch RNG is
    reseeded from (seed, epoch, rank), so the epoch's batches (order and augmentation, also
    in DataLoader workers, which take their seeds from it) depend on nothing else.
    """

    def __init__(self, loader: Any, *, seed: int, rank: int) -> None:
        self.loader = loader
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.pos = 0
        self._it: Iterator[Any] | None = None

    def _start(self) -> None:
        ds = self.loader.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.epoch)
        torch.manual_seed(_derived_seed(self.seed, self.epoch, self.rank))
        self._it = iter(self.loader)
        self.pos = 0

    def resume(self, epoch: int, pos: int, rng: dict[str, Any] | None) -> None:
        """Replay ``epoch`` up to ``pos`` batches, then restore the RNG states of that moment."""
        self.epoch = int(epoch)
        self._start()
        assert self._it is not None
        for _ in range(int(pos)):
            if next(self._it, None) is None:
                break
            self.pos += 1
        if rng is not None:
            _set_rng_state(rng)

    def next(self) -> Any:
        if self._it is None:
            self._start()
        while True:
            assert self._it is not None
            batch = next(self._it, None)
            if batch is not None:
                self.pos += 1
                return batch
            if self.pos == 0:
                raise InputError(
                    f"rank {self.rank} receives no training batches: the patch stores have "
                    "fewer chunks than ranks x data workers; use fewer data.num_workers or "
                    "ranks, or tile with a smaller chunk_patches"
                )
            self.epoch += 1
            self._start()


# -- data -------------------------------------------------------------------------------------
def prepare_demo_data(data_cfg: Any) -> dict[str, list[str]]:
    """Make the synthetic demo dataset in ``data_cfg.synth_dir`` if missing, then tile it.

    ``synth_count`` training images (seed ``data.seed``) go to ``SYNTH_DIR/images`` and one
    held-out image (seed ``data.seed + 1``) to ``SYNTH_DIR/val/images``; each set is tiled
    into ``patches_<patch>.zarr`` beside it (rerunning skips work already done). Returns
    ``{"stores", "val_stores", "val_images", "val_labels"}`` as lists of paths. The one
    place the demo data is made: :func:`train` (when ``data.synth_dir`` is the only data)
    and ``tilenet demo`` call it; :func:`tilenet.patches.data.build_loader` only reads stores.
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


# -- optimisation -----------------------------------------------------------------------------
def _build_optimizer(params: Any, tc: Any) -> torch.optim.Optimizer:
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(
        params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=True
    )


_BATCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
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

    # Closures: LambdaLR's state_dict stores no function, only counters (plain data).
    if len(opt.param_groups) == 1:
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, [factor, encoder_factor])


# -- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def _validate(
    model: torch.nn.Module,
    loader: Any,
    loss_fn: torch.nn.Module,
    *,
    device: torch.device,
    precision: str,
    channels_last: bool,
    num_classes: int,
    ignore_index: int,
    class_names: list[str],
    d: _Dist,
) -> dict[str, Any]:
    """Loss and per-class Dice/IoU on the held-out patches, all-reduced over ranks."""
    from tilenet.train.metrics import ConfusionMatrix

    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, n
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    # Validation must not move the training RNG (iter(loader) draws a seed from it).
    with torch.random.fork_rng(devices=fork_devices):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            sums[0] += loss_fn(logits.float(), y).double() * x.shape[0]
            sums[1] += x.shape[0]
            cm.update(logits, y)
    model.train(was_training)
    _all_reduce_sum(sums, d)
    cm.all_reduce()
    s = cm.compute(class_names=class_names)
    return {
        "val_loss": float(sums[0] / sums[1]) if sums[1] else None,
        "val_dice": s["mean_dice"],
        "val_iou": s["mean_iou"],
        "val_accuracy": s["accuracy"],
        "val_dice_per_class": dict(zip(s["class_names"], s["dice"], strict=True)),
        "val_iou_per_class": dict(zip(s["class_names"], s["iou"], strict=True)),
        "val_patches": int(sums[1]),
    }


def evaluate_images(
    model: Any,
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    *,
    infer: InferConfig | None = None,
    ignore_index: int = 255,
    work_dir: str | os.PathLike[str] | None = None,
    resolution: ResolutionConfig | None = None,
) -> dict[str, Any]:
    """Dice/IoU of whole images predicted by the tiled inference engine against labels.

    ``model`` is a :class:`~tilenet.engine.predictor.Predictor`, a checkpoint path or a
    ``(module, spec)`` pair (the module is not modified). Each image runs through
    :func:`tilenet.engine.infer.infer_image` with ``infer`` (the same tiling and stitching as
    ``tilenet infer``) into a temporary directory, class map only; it is compared with the
    label image block by block (:func:`tilenet.train.metrics.score_class_map`), so memory stays
    bounded by a block. Returns ``{"dice", "iou", "mean_dice", "mean_iou", ...}`` over all
    images together (:func:`tilenet.train.metrics.scores_from_confusion`). ``resolution`` is the
    pixel size to run at (by default the one the model was trained at, see
    :func:`tilenet.engine.infer.choose_resolution`); labels follow the grid run (nearest).
    """
    import dataclasses

    import zarr

    from tilenet.engine.infer import infer_image
    from tilenet.engine.predictor import Predictor
    from tilenet.io import open_image
    from tilenet.io.resolution import Resolution, label_view
    from tilenet.train.metrics import ConfusionMatrix, score_class_map

    cfg = dataclasses.replace(infer or InferConfig(), outputs=[])  # the class map alone
    predictor = Predictor(model, cfg)  # prepared once for all images
    k = predictor.spec.num_classes
    cm = ConfusionMatrix(k, ignore_index=ignore_index)
    for image, labels in pairs:
        with tempfile.TemporaryDirectory(prefix=".heldout-", dir=work_dir) as tmp:
            summary = infer_image(
                image, predictor, tmp, progress=False, resolution=resolution,
                **dataclasses.asdict(cfg),
            )  # fmt: skip
            pred: Any = zarr.open_group(Path(tmp) / "classes.ome.zarr", mode="r")["0"]
            h, w = pred.shape
            ran = (summary.get("resolution") or {}).get("scale")
            with open_image(labels) as lab:
                if ran is not None:  # run on a resampled grid: the labels on the same one
                    lab = label_view(lab, Resolution.from_dict(summary["resolution"]))
                if lab.shape[:2] != (h, w):
                    raise InputError(
                        f"{labels}: label image is {lab.shape[0]}x{lab.shape[1]} but {image} "
                        f"is {h}x{w}"
                    )
                cm.add(score_class_map(pred, lab, k, ignore_index=ignore_index).confusion)
    return cm.compute(class_names=list(predictor.spec.class_names))


# -- run directory ----------------------------------------------------------------------------
def _new_run_dir(out_dir: str | None) -> Path:
    if out_dir:
        return Path(out_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / stamp
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{stamp}-{n}")
        n += 1
    return path


class _Log:
    """metrics.jsonl (+ TensorBoard when installed) on rank 0; nothing elsewhere."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.tb: Any = None
        if not enabled:
            return
        if self.path.is_file():
            old = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            # A resumed run drops what the interrupted one logged after its checkpoint.
            keep = [r for r in old if resume_step is not None and r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
            self.records = keep
        self._fh = open(self.path, "a", encoding="utf-8")  # closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()


def _plot_curves(records: list[dict[str, Any]], path: Path, *, metric: str = "val_dice") -> Path:
    """Loss (train, val) and validation metric curves vs step as a 1000x400 PNG (matplotlib)."""
    # Lazy, and no pyplot: a Figure on its own Agg canvas touches no global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from tilenet.fsutil import atomic_output

    other = "val_iou" if metric != "val_iou" else "val_dice"
    panels = [
        ("loss", "loss", [("loss", "tab:blue"), ("val_loss", "tab:red")]),
        ("validation", metric, [(metric, "tab:green"), (other, "tab:purple")]),
    ]
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, ylabel, series) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        drawn = 0
        for key, colour in series:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if not pts:
                continue
            steps, values = zip(*pts, strict=True)
            marker = "o" if len(pts) <= 50 else None  # sparse validation points stay visible
            ax.plot(steps, values, color=colour, marker=marker, markersize=3, label=key)
            drawn += 1
        if drawn:
            ax.grid(alpha=0.3)
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# -- checkpoints ------------------------------------------------------------------------------
def _resume_path(resume: Any, run_dir: Path) -> Path | None:
    if resume is None or resume is False or (isinstance(resume, str) and not resume):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        last = run_dir / "last.pt"
        return last if last.is_file() else None
    if isinstance(resume, str):
        p = Path(resume)
        if not p.is_file():
            raise CheckpointError(f"{p}: train.resume checkpoint not found")
        return p
    raise ConfigError(f"train.resume must be true/false or a checkpoint path, got {resume!r}")


@dataclass
class _Progress:
    """Where training stands: optimizer steps done, best metric so far, validations since."""

    step: int = 0
    best: float | None = None
    bad: int = 0


def _improved(value: float | None, best: float | None, metric: str) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best if "loss" in metric else value > best


_METRICS = ("val_dice", "val_iou", "val_loss", "val_accuracy", "heldout_dice", "heldout_iou")


# -- the loop ---------------------------------------------------------------------------------
def train(cfg: Any) -> Path:
    """Train with the config tree ``cfg`` (a :class:`~tilenet.config.Config` or its
    DictConfig); return the run directory (identical on every rank)."""
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
    outer_rng = _rng_state()
    prev_det = torch.are_deterministic_algorithms_enabled()
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    d, device = _init_distributed(str(tc.device))
    own_group = d.enabled and not had_group  # a caller's process group is the caller's
    try:
        return _train(cfg, d, device)
    finally:
        torch.use_deterministic_algorithms(prev_det)
        _set_rng_state(outer_rng)
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


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


def _bands_text(bands: Sequence[int] | None) -> str:
    """``bands 4,2``, or ``all bands``."""
    return f"bands {','.join(map(str, bands))}" if bands else "all bands"


def _train(cfg: DictConfig, d: _Dist, device: torch.device) -> Path:
    from tilenet.engine.checkpoint import (
        is_pretrained_name,
        load_checkpoint,
        load_encoder_weights,
        load_pretrained_encoder,
        load_weights,
        save_checkpoint,
    )
    from tilenet.models import ModelSpec, create_model_from_config
    from tilenet.patches.data import build_loader
    from tilenet.train.losses import build_loss

    tc, mc = cfg.train, cfg.model
    if tc.resume is True and not tc.out_dir:
        raise ConfigError(
            "train.resume=true continues the run in train.out_dir; set train.out_dir=DIR "
            "or give the checkpoint: train.resume=DIR/last.pt"
        )
    # -- data (rank 0 makes the demo data; the others wait for it)
    if cfg.data.synth_dir and not cfg.data.stores and not cfg.data.images:
        prepared = prepare_demo_data(cfg.data) if d.main else None
        prepared = _broadcast(prepared, d)
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

    # -- model, optimiser, schedule
    _seed_everything(int(tc.seed))
    if tc.deterministic:
        # Some CUDA kernels (e.g. bilinear upsampling backward) have no deterministic
        # version: warn there rather than refuse to train. CPU kernels all have one.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
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
            model, mc, channels, fetched and (fetched["mean"], fetched["std"])
        )
        dsets: list[Any] = [ds] + ([val_loader.dataset] if val_loader is not None else [])
        for dset in dsets:
            dset.mean, dset.std = mean, std
            if hasattr(dset, "normalize"):
                dset.normalize = True
    model = model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = ModelSpec.from_model(model, mean=mean, std=std, class_names=names)
    if getattr(ds, "resolution", None):  # the training data's pixel size: infer's default
        spec = dataclasses.replace(spec, resolution=ds.resolution)
    if train_bands:  # the bands the training data was picked from: infer's default too
        spec = dataclasses.replace(spec, bands=train_bands)
    opt = _build_optimizer(_param_groups(model, tc), tc)
    freeze = int(tc.freeze_encoder_steps)
    encoder_bns = [
        m
        for m in getattr(model, "encoder", torch.nn.Identity()).modules()
        if freeze and isinstance(m, _BATCH_NORMS)
    ]
    sched = _build_scheduler(opt, tc)
    fp16 = tc.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    loss_fn = build_loss(
        tc.loss,
        num_classes=k,
        class_weights=list(tc.class_weights) or None,
        ignore_index=int(tc.ignore_index),
    ).to(device)

    # -- run directory and resume
    run_dir = Path(_broadcast(str(_new_run_dir(tc.out_dir)) if d.main else None, d))
    ckpt_path = _resume_path(tc.resume, run_dir)
    if tc.resume is True and ckpt_path is None and d.main:
        print(f"train.resume: no {run_dir / 'last.pt'} yet; starting from step 0", flush=True)
    state = _Progress()
    stream = _BatchStream(loader, seed=int(tc.seed) + int(cfg.data.seed), rank=d.rank)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"{ckpt_path}: cannot resume with this config: {first[:200]}"
            ) from None
        # Same channel count, other bands (4,2 -> 2,4) loads: it would go on silently as
        # another experiment, under the checkpoint's name.
        was = [int(b) for b in (ckpt.get("spec") or {}).get("bands") or []]
        if was != list(train_bands or []):
            raise CheckpointError(
                f"{ckpt_path}: cannot resume with this config: it was trained on "
                f"{_bands_text(was)}, the data now gives {_bands_text(train_bands)}; resume "
                "with the same data.bands (or stores tiled with them), or start a new run"
            )
        done = ckpt.get("metrics") or {}
        state.best, state.bad = done.get("best"), int(done.get("bad", 0))
        state.step = int(ckpt["step"])
        positions = ckpt.get("data_pos") or [[ckpt.get("epoch", 0), 0]]
        rngs = ckpt.get("rng") or [None]
        same_world = len(positions) == d.world
        epoch, pos = positions[d.rank] if same_world else positions[0]
        stream.resume(
            int(epoch), int(pos) if same_world else 0, rngs[d.rank] if same_world else None
        )
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    log = _Log(run_dir, enabled=d.main, resume_step=state.step if ckpt_path else None)

    # -- a frozen encoder computes no gradients (requires_grad False) until step `freeze`
    frozen = bool(freeze) and state.step < freeze
    encoder_params = list(getattr(model, "encoder", torch.nn.Identity()).parameters())
    for p in encoder_params if frozen else ():
        p.requires_grad_(False)

    # -- wrap for DDP / compile
    def wrap() -> tuple[torch.nn.Module, Any]:
        # DDP syncs the parameters that require grad when wrapped: rewrapped on thawing.
        net: torch.nn.Module = model
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Parameters of layers the forward never calls (an smp encoder's stages past
            # encoder_depth) get no gradient: DDP must be told to look for them.
            called = getattr(getattr(model, "analysis", None), "called", None)
            unused = called is not None and any(
                p.requires_grad and name.rpartition(".")[0] not in called
                for name, p in model.named_parameters()
            )
            net = DDP(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
        return net, torch.compile(net) if tc.compile else net

    net, fwd = wrap()

    def checkpoint(name: str) -> None:
        # Every rank's data position and RNG states, so each resumes its own shard exactly.
        positions = _gather([stream.epoch, stream.pos], d)
        rngs = _gather(_rng_state(), d)
        if not d.main:
            return
        payload = {
            "spec": spec,
            "model": {k_: v.detach().cpu() for k_, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if fp16 else {},
            "step": state.step,
            "epoch": stream.epoch,
            "data_pos": positions,
            "rng": rngs,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "metrics": {"best": state.best, "bad": state.bad},
        }
        if fetched is not None:  # in [0, 1], as published with the weights
            payload["encoder_pretrained"] = {
                k_: list(v) if isinstance(v, tuple) else v for k_, v in fetched.items()
            }
        save_checkpoint(run_dir / name, payload)

    def validate() -> dict[str, Any]:
        rec: dict[str, Any] = {}
        if val_loader is not None:
            rec.update(
                _validate(
                    model,
                    val_loader,
                    loss_fn,
                    device=device,
                    precision=tc.precision,
                    channels_last=tc.channels_last,
                    num_classes=k,
                    ignore_index=int(tc.ignore_index),
                    class_names=names,
                    d=d,
                )
            )
        if held_out and tc.val_images_every and state.step % tc.val_images_every == 0:
            rec.update(heldout())
        return rec

    heldout_cache: dict[int, dict[str, Any]] = {}

    def heldout() -> dict[str, Any]:
        if state.step in heldout_cache:  # already scored at this step (val_images_every)
            return heldout_cache[state.step]
        res = None
        if d.main:
            with torch.random.fork_rng(
                devices=[device.index or 0] if device.type == "cuda" else []
            ):
                s = evaluate_images(
                    (model, spec),
                    held_out,
                    infer=_infer_config(cfg, device),
                    ignore_index=int(tc.ignore_index),
                    work_dir=run_dir,
                    resolution=res_cfg,
                )
            res = {
                "heldout_dice": s["mean_dice"],
                "heldout_iou": s["mean_iou"],
                "heldout_dice_per_class": dict(zip(s["class_names"], s["dice"], strict=True)),
                "heldout_iou_per_class": dict(zip(s["class_names"], s["iou"], strict=True)),
                "heldout_pixels": s["pixels"],
            }
        heldout_cache.clear()
        heldout_cache[state.step] = _broadcast(res, d)
        return heldout_cache[state.step]

    # -- train
    total = int(tc.steps)
    accum = int(tc.grad_accum)
    budget = tc.max_steps_this_run
    stop_at = total if budget is None else min(total, state.step + int(budget))
    from tilenet.progress import progress_bar

    bar = progress_bar(
        total, initial=state.step, enabled=bool(tc.progress and d.main), unit="step", desc="train"
    )
    model.train()
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_steps, win_patches, win_time = 0, 0, 0.0
    t_run = time.perf_counter()
    stopped_early = False
    try:
        while state.step < stop_at:
            t0 = time.perf_counter()
            if frozen and state.step >= freeze:
                frozen = False
                for p in encoder_params:
                    p.requires_grad_(True)
                net, fwd = wrap()
            for bn in encoder_bns:  # a frozen encoder keeps its running statistics
                bn.train(state.step >= freeze)
            opt.zero_grad(set_to_none=True)
            for micro in range(accum):
                x, y = stream.next()
                x = x.to(device, non_blocking=True)
                if tc.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                sync = micro == accum - 1 or not d.enabled
                with contextlib.nullcontext() if sync else net.no_sync():  # type: ignore[operator]
                    with autocast(device, tc.precision):
                        loss = loss_fn(fwd(x), y) / accum
                    scaler.scale(loss).backward()
                win_loss += loss.detach().double()
                win_patches += int(x.shape[0])
            if tc.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
            scaler.step(opt)
            scaler.update()
            lr = float(opt.param_groups[0]["lr"])
            sched.step()
            state.step += 1
            step = state.step
            win_steps += 1
            win_time += time.perf_counter() - t0
            if step % tc.log_every == 0 or step == stop_at:
                stats = torch.stack(
                    [win_loss, torch.tensor(win_patches, dtype=torch.float64, device=device)]
                )
                _all_reduce_sum(stats, d)
                rec = {
                    "step": step,
                    "epoch": stream.epoch,
                    "loss": float(stats[0]) / (win_steps * d.world),
                    "lr": lr,
                    # every rank trains at once: the window's patches over its wall time
                    "patches_per_s": float(stats[1]) / max(win_time, 1e-9),
                }
                log.write(rec)
                bar.set_postfix(
                    loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", pps=f"{rec['patches_per_s']:.0f}"
                )
                win_loss.zero_()
                win_steps, win_patches, win_time = 0, 0, 0.0
            bar.update(1)
            if step % tc.val_every == 0 or step == total:
                rec = validate()
                if rec:
                    log.write({"step": step, **rec})
                    value = rec.get(tc.best_metric)
                    if value is not None and _improved(value, state.best, tc.best_metric):
                        state.best, state.bad = float(value), 0
                        checkpoint("best.pt")
                    elif value is not None:
                        state.bad += 1
                    if tc.early_stop_patience and state.bad >= tc.early_stop_patience:
                        stopped_early = True
            if step % tc.checkpoint_every == 0 or step == stop_at or stopped_early:
                checkpoint("last.pt")
            if stopped_early:
                if d.main:
                    bar.write(
                        f"early stop at step {step}: no better {tc.best_metric} for "
                        f"{tc.early_stop_patience} validations"
                    )
                break
    finally:
        bar.close()
    finished = state.step >= total or stopped_early
    if finished and state.best is None:
        checkpoint("best.pt")  # no validation metric: the final weights are the best we know
    train_s = time.perf_counter() - t_run
    if finished and held_out:
        rec = heldout()
        log.write({"step": state.step, **rec, "train_s": round(train_s, 2)})
        if d.main:
            print(
                f"held-out images: foreground Dice {_fmt(rec['heldout_dice'])}, "
                f"IoU {_fmt(rec['heldout_iou'])} ({len(held_out)} image(s))",
                flush=True,
            )
    if d.main:
        log.close()
        if finished:
            _plot_curves(log.records, run_dir / "curves.png", metric=tc.best_metric)
    _barrier(d)
    return run_dir


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _infer_config(cfg: DictConfig, device: torch.device) -> InferConfig:
    """The ``infer`` section for held-out scoring, on the training device."""
    import dataclasses

    ic: InferConfig = OmegaConf.to_object(cfg.infer)  # type: ignore[assignment]
    return dataclasses.replace(ic, device=str(device))
