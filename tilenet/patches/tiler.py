"""Images (+ label images) to a chunked, sharded zarr v3 patch store.

The store's layout (arrays ``images``, ``labels``, ``coords`` and the attributes) is owned by
:mod:`tilenet.patches.patchstore`. Patches are cut with :meth:`tilenet.geometry.TileGrid.for_patches`
(the grid inference uses), read with :func:`tilenet.io.open_image` and stored bit for bit.
Only the first ``count`` rows (the ``count`` attribute) are valid: an image is appended past
``count``, and ``count`` and its ``sources`` entry are updated only once all its patches are
written, so an interrupted run never leaves a half-written image marked complete; rerunning
resumes where it stopped.

A local run checks its options and inputs, then an existing store against them
(``_check_store``), plans every image (phase 1, ``_plan_tiling``, with
:mod:`tilenet.patches.tileplan`) and writes the plans in groups of images (phase 2,
``_write_phases``, with :mod:`tilenet.patches.tilewrite`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tilenet.config import ReaderConfig, ResolutionConfig, TilingConfig
from tilenet.errors import InputError, ShapeMismatchError, one_line
from tilenet.fsutil import atomic_output
from tilenet.geometry import TileGrid
from tilenet.io.location import location
from tilenet.io.lock import exclusive_output
from tilenet.io.paths import class_names_near, match_labels, resolve_images
from tilenet.io.storage import redact
from tilenet.patches.patchstore import (
    CHUNKS_PER_SHARD,
    FORMAT,
    FORMAT_VERSION,
    create_store,
    read_attrs,
    stats_attrs,
)
from tilenet.patches.tileplan import ImagePlan, plan_image, plan_or_reason
from tilenet.patches.tilewrite import write_batch
from tilenet.progress import progress_bar

__all__ = [
    "tile_images",
]


def _tile_to_bucket(images: Sequence[str | os.PathLike[str]], url: str, **kw: Any) -> Any:
    """:func:`tile_images` with ``out`` in object storage: tiled in a local stage (resumable)
    and uploaded when complete (:func:`tilenet.io.storage.staged_upload`). A store there is
    not appended to: object stores have no renames to commit shards by. Returns ``url``."""
    from tilenet.io.storage import staged_upload

    if read_attrs(url) is not None:
        raise InputError(
            f"{redact(url)}: already holds a patch store, and stores in object storage are not "
            "appended to; give a new --out (or tile locally, then upload)"
        )
    with staged_upload(url) as local:
        tile_images(images, out=local, **kw)
    return url


@dataclass
class _Run:
    """One local run's checked settings and inputs: what its phases share."""

    out: Path
    patch: int
    overlap: int
    level: int
    min_foreground: float
    mask_max_side: int
    tissue: float
    chunk_patches: int
    workers: int
    limits: dict[str, Any]
    resolution: ResolutionConfig | None
    bands: Sequence[int] | None
    min_annotated: float
    progress: bool
    failures: dict[str, str] | None
    annotations: str | os.PathLike[str] | None
    vector_labels: str | os.PathLike[str] | None
    label_field: str | None
    outside: str
    class_map: Mapping[str, int]
    paths: list[Path | str] = field(default_factory=list)
    label_paths: list[Path | None] = field(default_factory=list)
    #: Vector labels planned for ``paths`` (:func:`tilenet.io.vector.plan_vector_labels`).
    vector: Any = None
    names: list[str] = field(default_factory=list)
    has_labels: bool = False

    @property
    def res_attr(self) -> dict[str, Any] | None:
        return asdict(self.resolution) if self.resolution is not None else None

    @property
    def bands_attr(self) -> list[int] | None:
        # the bands a store holds: a rerun or an append with other bands must not mix them
        return [int(b) for b in self.bands] if self.bands else None


