"""Batch jobs: manifest, skip/retry/force, corrupt inputs, row-band regions, SIGKILL resume and
dask.distributed bit-identity. Real tiled TIFFs, a real tiny checkpoint, a real LocalCluster.
dask.distributed is imported by the tests that use it, not by every xdist worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from builders import make_checkpoint

from tilenet.cli import main
from tilenet.engine.infer import ImagePlan, plan_image, resolve_options, run_band
from tilenet.engine.predictor import Predictor
from tilenet.io import open_image
from tilenet.jobs import local_cluster, read_manifest, run_jobs, unique_stems
from tilenet.runtime import torch_threads

#: One torch thread everywhere: CPU kernels round differently with another thread count.
OPTS = {"tile": 64, "device": "cpu", "probabilities_dtype": "float32", "threads": 1}
ARRAYS = ("probabilities.ome.zarr", "classes.ome.zarr", "instances.ome.zarr")


def _image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    """A structured RGB tiled TIFF (blobs and stripes, so classes and instances vary)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [128 + 100 * np.sin(yy / 9.0), 128 + 100 * np.cos(xx / 13.0), 128 + 90 * np.sin(xx / 5.0)],
        axis=-1,
    )
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, arr, tile=(64, 64), photometric="rgb")
    return path


def _checkpoint(path: Path, seed: int = 0) -> Path:
    return make_checkpoint(path, seed=seed, class_names=["bg", "a", "b"])


def _assert_same_outputs(a: Path, b: Path) -> None:
    """Every level of every zarr output identical, bit for bit."""
    for name in ARRAYS:
        ga, gb = zarr.open_group(a / name, mode="r"), zarr.open_group(b / name, mode="r")
        keys = sorted(ga.array_keys())
        assert keys == sorted(gb.array_keys()) and keys, name
        for k in keys:
            x, y = np.asarray(ga[k][:]), np.asarray(gb[k][:])
            assert x.dtype == y.dtype and x.shape == y.shape, (name, k)
            assert x.tobytes() == y.tobytes(), f"{name} level {k} differs"


