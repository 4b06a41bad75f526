"""A few-layer model for tests: one 2x2 pool (stride 2), a skip, nearest upsampling."""

from __future__ import annotations

import torch
from torch import nn

from tilenet.models.registry import TileModel, register_model

__all__ = ["Tiny"]


class Tiny(TileModel):
    """conv3x3 -> BN -> ReLU -> pool -> conv3x3 -> ReLU -> up x2 -> concat -> conv1x1."""

    _stride_hint = 2

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 8) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        super().__init__(in_channels, num_classes)
        self.enc = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        return self.head(torch.cat([e, self.up(self.mid(e))], dim=1))


@register_model("tiny")
def tiny(*, in_channels: int, num_classes: int, width: int = 8) -> Tiny:
    """Tiny test model (stride 2)."""
    return Tiny(in_channels=in_channels, num_classes=num_classes, width=width)
