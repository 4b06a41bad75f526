"""Shared fixtures: tiny synthetic images, made fresh in each test's tmp_path."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Tests must not compete for the 2 cores with oversubscribed BLAS/torch thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def rgb64(rng: np.random.Generator) -> np.ndarray:
    """A 64x80 uint8 RGB image with structure (not constant), so windows differ."""
    yy, xx = np.mgrid[0:64, 0:80]
    base = np.stack([yy * 3, xx * 3, (yy + xx) * 2], axis=-1)
    noise = rng.integers(0, 20, size=(64, 80, 3))
    return ((base + noise) % 256).astype(np.uint8)
