"""HED stain augmentation (Tellez et al. 2018) in the joint image + mask augmentation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tilenet.config import AugmentConfig, load_config
from tilenet.errors import ConfigError
from tilenet.patches.augment import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    JointAugment,
    build_augment,
    hed_jitter,
)

skcolor = pytest.importorskip("skimage.color")

#: Only the stain augmentation (geometry and the generic colour jitter off).
HED_ONLY: dict[str, Any] = {
    "hflip": 0.0,
    "vflip": 0.0,
    "rot90": False,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
}


def _he_batch(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 RGB patches of H&E-like colours (purple nuclei, pink stroma, white)."""
    rng = np.random.default_rng(seed)
    palette = np.array([[80, 40, 140], [230, 140, 190], [245, 240, 245]], np.float64)
    idx = rng.integers(0, 3, (b, size, size))
    rgb = palette[idx] + rng.normal(0, 8, (b, size, size, 3))
    return torch.from_numpy(np.clip(rgb, 0, 255).astype(np.uint8)).permute(0, 3, 1, 2).clone()


def test_the_matrix_is_scikit_images() -> None:
    np.testing.assert_allclose(RGB_FROM_HED, skcolor.rgb_from_hed)
    np.testing.assert_allclose(HED_FROM_RGB, skcolor.hed_from_rgb, rtol=1e-12)


def test_hed_jitter_matches_scikit_image_rgb2hed_hed2rgb() -> None:
    """Perturbing skimage's rgb2hed stains and mixing back with hed2rgb gives the same pixels
    (where rgb2hed's clip at 0 does not act: tilenet does not clip)."""
    x = _he_batch(b=2)
    alpha = torch.tensor([[1.1, 0.9, 1.05], [0.85, 1.2, 1.0]])
    beta = torch.tensor([[0.01, -0.02, 0.0], [-0.01, 0.03, 0.01]])
    got = hed_jitter(x, alpha, beta).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        rgb = x[i].permute(1, 2, 0).numpy()
        hed = skcolor.rgb2hed(rgb)
        unclipped = (np.log(np.maximum(rgb / 255, 1e-6)) / np.log(1e-6)) @ skcolor.hed_from_rgb
        keep = (unclipped > 0).all(axis=-1)
        assert keep.mean() > 0.3
        want = skcolor.hed2rgb(hed * alpha[i].numpy() + beta[i].numpy())
        diff = np.abs(got[i].astype(np.float64) - np.round(want * 255))[keep]
        assert diff.max() <= 1  # rounding only


def test_identity_at_sigma_zero() -> None:
    x = _he_batch()
    assert build_augment(AugmentConfig(**HED_ONLY), channels=3) is None
    assert torch.equal(hed_jitter(x, torch.ones(4, 3), torch.zeros(4, 3)), x)
    f = x.float() / 255
    torch.testing.assert_close(hed_jitter(f, torch.ones(4, 3), torch.zeros(4, 3)), f)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
def test_range_dtype_and_mask(dtype: torch.dtype) -> None:
    aug = build_augment(AugmentConfig(**HED_ONLY, hed=0.2), channels=3)
    assert isinstance(aug, JointAugment)
    x = _he_batch()
    if dtype == torch.uint16:
        x = (x.to(torch.int32) * 257).to(torch.uint16)
    elif dtype == torch.float32:
        x = x.float() / 255
    masks = torch.randint(0, 3, (4, 16, 16), dtype=torch.uint8)
    torch.manual_seed(1)
    y, m = aug(x.clone(), masks.clone())
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(m, masks)  # the mask is untouched
    if dtype == torch.float32:
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # sigma > 0 changes the colours, by an amount of the order of sigma
    change = (y.double() - x.double()).abs().mean() / (1.0 if dtype == torch.float32 else 255)
    scale = 257.0 if dtype == torch.uint16 else 1.0
    assert 0.005 < float(change) / scale < 0.3


def test_deterministic_with_seed_and_per_patch() -> None:
    aug = build_augment(AugmentConfig(**HED_ONLY, hed=0.05, hed_bias=0.02), channels=3)
    assert aug is not None
    x, masks = _he_batch(), torch.zeros(4, 16, 16, dtype=torch.uint8)
    torch.manual_seed(7)
    a, _ = aug(x.clone(), masks.clone())
    torch.manual_seed(7)
    b, _ = aug(x.clone(), masks.clone())
    c, _ = aug(x.clone(), masks.clone())
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Each patch draws its own stain factors: the same patch four times comes out differently.
    same = x[:1].repeat(4, 1, 1, 1)
    d, _ = aug(same, masks.clone())
    assert not torch.equal(d[0], d[1])


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs RGB images, got 4 channels"):
        build_augment(AugmentConfig(hed=0.05), channels=4)
    with pytest.raises(ConfigError, match=r"data\.augment\.hed must be in \[0, 1\)"):
        build_augment(AugmentConfig(hed=1.5), channels=3)
    cfg = load_config(None, ["data.augment.hed=0.05"])
    assert (cfg.data.augment.hed, cfg.data.augment.hed_bias) == (0.05, None)
