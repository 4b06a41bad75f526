"""U-Net decoders on torchvision ResNet encoders (``unet_resnet18/34/50``), stride 32.

The encoder is torchvision's ResNet without its pooling and fully connected head, built with
``weights=None`` (nothing downloads). Its first conv is rebuilt for ``in_channels != 3``. The
decoder upsamples x2 five times (bilinear, ``align_corners=False``), concatenating the stem
and layer1..3 features, as in segmentation_models_pytorch's U-Net.

Weights: a state dict of the whole model, or of a torchvision ResNet (e.g. ImageNet weights
saved locally), which fills the encoder; for ``in_channels != 3`` the RGB filters of the first
conv are averaged and repeated (scaled by ``3 / in_channels``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tilenet.errors import ModelError
from tilenet.models.registry import TileModel, register_model
from tilenet.models.unet import conv_block

__all__ = ["ResNetUNet"]

#: torchvision builder name and feature widths (stem, layer1..4). torchvision is imported
#: when one is built: importing it costs ~3 s (it brings torch._dynamo), which a run of
#: another model, and ``tilenet info``, should not pay.
_ENCODERS = {
    "resnet18": ("resnet18", (64, 64, 128, 256, 512)),
    "resnet34": ("resnet34", (64, 64, 128, 256, 512)),
    "resnet50": ("resnet50", (64, 256, 512, 1024, 2048)),
}


class ResNetUNet(TileModel):
    """ResNet encoder + U-Net decoder with ``decoder`` widths (coarse to fine, 5 stages)."""

    _stride_hint = 32

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        encoder: str,
        decoder: tuple[int, ...] | list[int] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__(in_channels, num_classes)
        decoder = tuple(decoder)
        if len(decoder) != 5 or not all(isinstance(c, int) and c > 0 for c in decoder):
            raise ValueError(f"decoder must be 5 positive ints, got {decoder!r}")
        import torchvision.models

        build, widths = _ENCODERS[encoder]
        enc = getattr(torchvision.models, build)(weights=None)
        if in_channels != 3:
            enc.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        del enc.avgpool, enc.fc  # the classifier head: global pooling and a dense layer
        self.encoder = enc
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        skips = (widths[3], widths[2], widths[1], widths[0], 0)
        c_low = widths[4]
        blocks = []
        for c_skip, c_out in zip(skips, decoder, strict=True):
            blocks.append(conv_block(c_low + c_skip, c_out, "batch"))
            c_low = c_out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(decoder[-1], num_classes, 1)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        f0 = e.relu(e.bn1(e.conv1(x)))  # stride 2
        f1 = e.layer1(e.maxpool(f0))  # 4
        f2 = e.layer2(f1)  # 8
        f3 = e.layer3(f2)  # 16
        x = e.layer4(f3)  # 32
        for block, skip in zip(self.decoder[:4], (f3, f2, f1, f0), strict=True):
            x = block(torch.cat([self.up(x), skip], dim=1))
        x = self.decoder[4](self.up(x))
        return self.head(x)

    def load_pretrained(self, state: dict[str, Any]) -> None:
        """A whole-model state dict, or a torchvision ResNet one for the encoder."""
        if not any(k.startswith("layer1.") for k in state):
            super().load_pretrained(state)
            return
        enc = {k: v for k, v in state.items() if not k.startswith("fc.")}
        w = enc.get("conv1.weight")
        if isinstance(w, torch.Tensor) and w.shape[1] != self.in_channels:
            enc["conv1.weight"] = w.mean(1, keepdim=True).repeat(1, self.in_channels, 1, 1) * (
                3 / self.in_channels
            )
        try:
            self.encoder.load_state_dict(enc)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else str(exc)
            raise ModelError(
                f"weights do not fit the {self.spec.name} encoder: {first.strip()[:200]}"
            ) from None


def _builder(encoder: str) -> Any:
    def build(
        *,
        in_channels: int,
        num_classes: int,
        decoder: tuple[int, ...] | list[int] = (256, 128, 64, 32, 16),
    ) -> ResNetUNet:
        return ResNetUNet(
            in_channels=in_channels, num_classes=num_classes, encoder=encoder, decoder=decoder
        )

    build.__doc__ = f"U-Net on a torchvision {encoder} encoder (stride 32)."
    return build


for _name in _ENCODERS:
    register_model(f"unet_{_name}")(_builder(_name))
