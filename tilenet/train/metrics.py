"""Segmentation metrics from confusion matrices: per-class Dice and IoU.

A confusion matrix is a sum, so it can be accumulated batch by batch, tile by tile and
across DDP ranks (:meth:`ConfusionMatrix.all_reduce`) and the scores computed once at the
end. Rows are the true class, columns the predicted class; pixels whose label is
``ignore_index`` (or outside ``0..K-1``) are not counted.

>>> import torch
>>> cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 255]), 3)
>>> cm.tolist()
[[1, 0, 0], [0, 1, 0], [0, 1, 0]]
>>> scores = scores_from_confusion(cm, class_names=["bg", "a", "b"])
>>> scores["dice"], scores["mean_dice"]
([1.0, 0.6666666666666666, 0.0], 0.3333333333333333)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "ClassMapCounts",
    "ConfusionMatrix",
    "confusion_matrix",
    "score_class_map",
    "scores_from_confusion",
]


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """The (K, K) int64 confusion matrix of class maps ``pred`` and ``target`` (same shape).

    Computed on the tensors' device with one ``bincount``. Read-only numpy blocks (a
    memory-mapped or decoded-in-place label file) are accepted as they are.
    """
    pred, target = (
        np.array(a) if isinstance(a, np.ndarray) and not a.flags.writeable else a
        for a in (pred, target)
    )
    p = torch.as_tensor(pred).reshape(-1).to(torch.int64)
    t = torch.as_tensor(target).reshape(-1).to(device=p.device, dtype=torch.int64)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.numel()} pixels but target has {t.numel()}")
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    # Predictions outside 0..K-1 cannot come from an argmax; clamp so bincount stays K*K.
    idx = t[keep] * num_classes + p[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def scores_from_confusion(
    cm: torch.Tensor | np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    foreground: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Per-class Dice and IoU and their means over the ``foreground`` classes.

    ``foreground`` defaults to every class but 0 (all classes when K = 1). A class absent
    from both target and prediction has no score (``None``) and is left out of the means;
    the means are ``None`` when no foreground class has a score. Plain JSON-able data.
    """
    m = torch.as_tensor(cm).detach().cpu().to(torch.float64).numpy()
    k = m.shape[0]
    tp = np.diag(m)
    fp = m.sum(0) - tp
    fn = m.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    fg = list(foreground) if foreground is not None else (list(range(1, k)) or [0])
    names = list(class_names) if class_names else [f"class_{i}" for i in range(k)]

    def mean(v: np.ndarray) -> float | None:
        sel = v[fg]
        sel = sel[~np.isnan(sel)]
        return float(sel.mean()) if len(sel) else None

    total = m.sum()
    return {
        "dice": _nan_to_none(dice),
        "iou": _nan_to_none(iou),
        "mean_dice": mean(dice),
        "mean_iou": mean(iou),
        "accuracy": float(tp.sum() / total) if total else None,
        "class_names": names,
        "pixels": int(total),
    }


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; all-reducible across DDP ranks.

    >>> acc = ConfusionMatrix(2)
    >>> logits = torch.tensor([[[[3.0, 0.0]], [[0.0, 1.0]]]])  # (N=1, K=2, H=1, W=2)
    >>> acc.update(logits, torch.tensor([[[0, 1]]]))
    >>> acc.matrix.tolist()
    [[1, 0], [0, 1]]
    """

    def __init__(
        self, num_classes: int, *, ignore_index: int | None = 255, device: Any = "cpu"
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(
            (self.num_classes, self.num_classes), dtype=torch.int64, device=device
        )

    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits (N, K, H, W) (argmax taken) or class maps (N, H, W)."""
        x = logits_or_pred
        if x.ndim == target.ndim + 1:
            x = x.argmax(1)
        self.matrix += confusion_matrix(
            x.to(self.matrix.device),
            target.to(self.matrix.device),
            self.num_classes,
            ignore_index=self.ignore_index,
        )

    def add(self, matrix: torch.Tensor | np.ndarray) -> None:
        """Add a precomputed confusion matrix (e.g. one tile of a stitched prediction)."""
        self.matrix += torch.as_tensor(matrix, dtype=torch.int64).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrices of all ranks in place (no-op without torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self, **kwargs: Any) -> dict[str, Any]:
        """:func:`scores_from_confusion` of the accumulated matrix."""
        return scores_from_confusion(self.matrix, **kwargs)


@dataclass(frozen=True)
class ClassMapCounts:
    """Pixel counts of a class map against a label image (see :func:`score_class_map`).

    ``confusion`` is the (K, K) int64 confusion matrix; ``foreground`` is
    ``(|pred fg & true fg|, |pred fg|, |true fg|)`` over the pixels whose label is not
    ``ignore_index`` (foreground: any class but 0), for the binary foreground Dice.
    """

    confusion: np.ndarray
    foreground: tuple[int, int, int]

    @property
    def foreground_dice(self) -> float:
        """Binary foreground Dice ``2 |P & T| / (|P| + |T|)`` (0 when both are empty)."""
        both, pred, true = self.foreground
        return float(2 * both / max(pred + true, 1))


def score_class_map(
    pred: Any,
    labels: Any,
    num_classes: int,
    *,
    ignore_index: int = 255,
    block: int | tuple[int, int] | None = None,
) -> ClassMapCounts:
    """Count a (H, W) class map ``pred`` against ``labels`` block by block.

    ``pred`` is a 2-D array (numpy or zarr); ``labels`` an image with ``shape`` and
    ``read(window)`` returning (h, w, 1) class ids (a :class:`tilenet.io.LazyImage`).
    Blocks are ``block`` or ``pred``'s chunks, so memory stays bounded by a block.
    """
    from tilenet.errors import ShapeMismatchError
    from tilenet.geometry import iter_blocks

    h, w = (int(v) for v in pred.shape)
    if tuple(labels.shape[:2]) != (h, w):
        raise ShapeMismatchError(
            f"label image is {labels.shape[0]}x{labels.shape[1]} but the class map is {h}x{w}"
        )
    if block is None:
        chunks = getattr(pred, "chunks", None)
        block = (int(chunks[0]), int(chunks[1])) if chunks else (h, w)
    k = int(num_classes)
    cm = np.zeros((k, k), np.int64)
    fg = np.zeros(3, np.int64)
    for win in iter_blocks((h, w), block):
        p = np.asarray(pred[win.y : win.y1, win.x : win.x1])
        t = labels.read(win)[..., 0]
        cm += confusion_matrix(p, t, k, ignore_index=ignore_index).numpy()
        valid = t != ignore_index
        pf, tf = (p > 0) & valid, (t > 0) & valid
        fg += [int((pf & tf).sum()), int(pf.sum()), int(tf.sum())]
    return ClassMapCounts(cm, (int(fg[0]), int(fg[1]), int(fg[2])))
