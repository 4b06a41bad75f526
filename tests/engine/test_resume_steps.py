"""Resume keeps work by time: a band runs in steps of grid rows, each recorded when on disk.

An image of one band (fewer tiles than ``region_tiles``) interrupted after some rows keeps
them; the rerun goes on from the next row and ends bit-identical to an uninterrupted run.
Images are real tiled TIFFs, the model a real checkpoint; the slow test kills a real process
with SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from builders import kill_when

from tilenet.engine.checkpoint import save_checkpoint
from tilenet.engine.infer import infer_image, plan_image, resolve_options, run_band
from tilenet.engine.pace import Pace
from tilenet.engine.predictor import Predictor
from tilenet.io import open_image
from tilenet.models import ModelSpec, create_model

OPTS: dict[str, Any] = {"tile": 64, "device": "cpu", "probabilities_dtype": "float32"}
STORES = ("probabilities.ome.zarr", "classes.ome.zarr")


def _inputs(tmp_path: Path, h: int, w: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=3)
    spec = ModelSpec.from_model(model, mean=[128.0] * 3, std=[50.0] * 3)
    ckpt = save_checkpoint(tmp_path / "m.pt", {"spec": spec, "model": model.state_dict()})
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, arr, tile=(64, 64), photometric="rgb")
    return img, ckpt


def _same_stores(a: Path, b: Path) -> None:
    for name in STORES:
        x = zarr.open_group(a / name, mode="r")
        y = zarr.open_group(b / name, mode="r")
        assert sorted(x.array_keys()) == sorted(y.array_keys())
        for k in x.array_keys():
            assert np.asarray(x[k][:]).tobytes() == np.asarray(y[k][:]).tobytes(), (name, k)


def test_pace_sizes_steps_by_the_measured_rate() -> None:
    pace = Pace(budget_s=30.0)
    assert pace.rows(cols=20, left=100) == 1  # nothing measured yet: one row
    pace.add(20, 4.0)  # 0.2 s a tile, 4 s a row
    assert pace.rows(cols=20, left=100) == 7
    assert pace.rows(cols=20, left=3) == 3
    pace.add(20, 116.0)  # now 3 s a tile: a row of 20 is 60 s, over budget, still one
    assert pace.rows(cols=20, left=100) == 1


def test_an_interrupted_band_keeps_its_finished_rows(tmp_path: Path) -> None:
    """Interrupted in its third row (KeyboardInterrupt, as Ctrl-C), a one-band image keeps
    two rows; the rerun runs the rest and equals an uninterrupted run bit for bit."""
    img, ckpt = _inputs(tmp_path, 400, 280)  # 8 x 5 tiles of core 56 (tiny: halo 4)
    out = tmp_path / "out"
    cfg = resolve_options(OPTS)
    predictor = Predictor(ckpt, cfg)
    with open_image(img) as image:
        plan = plan_image(image, predictor.spec, cfg, out, model=ckpt)
        rows, cols = plan.grid.counts
        assert len(plan.bands) == 1 and (rows, cols) == (8, 5)
        seen: list[int] = []

        def interrupt(n: int) -> None:
            seen.append(n)
            if sum(seen) > 2 * cols:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_band(plan, 0, predictor, image, on_tiles=interrupt, pace=Pace(budget_s=0.0))
    progress = json.loads((out / ".tilenet" / "progress-00000.json").read_text())
    assert progress["done"] == 2 and progress["tiles"] == 2 * cols
    assert not list((out / ".tilenet").glob("region-*.json"))

    summary = infer_image(img, ckpt, out, **OPTS)
    fresh = infer_image(img, ckpt, tmp_path / "fresh", **OPTS)
    _same_stores(out, tmp_path / "fresh")
    assert summary["class_area_px"] == fresh["class_area_px"]
    assert summary["tiles"] == fresh["tiles"] == rows * cols
    # This run's tiles and those kept: tiles = run + skipped + resumed.
    assert summary["tiles_resumed"] == 2 * cols and fresh["tiles_resumed"] == 0
    assert summary["tiles_run"] + summary["tiles_skipped"] == (rows - 2) * cols
    assert fresh["tiles_run"] + fresh["tiles_skipped"] == rows * cols
    # Two rows kept, then one row measures the rate, then the rest in one step.
    assert summary["steps"] == 4 and fresh["steps"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_every_step_is_a_resume_point_under_a_zero_budget(tmp_path: Path) -> None:
    img, ckpt = _inputs(tmp_path, 224, 112)  # 4 x 2 tiles
    s = infer_image(img, ckpt, tmp_path / "out", checkpoint_s=0.0, **OPTS)
    assert s["steps"] == 4 and s["regions"] == 1
    assert 0 < s["timings"]["max_step_s"] <= s["timings"]["tiles_s"]


_RUN = textwrap.dedent(
    """
    import sys
    from tilenet.engine.infer import infer_image
    infer_image(sys.argv[1], sys.argv[2], sys.argv[3], checkpoint_s=float(sys.argv[4]),
                tile=64, device="cpu", probabilities_dtype="float32")
    """
)


def _run(img: Path, ckpt: Path, out: Path, checkpoint_s: float) -> list[str]:
    return [sys.executable, "-c", _RUN, str(img), str(ckpt), str(out), str(checkpoint_s)]


@pytest.mark.slow  # three processes that import torch (~10 s)
def test_sigkill_in_a_one_band_image_keeps_its_steps(tmp_path: Path) -> None:
    """A real process killed with SIGKILL once a step of its only band is recorded: the
    rerun keeps those rows and ends bit-identical to an uninterrupted run."""
    img, ckpt = _inputs(tmp_path, 1064, 600)  # 19 x 11 tiles: one band of 209 tiles
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_when(
        _run(img, ckpt, out, 0.0), lambda: bool(list((out / ".tilenet").glob("progress-*.json")))
    )
    done = json.loads((out / ".tilenet" / "progress-00000.json").read_text())["done"]
    assert 1 <= done < 19
    for cmd in (_run(img, ckpt, out, 0.0), _run(img, ckpt, tmp_path / "ref", 0.0)):
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    _same_stores(out, tmp_path / "ref")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regions"] == 1 and summary["steps"] == 19
    assert summary["tiles_resumed"] == 11 * done
    assert summary["tiles_run"] + summary["tiles_skipped"] == 11 * (19 - done)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _corrupt_tile(img: Path, index: int) -> None:
    """Zero the compressed bytes of tile ``index`` (from the end when negative) of ``img``:
    reading it fails (zlib)."""
    with tifffile.TiffFile(img) as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[index], page.databytecounts[index]  # type: ignore[union-attr]
    data = bytearray(img.read_bytes())
    data[off : off + n] = bytes(n)
    img.write_bytes(bytes(data))


def _zlib_inputs(tmp_path: Path, h: int, w: int) -> tuple[Path, Path]:
    img, ckpt = _inputs(tmp_path, h, w)
    arr = tifffile.imread(img)
    tifffile.imwrite(img, arr, tile=(64, 64), photometric="rgb", compression="zlib")
    return img, ckpt


def test_a_failed_run_with_nothing_finished_leaves_nothing(tmp_path: Path) -> None:
    """A corrupt tile in the only band: the error, and no stores or resume state behind
    (they were left, looking like outputs, though a rerun had nothing to keep)."""
    from tilenet.errors import CorruptImageError

    img, ckpt = _zlib_inputs(tmp_path, 300, 300)
    _corrupt_tile(img, 2)
    out = tmp_path / "out"
    with pytest.raises(CorruptImageError):
        infer_image(img, ckpt, out, **OPTS)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_a_failed_run_keeps_its_finished_bands_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt tile in the last band: the finished bands' stores and markers stay for the
    rerun (said in a line); nothing of this process's scratch or partial files."""
    from tilenet.errors import CorruptImageError

    img, ckpt = _zlib_inputs(tmp_path, 300, 300)
    _corrupt_tile(img, -1)
    out = tmp_path / "out"
    with (
        caplog.at_level("WARNING", logger="tilenet.outputs.outputset"),
        pytest.raises(CorruptImageError),
    ):
        infer_image(img, ckpt, out, region_tiles=6, **OPTS)  # 6 x 6 tiles: a band a row
    assert "finished work kept; the same command resumes it" in caplog.text
    assert len(list((out / ".tilenet").glob("region-*.json"))) == 5
    names = sorted(p.name for p in out.iterdir())
    assert names == [".tilenet", "classes.ome.zarr", "probabilities.ome.zarr"]
