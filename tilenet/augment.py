"""Joint image + mask augmentation with torchvision.transforms.v2, on whole batches.

Images are uint8 (or other integer/float) tensors (B, C, H, W) *before* normalisation, masks
(B, H, W). Flips and 90-degree rotations are exact (no interpolation) and applied to random
sub-batches at once, so they cost almost nothing per patch; colour jitter and rescaling
draw their parameters per patch. The mask follows every geometric change; pixels that a
rescale brings in from outside the patch get ``ignore_index`` in the mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from tilenet.config import AugmentConfig

__all__ = ["JointAugment", "RandomRot90", "build_augment"]


class RandomRot90(v2.Transform):
    """Rotate image and mask together by a random multiple of 90 degrees (exact).

    Only square inputs keep their shape; the tiler's patches are square.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor):
            return inpt
        out = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1))
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class JointAugment:
    """Augment a batch of images (B, C, H, W) and masks (B, H, W) consistently.

    >>> aug = JointAugment(AugmentConfig(brightness=0, contrast=0, saturation=0), channels=3)
    >>> x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    >>> y, m = aug(x, x[:, 0].clone())
    >>> bool((y[:, 0] == m).all())
    True
    """

    def __init__(self, cfg: AugmentConfig, *, channels: int, ignore_index: int = 255) -> None:
        self.cfg = cfg
        self.hflip = v2.RandomHorizontalFlip(p=1.0)
        self.vflip = v2.RandomVerticalFlip(p=1.0)
        per_sample: list[v2.Transform] = []
        if channels == 3 and any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
            per_sample.append(
                v2.ColorJitter(
                    brightness=cfg.brightness or None,
                    contrast=cfg.contrast or None,
                    saturation=cfg.saturation or None,
                    hue=cfg.hue or None,
                )
            )
        elif channels != 3 and (cfg.brightness or cfg.contrast):
            # saturation/hue need RGB; brightness/contrast do not
            per_sample.append(
                v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None)
            )
        lo, hi = (float(v) for v in cfg.scale)
        if (lo, hi) != (1.0, 1.0):
            per_sample.append(
                v2.RandomAffine(
                    degrees=0.0,
                    scale=(lo, hi),
                    fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index},
                )
            )
        self.per_sample = v2.Compose(per_sample) if per_sample else None

    @property
    def is_identity(self) -> bool:
        c = self.cfg
        return not (c.hflip or c.vflip or c.rot90 or self.per_sample)

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Plain tensors here; each call to a v2 transform wraps its inputs as Image/Mask so
        # that v2 knows which is the mask (a bare second tensor would pass through untouched).
        images = images.as_subclass(torch.Tensor)
        masks = masks.as_subclass(torch.Tensor)
        b = images.shape[0]
        for p, op in ((self.cfg.hflip, self.hflip), (self.cfg.vflip, self.vflip)):
            if p > 0:
                idx = torch.nonzero(torch.rand(b) < p).flatten()
                if len(idx):
                    im, ma = op(tv_tensors.Image(images[idx]), tv_tensors.Mask(masks[idx]))
                    images[idx], masks[idx] = im, ma
        if self.cfg.rot90 and images.shape[-1] == images.shape[-2]:
            k = torch.randint(0, 4, (b,))
            for r in (1, 2, 3):
                idx = torch.nonzero(k == r).flatten()
                if len(idx):
                    images[idx] = torch.rot90(images[idx], r, dims=(-2, -1))
                    masks[idx] = torch.rot90(masks[idx], r, dims=(-2, -1))
        if self.per_sample is not None:
            for i in range(b):
                images[i], masks[i] = self.per_sample(
                    tv_tensors.Image(images[i]), tv_tensors.Mask(masks[i])
                )
        return images, masks


def build_augment(cfg: AugmentConfig | None, *, channels: int) -> JointAugment | None:
    """A :class:`JointAugment` for ``cfg``, or None when disabled or a no-op."""
    if cfg is None or not getattr(cfg, "enabled", True):
        return None
    aug = JointAugment(cfg, channels=channels)
    return None if aug.is_identity else aug
