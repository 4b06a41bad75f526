"""The bench scripts: shared helpers (fast) and --quick smoke runs (slow: many subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import _benchutil as bu  # noqa: E402


def test_make_tiff_is_tiled_and_lazy_readable(tmp_path: Path) -> None:
    import tifffile

    p = bu.make_tiff(tmp_path / "a.tif", 1000, compression="zlib")
    with tifffile.TiffFile(p) as tf:
        page = tf.pages[0]
        assert page.shape == (1000, 1000, 3)
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        a = page.asarray()
    assert a.dtype == np.uint8 and 20 < a.mean() < 235 and a.std() > 10
    q = bu.make_tiff(tmp_path / "b.tif", 1024, distinct=2)
    with tifffile.TiffFile(q) as tf:
        b = tf.pages[0].asarray()
    # Repeated pre-encoded tiles: tile 0 equals tile 2 (period 2), not tile 1.
    assert np.array_equal(b[:512, :512], b[512:, :512])
    assert not np.array_equal(b[:512, :512], b[:512, 512:])


@pytest.mark.slow
def test_child_peak_rss_is_its_own(tmp_path: Path) -> None:
    """A child's reported peak is its own address space, not the (bigger) parent's."""
    ballast = np.ones(300_000_000 // 8)  # the parent is >= 300 MB before it spawns
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import _benchutil as bu\n"
        "a = np.ones(int(sys.argv[2]) // 8); bu.child_report({'n': a.size})"
    )
    small = bu.run_child(["-c", code, str(SCRIPTS), "8"])
    big = bu.run_child(["-c", code, str(SCRIPTS), "400000000"])
    assert ballast.sum() > 0
    assert small["peak_rss_mb"] < 250, small
    assert 380 < big["peak_rss_mb"] - small["peak_rss_mb"] < 500, (small, big)


def test_run_child_reports_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        bu.run_child(["-c", "raise SystemExit('boom')"])


def test_write_json_atomic(tmp_path: Path) -> None:
    out = bu.write_json(tmp_path / "d" / "r.json", {"x": [1, 2]})
    assert json.loads(out.read_text()) == {"x": [1, 2]}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


@pytest.mark.parametrize(
    "script", ["bench_encoders.py", "bench_peers.py", "bench_scaling.py", "bench_slides.py"]
)
def test_help(script: str) -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--quick" in res.stdout


@pytest.mark.slow
def test_bench_peers_quick(tmp_path: Path) -> None:
    pytest.importorskip("monai", reason="the peers need the bench extra: pip install -e .[bench]")
    pytest.importorskip("pytorch_toolbelt", reason="the bench extra")
    out = tmp_path / "peers.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_peers.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith("bench_peers: 256²")
    r = json.loads(out.read_text())
    (size,) = r["sizes"]
    t = size["contenders"]
    assert set(t) == {
        "model_crop",
        "tilenet_crop",
        "monai",
        "model_gauss",
        "tilenet_gauss",
        "toolbelt",
        "whole",
    }
    # Crop mode is exact; the blends differ from the whole pass only near tile seams.
    assert t["tilenet_crop"]["max_abs_diff_vs_whole"] < 1e-4
    for c in ("tilenet_gauss", "monai", "toolbelt"):
        assert t[c]["max_abs_diff_vs_whole"] < 0.5
    assert all(v["peak_rss_mb"] > 100 for v in t.values())
    assert size["ratios"]["efficiency_crop"] > 0


@pytest.mark.slow
def test_bench_scaling_quick(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_scaling.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [s["side"] for s in r["sizes"]] == [1024, 2048]
    assert abs(r["rss_growth"]) < 0.25


@pytest.mark.slow
def test_bench_encoders_quick(tmp_path: Path) -> None:
    pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / "encoders.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_encoders.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith("bench_encoders: 2 models")
    r = json.loads(out.read_text())
    rows = {m["label"]: m for m in r["models"]}
    assert set(rows) == {"unet", "smp.Unet resnet18"}
    smp = rows["smp.Unet resnet18"]
    assert 14e6 < smp["parameters"] < 15e6 and smp["exact"] is True
    # resnet18's receptive field needs more than the quick 512 px tile: 4 halos.
    assert smp["infer_tile"] == 4 * smp["infer_halo"] > 512
    for m in rows.values():
        assert m["train_patches_per_s"] > 0 and m["infer_mpx_per_s"] > 0
        assert m["train_activation_mb"] > 0 and m["infer_activation_mb"] > 0


@pytest.mark.slow
def test_bench_slides_quick(tmp_path: Path) -> None:
    out = tmp_path / "slides.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_slides.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith("bench_slides: 2048² slide")
    r = json.loads(out.read_text())
    assert set(r["formats"]) == {"svs", "dicom"}
    for entry in r["formats"].values():
        assert entry["identical"] is True  # tilenet and OpenSlide give the same pixels
        assert set(entry["passes"]) == {"random", "grid"}
        assert entry["passes"]["grid"]["windows"] == 16
        assert all(v > 0 for v in entry["passes"]["random"]["ratio"].values())
    assert set(r["formats"]["svs"]["passes"]["grid"]["ratio"]) == {"tilenet", "tilenet_openslide"}
