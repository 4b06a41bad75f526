"""Tiled inference end to end: exactness against a whole-image pass, outputs, errors, memory.

Images are real tiled TIFFs written with tifffile; models are registry models saved as real
checkpoints. The reference is one forward pass over the whole image, zero-padded after
normalisation to a multiple of the stride, then cropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from builders import make_checkpoint, whole_image_reference

from tilenet.cli import main
from tilenet.engine.checkpoint import load_model
from tilenet.engine.infer import infer_image
from tilenet.errors import CheckpointError, ConfigError, InputError
from tilenet.geometry import ceil_to
from tilenet.models import list_models

MEAN, STD = [120.0, 110.0, 100.0], [60.0, 50.0, 70.0]


def _image(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A structured RGB image (stripes + blobs + noise), written as a tiled TIFF."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            128 + 100 * np.sin(yy / 7.0),
            128 + 100 * np.cos(xx / 11.0),
            128 + 90 * np.sin((yy + xx) / 17.0),
        ],
        axis=-1,
    )
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, arr, tile=(64, 64), photometric="rgb")
    return arr


def _checkpoint(path: Path, name: str, num_classes: int = 3, **kwargs: Any) -> Path:
    """A seeded checkpoint with non-trivial BatchNorm statistics, so that eval-mode BN really
    is part of what is checked."""
    names = [f"c{i}" for i in range(num_classes)]
    return make_checkpoint(
        path, name, num_classes=num_classes, mean=MEAN, std=STD, class_names=names,
        bn_stats=True, **kwargs,
    )  # fmt: skip


def _reference(ckpt: Path, arr: np.ndarray, *, tta: bool = False) -> np.ndarray:
    return whole_image_reference(ckpt, arr, tta=tta)


def _probs(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(out / "probabilities.ome.zarr", mode="r")["0"][:])


def _classes(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(out / "classes.ome.zarr", mode="r")["0"][:])


def _exactness_case(
    name: str, tmp_path: Path, layout: str = "2d", **kwargs: Any
) -> tuple[Path, Path, np.ndarray, int]:
    """A checkpoint, an image and a tile size that make several tiles with clamped edges.

    The tile leaves a core of at least the halo; the image is one and a half tiles plus a
    few pixels along the tiled axes (never a multiple of the stride). ``tall``/``wide`` tile
    one axis only and keep the other narrow: cheap even for ResNet-50 receptive fields.
    """
    ckpt = _checkpoint(tmp_path / f"{name}.pt", name, **kwargs)
    _, spec = load_model(ckpt)
    s, halo = spec.stride, ceil_to(spec.receptive_field, spec.stride)
    tile = ceil_to(2 * halo + max(halo, 32), s)
    core = tile - 2 * halo
    long, narrow = tile + core // 2 + 3, 3 * s + 5
    h, w = {"2d": (long, long + 2), "tall": (long, narrow), "wide": (narrow, long)}[layout]
    img = tmp_path / "img.tif"
    arr = _image(img, h, w)
    return ckpt, img, arr, tile


def _cases() -> list[Any]:
    cases: list[Any] = []
    for name in sorted(n for n in list_models() if not n.startswith("smp.")):  # test_smp.py
        for layout in ("tall", "wide"):
            # tiny on both axes and unet in 2-D by default; the other models and layouts with
            # -m slow (.ci/run runs them): tests/models checks each model's crop exactness.
            slow = name != "tiny"
            marks = [pytest.mark.slow] if slow else []
            cases.append(pytest.param(name, layout, {}, marks=marks, id=f"{name}-{layout}"))
    cases.append(pytest.param("tiny", "2d", {}, id="tiny-2d"))
    # ~14 s: slow; tests/models checks the U-Net's crop exactness by default
    cases.append(pytest.param("unet", "2d", {"base": 4}, marks=pytest.mark.slow, id="unet-2d"))
    return cases


@pytest.mark.parametrize(("name", "layout", "kwargs"), _cases())
def test_crop_mode_equals_whole_image_pass(
    name: str, layout: str, kwargs: dict[str, Any], tmp_path: Path
) -> None:
    ckpt, img, arr, tile = _exactness_case(name, tmp_path, layout, **kwargs)
    out = tmp_path / "out"
    summary = infer_image(
        img,
        ckpt,
        out,
        tile=tile,
        outputs=["probabilities", "classes"],
        probabilities_dtype="float32",
        batch=2,
    )
    assert summary["tiles"] >= (4 if layout == "2d" else 2)
    got, ref = _probs(out), _reference(ckpt, arr)
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) < 1e-4
    np.testing.assert_array_equal(_classes(out), ref.argmax(0))
    assert summary["exact"] is True


def test_crop_mode_exact_with_tta_and_fails_without_halo(tmp_path: Path) -> None:
    ckpt, img, arr, tile = _exactness_case("tiny", tmp_path)
    opts = {"tile": tile, "outputs": ["probabilities"], "probabilities_dtype": "float32"}
    infer_image(img, ckpt, tmp_path / "tta", tta=True, **opts)
    assert float(np.abs(_probs(tmp_path / "tta") - _reference(ckpt, arr, tta=True)).max()) < 1e-4
    # With no halo the tile borders see zero padding instead of their neighbours: the check
    # above would catch a wrong halo.
    infer_image(img, ckpt, tmp_path / "nohalo", halo=0, **opts)
    assert float(np.abs(_probs(tmp_path / "nohalo") - _reference(ckpt, arr)).max()) > 1e-3


def test_image_smaller_than_tile(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "small.tif"
    arr = _image(img, 37, 51)
    infer_image(img, ckpt, tmp_path / "out", tile=256, outputs=["probabilities"])
    got = _probs(tmp_path / "out").astype(np.float32)
    assert got.shape == (3, 37, 51)
    assert float(np.abs(got - _reference(ckpt, arr)).max()) < 2e-3  # float16 storage


def test_pyramid_level(tmp_path: Path) -> None:
    """--level runs on that pyramid level, exactly as a whole pass over that level."""
    from tilenet.geometry import Window
    from tilenet.io import open_image, write_ome_tiff

    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    arr = _image(tmp_path / "flat.tif", 300, 260)
    pyr = tmp_path / "pyr.ome.tif"
    write_ome_tiff(pyr, arr, axes="yxc", tile=64, compression="zlib", min_side=64)
    with open_image(pyr) as im:
        assert len(im.levels) >= 2
        lh, lw = im.levels[1].shape
        level1 = im.read(Window(0, 0, lh, lw), 1)
    opts = {"tile": 64, "outputs": ["probabilities"], "probabilities_dtype": "float32"}
    s = infer_image(pyr, ckpt, tmp_path / "out", level=1, **opts)
    assert s["shape"] == [lh, lw] and s["tiles"] > 4
    assert float(np.abs(_probs(tmp_path / "out") - _reference(ckpt, level1)).max()) < 1e-4
    with pytest.raises(InputError, match="level 9 does not exist"):
        infer_image(pyr, ckpt, tmp_path / "out", level=9)


@pytest.mark.parametrize("mode", ["gaussian", "linear"])
def test_blend_modes_close_to_whole_pass(mode: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img.tif"
    arr = _image(img, 150, 130)
    out = tmp_path / mode
    s = infer_image(
        img, ckpt, out, tile=64, mode=mode, overlap=0.25, outputs=["probabilities", "classes"]
    )
    assert s["halo"] == 8 and s["tiles"] > 4
    got = _probs(out).astype(np.float32)
    ref = _reference(ckpt, arr)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=2e-3)
    # tiny's receptive field (6) fits in the 8-pixel overlap, so blending agrees closely.
    assert float(np.abs(got - ref).mean()) < 5e-3
    assert (_classes(out) == ref.argmax(0)).mean() > 0.99


def test_outputs_and_summary(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img.tif"
    _image(img, 300, 280)
    out = tmp_path / "out"
    s = infer_image(
        img,
        ckpt,
        out,
        tile=128,
        outputs=["probabilities", "classes", "instances", "preview", "geojson"],
        probabilities_dtype="uint8",
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "classes.geojson",  # the merged class regions (geojson output), QuPath annotations
            "classes.ome.tif",
            "classes.ome.zarr",
            "config.yaml",
            "instances.geojson",
            "instances.ome.zarr",
            "preview.png",
            "probabilities.ome.zarr",
            "summary.json",
        ]
    )  # and no temporaries left behind
    prob = zarr.open_group(out / "probabilities.ome.zarr", mode="r")
    ms = prob.attrs["multiscales"][0]
    assert [d["path"] for d in ms["datasets"]][:2] == ["0", "1"]
    assert prob["0"].dtype == np.uint8 and prob["0"].shape == (3, 300, 280)
    cls = _classes(out)
    assert cls.dtype == np.uint8 and cls.max() < 3
    with tifffile.TiffFile(out / "classes.ome.tif") as tif:
        assert tif.is_ome
        assert tif.series[0].shape == (300, 280)
        assert len(tif.series[0].levels) >= 2
        np.testing.assert_array_equal(tif.series[0].asarray(), cls)
    inst = zarr.open_group(out / "instances.ome.zarr", mode="r")["0"]
    assert inst.dtype == np.uint32 and inst.shape == (300, 280)
    assert ((np.asarray(inst[:]) > 0) == (cls > 0)).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(s))
    assert sum(summary["class_area_px"].values()) == 300 * 280
    assert summary["class_area_px"]["c1"] == int((cls == 1).sum())
    assert summary["instances"]["count"] == int(np.asarray(inst[:]).max())
    assert summary["tilenet_version"] and summary["tiles_per_s"] > 0
    features = json.loads((out / "instances.geojson").read_text())["features"]
    assert len(features) == summary["instances"]["count"]
    assert "mode: crop" in (out / "config.yaml").read_text()


def test_min_foreground_skips_background_tiles(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "half.tif"
    arr = np.full((256, 512, 3), 245, np.uint8)  # bright empty slide...
    rng = np.random.default_rng(1)
    arr[:, :200] = rng.integers(40, 120, (256, 200, 3))  # ...with dark tissue on the left
    tifffile.imwrite(img, arr, tile=(64, 64), photometric="rgb")
    out = tmp_path / "out"
    s = infer_image(
        img, ckpt, out, tile=128, min_foreground=0.5, outputs=["probabilities", "classes"]
    )
    assert 0 < s["tiles_skipped"] < s["tiles"]
    probs, cls = _probs(out), _classes(out)
    # The empty right part is background with certainty; the tissue was really predicted.
    assert (cls[:, 320:] == 0).all() and (probs[0, :, 320:] == 1).all()
    ref = _reference(ckpt, arr)
    np.testing.assert_allclose(probs[:, :, :120], ref[:, :, :120], atol=2e-3)


def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img.tif"
    _image(img, 64, 64)
    with pytest.raises(CheckpointError, match="not found"):
        infer_image(img, tmp_path / "missing.pt", tmp_path / "o")
    with pytest.raises(InputError, match=r"too small .* use --tile \d+"):
        infer_image(img, ckpt, tmp_path / "o", tile=8)
    with pytest.raises(InputError, match="multiple of the model's stride 2; try --tile 66"):
        infer_image(img, ckpt, tmp_path / "o", tile=65)
    with pytest.raises(InputError, match="unknown infer option 'tiles'"):
        infer_image(img, ckpt, tmp_path / "o", tiles=3)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    rc = main(["infer", str(bad), "--model", str(ckpt), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "bad.tif" in err
    rc = main(["infer", str(img), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.pt: checkpoint not found" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli_infer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img.tif"
    arr = _image(img, 100, 90)
    out = tmp_path / "out"
    rc = main(
        [
            "infer",
            str(img),
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--tile",
            "64",
            "--mode",
            "linear",
            "--overlap",
            "0.5",
            "--batch",
            "3",
            "--outputs",
            "classes,preview",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert "classes.ome.zarr" in capsys.readouterr().out
    assert (out / "preview.png").is_file() and not (out / "probabilities.ome.zarr").exists()
    cfg = (out / "config.yaml").read_text()
    assert "mode: linear" in cfg and "overlap: 0.5" in cfg and "batch: 3" in cfg
    assert (_classes(out) == _reference(ckpt, arr).argmax(0)).mean() > 0.98


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tilenet, tilenet.io, tilenet.io.tiff, tilenet.outputs.instances, zarr, tifffile
    from tilenet.engine.infer import infer_image
    # The reader's decoded-tile cache is a fixed 32 MiB budget that a small image does not
    # fill; switch it off so that only the engine's own memory is compared.
    tilenet.io.tiff.TILE_CACHE_BYTES = 0
    img, ckpt, out = sys.argv[1:4]
    def peak():  # VmHWM: unlike ru_maxrss, not inherited from the parent across exec
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith("VmHWM")).split()[1]) * 1024
    model = tilenet.load_model(ckpt)
    before = peak()
    infer_image(img, ckpt, out, tile=256, batch=4, outputs=["probabilities", "classes"],
                probabilities_dtype="float32")
    print(json.dumps({"before": before, "after": peak()}))
    """
)


