"""One writer at a time per output (:mod:`tilenet.io.lock`), with real processes.

A holder is a real second process (``hold_output`` in ``python -c``, released when the test
writes a line to its stdin, or SIGKILLed); the runs refused are the real CLI, ``infer_image``
and ``run_jobs``. Buckets are moto's S3 server on 127.0.0.1 (conditional writes) and fsspec's
``memory://`` (write-then-read-back).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from builders import make_checkpoint
from s3server import SECRET

from tilenet.errors import OutputBusyError
from tilenet.io.lock import LOCK_DIR, hold_output

#: Holds the output named by argv[1] (lease time to live argv[2]; the lock beside it with
#: --beside) until a line on stdin.
HOLDER = """
import sys
from tilenet.io.lock import hold_output
beside = "--beside" in sys.argv
with hold_output(sys.argv[1], what="holder", ttl=float(sys.argv[2]), beside=beside):
    print("held", flush=True)
    sys.stdin.readline()
"""


class _Holder:
    """A second process holding an output until :meth:`release` (or SIGKILL)."""

    def __init__(self, out: str | Path, *argv: str, ttl: float = 60.0) -> None:
        cmd = [sys.executable, "-c", HOLDER, str(out), str(ttl), *argv]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "held\n", self.proc.communicate()[1]
        self.pid = self.proc.pid

    def release(self) -> None:
        _, err = self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0, err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)


@pytest.fixture
def holders() -> Iterator[list[_Holder]]:
    started: list[_Holder] = []
    yield started
    for h in started:
        if h.proc.poll() is None:
            h.kill()


def _checkpoint(path: Path) -> Path:
    return make_checkpoint(path, class_names=["a", "b", "c"])


def _image(path: Path, h: int = 64, w: int = 64) -> Path:
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    tifffile.imwrite(path, arr, tile=(64, 64), photometric="rgb")
    return path


def _infer_cli(img: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "tilenet", "infer", str(img), "--model", str(ckpt)),
        *("--out", str(out), "--tile", "64", "--device", "cpu", "--quiet", *extra),
    ]


# -- local folders ----------------------------------------------------------------------------
def test_infer_into_an_output_another_run_holds_exits_2_at_once(
    tmp_path: Path, holders: list[_Holder], capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI refuses in one line naming the output and the holder (pid, host, its command
    line without credentials), writes nothing, and leaves the holder's lock alone.

    The CLI runs in this process (a second ``python -m tilenet`` process would only add the
    import of torch); ``test_two_infers_into_one_output`` (slow, run by .ci/run) starts two
    real CLI runs."""
    from tilenet.cli import main

    ckpt, img, out = _checkpoint(tmp_path / "m.pt"), _image(tmp_path / "a.tif"), tmp_path / "o"
    secret_url = f"https://ann:{SECRET}@host/x.tif?X-Amz-Signature={SECRET}"
    holders.append(holder := _Holder(out, secret_url))
    capsys.readouterr()
    t0 = time.monotonic()
    code = main(_infer_cli(img, ckpt, out)[3:])
    elapsed = time.monotonic() - t0
    line = capsys.readouterr().err
    assert code == 2, line
    assert line.count("\n") == 1, line
    assert line.startswith(f"tilenet: error: {out}: another run (pid {holder.pid} on ")
    assert socket.gethostname() in line and "https://host/x.tif?..." in line
    assert "is writing this output" in line and "--wait" in line and SECRET not in line
    assert elapsed < 30  # at once, not a wait
    assert sorted(p.name for p in out.iterdir()) == [LOCK_DIR]  # nothing written
    assert json.loads((out / LOCK_DIR / "lock").read_text())["pid"] == holder.pid
    holder.release()
    assert not out.exists()  # the holder made the folder, and removed it empty


@pytest.mark.slow  # ~4 s; default: test_infer_into_an_output_another_run_holds_...
def test_wait_runs_when_the_holder_ends(
    tmp_path: Path, holders: list[_Holder], caplog: pytest.LogCaptureFixture
) -> None:
    """``wait=True``: the run logs whom it waits for, starts once the holder is gone, and
    completes; nothing of the lock is left in the output."""
    from tilenet.engine.infer import infer_image

    ckpt, img, out = _checkpoint(tmp_path / "m.pt"), _image(tmp_path / "a.tif"), tmp_path / "o"
    holders.append(holder := _Holder(out))
    timer = threading.Timer(1.0, holder.release)
    timer.start()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tilenet.io.lock"):
        summary = infer_image(img, ckpt, out, tile=64, device="cpu", wait=True)
    waited = time.monotonic() - t0
    timer.join()
    assert waited >= 0.9
    assert f"waiting for another run (pid {holder.pid} on" in caplog.text
    assert (out / "summary.json").exists() and summary["tiles"] >= 1
    assert not (out / LOCK_DIR).exists()


