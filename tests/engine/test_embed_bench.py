"""scripts/bench_embed.py runs: its help at once, its quick setting (slow) end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_embed.py"


def test_help() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--quick" in res.stdout


@pytest.mark.slow  # ~1 min alone, minutes on a shared machine: three contenders, two models
def test_quick_run_writes_json_and_one_line(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith("bench_embed: mobilenetv3_small_100")
    runs = json.loads(out.read_text())["runs"]
    assert [r["encoder"] for r in runs] == ["mobilenetv3_small_100", "vit_tiny_patch16_224"]
    assert all(r["patches"] > 0 and 0 < r["model_busy"] <= 1 for r in runs)