def _write_big(path: Path, side: int) -> None:
    """A side x side RGB tiled TIFF, written tile by tile (never the whole image)."""
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    n = (side // 256) ** 2
    tifffile.imwrite(
        path,
        (tile for _ in range(n)),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(256, 256),
        photometric="rgb",
    )


@pytest.mark.slow
def test_memory_does_not_grow_with_image_size(tmp_path: Path) -> None:
    """Peak RSS of a whole run is the same for 1024^2 and 2560^2 (6x the pixels)."""
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny", width=2)
    peaks = {}
    for side in (1024, 2560):
        img = tmp_path / f"img{side}.tif"
        _write_big(img, side)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(img), str(ckpt), str(tmp_path / "o")],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        peaks[side] = r["after"] - r["before"]
    # The outputs grow by 5.5 x 1024^2 x (3 x 4 + 1) bytes = 75 MB and the input by 16 MB;
    # the run's peak must not follow (it is a few tiles and their model activations).
    assert peaks[2560] - peaks[1024] < 20e6, peaks
    assert peaks[2560] < 300e6, peaks


def test_groupnorm_model_warns_in_crop_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = _checkpoint(tmp_path / "gn.pt", "unet", base=4, depth=2, norm="group")
    img = tmp_path / "img.tif"
    _image(img, 40, 40)
    with caplog.at_level("WARNING", logger="tilenet.engine.predictor"):
        s = infer_image(img, ckpt, tmp_path / "out", tile=128, outputs=["classes"])
    assert s["exact"] is False
    assert "crop mode is not exact" in caplog.text and "gaussian" in caplog.text


