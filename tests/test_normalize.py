"""Normalisation: statistics with one std floor, one arithmetic for every batch."""

from __future__ import annotations

import numpy as np
import torch

from tilenet.normalize import STD_FLOOR, Normalizer, channel_stats, normalize_


def test_channel_stats_match_numpy_and_floor_constant_channels() -> None:
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (1000, 3)).astype(np.float64)
    px[:, 2] = 7.0  # a constant channel
    mean, std = channel_stats(px.sum(0), (px * px).sum(0), len(px))
    np.testing.assert_allclose(mean, px.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std[:2], px.std(0)[:2], rtol=1e-9)
    assert std[2] == STD_FLOOR
    # the former floors (std at 1e-6 in the tiler, variance at 1e-12 in store_stats) agree
    assert np.sqrt(np.maximum(-1e-20, 1e-12)) == max(0.0, 1e-6) == STD_FLOOR


def test_normalize_is_subtract_then_multiply_by_float32_reciprocal() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    mean, std = [10.0, 20.5, 30.25], [3.0, 7.0, 0.1]
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) * (1.0 / torch.tensor(std)).view(1, 3, 1, 1)
    got = normalize_(x.clone(), mean, std)
    assert torch.equal(got, want)
    y = x.clone()
    norm = Normalizer(mean, std)
    assert norm(y) is y and torch.equal(y, want)  # in place