def test_the_lock_of_a_killed_run_is_free_at_once(tmp_path: Path, holders: list[_Holder]) -> None:
    out = tmp_path / "o"
    holders.append(holder := _Holder(out))
    with pytest.raises(OutputBusyError):
        with hold_output(out):
            pass
    holder.kill()
    assert json.loads((out / LOCK_DIR / "lock").read_text())["pid"] == holder.pid  # left
    t0 = time.monotonic()
    with hold_output(out, what="rerun") as me:
        assert json.loads((out / LOCK_DIR / "lock").read_text())["token"] == me.token
    assert time.monotonic() - t0 < 1.0
    assert not (out / LOCK_DIR).exists()


def test_a_second_hold_refuses_in_the_same_process_too(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with hold_output(out, what="first") as me:
        with pytest.raises(OutputBusyError) as err:
            with hold_output(out, what="second"):
                pass
        with pytest.raises(OutputBusyError):  # not even waiting: it would wait for itself
            with hold_output(out, wait=True):
                pass
    assert isinstance(err.value, BlockingIOError) and err.value.exit_code == 2
    assert f"pid {me.pid} on {me.host} since " in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # what was there stays
    with hold_output(out):  # free again
        pass


@pytest.mark.slow  # ~4 s; default: test_infer_into_an_output_another_run_holds_...
def test_batch_job_refuses_a_held_root(tmp_path: Path, holders: list[_Holder]) -> None:
    """``run_jobs`` holds the job's root (workers take no lock): held by another run, it
    refuses before it writes a manifest; with ``wait`` it runs once the other has ended."""
    from tilenet.jobs import run_jobs

    ckpt, out = _checkpoint(tmp_path / "m.pt"), tmp_path / "o"
    (tmp_path / "in").mkdir()
    _image(tmp_path / "in" / "a.tif")
    holders.append(holder := _Holder(out))
    with pytest.raises(OutputBusyError, match=f"pid {holder.pid} "):
        run_jobs([tmp_path / "in"], ckpt, out, quiet=True, tile=64, device="cpu")
    assert not (out / "manifest.jsonl").exists()
    timer = threading.Timer(0.5, holder.release)  # --wait: runs once the holder is gone
    timer.start()
    report = run_jobs([tmp_path / "in"], ckpt, out, quiet=True, tile=64, device="cpu", wait=True)
    timer.join()
    assert report.exit_code == 0 and (out / "a" / "summary.json").exists()
    assert not (out / LOCK_DIR).exists() and not (out / "a" / LOCK_DIR).exists()


@pytest.mark.slow  # ~3 s; default: test_infer_into_an_output_another_run_holds_...
def test_tiling_into_a_store_another_run_holds_refuses(
    tmp_path: Path, holders: list[_Holder]
) -> None:
    """``tile_images`` holds its store, with the lock beside it (``.tilenet/a.zarr.lock``:
    a store's folder holds only the store)."""
    from tilenet.patches.tiler import tile_images

    img, store = _image(tmp_path / "a.tif"), tmp_path / "stores" / "a.zarr"
    holders.append(holder := _Holder(store, "--beside"))
    assert (tmp_path / "stores" / LOCK_DIR / "a.zarr.lock").exists() and not store.exists()
    with pytest.raises(OutputBusyError, match=f"{store}: another run \\(pid {holder.pid} "):
        tile_images([img], out=store, patch=32, overlap=0, workers=1, progress=False)
    assert not store.exists()
    holder.release()
    tile_images([img], out=store, patch=32, overlap=0, workers=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["a.zarr"]


# -- buckets ----------------------------------------------------------------------------------
def _lease(url: str) -> dict[str, object] | None:
    from tilenet.io.storage import exists, join, read_bytes

    key = join(url, LOCK_DIR, "lease.json")
    return json.loads(read_bytes(key)) if exists(key) else None


@pytest.mark.slow  # ~2.5 s; .ci/run runs test_lock -m slow
def test_bucket_lease_refuses_another_holder_and_is_deleted_on_release(bucket: str) -> None:
    out = f"{bucket}/run"
    with hold_output(out, what="first") as me:
        lease = _lease(out)
        assert lease is not None and lease["token"] == me.token and lease["pid"] == os.getpid()
        with pytest.raises(OutputBusyError) as err:
            with hold_output(out, what="second"):
                pass
        assert str(err.value).startswith(f"{out}: another run (pid {me.pid} on {me.host} ")
        assert ", lease until " in str(err.value)
    assert _lease(out) is None
    with hold_output(out):  # free again
        pass


def test_bucket_lease_is_renewed_while_held(bucket: str) -> None:
    out = f"{bucket}/run"
    with hold_output(out, ttl=0.9) as me:
        time.sleep(1.5)  # past the first expiry: renewed every 0.3 s
        lease = _lease(out)
        assert lease is not None and lease["token"] == me.token
        assert float(lease["expires"]) > time.time()  # type: ignore[arg-type]
        with pytest.raises(OutputBusyError):
            with hold_output(out):
                pass


@pytest.mark.slow  # ~2 s; .ci/run runs test_lock -m slow
def test_lease_of_a_killed_run_on_this_host_is_taken_over_at_once(
    bucket: str, holders: list[_Holder], caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGKILLed run's lease is left in the bucket; a rerun on the same host sees that its
    process is gone and takes the output at once (the SIGKILL-and-resume tests rely on it)."""
    out = f"{bucket}/run"
    holders.append(holder := _Holder(out, ttl=60.0))
    holder.kill()
    left = _lease(out)
    assert left is not None and left["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="tilenet.io.lock"):
        with hold_output(out) as me:  # no wait
            lease = _lease(out)
            assert lease is not None and lease["token"] == me.token
    assert time.time() < float(left["expires"])  # type: ignore[arg-type]
    assert f"took over the lease of another run (pid {holder.pid} " in caplog.text
    assert _lease(out) is None


@pytest.mark.slow  # ~7 s; default: the killed run on this host
def test_lease_of_a_run_on_another_host_is_waited_out(
    bucket: str, holders: list[_Holder], caplog: pytest.LogCaptureFixture
) -> None:
    """Another host's process cannot be looked at: its lease holds until it expires."""
    from tilenet.io.storage import join, write_bytes

    out = f"{bucket}/run"
    holders.append(holder := _Holder(out, ttl=2.0))
    holder.kill()
    left = _lease(out)
    assert left is not None
    left["host"] = "another-node"
    write_bytes(join(out, LOCK_DIR, "lease.json"), json.dumps(left).encode())
    with pytest.raises(OutputBusyError, match="on another-node"):
        with hold_output(out):
            pass
    with caplog.at_level(logging.WARNING, logger="tilenet.io.lock"):
        with hold_output(out, wait=True):
            taken = time.time()
    expired = float(left["expires"])  # type: ignore[arg-type]
    assert expired <= taken < expired + 10  # polled every second: not before, nor long after
    assert "took over the lease of another run" in caplog.text


def test_lease_without_conditional_writes_memory_store() -> None:
    """A store without conditional writes (fsspec memory://): write, read back, hold."""
    from tilenet.io.storage import exists

    out = f"memory://lock-{uuid.uuid4().hex[:8]}/run"
    with hold_output(out, what="first") as me:
        with pytest.raises(OutputBusyError, match=f"pid {me.pid} "):
            with hold_output(out, what="second"):
                pass
    assert not exists(f"{out}/{LOCK_DIR}/lease.json")


# -- two real runs ----------------------------------------------------------------------------
def _started_holding(cmd: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``cmd`` and pause it (SIGSTOP) once it holds ``out``: the second run then meets
    a live holder whatever the two processes' start-up times are (they raced: on an idle
    machine the first could finish before the second got to the lock)."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lock = out / LOCK_DIR / "lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and str(proc.pid) in lock.read_text(errors="replace")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    return proc


@pytest.mark.slow  # two pairs of CLI runs of a 1064 x 600 image: about a minute
def test_two_infers_into_one_output(tmp_path: Path) -> None:
    """Exactly one writes; the other exits 2 in one line naming the output and the winner.
    With --wait both succeed, one after the other, and the outputs are complete."""
    ckpt, img = _checkpoint(tmp_path / "m.pt"), _image(tmp_path / "a.tif", 1064, 600)
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = _started_holding(_infer_cli(img, ckpt, out), out, env)
    try:
        second = subprocess.run(
            _infer_cli(img, ckpt, out), env=env, stderr=subprocess.PIPE, text=True, timeout=300
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1
    assert f"{out}: another run (pid {first.pid} on " in second.stderr
    assert json.loads((out / "summary.json").read_text())["tiles"] > 100

    out2 = tmp_path / "o2"
    first = _started_holding(_infer_cli(img, ckpt, out2), out2, env)
    waiter = subprocess.Popen(
        _infer_cli(img, ckpt, out2, "--wait"), env=env, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(waiter.stderr or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("waiting for another run" in ln for ln in lines):
            assert waiter.poll() is None, lines
            assert time.monotonic() < deadline, "the second run never waited"
            time.sleep(0.01)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert waiter.wait(timeout=300) == 0, lines
    reader.join(timeout=10)
    assert sum("waiting for another run" in ln for ln in lines) == 1
    assert json.loads((out2 / "summary.json").read_text())["tiles"] > 100
    assert not [p for p in out2.iterdir() if p.name.startswith(".")]
