"""Input paths: files, directories and globs to image paths; label images matched by name.

The one place that decides which files are images and which label image belongs to which
image; the tiler, the training data, training's held-out set and the batch jobs all use it.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tilenet.errors import ImageNotFoundError, InputError, TilenetError
from tilenet.fsutil import safe_stem
from tilenet.io.sniff import sniff
from tilenet.io.storage import (
    StorageError,
    glob_urls,
    info,
    is_url,
    list_dir,
    local_path,
    redact,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "class_names_near",
    "image_stem",
    "match_by_stem",
    "match_labels",
    "resolve_images",
]

#: File name endings taken as images under a bucket prefix (listing an object costs nothing,
#: reading its head a request each) and for label files; local directories go by content.
IMAGE_SUFFIXES = (
    ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".zarr", ".svs", ".ndpi", ".scn", ".bif",
    ".mrxs", ".vms", ".vmu", ".svslide", ".dcm", ".vrt", ".jp2", ".j2k", ".img",
)  # fmt: skip
_LABEL_SUFFIXES = ("", "_label", "_labels", "_mask")


def resolve_images(specs: Sequence[str | os.PathLike[str]]) -> list[Path | str]:
    """Expand files, directories and glob patterns into a sorted list of image paths.

    A directory contributes the images directly inside it, known by content (magic bytes,
    as ``tilenet info``): DICOM series, MIRAX, SCN, BIF, VRT and JPEG 2000 files are found
    whatever their names; what is skipped is named in one warning. Duplicates are dropped.
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
        if p.is_dir() and not _is_image_dir(p):
            out.extend(_scan_dir(p))
        elif p.exists():
            out.append(p)
        elif glob.has_magic(s):
            hits = sorted(Path(h) for h in glob.glob(s))
            if not hits:
                raise ImageNotFoundError(f"{s}: pattern matches no files")
            out.extend(hits)
        else:
            raise ImageNotFoundError(f"{s}: no such file or directory")
    # One entry per file, named as given (a symlink keeps its own name: labels and
    # annotations are matched by it, not by the link target's name).
    seen: dict[Path | str, Path | str] = {}
    for item in out:
        seen.setdefault(item if isinstance(item, str) else item.resolve(), _absolute(item))
    if not seen:
        raise InputError("no input images given")
    return list(seen.values())


def _absolute(item: Path | str) -> Path | str:
    return item if isinstance(item, str) else Path(os.path.abspath(item))


def _is_image_dir(p: Path) -> bool:
    """Whether directory ``p`` is one image (a zarr store, a DICOM-WSI series)."""
    try:
        return sniff(p) in ("zarr", "slide")
    except TilenetError:
        return False


def _scan_dir(p: Path) -> list[Path]:
    """The images directly inside ``p``, known by content as ``tilenet info`` knows them
    (a DICOM series or zarr store inside counts as one image; a ``.mrxs`` beside its data
    folder is one). What is left out is named, with the reason, in one warning."""
    hits: list[Path] = []
    skipped: dict[str, list[str]] = {}
    for c in sorted(p.iterdir()):
        if c.name.startswith("."):
            continue
        try:
            sniff(c)
        except TilenetError as exc:
            if c.is_dir() and (
                c.with_suffix(".mrxs").is_file() or c.with_name(c.name + ".mrxs").is_file()
            ):
                continue  # a MIRAX slide's data folder: the .mrxs beside it is the image
            reason = (
                "a folder, neither a zarr store nor a DICOM series"
                if c.is_dir()
                else ("empty" if "empty file" in str(exc) else "not an image by its content")
            )
            skipped.setdefault(reason, []).append(c.name)
            continue
        hits.append(c)
    if skipped:
        parts = []
        for reason, names in sorted(skipped.items()):
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{len(names)} {reason} ({shown})")
        warnings.warn(f"{p}: skipped {'; '.join(parts)}", UserWarning, stacklevel=3)
    if not hits:
        raise ImageNotFoundError(f"{p}: directory holds no images (none of its files is one)")
    return hits


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
    """The label image of each image, matched by name (:func:`match_by_stem`): a file with
    the image's stem, optionally followed by ``_label``, ``_labels`` or ``_mask``."""
    return match_by_stem(
        images, labels, suffixes=IMAGE_SUFFIXES, tails=_LABEL_SUFFIXES, what="label image"
    )


def match_by_stem(
    images: Sequence[Path | str],
    spec: str | os.PathLike[str],
    *,
    suffixes: Sequence[str],
    tails: Sequence[str] = ("",),
    what: str,
) -> list[Path]:
    """The file of each image whose name is the image's stem: the one file matcher.

    ``spec`` is a directory or a glob pattern (files ending in one of ``suffixes``), a
    pattern with ``{stem}`` (``"masks/{stem}_mask.png"``), or, for one image, that image's
    file. A candidate's stem is :func:`~tilenet.fsutil.safe_stem` of its name, after the
    suffix it ends in where that is not an image suffix (QuPath's ``a.svs.geojson`` and
    ``a.geojson`` both belong to ``a.svs``); it matches an image whose stem followed by one of
    ``tails`` (tried in order) it is. ``what`` names the files in errors; a missing match is
    an :class:`~tilenet.errors.ImageNotFoundError` naming the image.

    >>> match_by_stem([], "masks/{stem}.png", suffixes=(".png",), what="label image")
    []
    """
    s = str(spec)
    if "{stem}" in s:
        found = [Path(s.replace("{stem}", image_stem(p))) for p in images]
        for img, f in zip(images, found, strict=True):
            if not f.exists():
                raise ImageNotFoundError(f"{f}: {what} for {img} not found")
        return found
    p = Path(s)
    if p.is_file():
        if len(images) != 1:
            raise InputError(
                f"{p}: one {what} for {len(images)} images; give a directory or a pattern "
                "with {stem}"
            )
        return [p]
    if p.is_dir():
        cands = [c for c in p.iterdir() if c.name.lower().endswith(tuple(suffixes))]
    elif glob.has_magic(s):
        cands = [Path(h) for h in glob.glob(s)]
    else:
        raise ImageNotFoundError(
            f"{s}: no such {what}, directory or pattern (a glob, or a path with {{stem}})"
        )
    by_stem: dict[str, Path] = {}
    for c in sorted(cands):
        by_stem.setdefault(_candidate_stem(c.name, suffixes), c)
    out: list[Path] = []
    for img in images:
        stem = image_stem(img)
        hit = next((by_stem[stem + t] for t in tails if stem + t in by_stem), None)
        if hit is None:
            raise ImageNotFoundError(
                f"{img}: no {what} named {stem}.* in {s}; {what}s are matched to images by "
                "file name"
            )
        out.append(hit)
    return out


def image_stem(image: Path | str) -> str:
    """The stem files are matched by: :func:`~tilenet.fsutil.safe_stem` of the file name of a
    local path or a URL, without its query (``s3://b/a/x.ome.tif?v=1`` -> ``x``).

    >>> image_stem("s3://b/a/x.ome.tif?v=1"), image_stem(Path("/d/slide 1.svs"))
    ('x', 'slide_1')
    """
    name = PurePosixPath(image.split("?", 1)[0]).name if isinstance(image, str) else image.name
    return safe_stem(name)


def _candidate_stem(name: str, suffixes: Sequence[str]) -> str:
    low = name.lower()
    for suf in suffixes:
        if low.endswith(suf) and not suf.lower().endswith(IMAGE_SUFFIXES):
            return safe_stem(name[: -len(suf)])
    return safe_stem(name)


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
