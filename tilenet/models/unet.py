"""A configurable U-Net (Ronneberger et al. 2015), padded so output size equals input size.

``depth`` 2x2 max-pools give a total stride of ``2**depth``; any input whose sides are
multiples of it works. Widths double per level from ``base``. The defaults (depth 4,
base 16, batch norm, bilinear upsampling, ~1.9 M parameters) train in minutes on a CPU.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from tilenet.models.registry import TileModel, register_model

__all__ = ["UNet", "conv_block", "make_norm"]

Norm = Literal["batch", "group", "none"]
Up = Literal["bilinear", "transpose"]


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer: BatchNorm (per-pixel at inference), GroupNorm or none."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}")


def conv_block(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    """Two 3x3 convs (zero padding 1), each followed by the norm and ReLU."""
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_out), (c_out, c_out)):
        # A bias before a batch norm is cancelled by it; keep it only without one.
        layers += [nn.Conv2d(a, b, 3, padding=1, bias=norm == "none"), make_norm(norm, b)]
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Up(nn.Module):
    """Upsample x2 (bilinear, or a 2x2 transposed conv), concatenate the skip, conv block."""

    def __init__(self, c_low: int, c_skip: int, c_out: int, norm: str, up: str) -> None:
        super().__init__()
        if up == "bilinear":
            # align_corners=False keeps the layer equivariant to shifts by whole cells.
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            c_up = c_low
        elif up == "transpose":
            self.up = nn.ConvTranspose2d(c_low, c_skip, 2, stride=2)
            c_up = c_skip
        else:
            raise ValueError(f"up must be 'bilinear' or 'transpose', got {up!r}")
        self.block = conv_block(c_up + c_skip, c_out, norm)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(low), skip], dim=1))


class UNet(TileModel):
    """U-Net with ``depth`` levels below full resolution."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        depth: int = 4,
        base: int = 16,
        norm: Norm = "batch",
        up: Up = "bilinear",
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 8:
            raise ValueError(f"depth must be an int in 1..8, got {depth!r}")
        if isinstance(base, bool) or not isinstance(base, int) or base < 1:
            raise ValueError(f"base must be a positive int, got {base!r}")
        self._stride_hint = 2**depth
        super().__init__(in_channels, num_classes)
        widths = [base * 2**i for i in range(depth + 1)]
        self.stem = conv_block(in_channels, widths[0], norm)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList(conv_block(widths[i], widths[i + 1], norm) for i in range(depth))
        self.ups = nn.ModuleList(
            _Up(widths[i + 1], widths[i], widths[i], norm, up) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for block in self.down:
            skips.append(x)
            x = block(self.pool(x))
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)


@register_model("unet")
def unet(
    *,
    in_channels: int,
    num_classes: int,
    depth: int = 4,
    base: int = 16,
    norm: Norm = "batch",
    up: Up = "bilinear",
) -> UNet:
    """U-Net: ``depth`` (stride ``2**depth``), ``base`` width, ``norm``, ``up`` sampling."""
    return UNet(
        in_channels=in_channels, num_classes=num_classes, depth=depth, base=base, norm=norm, up=up
    )
