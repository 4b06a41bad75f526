"""A batch's names and records: output names from input names, the manifest."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tilenet.errors import scrub_credentials
from tilenet.fsutil import safe_stem
from tilenet.io.location import Location, location

__all__ = ["MANIFEST", "Manifest", "read_manifest", "unique_stems"]

#: The manifest's name in a batch's output folder or prefix.
MANIFEST = "manifest.jsonl"


def unique_stems(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``safe_stem`` of each path, with ``-2``, ``-3``... appended where names collide.

    >>> unique_stems(["a/x.tif", "b/x.tif", "c/y.png", "x-2.tif"])
    ['x', 'x-3', 'y', 'x-2']
    """
    stems = [safe_stem(Path(p).name) for p in paths]
    taken = set(stems)
    seen: set[str] = set()
    out = []
    for s in stems:
        name, i = s, 2
        while name in seen:
            while f"{s}-{i}" in taken or f"{s}-{i}" in seen:
                i += 1
            name = f"{s}-{i}"
        seen.add(name)
        out.append(name)
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The latest record per image (by input path) of the manifest at ``path`` (a file or a
    URL); a torn last line (a kill) is ignored."""
    return Manifest.at(path).records()


class Manifest:
    """A batch's records on a :class:`~tilenet.io.location.Location`, one JSON line each
    (the client is the only writer): appended and fsynced in a folder, the object rewritten
    in a bucket (a few hundred bytes per image), so it is always whole."""

    def __init__(self, where: Location, name: str = MANIFEST) -> None:
        self.where, self.name = where, name

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> Manifest:
        """The manifest file (or object) ``path``."""
        parent, _, name = os.fspath(path).rstrip("/").rpartition("/")
        return cls(location(parent or "."), name)

    @property
    def path(self) -> str:
        return self.where.join(self.name)

    def records(self) -> dict[str, dict[str, Any]]:
        """The latest record per image (by input path); a torn line is ignored."""
        latest: dict[str, dict[str, Any]] = {}
        for line in (self.where.read_text(self.name) or "").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "image" in rec:
                latest[str(rec["image"])] = rec
        return latest

    def append(self, record: dict[str, Any]) -> None:
        """Add ``record`` (credentials scrubbed from any URL in it)."""
        self.where.append_line(self.name, scrub_credentials(json.dumps(record, sort_keys=True)))
