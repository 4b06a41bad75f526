"""Segmentation losses: cross-entropy, soft Dice, and their sum.

All take logits (N, K, H, W) and integer targets (N, H, W); pixels equal to
``ignore_index`` contribute nothing, and optional per-class weights apply to both. Pixels
labelled 255 (:data:`tilenet.io.base.IGNORE_INDEX`: outside every annotation, nodata, the fill
of augmentation) contribute nothing either, whatever ``ignore_index`` is.

>>> import torch
>>> loss = build_loss("ce+dice", num_classes=2)
>>> logits = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]])  # (1, 2, 1, 2), confident
>>> round(float(loss(logits, torch.tensor([[[0, 1]]]))), 3)
0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from tilenet.errors import ConfigError
from tilenet.io.base import IGNORE_INDEX

__all__ = ["LOSSES", "CombinedLoss", "DiceLoss", "build_loss"]

#: Names :func:`build_loss` accepts.
LOSSES = ("ce", "dice", "ce+dice")


class DiceLoss(nn.Module):
    """``1 - soft Dice`` of the softmax, per class over the whole batch, averaged over classes.

    Sums run over the batch (not per image), so a class absent from one patch does not make
    that patch's score undefined. ``smooth`` keeps a class absent from both prediction and
    target at a loss near 0 rather than 0/0. Classes are weighted by ``weight`` (normalised).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        weight: torch.Tensor | None = None,
        ignore_index: int | None = 255,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        w = torch.ones(self.num_classes) if weight is None else weight.detach().float()
        self.weight: torch.Tensor
        self.register_buffer("weight", w / w.sum(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = self.num_classes
        prob = torch.softmax(logits.float(), dim=1)
        valid = (target >= 0) & (target < k)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        # One-hot of an in-range copy of the target; invalid pixels are masked out of both.
        onehot = F.one_hot(torch.where(valid, target, 0).long(), k).permute(0, 3, 1, 2)
        mask = valid.unsqueeze(1).to(prob.dtype)
        prob = prob * mask
        onehot = onehot.to(prob.dtype) * mask
        dims = (0, 2, 3)
        inter = (prob * onehot).sum(dims)
        denom = prob.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return ((1 - dice) * self.weight.to(dice.device)).sum()


class CombinedLoss(nn.Module):
    """Sum of losses (here cross-entropy + Dice)."""

    def __init__(self, *losses: nn.Module) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = self.losses[0](logits, target)
        for loss in self.losses[1:]:
            total = total + loss(logits, target)
        return total


class _CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy in float32 (stable under autocast) that is 0, not NaN, if all ignored."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ignore_index != IGNORE_INDEX:  # the data's own "ignore" label: ignored too
            target = torch.where(target == IGNORE_INDEX, self.ignore_index, target)
        if self.ignore_index >= 0 and bool((target == self.ignore_index).all()):
            return logits.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
        return super().forward(logits.float(), target.long())


def build_loss(
    name: str,
    *,
    num_classes: int,
    class_weights: Sequence[float] | None = None,
    ignore_index: int | None = 255,
) -> nn.Module:
    """``"ce"``, ``"dice"`` or ``"ce+dice"``, with optional class weights and ignore_index."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    weight = None
    if class_weights:
        if len(class_weights) != num_classes:
            raise ConfigError(
                f"train.class_weights has {len(class_weights)} values but the model has "
                f"{num_classes} classes; give one weight per class"
            )
        if any(float(w) < 0 for w in class_weights) or sum(map(float, class_weights)) <= 0:
            raise ConfigError(f"train.class_weights must be >= 0 and not all 0: {class_weights!r}")
        weight = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
    ii = -100 if ignore_index is None else int(ignore_index)
    parts: list[nn.Module] = []
    if "ce" in name.split("+"):
        parts.append(_CrossEntropy(weight=weight, ignore_index=ii))
    if "dice" in name.split("+"):
        parts.append(DiceLoss(num_classes, weight=weight, ignore_index=ignore_index))
    return parts[0] if len(parts) == 1 else CombinedLoss(*parts)
