"""Object storage against a real S3 API: moto's server on 127.0.0.1, through s3fs/botocore.

The server runs for the session; every test gets its own bucket. The environment points
boto/s3fs (and the subprocesses the CLI tests start) at it with dummy credentials.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from builders import make_checkpoint, pyramid_tiff
from s3server import SECRET


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
    opts: dict[str, Any] = {"tile": (64, 64), "compression": "zlib", "ome": True}
    pyramid_tiff(path, arr, levels=3, pixel_size=(0.5, 0.5), **opts)
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


# -- reading ------------------------------------------------------------------------------------
@pytest.mark.slow  # ~10 s; default: test_source's TIFF in a bucket, test_geotiff_from_a_bucket_...
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


def test_cli_info_on_a_url_matches_local(
    tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tilenet.cli import main

    _pyramid_tiff(tmp_path / "p.tif")
    url = _upload(tmp_path / "p.tif", f"{bucket}/p.tif")
    assert main(["info", str(tmp_path / "p.tif")]) == 0
    local = capsys.readouterr().out
    assert main(["info", url]) == 0
    remote = capsys.readouterr().out
    strip = [line for line in local.splitlines() if not line.startswith("path:")]
    assert strip == [line for line in remote.splitlines() if not line.startswith("path:")]
    assert f"path:        {url}" in remote


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        ("s3://no-such-bucket-tilenet/a.tif", "a.tif: bucket does not exist"),
        ("{bucket}/missing.tif", "missing.tif: no such object"),
    ],
)
def test_missing_bucket_or_key_is_one_line_exit_2(
    bucket: str, where: str, expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tilenet.cli import main

    assert main(["info", where.format(bucket=bucket)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expect in err and "Traceback" not in err


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


class _CountingProxy:
    """A plain HTTP proxy in front of the S3 server that counts what the server sends back:
    GET requests and the bytes of their response bodies (headers not counted)."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        proxy = self
        self.gets = 0
        self.bytes = 0
        self._lock = threading.Lock()
        #: While set, GET requests get no answer (until ``release`` or 60 s): a stalled server.
        self.stall = threading.Event()
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if self.command == "GET" and proxy.stall.is_set():
                    proxy.release.wait(60)
                    self.close_connection = True
                    return
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                if self.command == "GET":  # counted before the client can have the answer
                    with proxy._lock:
                        proxy.gets += 1
                        proxy.bytes += len(data)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.gets = self.bytes = 0

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_window_fetches_only_its_tiles(
    tmp_path: Path, bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted at the server (through a proxy): reading a window fetches its tiles' compressed
    bytes (one range request each) and nothing else; a small fraction of the file."""
    from tilenet.geometry import Window
    from tilenet.io import open_image

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # noise: tiles stay large
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, arr, tile=(64, 64), compression="zlib", photometric="rgb")
    url = _upload(path, f"{bucket}/big.tif")
    win = Window(200, 300, 100, 100)  # tile rows 3-4, columns 4-6: 6 tiles
    with tifffile.TiffFile(path) as tf:
        counts = tf.pages[0].databytecounts
        tiles_bytes = sum(int(counts[ty * 16 + tx]) for ty in (3, 4) for tx in (4, 5, 6))
    proxy = _CountingProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        with open_image(url) as img:
            header = proxy.bytes
            proxy.reset()
            data = img.read(win)
            fetched, gets = proxy.bytes, proxy.gets
    finally:
        proxy.close()
    np.testing.assert_array_equal(data, arr[200:300, 300:400])
    from tilenet.io.storage import READ_CACHE_BYTES, read_cache_bytes

    assert 0 < read_cache_bytes() <= READ_CACHE_BYTES  # headers: one process-wide budget
    assert gets == 6 and fetched == tiles_bytes  # exactly the 6 tiles, nothing else
    size = path.stat().st_size
    assert header < size / 10 and fetched < size / 30, (header, fetched, size)


def test_access_denied_is_one_line(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An IAM user without a policy (moto enforcing IAM from now on): one line, no retries."""
    import boto3
    import moto.settings
    import s3fs

    from tilenet.cli import main

    _pyramid_tiff(tmp_path / "p.tif", 64, 64)
    url = _upload(tmp_path / "p.tif", f"{bucket}/p.tif")
    iam = boto3.client("iam")
    user = f"nobody-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients hold the old credentials
    try:
        assert main(["info", url]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{url}: access denied" in err, err
    assert key["SecretAccessKey"] not in err


@pytest.mark.slow  # .ci/run runs the slow storage tests too
def test_a_server_that_stops_answering_fails_fast_and_the_batch_goes_on(
    tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes away after the header was read: the next read fails in one line
    after the retries (no hang); in a batch that image fails and the others are done."""
    import time

    import boto3
    from moto.server import ThreadedMotoServer

    from tilenet.geometry import Window
    from tilenet.io import open_image, storage
    from tilenet.jobs import run_jobs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setattr(storage, "RETRIES", 2)
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="going")
    _pyramid_tiff(tmp_path / "p.tif", 128, 128)
    url = _upload(tmp_path / "p.tif", "s3://going/p.tif")
    img = open_image(url)
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"^s3://going/p.tif: storage did not answer"):
        img.read(Window(0, 0, 64, 64))
    img.close()
    ckpt = _checkpoint(tmp_path / "m.pt")
    report = run_jobs([url, str(tmp_path / "p.tif")], ckpt, tmp_path / "out", quiet=True,
                      tile=64, device="cpu")  # fmt: skip
    assert time.monotonic() - t0 < 60
    assert report.done == [str(tmp_path / "p.tif")]
    assert list(report.failed) == [url] and "did not answer" in report.failed[url]
    assert "\n" not in report.failed[url]


@pytest.mark.slow  # .ci/run runs the slow storage tests too
def test_a_server_that_stalls_mid_read_times_out(
    tmp_path: Path, bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server accepts the tile request and never answers: the read gives up after the
    read timeout and the retries, in one line, instead of hanging."""
    import time

    import boto3

    from tilenet.geometry import Window
    from tilenet.io import open_image, storage

    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "RETRIES", 2)
    _pyramid_tiff(tmp_path / "p.tif", 128, 192)
    name = bucket.removeprefix("s3://")
    boto3.client("s3").put_object(
        Bucket=name, Key="pub/p.tif", Body=(tmp_path / "p.tif").read_bytes(), ACL="public-read"
    )
    proxy = _CountingProxy(s3_server)
    try:
        url = f"{proxy.url}/{name}/pub/p.tif"
        with open_image(url) as img:
            proxy.stall.set()
            t0 = time.monotonic()
            with pytest.raises(storage.StorageError, match=r"p\.tif: storage did not answer"):
                img.read(Window(0, 0, 64, 64))
            took = time.monotonic() - t0
        print(f"gave up after {took:.1f} s")
        assert 1.0 <= took < 20, took
    finally:
        proxy.close()


# -- locations ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "bucket"])
def test_a_location_behaves_the_same_in_a_folder_and_a_bucket(
    tmp_path: Path, bucket: str, kind: str
) -> None:
    """Objects whole, lines appended (after a torn one on a fresh line), files built
    locally and put in place, trees removed: the same calls, the same results."""
    from tilenet.io.location import location

    where = location(str(tmp_path / "run") if kind == "local" else f"{bucket}/run")
    assert (where.local is not None) == (kind == "local")
    assert where.read_json("a.json") is None and where.names() == []
    where.write_bytes("a.json", b'{"k": 1}')
    where.child("state").write_bytes("x.json", b"[1]")  # not an object
    assert (
        where.read_json("a.json") == {"k": 1} and where.child("state").read_json("x.json") is None
    )
    where.write_bytes("m.jsonl", b'{"torn"')
    where.append_line("m.jsonl", "one")
    where.append_line("m.jsonl", "two")
    assert where.read_text("m.jsonl") == '{"torn"\none\ntwo\n'
    stage = tmp_path / "stage"
    with where.local_file("t.txt", stage=stage) as path:
        path.write_text("built locally")
        assert not where.exists("t.txt")  # nothing there until the block ends
    assert where.read_text("t.txt") == "built locally"
    with pytest.raises(RuntimeError), where.local_file("u.txt") as path:
        path.write_text("half")
        raise RuntimeError
    assert not where.exists("u.txt")
    assert where.names() == ["a.json", "m.jsonl", "state", "t.txt"]
    where.remove("state")
    assert not where.exists("state") and where.exists("a.json")
    where.remove()
    assert not where.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "stage" and p.name != "run"]


# -- infer and tile -----------------------------------------------------------------------------
def _checkpoint(path: Path) -> Path:
    return make_checkpoint(path, mean=[0.5] * 3, std=[0.25] * 3, class_names=["bg", "a", "b"])


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


@pytest.mark.slow  # ~15 s; default: test_infer_to_a_bucket_with_probabilities_tif_alone
def test_infer_url_in_and_out_equals_local(
    tmp_path: Path, bucket: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """``tilenet infer s3://…/p.ome.tif --out s3://…/run`` == the same run on local files;
    the secret key is nowhere in the outputs or on stdout/stderr."""
    from tilenet.cli import main

    ckpt = _checkpoint(tmp_path / "m.pt")
    _pyramid_tiff(tmp_path / "p.ome.tif", 200, 150)
    url = _upload(tmp_path / "p.ome.tif", f"{bucket}/in/p.ome.tif")
    model = ("--model", str(ckpt))
    assert (
        main(
            ["infer", str(tmp_path / "p.ome.tif"), *model, "--out", str(tmp_path / "ref"), *_INFER]
        )
        == 0
    )
    assert main(["infer", url, *model, "--out", f"{bucket}/run", *_INFER]) == 0
    printed = capfd.readouterr()
    got, want = _tree(f"{bucket}/run"), _tree(str(tmp_path / "ref"))
    _same_outputs(got, want)
    summary = json.loads(got["summary.json"])
    assert summary["input"] == url
    assert summary["outputs"]["classes"] == f"{bucket}/run/classes.ome.zarr"
    assert summary["class_area_px"] == json.loads(want["summary.json"])["class_area_px"]
    assert all(SECRET.encode() not in data for data in got.values())
    assert SECRET not in printed.out + printed.err
    assert f"{bucket}/run/summary.json" in printed.out


@pytest.mark.slow  # the slow step runs this file; the default run keeps test_formats' bucket case
def test_infer_to_a_bucket_with_probabilities_tif_alone(tmp_path: Path, bucket: str) -> None:
    """``--outputs classes,probabilities_tif`` to a bucket (it failed with KeyError
    'probabilities': the bucket path made that store only for ``probabilities``): the same
    files as a local run, a summary, and no local stage left behind."""
    from tilenet.cli import main
    from tilenet.io.location import location

    ckpt = _checkpoint(tmp_path / "m.pt")
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, _rgb(90, 70, seed=2), photometric="rgb")
    argv = ["infer", str(img), "--model", str(ckpt), *_INFER]
    argv += ["--outputs", "classes,probabilities_tif"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0
    assert main([*argv, "--out", f"{bucket}/run"]) == 0
    got = _tree(f"{bucket}/run")
    _same_outputs(got, _tree(str(tmp_path / "ref")))
    summary = json.loads(got["summary.json"])
    assert summary["outputs"]["probabilities_geotiff"] == f"{bucket}/run/probabilities.tif"
    assert "probabilities.tif" in got and "probabilities.ome.zarr/.zattrs" in got
    assert not location(f"{bucket}/run").scratch().exists()


@pytest.mark.slow
def test_batch_over_a_bucket_prefix_on_two_workers_equals_serial_local(
    tmp_path: Path, bucket: str
) -> None:
    """``infer s3://b/slides/*.tif --out s3://b/batch --workers 2`` (a real LocalCluster,
    one image split into bands across the workers) == a serial run on local copies; the
    manifest is in the bucket and a rerun skips everything."""
    from tilenet.jobs import read_manifest, run_jobs

    ckpt = _checkpoint(tmp_path / "m.pt")
    src = tmp_path / "slides"
    src.mkdir()
    _pyramid_tiff(src / "a.tif", 200, 180)
    tifffile.imwrite(src / "b.tif", _rgb(300, 260, seed=3), tile=(64, 64), photometric="rgb")
    for name in ("a.tif", "b.tif"):
        _upload(src / name, f"{bucket}/slides/{name}")
    opts: dict[str, Any] = {"tile": 64, "device": "cpu", "probabilities_dtype": "float32"}
    opts.update(threads=1, quiet=True, region_tiles=10)
    serial = run_jobs([str(src)], ckpt, tmp_path / "serial", **opts)
    dist = run_jobs([f"{bucket}/slides/*.tif"], ckpt, f"{bucket}/batch", workers=2, **opts)
    assert serial.exit_code == 0 and dist.exit_code == 0 and len(dist.done) == 2
    got = _tree(f"{bucket}/batch")
    _same_outputs(got, _tree(str(tmp_path / "serial")))
    manifest = read_manifest(f"{bucket}/batch/manifest.jsonl")
    assert sorted(manifest) == [f"{bucket}/slides/a.tif", f"{bucket}/slides/b.tif"]
    assert {r["status"] for r in manifest.values()} == {"done"}
    assert not [n for n in got if "/.tilenet/" in n or n.startswith(".")]
    assert all(SECRET.encode() not in data for data in got.values())
    again = run_jobs([f"{bucket}/slides/*.tif"], ckpt, f"{bucket}/batch", **opts)
    assert len(again.skipped) == 2


@pytest.mark.slow
def test_sigkill_while_writing_to_the_bucket_then_rerun(tmp_path: Path, bucket: str) -> None:
    """kill -9 after the first band marker lands in the bucket; the same command again keeps
    the finished bands and ends with outputs identical to an uninterrupted local run."""
    import signal
    import time

    import boto3

    ckpt = _checkpoint(tmp_path / "m.pt")
    tifffile.imwrite(
        tmp_path / "img.tif", _rgb(1064, 600, seed=5), tile=(64, 64), photometric="rgb"
    )
    url = _upload(tmp_path / "img.tif", f"{bucket}/img.tif")
    out = f"{bucket}/run"
    cmd = [sys.executable, "-m", "tilenet", "infer", url, "--model", str(ckpt), "--out", out]
    cmd += [*_INFER, "--region-tiles", "11"]
    s3 = boto3.client("s3")
    name = bucket.removeprefix("s3://")

    def markers() -> list[str]:
        listed = s3.list_objects_v2(Bucket=name, Prefix="run/.tilenet/region-")
        return [o["Key"] for o in listed.get("Contents", [])]

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
    kept = len(markers())
    assert 1 <= kept < 19
    listed = s3.list_objects_v2(Bucket=name, Prefix="run/")
    assert "run/summary.json" not in [o["Key"] for o in listed.get("Contents", [])]

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    got = _tree(out)
    summary = json.loads(got["summary.json"])
    assert summary["regions"] == 19 and summary["regions_resumed"] == kept
    # The reference with the threads of the runs above: CPU kernels round differently with
    # another thread count (this process's), last float bit.
    ref = tmp_path / "ref"
    argv = ["infer", str(tmp_path / "img.tif"), "--model", str(ckpt), "--out", str(ref)]
    argv = [sys.executable, "-m", "tilenet", *argv, *_INFER, "--region-tiles", "11"]
    assert subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode == 0
    _same_outputs(got, _tree(str(ref)))
    assert not [n for n in got if n.startswith(".")]


@pytest.mark.slow  # .ci/run runs the slow storage tests too
def test_tile_from_a_bucket_equals_local(tmp_path: Path, bucket: str) -> None:
    """``tilenet tile s3://…`` (TIFF pyramid and OME-Zarr) == the same on local copies."""
    import zarr

    from tilenet.patches.tiler import tile_images

    arr = _pyramid_tiff(tmp_path / "p.ome.tif")
    _ome_zarr(tmp_path / "z.ome.zarr", arr)
    urls = [_upload(tmp_path / n, f"{bucket}/{n}") for n in ("p.ome.tif", "z.ome.zarr")]
    local = [tmp_path / "p.ome.tif", tmp_path / "z.ome.zarr"]
    a = tile_images(local, out=tmp_path / "a.zarr", patch=64, progress=False)
    b = tile_images(urls, out=tmp_path / "b.zarr", patch=64, progress=False)
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for k in ga.array_keys():
        np.testing.assert_array_equal(ga[k][:], gb[k][:])


def test_geotiff_from_a_bucket_through_gdal_equals_local(tmp_path: Path, bucket: str) -> None:
    """A georeferenced TIFF goes to rasterio (GDAL's /vsis3/ with the endpoint options)."""
    import rasterio
    from rasterio.transform import from_origin

    from tilenet.geometry import Window
    from tilenet.io import open_image

    arr = _rgb(200, 160, seed=7)
    path = tmp_path / "g.tif"
    profile = {"driver": "GTiff", "height": 200, "width": 160, "count": 3, "dtype": "uint8"}
    profile.update(crs="EPSG:32633", transform=from_origin(500000, 4e6, 10, 10), tiled=True)
    with rasterio.open(path, "w", blockxsize=64, blockysize=64, **profile) as ds:
        ds.write(np.moveaxis(arr, -1, 0))
    url = _upload(path, f"{bucket}/g.tif")
    with open_image(path) as local, open_image(url) as remote:
        assert remote.format == "geotiff" and remote.crs == local.crs
        assert remote.transform == local.transform
        win = Window(30, 50, 100, 90)
        np.testing.assert_array_equal(remote.read(win), local.read(win))


def test_http_url_reads_by_range_requests(tmp_path: Path, bucket: str, s3_server: str) -> None:
    """An ``http://`` URL (here the object's path-style URL on the server) reads as a file."""
    import boto3

    from tilenet.geometry import Window
    from tilenet.io import open_image

    arr = _pyramid_tiff(tmp_path / "p.tif", 128, 192)
    name = bucket.removeprefix("s3://")
    boto3.client("s3").put_object(
        Bucket=name, Key="pub/p.tif", Body=(tmp_path / "p.tif").read_bytes(), ACL="public-read"
    )
    url = f"{s3_server}/{name}/pub/p.tif"
    with open_image(url) as img:
        assert img.shape[:2] == (128, 192) and len(img.levels) == 3
        np.testing.assert_array_equal(img.read(Window(10, 20, 70, 90)), arr[10:80, 20:110])


def test_the_block_cache_is_one_bounded_budget_for_all_open_files(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tilenet.io import open_image, storage

    monkeypatch.setattr(storage, "READ_CACHE_BYTES", 3 * storage.BLOCK_SIZE)
    _pyramid_tiff(tmp_path / "p.tif", 256, 256)
    urls = [_upload(tmp_path / "p.tif", f"{bucket}/many/{i}.tif") for i in range(6)]
    images = [open_image(u) for u in urls]  # all open at once, each header read
    try:
        assert 0 < storage.read_cache_bytes() <= 3 * storage.BLOCK_SIZE
    finally:
        for img in images:
            img.close()


@pytest.mark.slow  # .ci/run runs the slow storage tests too
def test_convert_from_a_bucket_and_local_only_outputs(tmp_path: Path, bucket: str) -> None:
    """``tilenet convert s3://… local.ome.tif`` works (the workaround the readers name), and
    so does converting into the bucket (OME-TIFF and OME-Zarr: made in a local stage and
    uploaded), refusing to overwrite without --force; never a local directory named ``s3:``."""
    from tilenet.errors import InputError
    from tilenet.geometry import Window
    from tilenet.io import convert, open_image

    arr = _pyramid_tiff(tmp_path / "p.tif", 96, 128)
    url = _upload(tmp_path / "p.tif", f"{bucket}/p.tif")
    out = convert(url, tmp_path / "c.ome.tif", tile=32)
    with open_image(out) as img:
        np.testing.assert_array_equal(img.read(Window(0, 0, 96, 128)), arr)
    for name in ("c.ome.tif", "c.ome.zarr"):
        assert (
            convert(tmp_path / "p.tif", f"{bucket}/conv/{name}", tile=32) == f"{bucket}/conv/{name}"
        )
        with open_image(f"{bucket}/conv/{name}") as img:
            assert img.shape[:2] == (96, 128)
            np.testing.assert_array_equal(img.read(Window(0, 0, 96, 128)), arr)
        with pytest.raises(InputError, match=r"conv/c\.ome\.\w+: already exists"):
            convert(url, f"{bucket}/conv/{name}", tile=32)
        assert convert(url, f"{bucket}/conv/{name}", tile=32, force=True)
    assert not Path("s3:").exists()


@pytest.mark.slow  # .ci/run runs the slow storage tests too
def test_tile_into_a_bucket_equals_local(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tilenet tile IMG --out s3://…/a.zarr``: the store is tiled in a local stage and
    uploaded, root zarr.json last; it equals a local tiling, trains like one, has its
    manifest beside it, leaves no stage behind, and a second run into it is one line."""
    import tempfile

    import tifffile
    import zarr

    from tilenet.cli import main
    from tilenet.io.storage import list_dir, read_bytes, zarr_store
    from tilenet.patches.data import store_stats

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    arr = _rgb(96, 160)
    tifffile.imwrite(tmp_path / "img.tif", arr, tile=(32, 32), photometric="rgb")
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "img.tif", (arr[..., 1] > 100).astype(np.uint8))
    argv = ["tile", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "labels"),
            "--patch", "32", "--overlap", "0", "--quiet"]  # fmt: skip
    url = f"{bucket}/stores/a.zarr"
    assert main([*argv, "--out", str(tmp_path / "a.zarr")]) == 0
    assert main([*argv, "--out", url]) == 0
    local = zarr.open_group(tmp_path / "a.zarr", mode="r")
    remote = zarr.open_group(zarr_store(url, read_only=True), mode="r")
    assert sorted(local.array_keys()) == sorted(remote.array_keys())
    assert {"images", "labels"} <= set(local.array_keys())
    for k in local.array_keys():
        np.testing.assert_array_equal(local[k][:], remote[k][:])
    assert store_stats([url]) == store_stats([tmp_path / "a.zarr"])
    lines = read_bytes(f"{url}.manifest.jsonl").decode().splitlines()
    assert [json.loads(ln)["status"] for ln in lines] == ["done"]
    assert not list((tmp_path / "tmp").rglob("*.zarr"))  # the stage is gone
    assert "zarr.json" in [u.rsplit("/", 1)[-1] for u in list_dir(url)]
    assert main([*argv, "--out", url]) == 2  # not appended to: one line


@pytest.mark.slow
def test_bench_s3_quick(tmp_path: Path) -> None:
    """scripts/bench_s3.py --quick: both sources read, bytes counted at the server."""
    out = tmp_path / "s3.json"
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_s3.py"
    res = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    s3 = [run for run in r["runs"] if run["source"] == "s3"]
    assert s3 and all(0 < run["bytes_per_window"] < r["file_bytes"] / 2 for run in s3)
    assert "win/s" in res.stdout


def test_credentials_in_a_url_never_reach_an_error_line(
    tmp_path: Path, bucket: str, s3_server: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A URL given with ``user:password@`` and a presigned query names a damaged TIFF: the
    one-line error names the object, and shows neither secret (in this process, with every
    write to the file descriptors captured: a subprocess per URL cost seconds)."""
    import boto3

    from tilenet.cli import main

    _pyramid_tiff(tmp_path / "p.tif", 128, 192)
    data = (tmp_path / "p.tif").read_bytes()
    name = bucket.removeprefix("s3://")
    s3 = boto3.client("s3")
    for key, body in (("cut.tif", data[: len(data) // 3]), ("junk.tif", b"II*\x00\x08\0\0\0xx")):
        s3.put_object(Bucket=name, Key=f"pub/{key}", Body=body, ACL="public-read")
        url = f"{s3_server}/{name}/pub/{key}".replace("://", f"://ann:{SECRET}@", 1)
        capfd.readouterr()
        code = main(["info", f"{url}?X-Amz-Signature={SECRET}"])
        out, err = capfd.readouterr()
        assert code == 2, err
        assert err.count("\n") == 1 and f"/pub/{key}?...: " in err, err
        assert SECRET not in err + out, err


@pytest.mark.slow  # .ci/run runs the slow storage tests too
def test_credentials_in_urls_are_not_written_to_the_outputs(
    tmp_path: Path, bucket: str, s3_server: str
) -> None:
    """``tilenet infer`` of a URL given with ``user:password@`` and a presigned query writes
    outputs, summary.json and config.yaml that name the input without either secret."""
    import boto3

    _pyramid_tiff(tmp_path / "p.tif", 128, 192)
    name = bucket.removeprefix("s3://")
    boto3.client("s3").put_object(
        Bucket=name, Key="pub/p.tif", Body=(tmp_path / "p.tif").read_bytes(), ACL="public-read"
    )
    url = f"{s3_server}/{name}/pub/p.tif".replace("://", f"://ann:{SECRET}@", 1)
    out = tmp_path / "out"
    ckpt = _checkpoint(tmp_path / "m.pt")
    res = subprocess.run(
        [
            *(sys.executable, "-m", "tilenet", "infer", f"{url}?X-Amz-Signature={SECRET}"),
            *("--model", str(ckpt), "--out", str(out), "--tile", "64", "--quiet"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"].endswith(f"/{name}/pub/p.tif?...")
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 5 and (out / "config.yaml") in written
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p


@pytest.mark.slow  # .ci/run runs the slow storage tests too
def test_train_from_patch_stores_in_a_bucket_equals_local(tmp_path: Path, bucket: str) -> None:
    """Training nodes without a shared disk: ``data.stores`` (and ``data.val_stores``) given
    as URLs of stores in a bucket train the same weights as the local stores, with loader
    worker processes reading the bucket themselves. A store URL that is not there is one
    line naming it."""
    import tifffile
    import torch

    from tilenet.config import load_config
    from tilenet.errors import ImageNotFoundError
    from tilenet.patches.tiler import tile_images
    from tilenet.train import train

    arr = _rgb(160, 224)
    tifffile.imwrite(tmp_path / "img.tif", arr, tile=(64, 64), photometric="rgb")
    tifffile.imwrite(tmp_path / "img_labels.tif", (arr[..., 0] > 128).astype(np.uint8))
    store = tile_images(
        [tmp_path / "img.tif"], labels=[tmp_path / "img_labels.tif"], out=tmp_path / "s.zarr",
        patch=32, overlap=0, progress=False,
    )  # fmt: skip
    url = _upload(Path(store), f"{bucket}/stores/s.zarr")

    def run(where: str, stores: str) -> dict[str, torch.Tensor]:
        over = {
            "data.stores": f"[{stores}]", "data.val_stores": f"[{stores}]",
            "data.patch": 32, "data.batch_size": 4, "data.num_workers": 2,
            "model.name": "tiny", "model.num_classes": 2, "model.kwargs.width": 2,
            "train.device": "cpu", "train.progress": False, "train.steps": 4,
            "train.warmup_steps": 0, "train.val_every": 2, "train.out_dir": tmp_path / where,
        }  # fmt: skip
        run_dir = train(load_config(None, [f"{k}={v}" for k, v in over.items()]))
        ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        return dict(ckpt["model"])

    local, remote = run("local", str(store)), run("remote", url)
    assert local.keys() == remote.keys()
    for k in local:
        assert torch.equal(local[k], remote[k]), k
    with pytest.raises(ImageNotFoundError, match=r"stores/nope\.zarr: patch store not found"):
        run("missing", f"{bucket}/stores/nope.zarr")
