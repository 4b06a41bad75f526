"""The output-format contract: every entry of ``FORMATS`` on a local folder and on a bucket.

Each format, asked for alone, writes the same files with the same pixels in a folder and in
an S3 bucket (moto's server on 127.0.0.1), the summary lists them, and a run interrupted
part-way (bands done, or finalize done but not published) then rerun resumes and gives the
same bytes. The SIGKILL runs (real processes) are ``slow``.

Adding a format: its module in ``tilenet/outputs/formats/`` and its row in :data:`FILES`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from builders import make_checkpoint

from tilenet.engine.infer import infer_image, plan_image, resolve_options, run_band
from tilenet.engine.predictor import Predictor
from tilenet.io import open_image
from tilenet.outputs.formats import FORMATS

#: What each format writes for a plain image, asked for alone (every run also writes
#: classes.ome.zarr, config.yaml and summary.json).
FILES: dict[str, set[str]] = {
    "classes": {"classes.ome.tif"},
    "geojson": {"instances.geojson", "instances.ome.zarr", "classes.geojson"},
    "instances": {"instances.ome.zarr"},
    "preview": {"preview.png"},
    "probabilities": {"probabilities.ome.zarr"},
    "probabilities_tif": {"probabilities.tif", "probabilities.ome.zarr"},
    "regions": {"classes.geojson"},
}
ALWAYS = {"classes.ome.zarr", "config.yaml", "summary.json"}
OPTS: dict[str, Any] = {"tile": 64, "device": "cpu", "probabilities_dtype": "float32"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model (3 classes) and a 150 x 100 RGB TIFF (3 x 2 tiles of 64)."""
    d = tmp_path_factory.mktemp("formats")
    names = ["bg", "a", "b"]
    ckpt = make_checkpoint(d / "m.pt", mean=[0.5] * 3, std=[0.25] * 3, class_names=names)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:150, 0:100]
    base = np.stack([yy * 2 + xx, xx * 3, (yy * xx) // 7], axis=-1) + rng.integers(
        0, 30, (150, 100, 3)
    )
    tifffile.imwrite(d / "img.tif", (base % 256).astype(np.uint8), photometric="rgb")
    return ckpt, d / "img.tif"


def _where(kind: str, tmp_path: Path, s3_server: str) -> str:
    if kind == "local":
        return str(tmp_path / "out")
    import boto3

    name = f"f-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}/run"


def _tree(where: str) -> dict[str, bytes]:
    """Every file under a folder or a URL prefix: relative name -> bytes."""
    from tilenet.io.storage import filesystem

    fs, path = filesystem(where)
    return {f[len(path) :].lstrip("/"): fs.cat_file(f) for f in fs.find(path)}


def _same(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Equal output trees: the same names, the same bytes (OME-TIFF: the same pixels, its
    OME-XML holds a fresh UUID); summary and config name where they are."""
    assert sorted(a) == sorted(b)
    for name in a:
        if name in ("summary.json", "config.yaml"):
            continue
        if name.endswith(".ome.tif"):
            with (
                tifffile.TiffFile(io.BytesIO(a[name])) as ta,
                tifffile.TiffFile(io.BytesIO(b[name])) as tb,
            ):
                for la, lb in zip(ta.series[0].levels, tb.series[0].levels, strict=True):
                    np.testing.assert_array_equal(la.asarray(), lb.asarray())
            continue
        assert a[name] == b[name], name


_REFERENCE: dict[str, dict[str, bytes]] = {}


def _reference(name: str, files: tuple[Path, Path], tmp_path: Path) -> dict[str, bytes]:
    """The tree of an uninterrupted local run of ``name`` (made once per module)."""
    if name not in _REFERENCE:
        ckpt, img = files
        out = tmp_path / f"ref-{name}"
        infer_image(img, ckpt, out, outputs=[name], **OPTS)
        _REFERENCE[name] = _tree(str(out))
    return _REFERENCE[name]


def test_every_format_has_a_row() -> None:
    assert set(FILES) == set(FORMATS)
    for fmt in FORMATS.values():  # what the disk check counts (0 for vectors, thumbnails)
        for georeferenced in (False, True):
            assert fmt.bytes_per_px(3, georeferenced=georeferenced) >= 0


def _format_cases() -> list[Any]:
    """Every format in a folder; in a bucket classes by default, the rest with -m slow
    (3-7 s each; .ci/run runs them)."""
    return [
        pytest.param(
            name, kind, marks=[pytest.mark.slow] if kind == "bucket" and name != "classes" else []
        )
        for name in sorted(FILES)
        for kind in ("local", "bucket")
    ]


@pytest.mark.parametrize(("name", "kind"), _format_cases())
def test_format_writes_the_same_files_in_a_folder_and_a_bucket(
    name: str, kind: str, files: tuple[Path, Path], tmp_path: Path, s3_server: str
) -> None:
    ckpt, img = files
    where = _where(kind, tmp_path, s3_server)
    summary = infer_image(img, ckpt, where, outputs=[name], **OPTS)
    tree = _tree(where)
    assert {n.split("/")[0] for n in tree} == FILES[name] | ALWAYS
    listed = set(summary["outputs"].values())
    assert {f"{where}/{f}" for f in FILES[name] | ALWAYS} <= listed
    assert json.loads(tree["summary.json"])["outputs"] == summary["outputs"]
    _same(tree, _reference(name, files, tmp_path))


@pytest.mark.parametrize("kind", ["local", pytest.param("bucket", marks=pytest.mark.slow)])  # 40 s
def test_interrupted_runs_resume_to_the_same_bytes(
    kind: str, files: tuple[Path, Path], tmp_path: Path, s3_server: str
) -> None:
    """Every format at once: a run stopped after its first band, and one stopped after
    finalize but before publishing, both end (rerun) with the files of an uninterrupted run."""
    ckpt, img = files
    every = sorted(FORMATS)
    cfg = resolve_options({**OPTS, "outputs": every})
    predictor = Predictor(ckpt, cfg)
    where = _where(kind, tmp_path, s3_server)
    with open_image(img) as image:
        plan = plan_image(image, predictor.spec, cfg, where, model=ckpt, region_tiles=2)
        assert len(plan.bands) == 3
        run_band(plan, 0, predictor, image)  # then killed
    summary = infer_image(img, ckpt, where, outputs=every, region_tiles=2, **OPTS)
    assert summary["regions_resumed"] == 1
    first = _tree(where)
    ref = tmp_path / "ref"
    infer_image(img, ckpt, ref, outputs=every, region_tiles=2, **OPTS)
    _same(first, _tree(str(ref)))
    assert not [n for n in first if n.startswith(".")]

    with open_image(img) as image:  # a new key (force): all bands, finalize, then killed
        plan = plan_image(image, predictor.spec, cfg, where, model=ckpt, region_tiles=2, force=True)
        assert "summary.json" not in _tree(where)  # removed first: nothing looks complete
        for band in plan.pending:
            run_band(plan, band, predictor, image)
        plan.outputs.finalize(plan.view(image), cfg, downsample=plan.downsample)
    summary = infer_image(img, ckpt, where, outputs=every, region_tiles=2, **OPTS)
    assert summary["regions_resumed"] == 3
    _same(_tree(where), first)


def _kill_after_first_marker(cmd: list[str], markers: Any) -> int:
    """Start ``cmd``, SIGKILL it once a band marker is there; the markers left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while not markers():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    return len(markers())


@pytest.mark.slow  # three CLI processes per place (torch imports): 30-90 s
@pytest.mark.parametrize("kind", ["local", "bucket"])
def test_sigkill_then_rerun_gives_the_same_files(
    kind: str, files: tuple[Path, Path], tmp_path: Path, s3_server: str
) -> None:
    from tilenet.io.storage import filesystem

    ckpt, _ = files
    img = tmp_path / "big.tif"
    rng = np.random.default_rng(5)
    tifffile.imwrite(
        img, rng.integers(0, 255, (400, 200, 3), dtype=np.uint8), tile=(64, 64), photometric="rgb"
    )
    where = _where(kind, tmp_path, s3_server)
    every = ",".join(sorted(FORMATS))
    cmd = [sys.executable, "-m", "tilenet", "infer", str(img), "--model", str(ckpt), "--out", where]
    cmd += ["--tile", "64", "--device", "cpu", "--quiet", "--probabilities-dtype", "float32"]
    cmd += ["--region-tiles", "4", "--outputs", every]
    fs, path = filesystem(where)

    def markers() -> list[str]:
        fs.invalidate_cache()
        return fs.glob(f"{path}/.tilenet/region-*.json")

    kept = _kill_after_first_marker(cmd, markers)
    assert kept >= 1 and not fs.exists(f"{path}/summary.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as killed: the same float rounding
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    got = _tree(where)
    assert json.loads(got["summary.json"])["regions_resumed"] == kept
    ref = [*cmd[:8], str(tmp_path / "ref"), *cmd[9:]]
    assert subprocess.run(ref, env=env, capture_output=True, timeout=300).returncode == 0
    _same(got, _tree(str(tmp_path / "ref")))
