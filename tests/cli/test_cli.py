from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml

from tilenet.cli import INFER_FLAGS, TILE_FLAGS, main
from tilenet.config import Config, InferConfig
from tilenet.engine.checkpoint import save_checkpoint
from tilenet.models import ModelSpec, create_model


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("info", "convert", "synth"):
        assert cmd in out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_python_dash_m_runs_the_same_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tilenet", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("tilenet ")


@pytest.mark.parametrize("flags", [TILE_FLAGS, INFER_FLAGS], ids=["tile", "infer"])
def test_each_flag_sets_the_config_key_of_its_name(flags: dict[str, list[str]]) -> None:
    for section, names in flags.items():
        keys = {f.name for f in fields(getattr(Config(), section))}
        assert set(names) <= keys, f"{section}: {sorted(set(names) - keys)}"


# -- tilenet infer: conf=FILE, key=value and flags -------------------------------------------------
@pytest.fixture
def image_and_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A 200 x 300 RGB tiled TIFF and a checkpoint of the registry's tiny model."""
    import torch

    rng = np.random.default_rng(0)
    img = tmp_path / "scan.tif"
    tifffile.imwrite(img, rng.integers(0, 255, (200, 300, 3), np.uint8), tile=(64, 64))
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=2)
    spec = ModelSpec.from_model(model, mean=[120.0] * 3, std=[60.0] * 3)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", {"spec": spec, "model": model.state_dict()})
    return img, ckpt


def _ran_with(out: Path) -> tuple[str, dict[str, Any]]:
    """The blend mode in ``out/summary.json`` and the infer section of ``out/config.yaml``."""
    summary = json.loads((out / "summary.json").read_text())
    infer: dict[str, Any] = yaml.safe_load((out / "config.yaml").read_text())["infer"]
    assert summary["mode"] == infer["mode"]
    return summary["mode"], infer


def test_infer_conf_file_then_overrides_then_flags(
    tmp_path: Path, image_and_checkpoint: tuple[Path, Path]
) -> None:
    img, ckpt = image_and_checkpoint
    conf = tmp_path / "infer.yaml"
    conf.write_text("infer:\n  tile: 256\n  mode: gaussian\n  outputs: [classes]\n")
    base = ["infer", str(img), "--model", str(ckpt), "--quiet", "--out"]

    assert main([*base, str(tmp_path / "a"), f"conf={conf}"]) == 0
    mode, infer = _ran_with(tmp_path / "a")
    assert (mode, infer["tile"], infer["outputs"]) == ("gaussian", 256, ["classes"])
    assert not (tmp_path / "a" / "probabilities.ome.zarr").exists()
    # key=value beats the file, a flag given beats both, keys not given keep the file's
    assert main([*base, str(tmp_path / "b"), f"conf={conf}", "infer.tile=128"]) == 0
    assert _ran_with(tmp_path / "b")[1]["tile"] == 128
    argv = [*base, str(tmp_path / "c"), f"conf={conf}", "infer.mode=linear", "--mode", "crop"]
    assert main(argv) == 0
    mode, infer = _ran_with(tmp_path / "c")
    assert (mode, infer["tile"], infer["outputs"]) == ("crop", 256, ["classes"])
    # no config at all: the dataclass defaults
    assert main([*base, str(tmp_path / "d"), "--outputs", "classes"]) == 0
    assert _ran_with(tmp_path / "d")[1]["mode"] == InferConfig().mode


def test_infer_jobs_section_makes_a_batch_job(
    tmp_path: Path, image_and_checkpoint: tuple[Path, Path]
) -> None:
    img, ckpt = image_and_checkpoint
    conf = tmp_path / "batch.yaml"
    conf.write_text("infer:\n  mode: linear\n  outputs: [classes]\njobs:\n  force: true\n")
    out = tmp_path / "out"
    argv = ["infer", str(img), "--model", str(ckpt), "--out", str(out), f"conf={conf}"]
    assert main([*argv, "jobs.quiet=true"]) == 0
    # one image, yet a batch: the job options come from the file like the flags'
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["done"]
    assert _ran_with(out / "scan")[0] == "linear"


def test_infer_bad_config_items_exit_2(
    tmp_path: Path, image_and_checkpoint: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    img, ckpt = image_and_checkpoint
    argv = ["infer", str(img), "--model", str(ckpt), "--out", str(tmp_path / "o")]
    assert main([*argv, "infer.tiles=3"]) == 2
    assert "'infer.tiles'" in capsys.readouterr().err
    assert main([*argv, "infer.mode=seamless"]) == 2
    assert "infer.mode" in capsys.readouterr().err
    assert main(["infer", "infer.tile=64", "--model", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "no INPUT" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
