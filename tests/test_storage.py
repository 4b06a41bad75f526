"""Object storage against a real S3 API: moto's server on 127.0.0.1, through s3fs/botocore.

The server runs for the session; every test gets its own bucket. The environment points
boto/s3fs (and the subprocesses the CLI tests start) at it with dummy credentials.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

SECRET = "tilenet-test-secret-3f9c"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "tilenet-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def _upload(local: Path, url: str) -> str:
    from tilenet.io.storage import upload

    upload(local, url)
    return url


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 2 + xx, xx * 3, (yy * xx) // 7], axis=-1)
    return ((base + rng.integers(0, 30, (h, w, 3))) % 256).astype(np.uint8)


def _pyramid_tiff(path: Path, h: int = 300, w: int = 420) -> np.ndarray:
    """A tiled, zlib-compressed pyramidal OME-TIFF (SubIFDs) with a pixel size."""
    arr = _rgb(h, w)
    with tifffile.TiffWriter(path, ome=True) as tf:
        opts: dict[str, Any] = {"tile": (64, 64), "compression": "zlib", "photometric": "rgb"}
        tf.write(
            arr,
            subifds=2,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
            **opts,
        )
        tf.write(arr[::2, ::2], subfiletype=1, **opts)
        tf.write(arr[::4, ::4], subfiletype=1, **opts)
    return arr


def _ome_zarr(path: Path, arr: np.ndarray) -> Path:
    from tilenet.io import OmeZarrWriter

    h, w, _ = arr.shape
    with OmeZarrWriter(
        path, shape=(3, h, w), dtype="uint8", axes="cyx", chunks=64, pixel_size=(0.5, 0.5)
    ) as wr:
        for y in range(0, h, 64):
            for x in range(0, w, 64):
                wr.write(y, x, arr[y : y + 64, x : x + 64])
        wr.finalize(min_side=64)
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tilenet", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=300,
    )


# -- reading ------------------------------------------------------------------------------------
def test_tiff_pyramid_and_ome_zarr_read_from_bucket_equal_local(
    tmp_path: Path, bucket: str
) -> None:
    from tilenet.geometry import Window
    from tilenet.io import fingerprint, open_image

    arr = _pyramid_tiff(tmp_path / "p.ome.tif")
    _ome_zarr(tmp_path / "z.ome.zarr", arr)
    for name in ("p.ome.tif", "z.ome.zarr"):
        url = _upload(tmp_path / name, f"{bucket}/slides/{name}")
        with open_image(tmp_path / name) as local, open_image(url) as remote:
            assert str(remote.path) == url
            a, b = local.info(), remote.info()
            assert {**a, "path": None} == {**b, "path": None}
            assert len(remote.levels) >= 3
            for level in range(len(remote.levels)):
                for win in (Window(0, 0, 70, 90), Window(37, 101, 64, 130)):
                    np.testing.assert_array_equal(local.read(win, level), remote.read(win, level))
        fp = fingerprint(url)
        assert fp == fingerprint(url) and len(fp) == 64


def test_cli_info_on_a_url_matches_local(tmp_path: Path, bucket: str) -> None:
    _pyramid_tiff(tmp_path / "p.tif")
    url = _upload(tmp_path / "p.tif", f"{bucket}/p.tif")
    local, remote = _cli("info", str(tmp_path / "p.tif")), _cli("info", url)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    strip = [line for line in local.stdout.splitlines() if not line.startswith("path:")]
    assert strip == [line for line in remote.stdout.splitlines() if not line.startswith("path:")]
    assert f"path:        {url}" in remote.stdout


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        ("s3://no-such-bucket-tilenet/a.tif", "no-such-bucket-tilenet/a.tif"),
        ("{bucket}/missing.tif", "missing.tif: no such object"),
    ],
)
def test_missing_bucket_or_key_is_one_line_exit_2(bucket: str, where: str, expect: str) -> None:
    r = _cli("info", where.format(bucket=bucket))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr


def test_glob_and_prefix_expand_through_fsspec(tmp_path: Path, bucket: str) -> None:
    from tilenet.io.paths import resolve_images

    _pyramid_tiff(tmp_path / "p.tif")
    for name in ("a.tif", "b.tif", "notes.txt"):
        _upload(tmp_path / "p.tif", f"{bucket}/slides/{name}")
    want = [f"{bucket}/slides/a.tif", f"{bucket}/slides/b.tif"]
    assert resolve_images([f"{bucket}/slides/*.tif"]) == want
    assert resolve_images([f"{bucket}/slides/"]) == want
    with pytest.raises(FileNotFoundError, match="matches no objects"):
        resolve_images([f"{bucket}/slides/*.svs"])


def test_redact_and_vendor_slide_message(bucket: str) -> None:
    from tilenet.errors import UnsupportedFormatError
    from tilenet.io import open_image
    from tilenet.io.storage import redact, write_bytes

    assert SECRET not in redact(f"https://user:{SECRET}@host/a.tif?sig={SECRET}")
    write_bytes(f"{bucket}/s.mrxs", b"[GENERAL]\nSLIDE_VERSION = 01.02\n")
    with pytest.raises(UnsupportedFormatError, match="OpenSlide reads only local files"):
        open_image(f"{bucket}/s.mrxs")


# -- infer and tile -----------------------------------------------------------------------------
def _checkpoint(path: Path) -> Path:
    import torch

    from tilenet.checkpoint import save_checkpoint
    from tilenet.models import ModelSpec, create_model

    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=3)
    spec = ModelSpec.from_model(model, mean=[0.5] * 3, std=[0.25] * 3, class_names=["bg", "a", "b"])
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


_INFER = ("--tile", "64", "--device", "cpu", "--quiet", "--probabilities-dtype", "float32")


def _tree(url_or_dir: str) -> dict[str, bytes]:
    """Every file under a local directory or a URL prefix: relative name -> bytes."""
    from tilenet.io.storage import filesystem, is_url

    if not is_url(url_or_dir):
        root = Path(url_or_dir)
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }
    fs, path = filesystem(url_or_dir)
    return {f[len(path) :].lstrip("/"): fs.cat_file(f) for f in fs.find(path)}


def _same_outputs(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Equal output trees, except what names where they are (summary, config)."""
    assert sorted(a) == sorted(b)
    for name in a:
        if name in ("summary.json", "manifest.jsonl") or name.endswith("/summary.json"):
            continue
        if name.endswith(".ome.tif"):  # the OME-XML holds a fresh UUID: compare the pixels
            with (
                tifffile.TiffFile(io.BytesIO(a[name])) as ta,
                tifffile.TiffFile(io.BytesIO(b[name])) as tb,
            ):
                for la, lb in zip(ta.series[0].levels, tb.series[0].levels, strict=True):
                    np.testing.assert_array_equal(la.asarray(), lb.asarray())
            continue
        assert a[name] == b[name], name


