"""torchvision's ``fcn_resnet50`` and ``deeplabv3_resnet50``, made tile-safe.

Both use a dilated ResNet50 (output stride 8) and upsample the logits bilinearly with
``align_corners=False``, which is equivariant to shifts by multiples of 8; its support is in
the receptive field. Built with ``weights=None, weights_backbone=None`` (nothing downloads);
no auxiliary head.

DeepLabV3's ASPP has a global image-pooling branch: every output pixel would depend on the
whole image (infinite receptive field), so tiles could never agree with a whole-image pass.
Here it is replaced by a *local* average: a ``(2r+1) x (2r+1)`` mean (``r`` = the largest
atrous rate, 36) over the same features, so it reaches no farther than the widest atrous conv
and the receptive field stays that of the convolutions. Its parameters keep torchvision's
names and shapes, so torchvision DeepLabV3 weights still load (the branch then averages
locally instead of globally: a small, deliberate change of the model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tilenet.models.registry import TileModel, register_model

__all__ = ["LocalPooling", "TorchvisionSeg"]


class _SeparableMean(nn.Module):
    """Mean over a (2r+1)^2 window of valid pixels, as two 1-D means (O(r) per pixel)."""

    def __init__(self, radius: int) -> None:
        super().__init__()
        k = 2 * radius + 1
        # count_include_pad=False: at the image edge average only real pixels.
        self.rows = nn.AvgPool2d((k, 1), stride=1, padding=(radius, 0), count_include_pad=False)
        self.cols = nn.AvgPool2d((1, k), stride=1, padding=(0, radius), count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cols(self.rows(x))


class LocalPooling(nn.Sequential):
    """ASPP pooling branch with a local mean; same parameter names as ``ASPPPooling``."""

    def __init__(self, in_channels: int, out_channels: int, radius: int) -> None:
        super().__init__(
            _SeparableMean(radius),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias-free 1x1 conv commutes with the mean; reducing channels first is 8x cheaper.
        return self[3](self[2](self[0](self[1](x))))


class TorchvisionSeg(TileModel):
    """A torchvision segmentation model returning only the ``"out"`` logits."""

    _stride_hint = 8

    def __init__(self, net: nn.Module, *, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        if in_channels != 3:
            backbone: Any = net.backbone
            backbone.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.net = net

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]

    def load_pretrained(self, state: dict[str, Any]) -> None:
        """Accept our state dicts (``net.`` prefix) and torchvision's (none; aux head dropped)."""
        if not any(k.startswith("net.") for k in state):
            state = {f"net.{k}": v for k, v in state.items() if not k.startswith("aux_")}
        super().load_pretrained(state)


@register_model("fcn_resnet50")
def fcn(*, in_channels: int, num_classes: int) -> TorchvisionSeg:
    """torchvision FCN-ResNet50 (output stride 8), random init."""
    from torchvision.models.segmentation import fcn_resnet50  # ~3 s: imported when built

    net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return TorchvisionSeg(net, in_channels=in_channels, num_classes=num_classes)


@register_model("deeplabv3_resnet50")
def deeplab(*, in_channels: int, num_classes: int, pool_radius: int = 36) -> TorchvisionSeg:
    """torchvision DeepLabV3-ResNet50 with a local (not global) ASPP pooling branch.

    ``pool_radius`` is that branch's reach in feature pixels (x8 in input pixels); 0 drops it.
    """
    if isinstance(pool_radius, bool) or not isinstance(pool_radius, int) or pool_radius < 0:
        raise ValueError(f"pool_radius must be a non-negative int, got {pool_radius!r}")
    from torchvision.models.segmentation import deeplabv3_resnet50
    from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPPooling

    net = deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
    )
    aspp = net.classifier[0]
    assert isinstance(aspp, ASPP)
    idx = next(i for i, m in enumerate(aspp.convs) if isinstance(m, ASPPPooling))
    old = aspp.convs[idx]
    c_in, c_out = old[1].in_channels, old[1].out_channels
    if pool_radius:
        aspp.convs[idx] = LocalPooling(c_in, c_out, pool_radius)
    else:
        del aspp.convs[idx]
        proj = aspp.project[0]
        aspp.project[0] = nn.Conv2d(proj.in_channels - c_out, proj.out_channels, 1, bias=False)
    return TorchvisionSeg(net, in_channels=in_channels, num_classes=num_classes)