@exclusive_output("out", what="tilenet tile", beside=True)
def tile_images(
    images: Sequence[str | os.PathLike[str]],
    *,
    labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    out: str | os.PathLike[str],
    patch: int = TilingConfig.patch,
    overlap: int = TilingConfig.overlap,
    level: int = TilingConfig.level,
    min_foreground: float = TilingConfig.min_foreground,
    tissue: float = TilingConfig.tissue,
    workers: int = TilingConfig.workers,
    class_names: Sequence[str] | None = None,
    chunk_patches: int = TilingConfig.chunk_patches,
    mask_max_side: int = TilingConfig.mask_max_side,
    reader: ReaderConfig | None = None,
    progress: bool = True,
    failures: dict[str, str] | None = None,
    annotations: str | os.PathLike[str] | None = TilingConfig.annotations,
    vector_labels: str | os.PathLike[str] | None = TilingConfig.vector_labels,
    label_field: str | None = TilingConfig.label_field,
    outside: str = TilingConfig.outside,
    min_annotated: float = TilingConfig.min_annotated,
    class_map: Mapping[str, int] = MappingProxyType({}),  # == TilingConfig's {}
    bands: Sequence[int] | None = TilingConfig.bands,
    resolution: ResolutionConfig | None = None,
) -> Path:
    """Cut ``images`` into ``patch`` x ``patch`` patches overlapping by ``overlap`` into ``out``.

    The keyword options are the fields of :class:`~tilenet.config.TilingConfig` (defaults
    there; ``tile_images(paths, out=o, **asdict(cfg))``), and ``reader`` holds the limits
    images are opened with. ``images`` are files, directories or globs. ``labels`` is a
    directory or pattern (see :func:`match_labels`) or an explicit list parallel to the
    resolved images. Patches whose foreground fraction (from a low-resolution Otsu mask on
    the finest level no larger than ``mask_max_side``) is below ``min_foreground`` are
    dropped; with ``tissue`` > 0 so are those whose tissue fraction (the mask of
    :func:`tilenet.tissue.detect_tissue`) is below it. Work runs on ``workers`` dask
    threads; each task reads and writes one shard of ``4 * chunk_patches`` patches. ``bands`` (1-based) keeps those bands of every image, in
    that order. Pixels without data (nodata in every band, alpha 0, a dataset mask) are left
    out of the statistics, labelled 255 (ignored by the loss) and stored as 0
    (:data:`~tilenet.normalize.NODATA_FILL`), whatever value the file uses.

    Rerunning into an existing store skips images already complete (same content
    fingerprint) and appends new ones. Returns the store path. With a ``failures`` dict an
    unreadable image (or one of another kind than the store's) is recorded there as
    ``{path: one-line reason}`` and left out instead of stopping the batch (tilenet.jobs).

    Vector labels instead of label images: ``annotations`` (QuPath GeoJSON in level-0
    pixels, one file per image matched by name, see :func:`tilenet.io.vector.match_annotations`)
    or ``vector_labels`` (one vector file in any CRS for every raster, class in
    ``label_field``). They are rasterized per patch; pixels outside every polygon are 255
    (``outside="ignore"``) or 0 (``"background"``), nodata pixels always 255. Patches are cut
    only where the polygons are, with at least ``min_annotated`` of their pixels annotated
    (see :mod:`tilenet.patches.tileplan`); a scene the polygons miss gets no patches (a
    warning).
    Class names come from the files (sorted) or ``class_map`` and are stored.

    ``resolution`` cuts every image at a target pixel size (``mpp``/``gsd``/
    ``magnification``: the nearest finer level resampled per window, label images by nearest
    neighbour; see :mod:`tilenet.io.resolution`); patches and coordinates are then in that
    grid. Each source records the pixel size of its patches (``mpp``/``gsd``), which training
    stores in the checkpoint.
    """
    limits = _checked_limits(patch, overlap, min_foreground, workers, chunk_patches, reader)
    if location(out).local is None:  # a bucket
        import inspect

        given = locals()
        params = inspect.signature(tile_images).parameters
        kw = {n: given[n] for n in params if n not in ("images", "out", "wait")}  # wait: held
        return _tile_to_bucket(images, str(out), **kw)
    run = _Run(
        out=Path(out),
        patch=patch,
        overlap=overlap,
        level=level,
        min_foreground=float(min_foreground),
        mask_max_side=mask_max_side,
        tissue=_checked_fraction("tissue", tissue),
        chunk_patches=chunk_patches,
        workers=workers,
        limits=limits,
        resolution=_target_resolution(resolution, level),
        bands=bands,
        min_annotated=min_annotated,
        progress=progress,
        failures=failures,
        annotations=annotations,
        vector_labels=vector_labels,
        label_field=label_field,
        outside=outside,
        class_map=class_map,
    )
    _resolve_inputs(run, images, labels, class_names)
    existing = _check_store(run)
    plans, channels, dtype = _plan_tiling(run, existing)
    if plans:
        _write_phases(run, plans, existing, channels, dtype)
    return run.out


