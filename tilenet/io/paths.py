"""Input paths: files, directories and globs to image paths; label images matched by name.

The one place that decides which files are images and which label image belongs to which
image; the tiler, the training data, training's held-out set and the batch jobs all use it.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tilenet.errors import ImageNotFoundError, InputError
from tilenet.fsutil import safe_stem
from tilenet.io.storage import (
    StorageError,
    glob_urls,
    info,
    is_url,
    list_dir,
    local_path,
    redact,
)

__all__ = ["IMAGE_SUFFIXES", "class_names_near", "match_labels", "resolve_images"]

#: File name endings taken as images when a directory is given.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".zarr", ".svs", ".ndpi")
_LABEL_SUFFIXES = ("", "_label", "_labels", "_mask")


def resolve_images(specs: Sequence[str | os.PathLike[str]]) -> list[Path | str]:
    """Expand files, directories and glob patterns into a sorted list of image paths.

    A directory contributes the images directly inside it (by suffix). Duplicates are dropped.
    URLs (``s3://bucket/slides/*.tif``, a prefix, an object) are expanded through fsspec and
    stay URL strings.
    """
    out: list[Path | str] = []
    for spec in specs:
        s = str(spec)
        if is_url(spec):
            out.extend(_resolve_url(s))
            continue
        p = local_path(s)
        if p.is_dir() and p.suffix.lower() != ".zarr":
            hits = sorted(c for c in p.iterdir() if c.name.lower().endswith(IMAGE_SUFFIXES))
            if not hits:
                raise ImageNotFoundError(
                    f"{p}: directory holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
            out.extend(hits)
        elif p.exists():
            out.append(p)
        elif glob.has_magic(s):
            hits = sorted(Path(h) for h in glob.glob(s))
            if not hits:
                raise ImageNotFoundError(f"{s}: pattern matches no files")
            out.extend(hits)
        else:
            raise ImageNotFoundError(f"{s}: no such file or directory")
    seen: dict[Path | str, None] = {}
    for item in out:
        seen.setdefault(item if isinstance(item, str) else item.resolve(), None)
    if not seen:
        raise InputError("no input images given")
    return list(seen)


def _resolve_url(url: str) -> list[str]:
    """A URL's images: the matches of a glob, the images under a prefix, or the object."""
    shown = redact(url)
    if glob.has_magic(url.split("://", 1)[1]):
        hits = glob_urls(url)
        if not hits:
            raise ImageNotFoundError(f"{shown}: pattern matches no objects")
        return hits
    try:
        kind = info(url).get("type")
    except StorageError:
        return [url]  # unreachable now: that image fails in one line, a batch goes on
    if kind == "directory" and not url.rstrip("/").lower().endswith(".zarr"):
        hits = [u for u in list_dir(url) if u.rstrip("/").lower().endswith(IMAGE_SUFFIXES)]
        if not hits:
            raise ImageNotFoundError(
                f"{shown}: prefix holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        return hits
    return [url]


def match_labels(images: Sequence[Path | str], labels: str | os.PathLike[str]) -> list[Path]:
    """The label image of each image, matched by name.

    ``labels`` is a directory (a file with the image's stem, optionally followed by
    ``_label``, ``_labels`` or ``_mask``), a glob pattern (matched the same way), or a
    pattern with ``{stem}`` (``"masks/{stem}_mask.png"``).
    """
    spec = str(labels)
    if "{stem}" in spec:
        found = [Path(spec.replace("{stem}", safe_stem(str(p)))) for p in images]
        for img, lab in zip(images, found, strict=True):
            if not lab.exists():
                raise ImageNotFoundError(f"{lab}: label image for {img} not found")
        return found
    if Path(spec).is_dir():
        candidates = [c for c in Path(spec).iterdir() if c.name.lower().endswith(IMAGE_SUFFIXES)]
    elif glob.has_magic(spec):
        candidates = [Path(h) for h in glob.glob(spec)]
    else:
        raise ImageNotFoundError(
            f"{spec}: --labels must be a directory or a pattern (glob or with {{stem}})"
        )
    by_stem = {safe_stem(c.name): c for c in sorted(candidates)}
    out: list[Path] = []
    for img in images:
        stem = safe_stem(str(img))
        hit = next((by_stem[stem + s] for s in _LABEL_SUFFIXES if stem + s in by_stem), None)
        if hit is None:
            raise ImageNotFoundError(
                f"{img}: no label image named {stem}.* in {spec}; label images are matched "
                "to images by file name"
            )
        out.append(hit)
    return out


def class_names_near(labels: Sequence[Path]) -> list[str]:
    """Class names from a ``classes.json`` beside the label directory, if there is one."""
    if not labels:
        return []
    d = labels[0].parent
    for cand in (d / "classes.json", d.parent / "classes.json"):
        if cand.is_file():
            try:
                data = json.loads(cand.read_text())
            except (OSError, ValueError):
                return []
            if isinstance(data, dict):
                data = data.get("classes", data.get("class_names", data))
            if isinstance(data, dict):  # {"0": "background", ...}
                try:
                    return [str(data[k]) for k in sorted(data, key=int)]
                except (TypeError, ValueError):
                    return []
            if isinstance(data, list):
                return [
                    str(x if not isinstance(x, dict) else x.get("name", i))
                    for i, x in enumerate(data)
                ]
    return []
