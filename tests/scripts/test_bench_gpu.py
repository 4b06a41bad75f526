"""scripts/bench_gpu.py --dry-run: every part of the GPU benchmark runs on the CPU at tiny
sizes, so the script cannot rot between the GPU runs that it is for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gpu.py"


@pytest.mark.slow  # ~11 s; for the script, not the package
def test_bench_gpu_dry_run_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # ~10 s on an idle machine; shared CI runners can be far slower
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_gpu cpu;") and str(out) in lines[0]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["device"] == "cpu"
    assert set(res["codecs_cpu_1thread_mpx_s"]) == {
        "jpeg_imagecodecs", "jpeg_torchvision", "jpeg2000", "deflate", "lzw", "zstd"
    }  # fmt: skip
    assert res["decode"]["device_paths"]["torchvision"] >= res["decode"]["tiles"] > 0
    tiny = res["models"]["tiny"]
    gpu, cpu = tiny["e2e"]["gpu"], tiny["e2e"]["cpu"]
    # --decode gpu off CUDA: the device decoder forced onto the CPU (same batched call).
    assert gpu["decode"]["decoder"] == "cuda-jpeg" and gpu["decode"]["tiles"]["torchvision"] > 0
    assert cpu["decode"]["decoder"] == "read" and gpu["precision"] == cpu["precision"] == "fp32"
    for rate in (gpu["mpx_s"], cpu["mpx_s"], tiny["forward"]["mpx_s"], tiny["train"]["steps_s"]):
        assert rate > 0
    assert "e2e_gpu_over_forward" in tiny
    assert tiny["monai"].get("mpx_s") or "monai" in tiny["monai"]["skipped"]
