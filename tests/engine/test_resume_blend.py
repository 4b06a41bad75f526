"""Blend modes resume by time too: resume points recorded while the one band runs.

A blend run (gaussian, linear: one band, chunks finished as their last tile is added)
records, about every ``checkpoint_s`` seconds, how many tiles it has added and where a rerun
must start (about two tile rows back, at a batch start). Interrupted, it keeps the finished
chunks; the rerun runs from there only and ends bit-identical to an uninterrupted run, in a
folder and in a bucket (moto's S3 server). The stitcher alone is checked across strips
(spilled chunks); the SIGKILL run (real processes) is ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from builders import kill_when, make_checkpoint

from tilenet.engine.infer import infer_image, plan_image, resolve_options, run_band
from tilenet.engine.pace import Pace
from tilenet.engine.predictor import Predictor
from tilenet.engine.stitch import BlendStitcher
from tilenet.geometry import TileGrid
from tilenet.io import open_image

OPTS: dict[str, Any] = {
    "tile": 64,
    "device": "cpu",
    "probabilities_dtype": "float32",
    "mode": "gaussian",
    "overlap": 0.5,
    "batch": 4,  # rows of 5 tiles: resume points must fall on batch starts, not row starts
    "outputs": ["probabilities", "classes"],
}
STORES = ("probabilities.ome.zarr", "classes.ome.zarr")


def _image(tmp_path: Path, h: int, w: int) -> Path:
    rng = np.random.default_rng(0)
    img = tmp_path / "img.tif"
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    tifffile.imwrite(img, arr, tile=(64, 64), photometric="rgb")
    return img


def _tree(where: str) -> dict[str, bytes]:
    """The stores' files under a folder or a bucket prefix: relative name -> bytes."""
    from tilenet.io.storage import filesystem

    out: dict[str, bytes] = {}
    for store in STORES:
        fs, path = filesystem(f"{where.rstrip('/')}/{store}")
        out |= {f[len(path) :]: fs.cat_file(f) for f in fs.find(path)}
    return out


def _interrupted(
    out: str, img: Path, ckpt: Path, stop_after: int, min_restart: int = 1
) -> dict[str, Any]:
    """Run ``img``'s one blend band, recording a resume point after every tile, and stop it
    (KeyboardInterrupt, as Ctrl-C) after ``stop_after`` tiles, once the writer thread (which
    adds tiles behind the model) has recorded a restart at ``min_restart`` or later (30 s at
    most); its progress marker."""
    from tilenet.io.location import location

    state = location(out).child(".tilenet")
    cfg = resolve_options(OPTS)
    predictor = Predictor(ckpt, cfg)
    with open_image(img) as image:
        plan = plan_image(image, predictor.spec, cfg, out, model=ckpt)
        assert len(plan.bands) == 1
        seen: list[int] = []

        def interrupt(n: int) -> None:
            seen.append(n)
            if sum(seen) >= stop_after:  # once the writer thread has recorded a resume point
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    marker = state.read_json("progress-00000.json")
                    if marker is not None and marker.get("restart", 0) >= min_restart:
                        break
                    time.sleep(0.01)
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_band(plan, 0, predictor, image, on_tiles=interrupt, pace=Pace(budget_s=0.0))
    assert not [n for n in state.names() if n.startswith("region-")]
    progress = state.read_json("progress-00000.json")
    assert progress is not None
    return progress