def test_infer_url_in_and_out_equals_local(tmp_path: Path, bucket: str) -> None:
    """``tilenet infer s3://…/p.ome.tif --out s3://…/run`` == the same run on local files;
    the secret key is nowhere in the outputs or on stderr."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    _pyramid_tiff(tmp_path / "p.ome.tif")
    url = _upload(tmp_path / "p.ome.tif", f"{bucket}/in/p.ome.tif")
    local = _cli(
        "infer",
        str(tmp_path / "p.ome.tif"),
        "--model",
        str(ckpt),
        "--out",
        str(tmp_path / "ref"),
        *_INFER,
    )
    assert local.returncode == 0, local.stderr
    remote = _cli("infer", url, "--model", str(ckpt), "--out", f"{bucket}/run", *_INFER)
    assert remote.returncode == 0, remote.stderr
    got, want = _tree(f"{bucket}/run"), _tree(str(tmp_path / "ref"))
    _same_outputs(got, want)
    summary = json.loads(got["summary.json"])
    assert (
        summary["input"] == url
        and summary["outputs"]["classes"] == f"{bucket}/run/classes.ome.zarr"
    )
    ref = json.loads(want["summary.json"])
    assert summary["class_area_px"] == ref["class_area_px"]
    assert all(SECRET.encode() not in data for data in got.values())
    assert SECRET not in remote.stderr + remote.stdout