def _checked_limits(
    patch: Any,
    overlap: Any,
    min_foreground: Any,
    workers: Any,
    chunk_patches: Any,
    reader: ReaderConfig | None,
) -> dict[str, Any]:
    """The reader's limits, once the options are checked (before anything is opened)."""
    if not isinstance(patch, int) or patch < 2:
        raise InputError(f"patch must be an int >= 2, got {patch!r}")
    if not 0.0 <= float(min_foreground) <= 1.0:
        raise InputError(f"min_foreground must be in [0, 1], got {min_foreground!r}")
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive int, got {workers!r}")
    if not isinstance(chunk_patches, int) or chunk_patches < 1:
        raise InputError(f"chunk_patches must be a positive int, got {chunk_patches!r}")
    limits = asdict(reader if reader is not None else ReaderConfig())
    TileGrid.for_patches((patch, patch), patch, overlap)  # validates overlap up front
    return limits


def _checked_fraction(name: str, value: Any) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _target_resolution(resolution: ResolutionConfig | None, level: int) -> ResolutionConfig | None:
    """``resolution`` checked; None when it asks for no resampling (the default section)."""
    if resolution is not None:
        from tilenet.io.resolution import check_resolution

        check_resolution(resolution, level=level)
        if resolution == ResolutionConfig():
            resolution = None
    return resolution


def _resolve_inputs(
    run: _Run,
    images: Sequence[str | os.PathLike[str]],
    labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    class_names: Sequence[str] | None,
) -> None:
    """Fill ``run``'s images, their label images or vector labels, and the class names."""
    run.paths = paths = resolve_images(images)
    annotations, vector_labels = run.annotations, run.vector_labels
    if labels is not None and (annotations or vector_labels):
        raise InputError(
            "give label images (--labels) or vector labels (--annotations, --vector-labels), "
            "not both"
        )
    if labels is None:
        run.label_paths = [None] * len(paths)
    elif isinstance(labels, str | os.PathLike):
        run.label_paths = list(match_labels(paths, labels))
    else:
        run.label_paths = [Path(p) for p in labels]
        if len(run.label_paths) != len(paths):
            raise InputError(f"{len(run.label_paths)} label images given for {len(paths)} images")
    if annotations or vector_labels:
        from tilenet.io.vector import plan_vector_labels

        if not 0.0 <= float(run.min_annotated) <= 1.0:
            raise InputError(f"min_annotated must be in [0, 1], got {run.min_annotated!r}")
        run.vector = plan_vector_labels(
            paths,
            annotations=annotations or None,
            vector_labels=vector_labels or None,
            label_field=run.label_field,
            outside=run.outside,  # type: ignore[arg-type]
            class_map=dict(run.class_map or {}),
        )
    run.has_labels = labels is not None or run.vector is not None
    run.names = (
        list(class_names) if class_names else class_names_near([p for p in run.label_paths if p])
    )
    if run.vector is not None and not class_names:
        run.names = list(run.vector.class_names)


