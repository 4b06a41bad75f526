"""The run environment: device, threads, and the host memory policy scoped to one run."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tilenet.errors import ConfigError, InputError
from tilenet.runtime import (
    HEAP_POLICIES,
    current_heap_settings,
    heap_policy,
    resolve_device,
    torch_threads,
)

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

#: Page faults of a re-allocated 48 MiB buffer (above glibc's largest dynamic mmap threshold):
#: ~0 when freed memory is kept for reuse, one per page (or 2 MiB huge page) when it was
#: unmapped on free. Measured before, inside and after the engine's policy, and after a
#: whole ``infer_image`` run.
_PROBE = """
import json, resource, sys
import numpy as np
from tilenet.runtime import current_heap_settings, heap_policy

def faults():
    a = np.ones(48 << 20, np.uint8)
    del a
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(48 << 20, np.uint8)
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del b
    return f1 - f0

out = {"before": faults(), "settings_before": current_heap_settings()}
with heap_policy(sys.argv[1]) as guard:
    out["inside"] = faults()
    out["settings_inside"] = current_heap_settings()
    for _ in range(7):
        guard.check()
    out["trims"] = guard.trims
out["after"] = faults()
out["settings_after"] = current_heap_settings()
if len(sys.argv) > 2:
    from tilenet.engine.infer import infer_image
    infer_image(sys.argv[2], sys.argv[3], sys.argv[4], tile=64, device="cpu")
    out["after_infer"] = faults()
    out["settings_after_infer"] = current_heap_settings()
print(json.dumps(out))
"""

#: A fresh mapping faults at least once per 2 MiB (numpy asks for huge pages).
_FRESH = (48 << 20) // (2 << 20)


def _probe(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_reuse_policy_keeps_buffers_only_inside_its_block() -> None:
    r = _probe("reuse")
    assert r["settings_before"] is None and r["settings_after"] is None, r
    assert r["settings_inside"] == [256 << 20, 1 << 30], r
    assert r["before"] >= _FRESH, r  # glibc's defaults: unmapped on free, faulted in again
    assert r["inside"] <= 8, r  # kept mapped: reused as it is
    assert r["after"] >= _FRESH, r  # restored: unmapped on free again
    assert r["trims"] == 0  # no trim period inside a 7-batch block of 8


def test_infer_image_restores_the_heap_settings_in_this_process(tmp_path: Path) -> None:
    """The fast check of the one below: the settings tilenet had in force before a run are
    in force after it (the fresh process below also measures that glibc obeys)."""
    import numpy as np
    import tifffile
    from builders import make_checkpoint

    from tilenet.engine.infer import infer_image

    img = tmp_path / "img.tif"
    arr = np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    tifffile.imwrite(img, arr, tile=(32, 32), photometric="rgb")
    ckpt = make_checkpoint(tmp_path / "m.pt", num_classes=2, mean=[128.0] * 3, std=[64.0] * 3)
    before = current_heap_settings()
    with heap_policy("flat"):  # also from inside another policy
        flat = current_heap_settings()
        infer_image(img, ckpt, tmp_path / "a", tile=64, device="cpu", heap="reuse")
        assert current_heap_settings() == flat != HEAP_POLICIES["reuse"].thresholds
    infer_image(img, ckpt, tmp_path / "b", tile=64, device="cpu", heap="reuse")
    assert current_heap_settings() == before


@pytest.mark.slow  # a fresh process imports torch: ~10 s on 2 busy cores (.ci/run runs it)
@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_infer_image_leaves_the_process_heap_settings_as_they_were(tmp_path: Path) -> None:
    import numpy as np
    import tifffile
    from builders import make_checkpoint

    img = tmp_path / "img.tif"
    arr = np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    tifffile.imwrite(img, arr, tile=(32, 32), photometric="rgb")
    ckpt = make_checkpoint(
        tmp_path / "m.pt", seed=None, num_classes=2, mean=[128.0] * 3, std=[64.0] * 3
    )
    r = _probe("trim", str(img), str(ckpt), str(tmp_path / "out"))
    assert r["settings_after_infer"] is None, r
    assert r["after_infer"] >= _FRESH, r  # freed memory no longer kept after the run


def test_heap_policy_restores_nested_settings() -> None:
    before = current_heap_settings()
    with heap_policy("flat"):
        flat = current_heap_settings()
        with heap_policy("reuse"):
            assert current_heap_settings() != flat
        assert current_heap_settings() == flat
    assert current_heap_settings() == before
    with heap_policy("system") as guard:
        assert current_heap_settings() == before and guard.every == 0
    with pytest.raises(ConfigError, match=r"unknown heap policy 'fast'.*reuse"):
        with heap_policy("fast"):
            pass
    assert set(HEAP_POLICIES) == {"reuse", "flat", "trim", "system"}


@pytest.mark.skipif(not GLIBC, reason="heap policies act on glibc's malloc")
def test_reuse_goes_flat_when_the_rss_passes_its_ceiling() -> None:
    """The first batch's growth sets the ceiling (base + 2x); held memory under it keeps the
    reuse thresholds, a batch that ends above it switches the rest of the block to flat."""
    import numpy as np

    before = current_heap_settings()
    with heap_policy("reuse") as guard:
        reuse = current_heap_settings()
        first = np.ones(100 << 20, np.uint8)  # the first batch's working set: 100 MiB
        guard.check()
        assert guard.ceiling_bytes is not None
        held = np.ones(60 << 20, np.uint8)  # fragments held for reuse: under the ceiling
        guard.check()
        assert guard.went_flat_at is None and current_heap_settings() == reuse
        more = np.ones(140 << 20, np.uint8)  # ... and past it
        guard.check()
        assert guard.went_flat_at == 3
        assert current_heap_settings() == HEAP_POLICIES["flat"].thresholds
        trims = guard.trims
        for _ in range(16):
            guard.check()
        assert guard.trims == trims  # flat holds nothing to trim
        del first, held, more
    assert current_heap_settings() == before
    with heap_policy("flat") as guard:
        guard.check()
        assert guard.ceiling_bytes is None  # only reuse holds memory that needs a cap


def test_torch_threads_are_restored() -> None:
    before = torch.get_num_threads()
    other = before + 1  # differs from the process's setting, whatever the test run gave it
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_every_heap_choice_of_the_config_is_a_policy() -> None:
    import typing

    from tilenet.config import InferConfig

    choices = typing.get_args(typing.get_type_hints(InferConfig)["heap"])
    assert set(choices) == set(HEAP_POLICIES)
