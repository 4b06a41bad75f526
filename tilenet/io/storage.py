"""Object storage: fsspec URLs (``s3://``, ``gs://``, ``az://``, ``http(s)://``) as inputs and
outputs.

Everything remote goes through fsspec (s3fs, gcsfs, adlfs, aiohttp), so credentials come from
the standard places only (environment, config files, instance roles) and never pass through
tilenet: nothing here logs or records them, and :func:`redact` strips ``user:pass@`` and
query strings (presigned tokens) from a URL before it is shown or written anywhere.

Reads never download a whole file: :func:`open_file` gives a seekable file whose reads are
HTTP range requests of :data:`BLOCK_SIZE` through one process-wide block cache bounded by
:data:`READ_CACHE_BYTES` (headers, tile tables), and :func:`read_range` fetches one byte range
(a tile) uncached (the readers cache decoded tiles themselves). Every request has connect/read timeouts and
transient failures are retried with exponential backoff (:data:`RETRIES`); what still fails
becomes a one-line :class:`StorageError` (or :class:`~tilenet.errors.ImageNotFoundError`)
naming the URL.

``file://`` URLs are plain local paths (:func:`local_path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from tilenet.errors import ImageNotFoundError, TilenetError, one_line

__all__ = [
    "BLOCK_SIZE",
    "CONNECT_TIMEOUT_S",
    "READ_CACHE_BYTES",
    "READ_TIMEOUT_S",
    "RETRIES",
    "StorageError",
    "download",
    "exists",
    "filesystem",
    "gdal_options",
    "gdal_path",
    "glob_urls",
    "head",
    "info",
    "is_image_url",
    "is_url",
    "join",
    "list_dir",
    "local_path",
    "open_file",
    "read_bytes",
    "read_cache_bytes",
    "read_range",
    "redact",
    "remote_fingerprint",
    "remove",
    "staged_upload",
    "storage_call",
    "upload",
    "write_bytes",
    "zarr_store",
]

#: Seconds to wait for a connection, and for the next bytes of an answer. Environment
#: ``TILENET_STORAGE_CONNECT_TIMEOUT`` / ``TILENET_STORAGE_READ_TIMEOUT`` override them.
CONNECT_TIMEOUT_S = float(os.environ.get("TILENET_STORAGE_CONNECT_TIMEOUT", 10))
READ_TIMEOUT_S = float(os.environ.get("TILENET_STORAGE_READ_TIMEOUT", 60))
#: Attempts per request for transient failures (connection errors, timeouts, 5xx), with
#: exponential backoff from :data:`_BACKOFF_S` (0.25, 0.5, 1 s...).
RETRIES = int(os.environ.get("TILENET_STORAGE_RETRIES", 4))
_BACKOFF_S = 0.25
#: Bytes per range request of a file opened with :func:`open_file` (headers, tile tables).
BLOCK_SIZE = 256 * 2**10
#: Budget of the process-wide LRU of :data:`BLOCK_SIZE` blocks shared by every remote file
#: opened with :func:`open_file` (however many are open: a training set costs no more).
READ_CACHE_BYTES = 16 * 2**20

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = ("file", "local")
_GDAL_PREFIX = {"s3": "/vsis3/", "gs": "/vsigs/", "gcs": "/vsigs/", "az": "/vsiaz/"}
_T = TypeVar("_T")
_CACHE_NAME = "tilenet-shared-blocks"
# Protocols whose client retries transient failures itself (botocore's "standard" mode).
_OWN_RETRIES = ("s3", "s3a")


class StorageError(TilenetError, OSError):
    """Object storage failed: access denied, a server that does not answer, ..."""


def _protocol(url: str) -> str | None:
    m = _URL.match(url)
    return m.group(1).lower() if m else None


def is_url(path: object) -> bool:
    """Whether ``path`` is a remote fsspec URL (``file://`` is local, a ``Path`` never a URL).

    >>> is_url("s3://bucket/a.tif"), is_url("file:///tmp/a.tif"), is_url("/tmp/a.tif")
    (True, False, False)
    """
    if not isinstance(path, str):
        return False
    proto = _protocol(path)
    return proto is not None and proto not in _LOCAL


def is_image_url(path: object) -> bool:
    """Whether ``path`` is a URL naming one image: an object or a ``.zarr`` prefix, not a
    glob or a prefix of many (``s3://b/slides/``)."""
    if not is_url(path):
        return False
    s = str(path)
    if "*" in s or "[" in s:
        return False
    if s.rstrip("/").lower().endswith(".zarr"):
        return True
    try:
        return info(s).get("type") == "file"
    except TilenetError:
        return True  # let the reader say what is wrong with it, in one line


def local_path(path: str | os.PathLike[str]) -> Path:
    """A local path; ``file://`` URLs are turned into their path.

    >>> str(local_path("file:///tmp/a.tif"))
    '/tmp/a.tif'
    """
    s = os.fspath(path)
    if _protocol(s) in _LOCAL:
        s = s.split("://", 1)[1]
    return Path(s)


def redact(url: str) -> str:
    """``url`` without credentials: no ``user:pass@``, no query string (presigned tokens).

    >>> redact("https://ann:s3cret@host/x.tif?X-Amz-Signature=abc")
    'https://host/x.tif?...'
    >>> redact("s3://bucket/a.tif")
    's3://bucket/a.tif'
    """
    if not is_url(url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))


def join(url: str, *names: str) -> str:
    """``url`` with path components appended.

    >>> join("s3://b/run/", "img", "summary.json")
    's3://b/run/img/summary.json'
    """
    return "/".join([url.rstrip("/"), *(n.strip("/") for n in names)])


def _options(protocol: str) -> dict[str, Any]:
    """Timeouts and retries per protocol (no credentials: fsspec finds those itself)."""
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {
            **({"endpoint_url": endpoint} if endpoint else {}),
            "config_kwargs": {
                "connect_timeout": CONNECT_TIMEOUT_S,
                "read_timeout": READ_TIMEOUT_S,
                "retries": {"max_attempts": RETRIES, "mode": "standard"},
            },
        }
    if protocol in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        return {"client_kwargs": {"timeout": timeout}}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` (with tilenet's timeouts) and the path within it."""
    import fsspec

    proto = _protocol(url) or "file"
    try:
        fs, path = fsspec.core.url_to_fs(url, **_options(proto))
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"{redact(url)}: cannot open {proto}:// URLs: {one_line(exc, typed=False)}"
        ) from exc
    if proto in _OWN_RETRIES:
        fs.retries = 1  # botocore retries with backoff (config above); s3fs would multiply it
    return fs, path


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    name = type(exc).__name__
    text = str(exc)
    return any(k in name for k in ("Timeout", "Connect", "Endpoint")) or any(
        k in text for k in ("503", "500", "SlowDown", "timed out", "Connection")
    )


def _error(url: str, exc: BaseException) -> TilenetError:
    """A one-line error naming the (redacted) URL for a failed storage request."""
    where = redact(url)
    text = one_line(exc, typed=False)
    if isinstance(exc, TilenetError):
        return exc
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        missing = "NoSuchBucket" in text or not _bucket_exists(url)
        return ImageNotFoundError(
            f"{where}: " + ("bucket does not exist" if missing else "no such object")
        )
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return StorageError(
            f"{where}: access denied; check the credentials (environment, config files, "
            "instance role) and the bucket policy"
        )
    if _transient(exc):
        return StorageError(
            f"{where}: storage did not answer after {RETRIES} attempts ({type(exc).__name__}); "
            "is the endpoint reachable?"
        )
    return StorageError(f"{where}: storage request failed: {text}")


def _bucket_exists(url: str) -> bool:
    """Whether the bucket of a ``s3://`` (``gs://``, ``az://``) URL exists; True otherwise."""
    proto = _protocol(url)
    if proto in (None, "http", "https") or proto in _LOCAL:
        return True
    fs, path = filesystem(url)
    try:
        return bool(fs.exists(path.split("/", 1)[0]))
    except Exception:
        return True  # cannot tell: say "no such object"


def storage_call(url: str, fn: Callable[[], _T]) -> _T:
    """Call ``fn`` (a request about ``url``), retrying transient failures with backoff.

    Failures become a one-line :class:`StorageError` / ``ImageNotFoundError``.
    """
    attempts = 1 if _protocol(url) in _OWN_RETRIES else RETRIES
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt + 1 < attempts and _transient(exc):
                time.sleep(_BACKOFF_S * 2**attempt)
                continue
            raise _error(url, exc) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def info(url: str) -> dict[str, Any]:
    """fsspec's ``info`` of ``url`` (``size``, ``type``, ETag/mtime where the store has them)."""
    fs, path = filesystem(url)
    return storage_call(url, lambda: fs.info(path))


def head(url: str, n: int = 32) -> bytes:
    """The first ``n`` bytes of the object at ``url`` (one range request)."""
    fs, path = filesystem(url)
    return storage_call(url, lambda: fs.cat_file(path, start=0, end=n))


def read_range(url: str, offset: int, count: int) -> bytes:
    """``count`` bytes of ``url`` from ``offset``: one range request, uncached."""
    fs, path = filesystem(url)
    return storage_call(url, lambda: fs.cat_file(path, start=offset, end=offset + count))


def read_bytes(url: str) -> bytes:
    """The whole (small) object at ``url``: metadata, markers, manifests."""
    fs, path = filesystem(url)
    return storage_call(url, lambda: fs.cat_file(path))


def write_bytes(url: str, data: bytes) -> None:
    """Write a small object in one request (an object appears whole or not at all)."""
    fs, path = filesystem(url)
    storage_call(url, lambda: fs.pipe_file(path, data))


def upload(
    local: str | os.PathLike[str], url: str, *, last: str | Sequence[str] | None = None
) -> None:
    """Upload a local file or directory tree to ``url``; the tree's files at the relative
    paths ``last`` (a zarr store's root ``zarr.json``, or ``.zgroup`` and ``.zattrs``: what
    makes it a store) go last, so that what a reader finds complete is complete."""
    fs, path = filesystem(url)
    src = Path(local)
    if src.is_dir():
        files = [f for f in sorted(src.rglob("*")) if f.is_file()]
        if last is not None:
            ends = {last} if isinstance(last, str) else set(last)
            files.sort(key=lambda f: f.relative_to(src).as_posix() in ends)
        for f in files:
            dest = path.rstrip("/") + "/" + f.relative_to(src).as_posix()
            storage_call(url, partial(fs.put_file, str(f), dest))
    else:
        storage_call(url, lambda: fs.put_file(str(src), path))


def download(url: str, local: str | os.PathLike[str]) -> Path:
    """Copy the object or prefix (a tree: a zarr store, say) at ``url`` to the local path
    ``local`` (replaced); the object requests run concurrently where the file system is
    asynchronous (s3fs, gcsfs)."""
    import shutil

    fs, path = filesystem(url)
    dest = Path(local)
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if storage_call(url, lambda: fs.isdir(path)):
        dest.mkdir()
        storage_call(url, lambda: fs.get(path.rstrip("/") + "/", str(dest) + "/", recursive=True))
    else:
        storage_call(url, lambda: fs.get_file(path, str(dest)))
    return dest


@contextlib.contextmanager
def staged_upload(url: str) -> Iterator[Path]:
    """A local path to build what goes to ``url`` at (a file or a zarr store, named as the
    URL's last name); when the block ends without error it is uploaded (a store's root
    ``zarr.json`` last: until every chunk is there, there is no store at ``url``) and the
    stage removed. The stage is the same directory for the same URL (under the temporary
    directory), so a rerun after an interruption finds the work done there."""
    import shutil
    import tempfile

    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    stage = Path(tempfile.gettempdir()) / "tilenet-stage" / key
    stage.mkdir(parents=True, exist_ok=True)
    local = stage / url.rstrip("/").rsplit("/", 1)[-1]
    yield local
    upload(local, url, last="zarr.json")
    shutil.rmtree(stage, ignore_errors=True)


def exists(url: str) -> bool:
    """Whether an object or a prefix (a zarr store, say) is at ``url``."""
    fs, path = filesystem(url)
    return bool(storage_call(url, lambda: fs.exists(path)))


def remove(url: str) -> None:
    """Remove the object or prefix ``url`` (nothing when it is not there)."""
    fs, path = filesystem(url)

    def rm() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    storage_call(url, rm)


class _SharedBlocks:
    """The blocks of all remote files, LRU, bounded by :data:`READ_CACHE_BYTES` in total."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self.lock:
            data = self.items.get(key)
            if data is not None:
                self.items.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        with self.lock:
            if key in self.items:
                return
            self.items[key] = data
            self.bytes += len(data)
            while self.bytes > READ_CACHE_BYTES and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.bytes -= len(old)


_BLOCKS = _SharedBlocks()
_FILE_IDS = itertools.count()


def read_cache_bytes() -> int:
    """Bytes held now by the process-wide block cache (at most :data:`READ_CACHE_BYTES`)."""
    return _BLOCKS.bytes


def _cache_class() -> Any:
    """An fsspec cache type reading whole blocks through :data:`_BLOCKS` (registered once)."""
    from fsspec.caching import BaseCache, caches, register_cache

    if _CACHE_NAME in caches:
        return caches[_CACHE_NAME]

    class SharedBlockCache(BaseCache):
        name = _CACHE_NAME

        def __init__(self, blocksize: int, fetcher: Any, size: int, **kwargs: Any) -> None:
            super().__init__(blocksize, fetcher, size)
            self.file_id = next(_FILE_IDS)  # never reused, unlike id()

        def _fetch(self, start: int | None, stop: int | None) -> bytes:
            start = 0 if start is None else start
            stop = self.size if stop is None or stop > self.size else stop
            if start >= stop:
                return b""
            bs = self.blocksize
            first, last = start // bs, (stop - 1) // bs
            data = b"".join(self._block(i) for i in range(first, last + 1))
            return data[start - first * bs : stop - first * bs]

        def _block(self, i: int) -> bytes:
            key = (self.file_id, i)
            data = _BLOCKS.get(key)
            if data is None:
                self.miss_count += 1
                data = self.fetcher(i * self.blocksize, min(self.size, (i + 1) * self.blocksize))
                _BLOCKS.put(key, data)
            else:
                self.hit_count += 1
            return data

    register_cache(SharedBlockCache)
    return SharedBlockCache


def open_file(url: str) -> Any:
    """``url`` as a seekable binary file: range requests of :data:`BLOCK_SIZE` blocks through
    the process-wide block cache (:data:`READ_CACHE_BYTES`); never a whole-file download."""
    fs, path = filesystem(url)
    cache = _cache_class()
    return storage_call(
        url, lambda: fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type=cache.name)
    )


def glob_urls(pattern: str) -> list[str]:
    """The URLs matching a glob ``pattern`` (``s3://bucket/slides/*.tif``), sorted."""
    fs, path = filesystem(pattern)
    proto = _protocol(pattern) or "file"
    hits = storage_call(pattern, lambda: fs.glob(path))
    return sorted(h if _protocol(h) else f"{proto}://{h}" for h in hits)


def list_dir(url: str) -> list[str]:
    """The URLs of the entries directly under ``url``, sorted."""
    fs, path = filesystem(url)
    proto = _protocol(url) or "file"
    hits = storage_call(url, lambda: fs.ls(path, detail=False, refresh=True))
    # Not kept: the file system object is shared by the process, and a listing cached now
    # would hide what other processes write there later (a batch's workers).
    fs.invalidate_cache(path)
    return sorted(h if _protocol(h) else f"{proto}://{h}" for h in hits)


def remote_fingerprint(url: str, meta_names: Sequence[str]) -> str:
    """A fingerprint of the object or prefix at ``url`` from listing metadata, not content.

    An object: its size and ETag (or mtime). A prefix (zarr store): the contents of the
    metadata files named ``meta_names`` at its root and one level below (the levels of an
    OME-Zarr), so no chunk is listed or read.
    """
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    meta = storage_call(url, lambda: fs.info(path))
    if meta.get("type") != "directory":
        keep = {k: str(meta.get(k)) for k in ("size", "ETag", "etag", "mtime", "LastModified")}
        digest.update(("object\0" + json.dumps(keep, sort_keys=True)).encode())
        return digest.hexdigest()
    digest.update(b"dir\0")
    entries = storage_call(url, lambda: fs.ls(path, detail=True))
    dirs = sorted(e["name"] for e in entries if e.get("type") == "directory")
    for base in [path.rstrip("/"), *dirs]:
        for name in meta_names:
            key = f"{base}/{name}"
            try:
                data = storage_call(url, partial(fs.cat_file, key))
            except ImageNotFoundError:
                continue
            digest.update(key[len(path) :].encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def zarr_store(url: str, *, read_only: bool) -> Any:
    """A zarr ``FsspecStore`` on ``url`` (chunks are read and written object by object)."""
    from zarr.storage import FsspecStore

    fs, path = filesystem(url)
    if not getattr(fs, "async_impl", False):
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(fs)
    elif not fs.asynchronous:
        retries = getattr(fs, "retries", None)
        fs = type(fs)(**{**fs.storage_options, "asynchronous": True})
        if retries is not None:
            fs.retries = retries  # as :func:`filesystem` set it (botocore retries for S3)
    return FsspecStore(fs, path=path, read_only=read_only)


def gdal_path(url: str) -> str:
    """The GDAL virtual path of ``url`` (``/vsis3/...``, ``/vsigs/...``, ``/vsicurl/...``).

    >>> gdal_path("s3://bucket/a.tif"), gdal_path("https://host/a.tif")
    ('/vsis3/bucket/a.tif', '/vsicurl/https://host/a.tif')
    """
    proto = _protocol(url) or ""
    if proto in _GDAL_PREFIX:
        return _GDAL_PREFIX[proto] + url.split("://", 1)[1]
    return "/vsicurl/" + url


def gdal_options(url: str) -> dict[str, str]:
    """GDAL config options for reading ``url``: the S3 endpoint of the environment
    (``AWS_ENDPOINT_URL``), timeouts and retries. No credentials: GDAL reads those itself."""
    opts = {
        "GDAL_HTTP_TIMEOUT": str(int(READ_TIMEOUT_S)),
        "GDAL_HTTP_CONNECTTIMEOUT": str(int(CONNECT_TIMEOUT_S)),
        "GDAL_HTTP_MAX_RETRY": str(RETRIES - 1),
        "GDAL_HTTP_RETRY_DELAY": str(_BACKOFF_S),
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if _protocol(url) in ("s3", "s3a") and endpoint:
        parts = urlsplit(endpoint)
        opts["AWS_S3_ENDPOINT"] = parts.netloc or parts.path
        opts["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return opts