def test_uint16_image_is_exact_too(tmp_path: Path) -> None:
    """Non-uint8 tiles are normalised through the same path (float32 before the device)."""
    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img16.tif"
    arr = (_image(tmp_path / "tmp.tif", 70, 90).astype(np.uint16) * 257)[:, :, ::-1].copy()
    tifffile.imwrite(img, arr, tile=(32, 32), photometric="rgb")
    opts = {"tile": 32, "outputs": ["probabilities"], "probabilities_dtype": "float32"}
    s = infer_image(img, ckpt, tmp_path / "out", **opts)
    assert s["tiles"] > 4
    assert float(np.abs(_probs(tmp_path / "out") - _reference(ckpt, arr)).max()) < 1e-4


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    """`tilenet demo --out DIR`: synth, tile, train, infer, score (minutes on 2 CPU cores)."""
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert rc == 0
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["dice"] >= 0.90
    assert 0 < result["seconds"] < 600
    assert Path(result["outputs"]["classes"]).is_dir()
    assert Path(result["outputs"]["preview"]).is_file()


@pytest.mark.slow  # ~2.5 s; .ci/run runs it
def test_a_callers_module_is_left_as_it_was(tmp_path: Path) -> None:
    """The engine folds BatchNorm into a copy; the caller's module keeps its layers and mode."""
    ckpt = _checkpoint(tmp_path / "m.pt", "unet", base=4, depth=2)
    module, spec = load_model(ckpt)
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    img = tmp_path / "img.tif"
    _image(img, 70, 90)
    s = infer_image(img, (module, spec), tmp_path / "out", tile=64, outputs=["classes"])
    assert s["exact"] is True
    assert module.training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_heap_policies_give_identical_outputs(tmp_path: Path) -> None:
    """--heap reuse (default) and flat change how host memory is recycled, never the numbers."""
    ckpt = _checkpoint(tmp_path / "m.pt", "unet", base=4, depth=2)
    img = tmp_path / "img.tif"
    _image(img, 150, 170)
    outs = {}
    for heap in ("flat", "reuse"):
        infer_image(
            img,
            ckpt,
            tmp_path / heap,
            tile=64,
            batch=3,
            heap=heap,
            outputs=["probabilities"],
            probabilities_dtype="float32",
        )
        outs[heap] = zarr.open_group(tmp_path / heap / "probabilities.ome.zarr", mode="r")["0"][:]
    np.testing.assert_array_equal(outs["flat"], outs["reuse"])
    with pytest.raises(ConfigError, match="heap"):
        infer_image(img, ckpt, tmp_path / "bad", tile=64, heap="huge")


