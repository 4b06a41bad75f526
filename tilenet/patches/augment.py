"""Joint image + mask augmentation with torchvision.transforms.v2, on whole batches.

Images are uint8 (or other integer/float) tensors (B, C, H, W) *before* normalisation, masks
(B, H, W). Flips and 90-degree rotations are exact (no interpolation) and applied to random
sub-batches at once, so they cost almost nothing per patch; colour jitter and rescaling
draw their parameters per patch. The mask follows every geometric change; pixels that a
rescale brings in from outside the patch get ``ignore_index`` in the mask.

HED stain augmentation (Tellez et al. 2018, for H&E): each RGB patch is unmixed into
haematoxylin, eosin and DAB optical densities with the Ruifrok-Johnston matrix as
scikit-image publishes it (``skimage.color.hed_from_rgb``, same scaling as ``rgb2hed``), each
stain is perturbed ``h' = alpha * h + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and
``beta ~ U(-bias, bias)`` per patch, and the result mixed back to RGB. It runs on the whole
batch as tensors in the loader (no per-patch NumPy round trip); unlike ``rgb2hed`` the
stains are not clipped at 0, so ``alpha = 1, beta = 0`` gives back the input.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from tilenet.config import AugmentConfig
from tilenet.errors import ConfigError

__all__ = [
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "JointAugment",
    "RandomRot90",
    "build_augment",
    "hed_jitter",
]

#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as
#: ``skimage.color.rgb_from_hed``; HED_FROM_RGB is its inverse (``hed_from_rgb``).
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
HED_FROM_RGB = tuple(
    map(tuple, torch.linalg.inv(torch.tensor(RGB_FROM_HED, dtype=torch.float64)).tolist())
)
#: scikit-image's optical density scale: log(1e-6) (``rgb2hed``'s ``log_adjust``).
_LOG_ADJUST = float(torch.log(torch.tensor(1e-6, dtype=torch.float64)))


def hed_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale and shift the H, E, D stains of RGB ``images`` (B, 3, H, W), one (3,) ``alpha``
    and ``beta`` per image (``alpha``, ``beta``: (B, 3)); same dtype out.

    Integer images are read as 0 .. their dtype's maximum, floats as 0 .. 1; the result is
    rounded and clipped to that range.

    >>> x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    >>> bool((hed_jitter(x, torch.ones(2, 3), torch.zeros(2, 3)) == x).all())
    True
    """
    b, c, h, w = images.shape
    integer = not images.dtype.is_floating_point
    top = float(torch.iinfo(images.dtype).max) if integer else 1.0
    # Unmixing, scaling the stains and mixing back are linear in optical density, so one
    # 3x3 matrix and offset per image do it: od' = od @ (H diag(alpha) R) + beta @ R.
    to_hed = torch.tensor(HED_FROM_RGB, dtype=torch.float32)
    to_rgb = torch.tensor(RGB_FROM_HED, dtype=torch.float32)
    alpha, beta = alpha.to(torch.float32), beta.to(torch.float32)
    mix = to_hed[None] * alpha[:, None, :] @ to_rgb  # (B, 3, 3)
    shift = (beta @ to_rgb) * _LOG_ADJUST  # (B, 3), in log space
    logs = torch.log(images.to(torch.float32).div_(top).clamp_(1e-6)).reshape(b, c, h * w)
    # Channels first: (B, 3, 3) @ (B, 3, HW), much faster than (B, HW, 3) @ (B, 3, 3).
    out = torch.baddbmm(shift[:, :, None], mix.transpose(1, 2), logs).exp_().clamp_(0.0, 1.0)
    out = out.reshape(b, c, h, w)
    if not integer:
        return out.to(images.dtype)
    return out.mul_(top).round_().to(images.dtype)


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
        #: torchvision's colour jitter, for uint8 RGB images (it clamps floats to [0, 1]).
        self.colour: v2.Transform | None = None
        if channels == 3 and any((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
            self.colour = v2.ColorJitter(
                brightness=cfg.brightness or None,
                contrast=cfg.contrast or None,
                saturation=cfg.saturation or None,
                hue=cfg.hue or None,
            )
        #: Brightness/contrast for other images (any bands, any dtype; ColorJitter refuses
        #: 2 or 4 bands and uint16, and clamps floats to [0, 1]): per band
        #: (:func:`_band_jitter`); saturation and hue need uint8 RGB.
        self.band_jitter = (float(cfg.brightness), float(cfg.contrast))
        self.channels = channels
        self.affine: v2.Transform | None = None
        lo, hi = (float(v) for v in cfg.scale)
        if (lo, hi) != (1.0, 1.0):
            self.affine = v2.RandomAffine(
                degrees=0.0,
                scale=(lo, hi),
                fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index},
            )
        per_sample = [t for t in (self.colour, self.affine) if t is not None]
        self.per_sample = v2.Compose(per_sample) if per_sample else None
        self.hed = float(cfg.hed)
        self.hed_bias = float(cfg.hed if cfg.hed_bias is None else cfg.hed_bias)
        if not 0.0 <= self.hed < 1.0 or self.hed_bias < 0.0:
            raise ConfigError(
                f"data.augment.hed must be in [0, 1) and hed_bias >= 0, got {cfg.hed!r}, "
                f"{cfg.hed_bias!r}"
            )
        if (self.hed or self.hed_bias) and channels != 3:
            raise ConfigError(
                f"data.augment.hed: HED stain augmentation needs RGB images, got {channels} "
                "channels"
            )

    @property
    def is_identity(self) -> bool:
        c = self.cfg
        return not (c.hflip or c.vflip or c.rot90 or self.per_sample or self.hed or self.hed_bias)

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Plain tensors here; each call to a v2 transform wraps its inputs as Image/Mask so
        # that v2 knows which is the mask (a bare second tensor would pass through untouched).
        images = images.as_subclass(torch.Tensor)
        masks = masks.as_subclass(torch.Tensor)
        b = images.shape[0]
        dtype = images.dtype
        if dtype in _SIGNED:  # no index_put for wide unsigned ints: move bits as signed ones
            images = images.view(_SIGNED[dtype])
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
        images = images.view(dtype)
        if self.hed or self.hed_bias:  # stains first, then the generic colour jitter
            alpha = 1.0 + (torch.rand(b, 3) * 2 - 1) * self.hed
            beta = (torch.rand(b, 3) * 2 - 1) * self.hed_bias
            images = hed_jitter(images, alpha, beta)
        per_sample = self.per_sample
        if self.channels != 3 or dtype != torch.uint8:  # ColorJitter: floats in [0, 1]
            if any(self.band_jitter):
                images = _band_jitter(images, *self.band_jitter)
            per_sample = self.affine
        if per_sample is not None:
            for i in range(b):
                images[i], masks[i] = per_sample(
                    tv_tensors.Image(images[i]), tv_tensors.Mask(masks[i])
                )
        return images, masks


#: Unsigned integer dtypes torch cannot index_put, and the signed ones of their width.
_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _band_jitter(images: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """Brightness and contrast per image for any number of bands and any dtype: each image
    is scaled by a factor in [1 - brightness, 1 + brightness], then pulled towards (or pushed
    from) its mean over all bands by one in [1 - contrast, 1 + contrast]; integers are
    rounded and clamped to their dtype's range, floats are not clamped.

    >>> x = torch.full((2, 4, 3, 3), 1000, dtype=torch.uint16)
    >>> y = _band_jitter(x, 0.1, 0.1)
    >>> y.dtype, bool(((y.int() >= 900) & (y.int() <= 1100)).all())
    (torch.uint16, True)
    """
    b = images.shape[0]
    f = images.to(torch.float32)
    if brightness:
        f = f * (1.0 + (torch.rand(b, 1, 1, 1) * 2 - 1) * brightness)
    if contrast:
        mean = f.mean(dim=(1, 2, 3), keepdim=True)
        f = mean + (f - mean) * (1.0 + (torch.rand(b, 1, 1, 1) * 2 - 1) * contrast)
    if images.dtype.is_floating_point:
        return f.to(images.dtype)
    info = torch.iinfo(images.dtype)
    return f.round_().clamp_(info.min, info.max).to(images.dtype)


def build_augment(cfg: AugmentConfig | None, *, channels: int) -> JointAugment | None:
    """A :class:`JointAugment` for ``cfg``, or None when disabled or a no-op."""
    if cfg is None or not getattr(cfg, "enabled", True):
        return None
    aug = JointAugment(cfg, channels=channels)
    return None if aug.is_identity else aug
