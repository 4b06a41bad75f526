"""Synthetic dataset: determinism, independence from chunking, agreement of images and labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tilenet.cli import main
from tilenet.errors import InputError
from tilenet.geometry import Window
from tilenet.patches.synth import CLASS_NAMES, render, synthesize


def _read(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled
        return [lv.asarray() for lv in tif.series[0].levels]


@pytest.mark.parametrize(("cut_y", "cut_x"), [(37, 101), (64, 64), (150, 1)])
def test_render_does_not_depend_on_the_window_cut(cut_y: int, cut_x: int) -> None:
    whole_rgb, whole_lab = render(Window(100, 200, 220, 260), seed=3, index=1)
    assert whole_rgb is not None
    for wy, wh in ((100, cut_y), (100 + cut_y, 220 - cut_y)):
        for wx, ww in ((200, cut_x), (200 + cut_x, 260 - cut_x)):
            rgb, lab = render(Window(wy, wx, wh, ww), seed=3, index=1)
            ys, xs = slice(wy - 100, wy - 100 + wh), slice(wx - 200, wx - 200 + ww)
            np.testing.assert_array_equal(rgb, whole_rgb[ys, xs])
            np.testing.assert_array_equal(lab, whole_lab[ys, xs])


def test_render_labels_alone_match_and_far_windows_work() -> None:
    window = Window(49_800, 123_456, 64, 96)  # far from the origin: still finite, still varied
    rgb, lab = render(window, seed=0, index=2)
    none, lab_only = render(window, seed=0, index=2, image=False)
    assert none is None and rgb is not None
    np.testing.assert_array_equal(lab, lab_only)
    assert rgb.shape == (64, 96, 3) and rgb.dtype == np.uint8 and rgb.std() > 5


def test_seed_and_index_change_the_image() -> None:
    a, _ = render(Window(0, 0, 128, 128), seed=0, index=0)
    b, _ = render(Window(0, 0, 128, 128), seed=1, index=0)
    c, _ = render(Window(0, 0, 128, 128), seed=0, index=1)
    assert a is not None and b is not None and c is not None
    assert (a != b).mean() > 0.5 and (a != c).mean() > 0.5


def test_classes_are_visually_separable() -> None:
    rgb, lab = render(Window(0, 0, 512, 512), seed=0, index=0)
    assert rgb is not None
    assert set(np.unique(lab)) == {0, 1, 2}
    means = {k: rgb[lab == k].astype(float).mean(axis=0) for k in range(3)}
    bright = {k: m.mean() for k, m in means.items()}
    assert bright[1] < bright[2] < bright[0]  # dark cells, pink stroma, light background
    assert means[2][0] - means[2][1] > 40  # stroma is pink (red >> green)
    assert means[1][2] > means[1][1] + 40  # cells are blue/purple


def test_synthesize_writes_matching_pyramidal_pairs(tmp_path: Path) -> None:
    pairs = synthesize(tmp_path / "a", size=512, count=2, seed=0, tile=128)
    assert [(p.name, q.name) for p, q in pairs] == [
        ("synth_000.tif", "synth_000.tif"),
        ("synth_001.tif", "synth_001.tif"),
    ]
    assert json.loads((tmp_path / "a" / "classes.json").read_text())["classes"] == CLASS_NAMES
    img_levels, lab_levels = _read(pairs[0][0]), _read(pairs[0][1])
    assert [lv.shape for lv in img_levels] == [(512, 512, 3), (256, 256, 3)]
    assert [lv.shape for lv in lab_levels] == [(512, 512), (256, 256)]
    assert lab_levels[0].dtype == np.uint8
    assert set(np.unique(lab_levels[0])) == {0, 1, 2}
    assert set(np.unique(lab_levels[1])) <= {0, 1, 2}
    # lossless: the pixels are exactly what render() makes, so labels match the pixels
    rgb, lab = render(Window(0, 0, 512, 512), seed=0, index=0)
    np.testing.assert_array_equal(img_levels[0], rgb)
    np.testing.assert_array_equal(lab_levels[0], lab)
    with tifffile.TiffFile(pairs[0][0]) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata


@pytest.mark.slow  # ~2 s; .ci/run runs it
def test_synthesize_is_deterministic_and_tile_independent(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", size=300, count=1, seed=7, tile=64)
    b = synthesize(tmp_path / "b", size=300, count=1, seed=7, tile=128)
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(_read(ia)[0], _read(ib)[0])
        np.testing.assert_array_equal(_read(la)[0], _read(lb)[0])
    again = synthesize(tmp_path / "a", size=300, count=1, seed=7, tile=64)
    assert ia.read_bytes() == again[0][0].read_bytes()


def test_synthesize_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="size"):
        synthesize(tmp_path, size=0)
    with pytest.raises(InputError, match="count"):
        synthesize(tmp_path, count=0)
    with pytest.raises(InputError, match="multiple of 16"):
        synthesize(tmp_path, tile=100)


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path), "--size", "64", "--count", "1", "--seed", "2"]) == 0
    assert "synth_000.tif" in capsys.readouterr().out
    assert (tmp_path / "labels" / "synth_000.tif").is_file()
    assert main(["synth", str(tmp_path), "--size", "-5"]) == 2


@pytest.mark.slow
def test_synthesize_memory_is_bounded_by_the_tile(tmp_path: Path) -> None:
    """4096^2 RGB is 48 MiB (+16 MiB labels); the run must stay far below that."""
    code = (
        "import sys\n"
        "from tilenet.patches.synth import synthesize\n"
        # VmHWM (kB): unlike ru_maxrss, not inherited from the parent across exec.
        "def hwm():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return int(next(ln for ln in f if ln.startswith('VmHWM')).split()[1])\n"
        "synthesize(sys.argv[1] + '/warm', size=256, count=1)\n"
        "base = hwm()\n"
        "synthesize(sys.argv[1] + '/big', size=4096, count=1)\n"
        "print((hwm() - base) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    grown_mib = int(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 24, f"peak RSS grew by {grown_mib} MiB"