def _check_store(run: _Run) -> dict[str, Any] | None:
    """The attributes of the store already at ``run.out`` (None: none there), checked to
    match this run's settings, classes and labels (a resume or an append)."""
    out = run.out
    if not out.exists():
        return None
    existing = read_attrs(out)
    if existing is None:
        raise InputError(
            f"{out}: exists and is not a tilenet patch store; choose another --out or remove it"
        )
    for key, want in (
        ("patch", run.patch),
        ("overlap", run.overlap),
        ("level", run.level),
        ("resolution", run.res_attr),
        ("bands", run.bands_attr),
    ):
        if existing.get(key) != want:
            raise InputError(
                f"{out}: store was tiled with {key}={existing.get(key)}, not {want}; "
                "use the same settings to resume/append, or a new --out"
            )
    names = run.names
    if run.vector is not None and existing.get("class_names") not in (None, [], names):
        raise InputError(
            f"{out}: store has classes {existing['class_names']}, these labels {names}; "
            "give the same classes (tiling.class_map) or a new --out"
        )
    if bool(existing.get("has_labels")) != run.has_labels:
        raise InputError(
            f"{out}: store {'has' if existing.get('has_labels') else 'has no'} labels; "
            "append images with labels given the same way"
        )
    return existing


#: A finished source recorded before labels were fingerprinted: it matches any labels.
_ANY = "*"


def _plan_tiling(run: _Run, existing: dict[str, Any] | None) -> tuple[list[ImagePlan], int, str]:
    """Phase 1: the plans of the images not yet in the store, and their channels and dtype.

    No plans: nothing left to write. An image that fails (with ``run.failures``) is recorded
    there and left out; without, its error is raised.
    """
    from tilenet.io import fingerprint

    failures = run.failures
    # Finished work is keyed by the image AND its labels: the same pixels with other
    # annotations are another source. Stores written before labels were fingerprinted
    # (no "labels_fingerprint" key) match by the image alone, as they were written.
    done = {
        (s["fingerprint"], s.get("labels_fingerprint", _ANY))
        for s in (existing or {}).get("sources", [])
    }
    todo: list[tuple[Path | str, Path | None, str]] = []
    keys: list[tuple[str, str | None]] = []
    vindex = {p: i for i, p in enumerate(run.paths)}
    for p, lab in zip(run.paths, run.label_paths, strict=True):
        labels = lab if lab is not None else run.vector.files[vindex[p]] if run.vector else None
        try:
            key = (str(fingerprint(p)), str(fingerprint(labels)) if labels else None)
        except OSError as exc:
            if failures is None:
                raise
            failures[str(p)] = one_line(exc)
            continue
        if key not in done and (key[0], _ANY) not in done and key not in keys:
            todo.append((p, lab, key[0]))
            keys.append(key)
    # Planned in this thread, one image after another (headers and a low-resolution mask
    # each): their warnings (a scene the labels miss, a resampling note) then reach the
    # caller. From pool threads they raced other threads' warnings.catch_warnings blocks,
    # which are process-wide, and were sometimes lost.
    make_plan: Any = plan_image if failures is None else plan_or_reason
    plans: list[ImagePlan] = [
        make_plan(
            p,
            lab,
            fp,
            patch=run.patch,
            overlap=run.overlap,
            level=run.level,
            min_foreground=run.min_foreground,
            mask_max_side=run.mask_max_side,
            tissue=run.tissue,
            limits=run.limits,
            vector=run.vector,
            vindex=vindex[p],
            min_annotated=float(run.min_annotated),
            bands=run.bands,
            resolution=run.resolution,
        )
        for p, lab, fp in todo
    ]
    for pl, (_, lfp) in zip(plans, keys, strict=True):
        if not isinstance(pl, str):
            pl.labels_fingerprint = lfp
    if failures is not None:
        failures.update(
            {str(t[0]): pl for t, pl in zip(todo, plans, strict=True) if isinstance(pl, str)}
        )
        plans = [pl for pl in plans if not isinstance(pl, str)]
        if not plans and existing is None:
            return plans, 0, ""
    if not plans:
        if existing is None:
            raise InputError("nothing to tile")
        return plans, 0, ""
    return plans, *_one_kind(plans, existing, failures)


