"""Atomic outputs and safe output names.

Everything tilenet writes goes to a temporary sibling first and is renamed into place when
complete, so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tilenet.errors import InputError

__all__ = ["atomic_output", "remove_path", "safe_stem", "tmp_sibling", "write_text_atomic"]


def tmp_sibling(path: str | os.PathLike[str]) -> Path:
    """The temporary name used while ``path`` is being written (same directory, same fs).

    >>> tmp_sibling("/out/classes.ome.zarr").name.startswith(".classes.ome.zarr.partial-")
    True
    """
    p = Path(path)
    return p.with_name(f".{p.name}.partial-{os.getpid()}")


def remove_path(path: str | os.PathLike[str]) -> None:
    """Remove a file or a directory tree if it exists."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` (file or directory) into; rename on success.

    On an exception the temporary is removed and ``path`` is untouched. A file replaces an
    existing file in one atomic rename (readers see the old or the new one, never none); a
    directory replaces an existing ``path`` by removing it first.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise InputError(f"{final}: already exists (use --force to overwrite)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    remove_path(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    if final.exists() and (tmp.is_dir() or final.is_dir()):
        remove_path(final)  # rename() cannot replace a directory or put one over a file
    os.replace(tmp, final)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) through :func:`atomic_output`; return the path.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_text_atomic(Path(d) / "sub" / "a.txt", "hi")
    ...     p.read_text(), sorted(x.name for x in p.parent.iterdir())
    ('hi', ['a.txt'])
    """
    final = Path(path)
    with atomic_output(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final


_SUFFIXES = (
    *(".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".png", ".jpeg", ".jpg"),
    *(".svs", ".ndpi", ".scn", ".bif", ".vsi", ".mrxs"),
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(name: str) -> str:
    """A file-system-safe output name derived from an input name (no separators, no '..').

    Output names made from input names must stay inside the output directory.

    >>> safe_stem("slide 01.ome.tif")
    'slide_01'
    >>> safe_stem("../../etc/passwd")
    'passwd'
    >>> safe_stem("..")[:6]
    'image-'
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.lower().endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    stem = _UNSAFE.sub("_", base).strip("._")
    if not stem:
        stem = "image-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return stem[:200]