@pytest.mark.slow  # ~1.2 s; .ci/run runs it
def test_a_run_whose_heap_passes_the_ceiling_finishes_flat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reuse policy's ceiling (runtime.HeapGuard) switches a run to flat mid-way: the
    summary says so, and the numbers are those of a run that never switched."""
    import dataclasses

    from tilenet.runtime import HEAP_POLICIES

    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img.tif"
    _image(img, 100, 120)
    kw: dict[str, Any] = dict(tile=48, batch=2, outputs=["probabilities"])
    s = infer_image(img, ckpt, tmp_path / "a", probabilities_dtype="float32", **kw)
    assert s["timings"]["heap_went_flat"] == 0
    # A ceiling below the RSS the run starts from: passed at the second batch, whatever the
    # machine (the first batch sets it).
    low = dataclasses.replace(HEAP_POLICIES["reuse"], ceiling=-1.0)
    monkeypatch.setitem(HEAP_POLICIES, "reuse", low)
    s = infer_image(img, ckpt, tmp_path / "b", probabilities_dtype="float32", **kw)
    assert s["timings"]["heap_went_flat"] >= 1  # bands that went flat
    a, b = (
        zarr.open_group(tmp_path / d / "probabilities.ome.zarr", mode="r")["0"][:] for d in "ab"
    )
    np.testing.assert_array_equal(a, b)


def _infer_cli(img: Path, ckpt: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "tilenet", "infer", str(img), "--model", str(ckpt)),
        *("--out", str(out), "--tile", "64", "--device", "cpu", "--quiet"),
        *("--probabilities-dtype", "float32", "--region-tiles", "11"),
    ]


@pytest.mark.slow  # 22 s (three CLI processes); resuming from partial bands stays in the
# default run (test_jobs.py::test_partial_bands_reused_only_for_the_same_input, blend reruns)
def test_sigkill_plain_infer_resumes_identically(
    tmp_path: Path, kill_after_first_band: Callable[..., int]
) -> None:
    """``tilenet infer img`` killed with SIGKILL, then the same command: the finished bands
    are kept, the output equals an uninterrupted run bit for bit, no partial data remains."""

    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img.tif"
    _image(img, 1064, 600)  # 19 x 11 tiles of core 56: a band per grid row, 19 bands
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kept = kill_after_first_band(_infer_cli(img, ckpt, out), out / ".tilenet")
    assert 1 <= kept < 19
    assert not (out / "summary.json").exists()  # the stores are written in place, unfinished:
    assert "multiscales" not in zarr.open_group(out / "classes.ome.zarr", mode="r").attrs

    rerun = subprocess.run(_infer_cli(img, ckpt, out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regions"] == 19 and summary["regions_resumed"] == kept
    # Tiles run by this process vs kept from the killed one (11 tiles a band).
    assert summary["tiles_resumed"] == 11 * kept
    assert summary["tiles_run"] + summary["tiles_skipped"] == 11 * (19 - kept)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no orphans

    ref = subprocess.run(
        _infer_cli(img, ckpt, tmp_path / "ref"), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr
    for name in ("probabilities.ome.zarr", "classes.ome.zarr", "instances.ome.zarr"):
        a = zarr.open_group(out / name, mode="r")
        b = zarr.open_group(tmp_path / "ref" / name, mode="r")
        assert sorted(a.array_keys()) == sorted(b.array_keys())
        for k in a.array_keys():
            assert np.asarray(a[k][:]).tobytes() == np.asarray(b[k][:]).tobytes(), (name, k)
    assert json.loads((tmp_path / "ref" / "summary.json").read_text())["regions_resumed"] == 0


def test_blend_mode_rerun_over_partial_outputs(tmp_path: Path) -> None:
    """Blend modes are one band: a rerun over an interrupted run's partial stores recomputes
    them and equals a fresh run, leaving nothing partial behind."""
    from tilenet.engine.infer import plan_image, resolve_options
    from tilenet.engine.predictor import Predictor
    from tilenet.io import open_image

    ckpt = _checkpoint(tmp_path / "m.pt", "tiny")
    img = tmp_path / "img.tif"
    _image(img, 150, 170)
    opts = {"tile": 64, "mode": "gaussian", "probabilities_dtype": "float32", "device": "cpu"}
    cfg = resolve_options(opts)
    with open_image(img) as image:  # what a run killed before its band finished leaves
        plan = plan_image(image, Predictor(ckpt, cfg).spec, cfg, tmp_path / "out", model=ckpt)
    assert len(plan.bands) == 1 and plan.pending == [0]
    assert (tmp_path / "out" / ".tilenet" / "key.json").is_file()
    s = infer_image(img, ckpt, tmp_path / "out", **opts)
    fresh = infer_image(img, ckpt, tmp_path / "fresh", **opts)
    assert s["regions_resumed"] == 0 and s["class_area_px"] == fresh["class_area_px"]
    np.testing.assert_array_equal(_probs(tmp_path / "out"), _probs(tmp_path / "fresh"))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