def _one_kind(
    plans: list[ImagePlan], existing: dict[str, Any] | None, failures: dict[str, str] | None
) -> tuple[int, str]:
    """The channels and dtype of the store; ``plans`` of another kind are dropped (recorded
    in ``failures``) or raise."""
    channels = plans[0].shape[2]
    dtype = plans[0].dtype
    if existing is not None:
        channels, dtype = existing["channels"], existing["dtype"]
    for pl in list(plans):
        if pl.shape[2] != channels or pl.dtype != dtype:
            err = ShapeMismatchError(
                f"{pl.path}: has {pl.shape[2]} channels of {pl.dtype}, but the store holds "
                f"{channels} channels of {dtype}; a store holds one kind of image"
            )
            if failures is None:
                raise err
            failures[str(pl.path)] = str(err)
            plans.remove(pl)
    return channels, dtype


def _open_store(
    run: _Run, existing: dict[str, Any] | None, channels: int, dtype: str
) -> tuple[Any, int]:
    """The store's zarr group, created empty (atomically) if new, and its chunk_patches."""
    import zarr

    from tilenet._version import __version__

    out = run.out
    if existing is None:
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tilenet_version": __version__,
            "patch": run.patch,
            "overlap": run.overlap,
            "level": run.level,
            "resolution": run.res_attr,
            "bands": run.bands_attr,
            "channels": channels,
            "dtype": dtype,
            "chunk_patches": run.chunk_patches,
            "has_labels": run.has_labels,
            "min_foreground": run.min_foreground,
            "tissue": run.tissue,
            "class_names": run.names,
            "vector_labels": run.vector.describe() if run.vector is not None else None,
            "min_annotated": float(run.min_annotated),
            "count": 0,
            "sources": [],
            **stats_attrs([], channels),
        }
        # The empty store appears atomically, so a crash here never leaves a half-made one.
        with atomic_output(out) as tmp:
            create_store(
                tmp,
                patch=run.patch,
                channels=channels,
                dtype=dtype,
                labels=run.has_labels,
                chunk_patches=run.chunk_patches,
                attrs=attrs,
            )
        return zarr.open_group(out, mode="r+"), run.chunk_patches
    group = zarr.open_group(out, mode="r+")
    if run.names and not existing.get("class_names"):
        group.attrs["class_names"] = run.names
    return group, int(existing["chunk_patches"])


def _write_phases(
    run: _Run,
    plans: list[ImagePlan],
    existing: dict[str, Any] | None,
    channels: int,
    dtype: str,
) -> None:
    """Phase 2: open (or create) the store and write in groups of images; each group is
    committed when all its shards are."""
    group, chunk_patches = _open_store(run, existing, channels, dtype)
    shard = chunk_patches * CHUNKS_PER_SHARD
    store_attrs: Any = group.attrs
    sources: list[dict[str, Any]] = list(store_attrs["sources"])
    count = int(store_attrs["count"])
    total = sum(len(p.windows) for p in plans)
    if plans and not total:  # said once for the store: each image may have said why too
        warnings.warn(
            f"{run.out}: no patch to cut from {len(plans)} image(s): no window meets the "
            "labels (labels that overlap no image, or --min-annotated / --min-foreground "
            "leaving none); the store gets none",
            UserWarning,
            stacklevel=2,
        )
    workers = run.workers
    bar = progress_bar(total, unit="patch", desc=f"tile {run.out.name}", enabled=run.progress)
    try:
        batch: list[ImagePlan] = []
        for i, plan in enumerate(plans):
            batch.append(plan)
            if sum(len(p.windows) for p in batch) >= 8 * shard * workers or i == len(plans) - 1:
                count = write_batch(
                    run.out,
                    group,
                    batch,
                    sources,
                    count,
                    shard=shard,
                    level=run.level,
                    patch=run.patch,
                    channels=channels,
                    workers=workers,
                    limits=run.limits,
                    bar=bar,
                    resolution=run.resolution,
                )
                batch = []
    finally:
        bar.close()
