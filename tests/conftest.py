"""Shared fixtures: tiny synthetic images made fresh in each test's tmp_path, the builders of
``tests/builders.py`` (checkpoint, whole-image reference, pyramid TIFF), one tiny checkpoint
per session, the session's S3 server and its buckets."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


def _threads_per_worker() -> str:
    """The cores shared out among pytest-xdist's workers (all of them when run serially).

    Each worker runs one test at a time; a worker with as many torch/OpenMP threads as the
    machine has cores oversubscribes it, and OpenMP threads that spin while they wait for a
    core burn CPU the other worker needs: with 2 workers on 2 cores, 2 threads each cost
    ~30 % more CPU time than 1 (tests/models/test_smp.py: 42 s against 31 s of user time).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return str(max(1, (os.cpu_count() or 1) // max(1, workers)))


# Set before torch is imported (it reads OMP_NUM_THREADS once); subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", _threads_per_worker())

# Where the environment asks Python not to write bytecode (PYTHONDONTWRITEBYTECODE=1, as on
# this project's CI machines), each pytest-xdist worker and each tilenet process a test starts
# would compile tilenet and the (assertion-rewritten) tests from source again: ~4 s of CPU a
# worker. Let the test run cache them in the checkout's __pycache__ folders (git-ignored);
# subprocesses read them. Installed packages are compiled at install time either way.
sys.dont_write_bytecode = False

import builders  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from s3server import moto_server  # noqa: E402


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection built (torch, the test modules, ~1.5 M objects) out of the
    garbage collector's sight: it lives until the process ends anyway, and every full
    collection, pytest's five at the end of each worker included, would walk it again."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_cuda:  # not a path named gpu
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the session (tests/s3server.py); its endpoint URL."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A fresh, empty bucket on :func:`s3_server`; its s3:// URL."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def make_checkpoint() -> Callable[..., Path]:
    """``make_checkpoint(path, name="tiny", **options) -> path``: :func:`builders.make_checkpoint`."""
    return builders.make_checkpoint


@pytest.fixture(scope="session")
def whole_image_reference() -> Callable[..., np.ndarray]:
    """``whole_image_reference(checkpoint_or_model, arr) -> (K, H, W)`` softmax of one
    whole-image pass: :func:`builders.whole_image_reference`."""
    return builders.whole_image_reference


@pytest.fixture(scope="session")
def pyramid_tiff() -> Callable[..., list[np.ndarray]]:
    """``pyramid_tiff(path, arr, levels=2, ...) -> levels``: :func:`builders.pyramid_tiff`."""
    return builders.pyramid_tiff


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``tiny`` checkpoint per session (seed 0, 3 classes bg/a/b, mean 120, std 60):
    read-only, shared by the tests that only need some real model."""
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "tiny.pt"
    return builders.make_checkpoint(path, class_names=["bg", "a", "b"])


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


def _kill_after_first_band(cmd: list[str], markers: Path, *, timeout: float = 120) -> int:
    """Start ``cmd`` (one thread), SIGKILL it once a band marker appears in ``markers``;
    return how many markers the killed run left."""
    builders.kill_when(cmd, lambda: bool(list(markers.glob("region-*.json"))), timeout=timeout)
    return len(list(markers.glob("region-*.json")))


@pytest.fixture
def kill_after_first_band() -> Callable[..., int]:
    """``kill(cmd, markers_dir) -> bands kept``: a real SIGKILL in the middle of a run."""
    return _kill_after_first_band