@pytest.mark.parametrize(
    "where",
    ["folder", pytest.param("bucket", marks=pytest.mark.slow)],  # bucket: ~10 s
)
def test_an_interrupted_blend_run_keeps_its_finished_rows(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    """Stopped after 4 of 6 tile rows, a gaussian run keeps what it had recorded; the rerun
    runs only the tiles from the restart on and ends bit-identical to an uninterrupted run."""
    img = _image(tmp_path, 192, 160)  # 6 x 5 tiles of core 32 (tile 64, overlap 0.5)
    ckpt = make_checkpoint(tmp_path / "m.pt")
    base = str(tmp_path) if where == "folder" else request.getfixturevalue("bucket")
    out = f"{base}/out"
    progress = _interrupted(out, img, ckpt, stop_after=4 * 5)
    added, restart = progress["added"], progress["restart"]
    assert 0 < restart < added < 6 * 5 and restart % 4 == 0  # a batch start (no tile skipped)
    assert progress["tiles"] == restart and added - restart <= 3 * 5  # about two rows back
    summary = infer_image(img, ckpt, out, **OPTS)
    fresh = infer_image(img, ckpt, f"{base}/fresh", **OPTS)
    assert _tree(out) == _tree(f"{base}/fresh")
    assert summary["class_area_px"] == fresh["class_area_px"]
    assert summary["tiles"] == fresh["tiles"] == 6 * 5
    # The rerun put only the tiles from the restart through the model.
    assert summary["tiles_resumed"] == restart and fresh["tiles_resumed"] == 0
    assert summary["tiles_run"] + summary["tiles_skipped"] == 6 * 5 - restart
    assert summary["steps"] == progress["steps"] + 1 and fresh["steps"] == 1


def test_an_interrupted_run_across_strips_takes_up_its_spilled_sums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vertical strips of 2 tile columns (as an image over 8192 px wide has): chunks that
    wait for the next strip are spilled to the resume state, so the rerun starts a couple of
    tiles back in the strip it was stopped in, not in the strip before, and ends
    bit-identical to an uninterrupted run with the same strips."""
    import tilenet.engine.tiles as tiles

    monkeypatch.setattr(tiles, "BLEND_STRIP_PX", 64)  # 64 px: strips of 2 tiles of core 32
    img = _image(tmp_path, 192, 160)  # 6 x 5 tiles: strips of 2 x 6, 2 x 6, 1 x 6
    ckpt = make_checkpoint(tmp_path / "m.pt")
    progress = _interrupted(str(tmp_path / "out"), img, ckpt, stop_after=20, min_restart=12)
    added, restart = progress["added"], progress["restart"]
    # In the second strip or later (the first has 12 tiles): its spilled chunks are kept.
    assert 12 <= restart <= added <= restart + 2 * 2 + 1 + 3  # two strip rows (+ a batch)
    assert (tmp_path / "out" / ".tilenet" / "spill").is_dir()
    summary = infer_image(img, ckpt, tmp_path / "out", **OPTS)
    infer_image(img, ckpt, tmp_path / "fresh", **OPTS)
    assert _tree(str(tmp_path / "out")) == _tree(str(tmp_path / "fresh"))
    assert summary["tiles_resumed"] == restart
    assert not (tmp_path / "out" / ".tilenet").exists()


@pytest.mark.slow  # three runs (~3 s)
def test_a_resume_point_that_does_not_fit_is_run_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A progress marker whose restart is not a batch start (the model would see other
    batches) is not trusted: said in a line, the band runs whole, the outputs are the same."""
    img = _image(tmp_path, 192, 160)
    ckpt = make_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    progress = _interrupted(str(out), img, ckpt, stop_after=4 * 5)
    marker = out / ".tilenet" / "progress-00000.json"
    marker.write_text(json.dumps({**progress, "restart": progress["restart"] + 1}))
    with caplog.at_level("WARNING", logger="tilenet.engine.blendsteps"):
        summary = infer_image(img, ckpt, out, **OPTS)
    assert "progress of band 0 does not fit this run; running it whole" in caplog.text
    assert summary["tiles_resumed"] == 0 and summary["tiles_run"] == 6 * 5
    fresh = infer_image(img, ckpt, tmp_path / "fresh", **OPTS)
    assert _tree(str(out)) == _tree(str(tmp_path / "fresh"))
    assert summary["class_area_px"] == fresh["class_area_px"]


def test_resume_points_under_a_zero_budget(tmp_path: Path) -> None:
    """Every tile that moves the restart on is a resume point; the band's marker replaces
    them at the end, and the outputs are those of a run with none."""
    img = _image(tmp_path, 160, 96)  # 5 x 3 tiles
    ckpt = make_checkpoint(tmp_path / "m.pt")
    s = infer_image(img, ckpt, tmp_path / "out", checkpoint_s=0.0, **OPTS)
    ref = infer_image(img, ckpt, tmp_path / "ref", **OPTS)
    assert s["steps"] >= 2 and ref["steps"] == 1 and s["regions"] == 1
    assert 0 < s["timings"]["max_step_s"] <= s["timings"]["tiles_s"] + 0.01
    assert _tree(str(tmp_path / "out")) == _tree(str(tmp_path / "ref"))
    assert not (tmp_path / "out" / ".tilenet").exists()


class _Arrays:
    """A sink into plain arrays (what the stitcher wrote, and how often per chunk)."""

    def __init__(self, k: int, shape: tuple[int, int]) -> None:
        self.num_classes = k
        self.area = np.zeros(k, np.int64)
        self.probs = np.full((k, *shape), np.nan, np.float32)

    def write(self, window: Any, probs: np.ndarray) -> None:
        self.probs[(slice(None), *window.slices)] = probs


@pytest.mark.parametrize("durable", [pytest.param(False, marks=pytest.mark.slow), True])
def test_the_stitcher_resumed_across_strips_sums_as_whole(tmp_path: Path, durable: bool) -> None:
    """Strips of 2 tile columns (chunks spilled from one strip to the next): stopped and
    resumed from :meth:`BlendStitcher.restart`, keeping the chunks it finished (and with a
    spill store that outlives the run, its spilled sums), the stitcher writes every pixel
    with the same bits as a run without a stop. A durable spill keeps the restart about two
    tile rows back; without one it goes back to the previous strip."""
    grid = TileGrid((110, 170), tile=48, halo=12)  # 5 x 8 tiles: strips of 2 x 5 = 10

    def stitcher(sink: Any, name: str, **kw: Any) -> BlendStitcher:
        where = {"spill_store" if durable else "spill_dir": str(tmp_path / name)}
        return BlendStitcher(grid, sink, mode="gaussian", strip_tiles=2, **where, **kw)

    rng = np.random.default_rng(1)
    whole = stitcher(_Arrays(3, grid.shape), "whole")
    probs = {}
    for t in whole.order:
        r = t.read.clip(*grid.shape)
        probs[t.index] = rng.random((3, r.h, r.w), dtype=np.float32)
        whole.add(t, probs[t.index])
    whole.close()
    lags = []
    for stop in (17, 37):  # in the second and fourth strips
        sink = _Arrays(3, grid.shape)
        first = stitcher(sink, f"s{stop}")
        for t in first.order[:stop]:
            first.add(t, probs[t.index])
        start = first.restart(stop)
        lags.append(stop - start)
        sink.probs[:] = np.where(np.isnan(sink.probs), -1.0, sink.probs)  # unfinished: junk
        kept = sink.probs.copy()
        again = stitcher(sink, f"s{stop}" if durable else f"t{stop}", kept=stop, start=start)
        for t in again.order[start:]:
            again.add(t, probs[t.index])
        again.close()
        assert sink.probs.tobytes() == whole.sink.probs.tobytes()  # type: ignore[attr-defined]
        done = [grid[c].core for c in again.done]
        assert all((kept[(slice(None), *w.slices)] >= 0).all() for w in done)
    assert lags == ([5, 5] if durable else [15, 15])
    with pytest.raises(ValueError, match="cannot resume at tile"):
        stitcher(_Arrays(3, grid.shape), "x", kept=37, start=37)


_RUN = textwrap.dedent(
    """
    import sys
    from tilenet.engine.infer import infer_image
    infer_image(sys.argv[1], sys.argv[2], sys.argv[3], checkpoint_s=float(sys.argv[4]),
                tile=64, device="cpu", probabilities_dtype="float32", mode="gaussian",
                overlap=0.5, batch=4, outputs=["probabilities", "classes"])
    """
)


def _run(img: Path, ckpt: Path, out: Path, checkpoint_s: float) -> list[str]:
    return [sys.executable, "-c", _RUN, str(img), str(ckpt), str(out), str(checkpoint_s)]


@pytest.mark.slow  # three processes that import torch (~10 s)
def test_sigkill_in_a_blend_run_keeps_its_resume_point(tmp_path: Path) -> None:
    """A real process killed with SIGKILL once a resume point is recorded: the rerun runs
    the tiles from its restart only and ends bit-identical to an uninterrupted run."""
    img = _image(tmp_path, 256, 320)  # 8 x 10 tiles: one band of 80
    ckpt = make_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    marker = out / ".tilenet" / "progress-00000.json"
    kill_when(_run(img, ckpt, out, 0.0), marker.exists)
    restart = json.loads(marker.read_text())["restart"]
    assert 0 < restart < 80
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (_run(img, ckpt, out, 0.0), _run(img, ckpt, tmp_path / "ref", 0.0)):
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert _tree(str(out)) == _tree(str(tmp_path / "ref"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regions"] == 1 and summary["tiles_resumed"] == restart
    assert summary["tiles_run"] + summary["tiles_skipped"] == 80 - restart
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
