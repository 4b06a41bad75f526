"""Where outputs live: a local folder or a bucket prefix, decided once.

:func:`location` is the one place above the readers that asks whether a path is a URL; code
above ``io`` holds a :class:`Location` and writes, resumes and publishes through the same
calls whichever it is:

* :class:`LocalLocation`: a folder. Objects are files written to a temporary sibling and
  renamed into place; :meth:`~Location.append_line` appends and fsyncs.
* :class:`FsspecLocation`: a prefix in object storage (``s3://bucket/run``), through
  :mod:`tilenet.io.storage` (its timeouts, retries, redaction). An object appears whole or
  not at all; :meth:`~Location.append_line` rewrites the object; files that need a local
  path (TIFF, COG, GeoPackage, a zarr store built by a local writer) are built in a local
  stage and uploaded, a store's root metadata last.

Both are plain data (picklable): a dask worker gets the same location as the client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tilenet.errors import ImageNotFoundError
from tilenet.fsutil import atomic_output, remove_path

__all__ = ["FsspecLocation", "LocalLocation", "Location", "location"]

#: Root metadata of a zarr store (v3, v2): uploaded last, so a store that is there is whole.
_ROOT_META = ("zarr.json", ".zattrs", ".zgroup", ".zarray")


class Location(Protocol):
    """A local folder or a bucket prefix: what outputs, resume state and manifests live in."""

    @property
    def url(self) -> str:
        """The folder (as given) or the URL (no trailing slash)."""
        ...

    @property
    def local(self) -> Path | None:
        """The folder of a local location; None for a bucket prefix."""
        ...

    def child(self, *names: str) -> Location:
        """The location ``names`` below this one."""
        ...

    def join(self, *names: str) -> str:
        """The path or URL of ``names`` below this location."""
        ...

    def zarr_store(self, *, read_only: bool) -> Any:
        """A zarr store rooted here (``LocalStore`` or ``FsspecStore``)."""
        ...

    def exists(self, name: str = "") -> bool:
        """Whether a file, object or prefix ``name`` is there."""
        ...

    def names(self) -> list[str]:
        """The names of the entries directly here (none when it does not exist)."""
        ...

    def read_text(self, name: str) -> str | None:
        """The text of ``name``, or None when it is not there."""
        ...

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON object in ``name``, or None when it is missing, torn or not an object."""
        ...

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole or not at all."""
        ...

    def append_line(self, name: str, line: str) -> None:
        """Append ``line`` and a newline to ``name`` (on a fresh line after a torn one)."""
        ...

    def remove(self, name: str = "") -> None:
        """Remove ``name`` (a file or a tree; nothing when it is not there); "" is all of it."""
        ...

    def local_file(
        self, name: str, *, stage: Path | None = None
    ) -> contextlib.AbstractContextManager[Path]:
        """A local path to build ``name`` at (a file or a directory tree).

        When the block ends without error it is put in place: renamed in a folder, uploaded
        to a bucket (a zarr store's root metadata last). A bucket's local copy is built in
        ``stage`` and left there when ``stage`` is given (for later readers), else dropped.
        """
        ...

    def scratch(self) -> Path:
        """Local disk for this location and process (blend spills, stages); not created."""
        ...

    def local_copy(self, name: str) -> Path:
        """A local path to read ``name`` (a file or a tree) at: itself in a folder, a copy in
        :meth:`scratch` for a bucket (made once per call: read it many times)."""
        ...


def location(where: str | os.PathLike[str]) -> Location:
    """The :class:`Location` of a folder or of a URL prefix (``s3://bucket/run``).

    >>> location("s3://b/run/").url, location("/tmp/run").url
    ('s3://b/run', '/tmp/run')
    """
    from tilenet.io.storage import is_url, local_path

    if is_url(where):
        return FsspecLocation(str(where).rstrip("/"))
    return LocalLocation(str(local_path(where)))


def _json_object(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class LocalLocation:
    """A local folder (created when something is written into it)."""

    url: str

    @property
    def local(self) -> Path:
        return Path(self.url)

    def child(self, *names: str) -> LocalLocation:
        return LocalLocation(self.join(*names))

    def join(self, *names: str) -> str:
        return str(Path(self.url, *names))

    def zarr_store(self, *, read_only: bool) -> Any:
        from zarr.storage import LocalStore

        if not read_only:
            self.local.mkdir(parents=True, exist_ok=True)
        return LocalStore(self.local, read_only=read_only)

    def exists(self, name: str = "") -> bool:
        return (self.local / name).exists()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []

    def read_text(self, name: str) -> str | None:
        try:
            return (self.local / name).read_text()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return _json_object(self.read_text(name))
        except (OSError, UnicodeDecodeError):
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        with atomic_output(self.local / name) as tmp:
            tmp.write_bytes(data)

    def append_line(self, name: str, line: str) -> None:
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as fh:
            fresh = b""
            if fh.tell():  # a killed writer may have left a torn last line
                fh.seek(-1, os.SEEK_END)
                fresh = b"" if fh.read(1) == b"\n" else b"\n"
            fh.write(fresh + line.encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self, name: str = "") -> None:
        remove_path(self.local / name if name else self.local)

    @contextlib.contextmanager
    def local_file(self, name: str, *, stage: Path | None = None) -> Iterator[Path]:
        final = self.local / name
        # Built under its own name in a temporary sibling directory (writers that name
        # things after the file see the real name), then renamed into place.
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        remove_path(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp / final.name
            if final.is_dir() or (tmp / final.name).is_dir():
                remove_path(final)  # rename() cannot replace a directory
            os.replace(tmp / final.name, final)
        finally:
            remove_path(tmp)

    def scratch(self) -> Path:
        return self.local / f".scratch-{os.getpid()}"

    def local_copy(self, name: str) -> Path:
        return self.local / name


@dataclass(frozen=True)
class FsspecLocation:
    """A prefix in object storage (``s3://bucket/run``), through :mod:`tilenet.io.storage`."""

    url: str

    @property
    def local(self) -> None:
        return None

    def child(self, *names: str) -> FsspecLocation:
        return FsspecLocation(self.join(*names))

    def join(self, *names: str) -> str:
        from tilenet.io.storage import join

        names = tuple(n for n in names if n)
        return join(self.url, *names) if names else self.url

    def zarr_store(self, *, read_only: bool) -> Any:
        from tilenet.io.storage import zarr_store

        return zarr_store(self.url, read_only=read_only)

    def exists(self, name: str = "") -> bool:
        from tilenet.io.storage import exists

        return exists(self.join(name))

    def names(self) -> list[str]:
        from tilenet.io.storage import list_dir

        try:
            return [u.rstrip("/").rsplit("/", 1)[-1] for u in list_dir(self.url)]
        except ImageNotFoundError:
            return []

    def read_text(self, name: str) -> str | None:
        from tilenet.io.storage import read_bytes

        try:
            return read_bytes(self.join(name)).decode()
        except ImageNotFoundError:
            return None

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return _json_object(self.read_text(name))
        except UnicodeDecodeError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        from tilenet.io.storage import write_bytes

        write_bytes(self.join(name), data)

    def append_line(self, name: str, line: str) -> None:
        # No appends in object storage: the whole object is rewritten (a manifest is small).
        text = self.read_text(name) or ""
        if text and not text.endswith("\n"):
            text += "\n"
        self.write_bytes(name, (text + line + "\n").encode())

    def remove(self, name: str = "") -> None:
        from tilenet.io.storage import remove

        remove(self.join(name))

    @contextlib.contextmanager
    def local_file(self, name: str, *, stage: Path | None = None) -> Iterator[Path]:
        from tilenet.io.storage import upload

        where = stage if stage is not None else Path(tempfile.mkdtemp(prefix="tilenet-stage-"))
        path = where / name
        remove_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield path
            upload(path, self.join(name), last=_ROOT_META)
        finally:
            if stage is None:
                shutil.rmtree(where, ignore_errors=True)

    def scratch(self) -> Path:
        tag = hashlib.sha1(self.url.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"tilenet-scratch-{tag}-{os.getpid()}"

    def local_copy(self, name: str) -> Path:
        from tilenet.io.storage import download

        return download(self.join(name), self.scratch() / "copies" / name)
