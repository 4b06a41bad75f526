"""Validation: held-out patches (loss, Dice, IoU all-reduced over ranks) and whole held-out
images scored through the tiled inference engine (:class:`~tilenet.engine.predictor.Predictor`),
stitched exactly as ``tilenet infer`` would. Neither moves the training RNG."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tilenet.config import InferConfig, ResolutionConfig
from tilenet.errors import InputError
from tilenet.patches.data import model_input
from tilenet.runtime import autocast
from tilenet.train.distributed import Dist, all_reduce_sum, broadcast
from tilenet.train.setup import Run

__all__ = ["Validator", "evaluate_images", "validate_patches"]


def _fork_devices(device: torch.device) -> list[int]:
    """The CUDA device whose RNG ``torch.random.fork_rng`` must also save, if any."""
    return [device.index or 0] if device.type == "cuda" else []


@torch.no_grad()
def validate_patches(
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
    d: Dist,
) -> dict[str, Any]:
    """Loss and per-class Dice/IoU on the held-out patches, all-reduced over ranks."""
    from tilenet.train.metrics import ConfusionMatrix

    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n, n
    # Validation must not move the training RNG (iter(loader) draws a seed from it).
    with torch.random.fork_rng(devices=_fork_devices(device)):
        for x, y in loader:
            x = model_input(x.to(device, non_blocking=True), loader.dataset)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            sums[0] += loss_fn(logits.float(), y).double() * x.shape[0]
            sums[1] += x.shape[0]
            cm.update(logits, y)
    model.train(was_training)
    all_reduce_sum(sums, d)
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


def _infer_config(cfg: DictConfig, device: torch.device) -> InferConfig:
    """The ``infer`` section for held-out scoring, on the training device."""
    ic: InferConfig = OmegaConf.to_object(cfg.infer)  # type: ignore[assignment]
    return dataclasses.replace(ic, device=str(device))


class Validator:
    """A run's validation at a step: held-out patches (``data.val_stores``) every call, and
    held-out images (``train.val_images``) every ``train.val_images_every`` steps.

    Collective under DDP: every rank calls it. Images are scored on rank 0 and broadcast; a
    step's image scores are kept, so the end of training does not score them twice.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self._heldout: dict[int, dict[str, Any]] = {}

    def __call__(self, step: int) -> dict[str, Any]:
        """The validation record at ``step`` (empty: nothing to validate on)."""
        run, tc = self.run, self.run.tc
        rec: dict[str, Any] = {}
        if run.val_loader is not None:
            rec.update(
                validate_patches(
                    run.model,
                    run.val_loader,
                    run.loss_fn,
                    device=run.device,
                    precision=tc.precision,
                    channels_last=tc.channels_last,
                    num_classes=int(run.cfg.model.num_classes),
                    ignore_index=int(tc.ignore_index),
                    class_names=run.class_names,
                    d=run.dist,
                )
            )
        if run.held_out and tc.val_images_every and step % tc.val_images_every == 0:
            rec.update(self.heldout(step))
        return rec

    def heldout(self, step: int) -> dict[str, Any]:
        """Scores of the held-out images at ``step`` (``heldout_dice``, ``heldout_iou``, ...)."""
        if step in self._heldout:  # already scored at this step (val_images_every)
            return self._heldout[step]
        run = self.run
        res = None
        if run.dist.main:
            with torch.random.fork_rng(devices=_fork_devices(run.device)):
                s = evaluate_images(
                    (run.model, run.spec),
                    run.held_out,
                    infer=_infer_config(run.cfg, run.device),
                    ignore_index=int(run.tc.ignore_index),
                    work_dir=run.run_dir,
                    resolution=run.resolution,
                )
            res = {
                "heldout_dice": s["mean_dice"],
                "heldout_iou": s["mean_iou"],
                "heldout_dice_per_class": dict(zip(s["class_names"], s["dice"], strict=True)),
                "heldout_iou_per_class": dict(zip(s["class_names"], s["iou"], strict=True)),
                "heldout_pixels": s["pixels"],
            }
        self._heldout.clear()
        self._heldout[step] = broadcast(res, run.dist)
        return self._heldout[step]