def _mtimes(d: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_unique_stems_stay_inside_and_differ() -> None:
    stems = unique_stems(["a/x.tif", "b/x.tif", "../../x.tif", "c/x-2.tif"])
    assert len(set(stems)) == 4
    assert all("/" not in s and ".." not in s for s in stems)


def test_batch_corrupt_skip_retry_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt")
    src = tmp_path / "imgs"
    src.mkdir()
    _image(src / "one.tif", 100, 90, seed=1)
    _image(src / "two.tif", 64, 70, seed=2)
    (src / "bad.tif").write_bytes(b"II*\x00garbage that is no TIFF")
    out = tmp_path / "out"
    argv = ["infer", str(src), "--model", str(ckpt), "--out", str(out), "--tile", "64"]
    argv += ["--device", "cpu", "--quiet"]

    assert main(argv) == 1  # the corrupt one failed, the others finished
    printed = capsys.readouterr().out
    assert "2 done, 0 skipped, 1 failed" in printed and "bad.tif" in printed
    table = printed.split("REASON", 1)[1]
    assert "bad.tif" in table and "one.tif" not in table
    recs = read_manifest(out / "manifest.jsonl")
    assert {Path(k).name: r["status"] for k, r in recs.items()} == {
        "one.tif": "done",
        "two.tif": "done",
        "bad.tif": "failed",
    }
    bad = recs[str((src / "bad.tif").resolve())]
    assert "bad.tif" in bad["error"] and "\n" not in bad["error"]
    done = recs[str((src / "one.tif").resolve())]
    assert done["model_checksum"] and done["fingerprint"] and done["tilenet_version"]
    assert Path(done["outputs"]["classes"]) == out / "one" / "classes.ome.zarr"
    assert (out / "two" / "summary.json").is_file()

    # Rerun: the finished images are skipped (nothing rewritten), the failure stays failed.
    before = _mtimes(out / "one")
    assert main([*argv, "--log-json"]) == 1
    cap = capsys.readouterr()
    events = [json.loads(line) for line in cap.err.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("skipped") == 2
    assert "0 done, 2 skipped, 1 failed" in cap.out
    assert _mtimes(out / "one") == before

    # A fixed input has a new fingerprint: it runs without --retry-failed.
    _image(src / "bad.tif", 80, 80, seed=3)
    assert main(argv) == 0
    assert "1 done, 2 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "bad" / "classes.ome.zarr").is_dir()

    # A changed model is not "the same job": everything is redone.
    _checkpoint(ckpt, seed=5)
    assert main(argv) == 0
    assert "3 done, 0 skipped" in capsys.readouterr().out

    # --force redoes everything; --retry-failed retries a failure of the same input.
    (src / "bad.tif").write_bytes(b"II*\x00still garbage")
    assert main(argv) == 1
    capsys.readouterr()
    assert main(argv) == 1
    assert "0 done, 2 skipped, 1 failed" in capsys.readouterr().out  # kept failed, not rerun
    recs = read_manifest(out / "manifest.jsonl")
    assert recs[str((src / "bad.tif").resolve())].get("previous") is True
    assert main([*argv, "--retry-failed"]) == 1
    assert "previous" not in read_manifest(out / "manifest.jsonl")[str((src / "bad.tif").resolve())]
    before = _mtimes(out / "one")
    assert main([*argv, "--force"]) == 1
    assert "2 done, 0 skipped, 1 failed" in capsys.readouterr().out
    assert _mtimes(out / "one") != before


def test_regions_equal_whole_image(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Row bands computed separately into one store equal the single-pass result exactly."""
    ckpt = tiny_checkpoint
    img = _image(tmp_path / "big.tif", 300, 260)
    whole = run_jobs([img], ckpt, tmp_path / "whole", quiet=True, **OPTS)
    split = run_jobs([img], ckpt, tmp_path / "split", quiet=True, region_tiles=10, **OPTS)
    assert whole.exit_code == split.exit_code == 0
    summary = json.loads((tmp_path / "split" / "big" / "summary.json").read_text())
    assert summary["regions"] == 3 and summary["tiles"] == 30  # 6 x 5 tiles, 2 rows per band
    _assert_same_outputs(tmp_path / "whole" / "big", tmp_path / "split" / "big")
    ref = json.loads((tmp_path / "whole" / "big" / "summary.json").read_text())
    # One summary writer: a banded image reports what a whole one does.
    assert set(summary) == set(ref) and set(summary["timings"]) == set(ref["timings"])
    assert summary["exact"] is ref["exact"] is True and summary["device"] == "cpu"
    assert summary["tiles_per_s"] > 0 and ref["regions"] == 1
    assert summary["class_area_px"] == ref["class_area_px"]
    assert summary["instances"] == ref["instances"]
    assert not [p for p in (tmp_path / "split" / "big").iterdir() if p.name.startswith(".")]


def _batch(tmp_path: Path, sizes: list[tuple[int, int]]) -> Path:
    """A folder of small images plus one split into 3 bands (30 tiles)."""
    src = tmp_path / "imgs"
    src.mkdir()
    for i, (h, w) in enumerate(sizes):
        _image(src / f"small{i}.tif", h, w, seed=i)
    _image(src / "split.tif", 300, 260, seed=9)  # 30 tiles -> 3 bands across the workers
    return src


@pytest.mark.slow  # ~3 s; .ci/run runs it (and the LocalCluster one)
def test_an_existing_scheduler_is_bit_identical_to_serial(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """--scheduler: whole images and bands of one image as dask tasks on an existing cluster
    (here one in-process worker, started by the test) equal the serial run bit for bit."""
    from dask.distributed import LocalCluster

    ckpt, src = tiny_checkpoint, _batch(tmp_path, [(100, 90)])
    serial = run_jobs([src], ckpt, tmp_path / "serial", quiet=True, region_tiles=10, **OPTS)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        sched = run_jobs(
            [src], ckpt, tmp_path / "sched", scheduler=cluster.scheduler_address, quiet=True,
            region_tiles=10, **OPTS,
        )  # fmt: skip
    assert serial.exit_code == sched.exit_code == 0 and len(sched.done) == 2
    for stem in ("small0", "split"):
        _assert_same_outputs(tmp_path / "serial" / stem, tmp_path / "sched" / stem)


@pytest.mark.slow  # two worker processes import torch: ~20 s on 2 cores (.ci/run runs it)
def test_local_cluster_bit_identical_to_serial(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ckpt, src = tiny_checkpoint, _batch(tmp_path, [(100, 90), (64, 64), (120, 70)])
    serial = run_jobs([src], ckpt, tmp_path / "serial", quiet=True, region_tiles=10, **OPTS)
    dist = run_jobs([src], ckpt, tmp_path / "dist", workers=2, quiet=True, region_tiles=10, **OPTS)
    assert serial.exit_code == dist.exit_code == 0 and len(dist.done) == 4
    assert dist.dashboard and dist.dashboard.startswith("http")
    for stem in ("small0", "small1", "small2", "split"):
        _assert_same_outputs(tmp_path / "serial" / stem, tmp_path / "dist" / stem)


@pytest.mark.slow  # a 2-process dask cluster, ~3 s; .ci/run runs it
def test_gpu_pinning_env_per_worker() -> None:
    """The per-GPU cluster gives worker i CUDA_VISIBLE_DEVICES=i (checked without GPUs)."""
    from dask.distributed import Client

    with local_cluster(2, gpus=2) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["0", "1"]


def _cli(src: Path, ckpt: Path, out: Path) -> list[str]:
    opts = "--tile 64 --device cpu --quiet --log-json --region-tiles 37 --threads 1"
    opts += " --probabilities-dtype float32"
    return [
        *(sys.executable, "-m", "tilenet", "infer", str(src)),
        *("--model", str(ckpt), "--out", str(out)),
        *opts.split(),
    ]


@pytest.mark.slow
def test_sigkill_resume_is_identical(
    tmp_path: Path, kill_after_first_band: Callable[..., int], tiny_checkpoint: Path
) -> None:
    """kill -9 after the first band is recorded; the rerun redoes only the missing bands."""
    ckpt = tiny_checkpoint
    src = tmp_path / "imgs"
    src.mkdir()
    _image(src / "huge.tif", 1064, 2048)  # 19 x 37 tiles of core 56 -> 19 bands
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kept = kill_after_first_band(_cli(src, ckpt, out), out / "huge" / ".tilenet")
    assert 1 <= kept < 19
    assert not (out / "huge" / "summary.json").exists()  # nothing looks finished
    assert all(r["status"] != "done" for r in read_manifest(out / "manifest.jsonl").values())

    rerun = subprocess.run(_cli(src, ckpt, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    events = [json.loads(line) for line in rerun.stderr.splitlines() if line.startswith("{")]
    assert sum(e["event"] == "region" for e in events) == 19 - kept  # finished bands reused
    ref = run_jobs([src], ckpt, tmp_path / "ref", quiet=True, region_tiles=10**6, **OPTS)
    assert ref.exit_code == 0
    _assert_same_outputs(out / "huge", tmp_path / "ref" / "huge")
    assert read_manifest(out / "manifest.jsonl")[str((src / "huge.tif").resolve())]["status"] == (
        "done"
    )


def test_tile_directory_with_corrupt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tilenet tile`` shares the batch behaviour: failures recorded, the others tiled."""
    src = tmp_path / "imgs"
    src.mkdir()
    _image(src / "a.tif", 64, 64, seed=1)
    _image(src / "b.tif", 64, 96, seed=2)
    (src / "c.tif").write_bytes(b"II*\x00not a tiff")
    store = tmp_path / "patches.zarr"
    argv = ["tile", str(src), "--out", str(store), "--patch", "32", "--overlap", "0", "--quiet"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "2 done, 0 skipped, 1 failed" in printed and "c.tif" in printed.split("REASON")[1]
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs["count"] == 4 + 6 and len(attrs["sources"]) == 2
    recs = read_manifest(tmp_path / "patches.zarr.manifest.jsonl")
    assert sorted(r["status"] for r in recs.values()) == ["done", "done", "failed"]
    assert main(argv) == 1
    assert "0 done, 2 skipped, 1 failed" in capsys.readouterr().out


def _interrupted_run(img: Path, ckpt: Path, out: Path, bands: int = 1) -> ImagePlan:
    """State as a run killed after ``bands`` of 3 bands leaves it: partial stores, markers."""
    opts = {k: v for k, v in OPTS.items() if k != "threads"}
    cfg = resolve_options(opts)
    predictor = Predictor(ckpt, cfg)
    with torch_threads(1), open_image(img) as image:
        plan = plan_image(image, predictor.spec, cfg, out / "big", model=ckpt, region_tiles=10)
        assert len(plan.bands) == 3 and plan.pending == [0, 1, 2]
        for i in range(bands):
            run_band(plan, i, predictor, image)
            assert (out / "big" / ".tilenet" / f"region-{i:05d}.json").is_file()
    return plan


def _bands_run(img: Path, ckpt: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> int:
    capsys.readouterr()
    report = run_jobs([img], ckpt, out, log_json=True, region_tiles=10, **OPTS)
    assert report.exit_code == 0
    return capsys.readouterr().err.count('"event": "region"')


@pytest.mark.slow  # ~3 s; .ci/run runs it
def test_partial_bands_reused_only_for_the_same_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    ckpt = tiny_checkpoint
    img = _image(tmp_path / "big.tif", 300, 260, seed=0)
    _interrupted_run(img, ckpt, tmp_path / "same")
    assert _bands_run(img, ckpt, tmp_path / "same", capsys) == 2  # band 0 reused

    _interrupted_run(img, ckpt, tmp_path / "changed")
    _image(img, 300, 260, seed=7)  # the input changes before the rerun
    assert _bands_run(img, ckpt, tmp_path / "changed", capsys) == 3  # nothing reused
    assert run_jobs([img], ckpt, tmp_path / "fresh", quiet=True, **OPTS).exit_code == 0
    _assert_same_outputs(tmp_path / "changed" / "big", tmp_path / "fresh" / "big")


@pytest.mark.slow  # ~2 s; .ci/run runs it
def test_kill_during_finalize_keeps_the_bands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    """Killed after the probabilities store was finalized: the rerun only finalizes."""
    ckpt = tiny_checkpoint
    img = _image(tmp_path / "big.tif", 300, 260, seed=0)
    out = tmp_path / "out"
    plan = _interrupted_run(img, ckpt, out, bands=3)
    plan.outputs.finalize_store("probabilities")
    assert (out / "big" / "probabilities.ome.zarr").is_dir()
    assert _bands_run(img, ckpt, out, capsys) == 0
    assert run_jobs([img], ckpt, tmp_path / "fresh", quiet=True, **OPTS).exit_code == 0
    _assert_same_outputs(out / "big", tmp_path / "fresh" / "big")
    for name in ARRAYS:
        attrs = zarr.open_group(out / "big" / name, mode="r").attrs.asdict()
        assert attrs == zarr.open_group(tmp_path / "fresh" / "big" / name, mode="r").attrs.asdict()
