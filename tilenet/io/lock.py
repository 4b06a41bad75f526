"""One writer at a time per output: :func:`hold_output` around a whole run.

Two runs writing the same output (``tilenet infer a.tif --out OUT`` started twice) would
interleave partial stores and resume markers: both could exit 0 with broken outputs. A run
holds its output for its whole length instead; a second run into it refuses at once with
one line naming the output and the run that holds it (:class:`~tilenet.errors.OutputBusyError`,
exit code 2), or with ``wait=True`` (``--wait``) waits until it is free.

Where the output is decided here, once (:func:`tilenet.io.storage.is_url`):

* **A local folder** (or ``file://``): ``OUT/.tilenet/lock``, held with ``fcntl.flock``
  (``LOCK_EX | LOCK_NB``) on an open descriptor. The operating system drops the lock when the
  process ends, SIGKILL included, so the lock of a killed run never blocks the rerun that
  resumes it. The file holds the holder's pid, host, start time and command line, for the
  message. On release the file (and the folders the lock made, when empty) are removed; a
  process that locked a file just unlinked sees it and locks the new one. Network file systems
  may not honour ``flock`` (NFS before Linux 2.6.12, some FUSE mounts). On Windows
  ``msvcrt.locking`` on one byte plays the part of ``flock`` (untested here).
* **A bucket** (``s3://`` and any other fsspec URL): a lease object ``OUT/.tilenet/lease.json``
  with the holder and an expiry (:data:`LEASE_TTL_S`), renewed by a daemon thread every third
  of its time to live and deleted on release. A run refuses an unexpired lease of another
  holder and takes over one that has ended: expired, or left by a process of this host that is
  no more (a killed run's lease ends by itself; on the same host at once). Object
  stores have no create-if-absent in every backend. On S3 (``s3://``, ``s3a://``) the lease
  is created with a conditional write (``If-None-Match: *``, s3fs ``mode="create"``) and
  taken over or renewed with ``If-Match`` on the ETag read, so of two runs exactly one wins
  (tested against moto's S3 server). Other stores get write-then-read-back: write the lease,
  wait :data:`SETTLE_S`, read it back, and hold it only if it is still ours -- best effort,
  as two runs whose writes fall more than :data:`SETTLE_S` apart after reading no lease could
  both believe they hold it. Expiry compares wall clocks: hosts must agree to well within
  the time to live. A holder that cannot renew in time (storage unreachable for longer than
  the time to live) loses the lease to the next run and says so in a log line.

Who holds what: ``infer_image`` its ``out_dir``; a batch job (``run_jobs``) the job's root
only, never the per-image folders inside it, and its dask workers (other processes) take no
lock, so nothing in a job waits on the job; ``tile_images`` its patch store, with the lock
beside the store (``stores/.tilenet/a.zarr.lock``: a store's folder holds only the store).
A second :func:`hold_output` of the same output in the same process is a second holder and
refuses too, even with ``wait`` (it would wait for itself).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from tilenet.errors import OutputBusyError, TilenetError, scrub_credentials
from tilenet.io.storage import filesystem, is_url, join, local_path, redact, storage_call

__all__ = [
    "HOLDER_FILES",
    "LEASE_TTL_S",
    "LOCK_DIR",
    "SETTLE_S",
    "Holder",
    "exclusive_output",
    "hold_output",
]

log = logging.getLogger(__name__)

#: Folder inside an output that holds its lock (local) or lease (bucket).
LOCK_DIR = ".tilenet"
_LOCK_FILE = "lock"
_LEASE_FILE = "lease.json"
#: The names in LOCK_DIR that belong to the holder: whoever clears that folder (the output
#: set's resume state lives there too) must leave them, or a second run gets in.
HOLDER_FILES = frozenset({_LOCK_FILE, _LEASE_FILE})
#: Seconds a bucket lease lives unless renewed (renewed every third of it while held).
LEASE_TTL_S = 60.0
#: Write-then-read-back (stores without conditional writes): seconds between the two.
SETTLE_S = 0.5
#: Seconds between two tries while waiting for a local lock.
_POLL_S = 0.25
_CONDITIONAL = ("s3", "s3a")
_COMMAND_CHARS = 300

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Holder:
    """Who holds an output: recorded in the lock file or lease, shown to the run refused."""

    pid: int
    host: str
    #: Unix time the holder took the output.
    since: float
    #: What holds it (``tilenet infer``) and its command line (credentials cut).
    what: str
    command: str
    #: Unique per hold (a lease is renewed and released only by its own holder).
    token: str = ""
    #: Unix time a lease runs out unless renewed (None for a local lock).
    expires: float | None = None

    @classmethod
    def me(cls, what: str, ttl: float | None = None) -> Holder:
        now = time.time()
        command = scrub_credentials(" ".join([_program(), shlex.join(sys.argv[1:])]))
        if len(command) > _COMMAND_CHARS:
            command = command[: _COMMAND_CHARS - 3] + "..."
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            since=now,
            what=what,
            command=command,
            token=uuid.uuid4().hex,
            expires=None if ttl is None else now + ttl,
        )

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder in a lock file's or lease's bytes; None when unreadable (being written)."""
        try:
            d = json.loads(data)
            return cls(
                pid=int(d["pid"]),
                host=str(d["host"]),
                since=float(d["since"]),
                what=str(d.get("what", "")),
                command=str(d.get("command", "")),
                token=str(d.get("token", "")),
                expires=None if d.get("expires") is None else float(d["expires"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    def renewed(self, ttl: float) -> Holder:
        return replace(self, expires=time.time() + ttl)

    def starting(self, ttl: float | None = None) -> Holder:
        """This holder as it takes the output now (after a wait): since now, a fresh lease."""
        now = time.time()
        return replace(self, since=now, expires=None if ttl is None else now + ttl)

    def expired(self) -> bool:
        return self.expires is not None and self.expires < time.time()

    def gone(self) -> bool:
        """Whether this holder has ended: its lease expired, or it ran on this host and its
        process is no more (a killed run's lease stops no rerun on the same machine; one from
        another host ends with its time to live)."""
        if self.expired():
            return True
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # alive, another user's
        return False

    def describe(self) -> str:
        """``pid 12 on host since 2026-12-06 22:31:05 UTC: tilenet infer a.tif --out o``."""
        text = f"pid {self.pid} on {self.host} since {_utc(self.since)}"
        if self.expires is not None:
            text += f", lease until {_utc(self.expires)}"
        return text + f": {scrub_credentials(self.command or self.what)}"


def _program() -> str:
    """This program's name as typed: ``tilenet``, ``python -m tilenet``."""
    path = Path(sys.argv[0] if sys.argv and sys.argv[0] else "python")
    if path.name == "__main__.py":
        return f"python -m {path.parent.name}"
    return f"python {path.name}" if path.name in ("-c", "-") else path.name


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _who(other: Holder | None) -> str:
    return f"another run ({other.describe()})" if other else "another run"


def _busy(out: str, other: Holder | None) -> OutputBusyError:
    return OutputBusyError(
        f"{redact(out)}: {_who(other)} is writing this output; wait for it to end, or rerun "
        "with --wait to start when it has"
    )


@contextlib.contextmanager
def hold_output(
    out: str | os.PathLike[str],
    *,
    wait: bool = False,
    what: str = "tilenet",
    ttl: float = LEASE_TTL_S,
    beside: bool = False,
) -> Iterator[Holder]:
    """Hold the output location ``out`` (a folder or a bucket prefix) for the block.

    Another live holder makes it raise :class:`~tilenet.errors.OutputBusyError` at once,
    naming ``out`` and that run; with ``wait`` it polls instead (one log line) until the
    output is free. ``what`` names this run for others' messages; ``ttl`` is a bucket
    lease's time to live in seconds. ``beside`` keeps the lock out of ``out``, in its
    parent's ``.tilenet/`` (``a.zarr.lock``, ``a.zarr.lease.json``): for an output whose
    folder may hold nothing else (a patch store). Yields this run's :class:`Holder`.
    """
    where = str(out).rstrip("/") if is_url(out) else os.fspath(local_path(out))
    lock: _LocalLock | _Lease
    if is_url(out):
        parent, name = where.rsplit("/", 1) if beside else (where, "")
        key = join(parent, LOCK_DIR, f"{name}.{_LEASE_FILE}" if beside else _LEASE_FILE)
        lock = _Lease(key, Holder.me(what, ttl), ttl)
    else:
        path = Path(where).absolute()
        folder = path.parent if beside else path
        name = f"{path.name}.lock" if beside else _LOCK_FILE
        lock = _LocalLock(folder / LOCK_DIR / name, Holder.me(what))
    _acquire(lock, where, wait=wait)
    try:
        yield lock.me
    finally:
        lock.release()


def _acquire(lock: _LocalLock | _Lease, where: str, *, wait: bool) -> None:
    """Take ``lock``, or refuse naming its holder, or (``wait``) poll until it is free."""
    told: str | None = None
    while True:
        held, other = lock.try_acquire()
        if held:
            return
        mine = other is not None and (other.pid, other.host) == (lock.me.pid, lock.me.host)
        if not wait or mine:  # held by this very process: waiting would never end
            raise _busy(where, other)
        if (other.token if other else "") != told:  # one line per holder waited for
            log.warning("%s: waiting for %s to finish", redact(where), _who(other))
            told = other.token if other else ""
        time.sleep(lock.poll_s)


class _LocalLock:
    """A lock file (``OUT/.tilenet/lock``) under ``flock``: the OS releases it when the
    process dies."""

    poll_s = _POLL_S

    def __init__(self, path: Path, me: Holder) -> None:
        self.me = me
        self.path = path
        self.fd: int | None = None
        self.made: list[Path] = []  # folders the lock created: removed on release when empty

    def try_acquire(self) -> tuple[bool, Holder | None]:
        """(True, None) once held; else (False, the holder, None when it has not written
        itself yet)."""
        self.me = self.me.starting()
        for _ in range(100):  # a holder unlinking the file as we open it: open again
            self.made += _make_dirs(self.path.parent)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # its folder just removed by a holder releasing
            if not _try_lock(fd):
                os.close(fd)
                return False, _read_holder(self.path)
            if not _same_file(fd, self.path):
                os.close(fd)  # unlinked by the holder before us on release: not the lock
                continue
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, self.me.encode())
            self.fd = fd
            return True, None
        raise OSError(f"{self.path}: could not lock it (it keeps being replaced)")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # still holding it: nobody can lock this file and keep it
        os.close(self.fd)
        self.fd = None
        for d in [self.path.parent, *reversed(self.made)]:
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty


def _make_dirs(d: Path) -> list[Path]:
    """Create ``d`` and its missing parents; return the ones created, outermost first."""
    missing = [p for p in [d, *d.parents] if not p.exists()][::-1]
    d.mkdir(parents=True, exist_ok=True)
    return missing


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` exclusively without blocking; False when another holds it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, 2**30, os.SEEK_SET)  # lock a byte past the text, which stays readable
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(path: Path) -> Holder | None:
    """The holder written in ``path`` (a holder writes itself right after locking)."""
    for _ in range(20):
        try:
            holder = Holder.parse(path.read_bytes())
        except OSError:
            holder = None
        if holder is not None:
            return holder
        time.sleep(0.02)
    return None


class _Lease:
    """A lease object (``OUT/.tilenet/lease.json``) in a bucket, renewed while held (see
    the module doc)."""

    def __init__(self, url: str, me: Holder, ttl: float) -> None:
        self.me, self.ttl = me, ttl
        self.url = url
        self.fs, self.key = filesystem(url)
        proto = url.split("://", 1)[0].lower()
        self.conditional = proto in _CONDITIONAL
        self.poll_s = min(ttl / 3, 5.0)
        self.etag: str | None = None
        self.lost = False
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    # -- requests -------------------------------------------------------------------------
    def _read(self) -> tuple[Holder | None, str | None] | None:
        """The lease and its ETag; None when there is none."""

        def get() -> tuple[Holder | None, str | None] | None:
            try:
                meta = self.fs.info(self.key)
                data = self.fs.cat_file(self.key)
            except FileNotFoundError:
                return None
            return Holder.parse(data), meta.get("ETag") or meta.get("etag")

        self.fs.invalidate_cache(self.key)
        return storage_call(self.url, get)

    def _write(self, holder: Holder, *, create: bool = False, match: str | None = None) -> bool:
        """Write ``holder``: if absent (``create``), if the ETag is still ``match``, or
        unconditionally. False when the condition did not hold."""
        kwargs: dict[str, Any] = {}
        if create:
            kwargs["mode"] = "create"
        if match is not None:
            kwargs["IfMatch"] = match

        def put() -> bool:
            try:
                out = self.fs.pipe_file(self.key, holder.encode(), **kwargs)
            except FileExistsError:
                return False
            except OSError as exc:
                if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
                    return False
                raise
            self.etag = out.get("ETag") if isinstance(out, dict) else None
            return True

        return storage_call(self.url, put)

    # -- the protocol ---------------------------------------------------------------------
    def try_acquire(self) -> tuple[bool, Holder | None]:
        """(True, None) once held; else (False, the live holder)."""
        for _ in range(10):  # a lease released between our write and read: try again
            self.me = self.me.starting(self.ttl)
            if self.conditional:
                held, other = self._try_conditional()
            else:
                held, other = self._try_read_back()
            if held:
                self.thread = threading.Thread(target=self._renew, name="tilenet-lease")
                self.thread.daemon = True
                self.thread.start()
                return True, None
            if other is not None:
                return False, other
        return False, None

    def _try_conditional(self) -> tuple[bool, Holder | None]:
        if self._write(self.me, create=True):
            return True, None
        found = self._read()
        if found is None:
            return False, None  # released in between
        other, etag = found
        if other is not None and other.token == self.me.token:
            self.etag = etag  # our own create, answered lost and retried
            return True, None
        if other is not None and not other.gone():
            return False, other
        if etag is not None and self._write(self.me.renewed(self.ttl), match=etag):
            log.warning(
                "%s: took over the lease of %s, which has ended", redact(self.url), _who(other)
            )
            return True, None
        return False, None  # another run took it over first: look again

    def _try_read_back(self) -> tuple[bool, Holder | None]:
        found = self._read()
        if found is not None:
            other = found[0]
            if other is not None and other.token != self.me.token and not other.gone():
                return False, other
        self._write(self.me)
        time.sleep(SETTLE_S)
        back = self._read()
        other = back[0] if back is not None else None
        if other is not None and other.token == self.me.token:
            return True, None
        return False, other

    def _renew(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                self._renew_once()
            except Exception as exc:  # a transient failure: the next tick tries again
                log.warning("%s: could not renew the lease: %s", redact(self.url), exc)
            if self.lost:
                return

    def _renew_once(self) -> None:
        me = self.me = self.me.renewed(self.ttl)
        if self.conditional and self.etag is not None and self._write(me, match=self.etag):
            return
        found = self._read()  # not renewed: a write of ours answered lost, or another run's
        if found is not None and found[0] is not None and found[0].token == me.token:
            if self._write(me, match=found[1] if self.conditional else None):
                return
        self.lost = True
        found = self._read()
        log.warning(
            "%s: lost the lease (not renewed in time) to %s; another run may write this output too",
            redact(self.url),
            _who(found[0] if found else None),
        )

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.lost:
            return
        try:
            found = self._read()
            if found is not None and found[0] is not None and found[0].token == self.me.token:
                storage_call(self.url, lambda: self.fs.rm_file(self.key))
                self.fs.invalidate_cache(self.key)
        except TilenetError as exc:  # it runs out by itself
            log.warning("%s: could not delete the lease: %s", redact(self.url), exc)


def exclusive_output(
    param: str, *, what: str, beside: bool = False
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Make every call of the decorated function hold :func:`hold_output` on the output its
    argument ``param`` names, for the whole call. The decorated function takes one more
    keyword, ``wait`` (default False), shown in its signature; ``wait``, ``what`` and
    ``beside`` are :func:`hold_output`'s. A thin wrapper at an entry point (``infer_image``,
    ``run_jobs``, ``tile_images``), so that the body stays the body."""

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        signature = inspect.signature(fn)
        if "wait" in signature.parameters or param not in signature.parameters:
            raise TypeError(f"{fn.__qualname__}: cannot hold its output {param!r} with a 'wait'")

        @functools.wraps(fn)
        def held(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            wait = bool(kwargs.pop("wait", False))
            out = signature.bind_partial(*args, **kwargs).arguments[param]
            with hold_output(out, wait=wait, what=what, beside=beside):
                return fn(*args, **kwargs)

        setattr(held, "__signature__", _with_wait(signature))  # noqa: B010
        held.__doc__ = (fn.__doc__ or "") + (
            f"\n\n    The call holds ``{param}`` (:func:`tilenet.io.lock.hold_output`): another "
            "run writing it makes it\n    raise OutputBusyError, or with ``wait=True`` wait.\n"
        )
        return held

    return decorate


def _with_wait(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` with a keyword-only ``wait: bool = False`` (before any ``**kwargs``)."""
    params = list(signature.parameters.values())
    wait = inspect.Parameter(
        "wait", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"
    )
    at = len(params)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        at -= 1
    return signature.replace(parameters=[*params[:at], wait, *params[at:]])
