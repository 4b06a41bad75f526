"""Images (+ label images) to a chunked, sharded zarr v3 patch store.

The store's layout (arrays ``images``, ``labels``, ``coords`` and the attributes) is owned by
:mod:`tilenet.patches.patchstore`. Patches are cut with :meth:`tilenet.geometry.TileGrid.for_patches`
(the grid inference uses), read with :func:`tilenet.io.open_image` and stored bit for bit.
Only the first ``count`` rows (the ``count`` attribute) are valid: an image is appended past
``count``, and ``count`` and its ``sources`` entry are updated only once all its patches are
written, so an interrupted run never leaves a half-written image marked complete; rerunning
resumes where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from tilenet.config import ReaderConfig, ResolutionConfig, TilingConfig
from tilenet.errors import (
    InputError,
    ShapeMismatchError,
    TilenetError,
)
from tilenet.fsutil import atomic_output
from tilenet.geometry import TileGrid, Window
from tilenet.io.base import IGNORE_INDEX, nodata_mask
from tilenet.io.foreground import foreground_fractions, foreground_mask
from tilenet.io.location import location
from tilenet.io.paths import class_names_near, match_labels, resolve_images
from tilenet.io.storage import redact
from tilenet.patches.patchstore import (
    ARRAYS,
    CHUNKS_PER_SHARD,
    COORDS,
    FORMAT,
    FORMAT_VERSION,
    IMAGES,
    LABELS,
    create_store,
    read_attrs,
    stats_attrs,
)
from tilenet.progress import progress_bar

__all__ = [
    "tile_images",
]


# -- planning ----------------------------------------------------------------------------
@dataclass
class _Plan:
    """What to write for one image."""

    path: Path
    label: Path | None
    shape: tuple[int, int, int]
    dtype: str
    fingerprint: str
    windows: list[Window]
    start: int = 0
    #: Vector labels (QuPath annotations or a vector file) rasterized per window.
    vector: Any = None
    #: The image's bands to keep (1-based, in this order); None: all.
    bands: tuple[int, ...] | None = None

    #: The pixel size its patches have (``pixel_record``), and how it was resampled.
    pixel: dict[str, Any] | None = None
    resolution: dict[str, Any] | None = None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(exc, TilenetError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _open_at(
    path: Path | str,
    limits: dict[str, Any],
    resolution: ResolutionConfig | None,
    level: int,
    bands: Sequence[int] | None = None,
) -> tuple[Any, int]:
    """The image (its ``bands``, 1-based, or all) at ``resolution`` (a resampled view, see
    :mod:`tilenet.io.resolution`) and the level to read it at: ``level`` without a target,
    else the view's level 0."""
    from tilenet.io import open_image
    from tilenet.io.resolution import at_resolution

    img = open_image(path, **limits).select_bands(bands)
    if resolution is None:
        return img, level
    try:
        view, res = at_resolution(img, resolution, level=level)
    except BaseException:
        img.close()
        raise
    return view, level if res is None else 0


def _plan_or_reason(*args: Any, **kwargs: Any) -> _Plan | str:
    """:func:`_plan_image`, or the one-line reason it failed (batches go on without it)."""
    try:
        return _plan_image(*args, **kwargs)
    except Exception as exc:
        return _one_line(exc)


def _plan_image(
    path: Path,
    label: Path | None,
    fp: str,
    *,
    patch: int,
    overlap: int,
    level: int,
    min_foreground: float,
    mask_max_side: int,
    limits: dict[str, Any],
    vector: Any = None,
    vindex: int = 0,
    min_annotated: float = 0.0,
    bands: Sequence[int] | None = None,
    resolution: ResolutionConfig | None = None,
) -> _Plan:
    from tilenet.io import open_image
    from tilenet.io.resolution import ResampledImage, label_view, pixel_record

    img, level = _open_at(path, limits, resolution, level, bands)
    with img:
        if not 0 <= level < len(img.levels):
            raise InputError(
                f"{path}: has no pyramid level {level} (levels 0..{len(img.levels) - 1}); "
                "use a smaller --level"
            )
        lh, lw = img.levels[level].shape
        if label is not None:
            with open_image(label, **limits) as lab:
                src = img.source if isinstance(img, ResampledImage) and img.source else img
                if lab.shape[:2] != src.shape[:2]:
                    raise ShapeMismatchError(
                        f"{label}: label image is {lab.shape[0]}x{lab.shape[1]} but {path} is "
                        f"{src.shape[0]}x{src.shape[1]}; labels must have the image's size"
                    )
                lab = label_view(lab, img)  # on a resampled view's grid (nearest)
                if lab.channels != 1:
                    raise InputError(
                        f"{label}: label image has {lab.channels} channels; expected one "
                        "(a class index per pixel)"
                    )
                if level >= len(lab.levels) or lab.levels[level].shape != (lh, lw):
                    raise ShapeMismatchError(
                        f"{label}: has no level {level} of size {lh}x{lw} matching {path}; "
                        "tile at --level 0 or write the labels with the same pyramid"
                    )
        grid = TileGrid.for_patches((lh, lw), patch, overlap)
        # An image smaller than a patch gives one window of the whole image; read it as a
        # full patch (the reader zero-fills past the edge) so every patch is P x P.
        windows = [Window(w.y, w.x, patch, patch) for w in grid.windows()]
        if min_foreground > 0:
            mask, mask_ds = foreground_mask(img, max_side=mask_max_side)
            frac = foreground_fractions(windows, mask, mask_ds, img.levels[level].downsample)
            windows = [w for w, f in zip(windows, frac, strict=True) if f >= min_foreground]
        vlab = None
        if vector is not None:
            vlab = vector.open(vindex, img)
            windows = _annotated_windows(vlab, windows, level, vector.outside, min_annotated)
        return _Plan(
            path=path,
            label=vector.files[vindex] if vector is not None else label,
            shape=tuple(img.shape),
            dtype=str(np.dtype(img.dtype)),
            fingerprint=fp,
            windows=windows,
            vector=vlab,
            bands=tuple(bands) if bands else None,
            pixel=pixel_record(img, level),
            resolution=img.metadata.get("resolution"),
        )


def _annotated_windows(
    lab: Any, windows: list[Window], level: int, outside: str, min_annotated: float
) -> list[Window]:
    """The windows to cut where vector labels are: none for a scene they miss (warned when
    the labels were opened); with outside="ignore" only windows with annotated pixels (and at
    least ``min_annotated`` of them); with outside="background" all, or those with
    ``min_annotated`` > 0 annotated."""
    if lab.empty:
        return []
    if outside == "background" and min_annotated <= 0:
        return windows
    windows = [w for w, hit in zip(windows, lab.candidates(windows, level), strict=True) if hit]
    return [
        w for w in windows if (f := lab.annotated_fraction(w, level)) > 0 and f >= min_annotated
    ]


def _write_range(
    store: Any,
    plans: list[_Plan],
    src_index: list[int],
    lo: int,
    hi: int,
    *,
    level: int,
    patch: int,
    channels: int,
    limits: dict[str, Any],
    resolution: ResolutionConfig | None = None,
) -> dict[int, np.ndarray]:
    """Read patches ``lo:hi`` (global rows) of ``plans`` and write them; return partial stats.

    Stats per plan position: [sum_c..., sumsq_c..., npix, class pixel counts(256),
    class patch counts(256)] as float64.
    """
    import zarr

    from tilenet.io import open_image
    from tilenet.io.resolution import label_view

    group = zarr.open_group(store, mode="r+")
    arr_img: Any = group[IMAGES]
    has_labels = LABELS in group
    n = hi - lo
    imgs = np.empty((n, patch, patch, channels), dtype=arr_img.dtype)
    labs = np.zeros((n, patch, patch), dtype=np.uint8) if has_labels else None
    coords = np.empty((n, 4), dtype=np.int64)
    stats: dict[int, np.ndarray] = {}
    row = lo
    for k, plan in enumerate(plans):
        a, b = max(lo, plan.start), min(hi, plan.start + len(plan.windows))
        if a >= b:
            continue
        st = stats.setdefault(k, np.zeros(2 * channels + 1 + 512, dtype=np.float64))
        img, level = _open_at(plan.path, limits, resolution, level, plan.bands)
        vec = plan.vector
        lab = open_image(plan.label, **limits) if plan.label is not None and vec is None else None
        if lab is not None:
            lab = label_view(lab, img)
        try:
            for g in range(a, b):
                win = plan.windows[g - plan.start]
                i = g - lo
                data = img.read(win, level)
                imgs[i] = data
                coords[i] = (src_index[k], level, win.y, win.x)
                # stats over the part inside the image only (zero padding is not data)
                inside = win.clip(*img.levels[level].shape).relative_to(win)
                none = nodata_mask(data, img.nodata)  # nodata: not in the stats, label ignored
                px = data[inside.slices]
                px = px[~none[inside.slices]] if none is not None else px
                px = px.reshape(-1, channels).astype(np.float64)
                st[:channels] += px.sum(0)
                st[channels : 2 * channels] += (px * px).sum(0)
                st[2 * channels] += px.shape[0]
                if labs is not None and (vec is not None or lab is not None):
                    # vector labels: outside the image and outside every polygon is ignored
                    labs[i] = (
                        vec.read(win, level, fill=IGNORE_INDEX)
                        if vec is not None
                        else lab.read(win, level)  # type: ignore[union-attr]
                    )[..., 0]
                    if none is not None:  # nodata: ignored by the loss
                        labs[i][none] = IGNORE_INDEX
                    counts = np.bincount(labs[i][inside.slices].ravel(), minlength=256)
                    counts[IGNORE_INDEX] = 0  # not a class
                    st[2 * channels + 1 : 2 * channels + 257] += counts
                    st[2 * channels + 257 :] += counts > 0
                row += 1
        finally:
            img.close()
            if lab is not None:
                lab.close()
    assert row == hi
    arr_img[lo:hi] = imgs
    arr_coords: Any = group[COORDS]
    if labs is not None:
        arr_labels: Any = group[LABELS]
        arr_labels[lo:hi] = labs
    arr_coords[lo:hi] = coords
    return stats


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


def tile_images(
    images: Sequence[str | os.PathLike[str]],
    *,
    labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    out: str | os.PathLike[str],
    patch: int = TilingConfig.patch,
    overlap: int = TilingConfig.overlap,
    level: int = TilingConfig.level,
    min_foreground: float = TilingConfig.min_foreground,
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
    dropped. Work runs on ``workers`` dask threads; each task reads and writes one shard of
    ``4 * chunk_patches`` patches. ``bands`` (1-based) keeps those bands of every image, in
    that order. Where an image declares nodata, pixels with every band nodata are left out of
    the statistics and labelled 255 (ignored by the loss).

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
    (see :func:`_annotated_windows`); a scene the polygons miss gets no patches (a warning).
    Class names come from the files (sorted) or ``class_map`` and are stored.

    ``resolution`` cuts every image at a target pixel size (``mpp``/``gsd``/
    ``magnification``: the nearest finer level resampled per window, label images by nearest
    neighbour; see :mod:`tilenet.io.resolution`); patches and coordinates are then in that
    grid. Each source records the pixel size of its patches (``mpp``/``gsd``), which training
    stores in the checkpoint.
    """
    import zarr

    from tilenet._version import __version__

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
    if location(out).local is None:  # a bucket
        import inspect

        given = locals()
        params = inspect.signature(tile_images).parameters
        kw = {n: given[n] for n in params if n not in ("images", "out")}
        return _tile_to_bucket(images, str(out), **kw)
    if resolution is not None:
        from tilenet.io.resolution import check_resolution

        check_resolution(resolution, level=level)
        if resolution == ResolutionConfig():
            resolution = None
    res_attr = asdict(resolution) if resolution is not None else None
    # the bands a store holds: a rerun or an append with other bands must not mix them
    bands_attr = [int(b) for b in bands] if bands else None
    out = Path(out)
    paths = resolve_images(images)
    if labels is not None and (annotations or vector_labels):
        raise InputError(
            "give label images (--labels) or vector labels (--annotations, --vector-labels), "
            "not both"
        )
    if labels is None:
        label_paths: list[Path | None] = [None] * len(paths)
    elif isinstance(labels, str | os.PathLike):
        label_paths = list(match_labels(paths, labels))
    else:
        label_paths = [Path(p) for p in labels]
        if len(label_paths) != len(paths):
            raise InputError(f"{len(label_paths)} label images given for {len(paths)} images")
    vector = None
    if annotations or vector_labels:
        from tilenet.io.vector import plan_vector_labels

        if not 0.0 <= float(min_annotated) <= 1.0:
            raise InputError(f"min_annotated must be in [0, 1], got {min_annotated!r}")
        vector = plan_vector_labels(
            paths,
            annotations=annotations or None,
            vector_labels=vector_labels or None,
            label_field=label_field,
            outside=outside,  # type: ignore[arg-type]
            class_map=dict(class_map or {}),
        )
    has_labels = labels is not None or vector is not None
    names = list(class_names) if class_names else class_names_near([p for p in label_paths if p])
    if vector is not None and not class_names:
        names = list(vector.class_names)

    existing: dict[str, Any] | None = None
    if out.exists():
        existing = read_attrs(out)
        if existing is None:
            raise InputError(
                f"{out}: exists and is not a tilenet patch store; choose another --out or remove it"
            )
        for key, want in (
            ("patch", patch),
            ("overlap", overlap),
            ("level", level),
            ("resolution", res_attr),
            ("bands", bands_attr),
        ):
            if existing.get(key) != want:
                raise InputError(
                    f"{out}: store was tiled with {key}={existing.get(key)}, not {want}; "
                    "use the same settings to resume/append, or a new --out"
                )
        if vector is not None and existing.get("class_names") not in (None, [], names):
            raise InputError(
                f"{out}: store has classes {existing['class_names']}, these labels {names}; "
                "give the same classes (tiling.class_map) or a new --out"
            )
        if bool(existing.get("has_labels")) != has_labels:
            raise InputError(
                f"{out}: store {'has' if existing.get('has_labels') else 'has no'} labels; "
                "append images with labels given the same way"
            )

    # Phase 1 (parallel): open each image, check it and its label, choose its patches.
    from tilenet.io import fingerprint

    done = {s["fingerprint"]: s for s in (existing or {}).get("sources", [])}
    todo: list[tuple[Path | str, Path | None, str]] = []
    vindex = {p: i for i, p in enumerate(paths)}
    for p, lab in zip(paths, label_paths, strict=True):
        try:
            fp = str(fingerprint(p))
        except OSError as exc:
            if failures is None:
                raise
            failures[str(p)] = _one_line(exc)
            continue
        if fp not in done and fp not in {t[2] for t in todo}:
            todo.append((p, lab, fp))
    # Planned in this thread, one image after another (headers and a low-resolution mask
    # each): their warnings (a scene the labels miss, a resampling note) then reach the
    # caller. From pool threads they raced other threads' warnings.catch_warnings blocks,
    # which are process-wide, and were sometimes lost.
    make_plan: Any = _plan_image if failures is None else _plan_or_reason
    plans: list[_Plan] = [
        make_plan(
            p,
            lab,
            fp,
            patch=patch,
            overlap=overlap,
            level=level,
            min_foreground=float(min_foreground),
            mask_max_side=mask_max_side,
            limits=limits,
            vector=vector,
            vindex=vindex[p],
            min_annotated=float(min_annotated),
            bands=bands,
            resolution=resolution,
        )
        for p, lab, fp in todo
    ]
    if failures is not None:
        failures.update(
            {str(t[0]): pl for t, pl in zip(todo, plans, strict=True) if isinstance(pl, str)}
        )
        plans = [pl for pl in plans if not isinstance(pl, str)]
        if not plans and existing is None:
            return out
    if not plans:
        if existing is None:
            raise InputError("nothing to tile")
        return out

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
    if not plans:
        return out

    if existing is None:
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tilenet_version": __version__,
            "patch": patch,
            "overlap": overlap,
            "level": level,
            "resolution": res_attr,
            "bands": bands_attr,
            "channels": channels,
            "dtype": dtype,
            "chunk_patches": chunk_patches,
            "has_labels": has_labels,
            "min_foreground": float(min_foreground),
            "class_names": names,
            "vector_labels": vector.describe() if vector is not None else None,
            "min_annotated": float(min_annotated),
            "count": 0,
            "sources": [],
            **stats_attrs([], channels),
        }
        # The empty store appears atomically, so a crash here never leaves a half-made one.
        with atomic_output(out) as tmp:
            create_store(
                tmp,
                patch=patch,
                channels=channels,
                dtype=dtype,
                labels=has_labels,
                chunk_patches=chunk_patches,
                attrs=attrs,
            )
        group = zarr.open_group(out, mode="r+")
    else:
        group = zarr.open_group(out, mode="r+")
        chunk_patches = int(existing["chunk_patches"])
        if names and not existing.get("class_names"):
            group.attrs["class_names"] = names

    # Phase 2: write in groups of images; each group is committed when all its shards are.
    shard = chunk_patches * CHUNKS_PER_SHARD
    store_attrs: Any = group.attrs
    sources: list[dict[str, Any]] = list(store_attrs["sources"])
    count = int(store_attrs["count"])
    total = sum(len(p.windows) for p in plans)
    bar = progress_bar(total, unit="patch", desc=f"tile {out.name}", enabled=progress)
    try:
        batch: list[_Plan] = []
        for i, plan in enumerate(plans):
            batch.append(plan)
            if sum(len(p.windows) for p in batch) >= 8 * shard * workers or i == len(plans) - 1:
                count = _write_batch(
                    out,
                    group,
                    batch,
                    sources,
                    count,
                    shard=shard,
                    level=level,
                    patch=patch,
                    channels=channels,
                    workers=workers,
                    limits=limits,
                    bar=bar,
                    resolution=resolution,
                )
                batch = []
    finally:
        bar.close()
    return out


def _write_batch(
    out: Path,
    group: Any,
    batch: list[_Plan],
    sources: list[dict[str, Any]],
    count: int,
    *,
    shard: int,
    level: int,
    patch: int,
    channels: int,
    workers: int,
    limits: dict[str, Any],
    bar: Any,
    resolution: ResolutionConfig | None = None,
) -> int:
    import dask

    start = count
    src_index = []
    for k, plan in enumerate(batch):
        plan.start = start
        start += len(plan.windows)
        src_index.append(len(sources) + k)
    end = start
    # Rows past ``count`` may hold an interrupted run's leftovers: they are overwritten.
    for name in ARRAYS:
        if name in group:
            arr = group[name]
            arr.resize((end, *arr.shape[1:]))
    ranges = [
        (max(s, count), min(s + shard, end))
        for s in range(count // shard * shard, end, shard)
        if max(s, count) < min(s + shard, end)
    ]

    def tick(result: dict[int, np.ndarray], n: int) -> dict[int, np.ndarray]:
        bar.update(n)
        return result

    tasks = [
        dask.delayed(tick)(
            dask.delayed(_write_range)(
                str(out),
                batch,
                src_index,
                lo,
                hi,
                level=level,
                patch=patch,
                channels=channels,
                limits=limits,
                resolution=resolution,
            ),
            hi - lo,
        )
        for lo, hi in ranges
    ]
    results = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    stats = [np.zeros(2 * channels + 1 + 512) for _ in batch]
    for res in results:
        for k, v in res.items():
            stats[k] += v
    for plan, st in zip(batch, stats, strict=True):
        cp = st[2 * channels + 1 : 2 * channels + 257]
        k = int(np.nonzero(cp)[0].max()) + 1 if cp.any() else 0
        sources.append(
            {
                "path": str(plan.path),
                "label": str(plan.label) if plan.label else None,
                "shape": list(plan.shape),
                "dtype": plan.dtype,
                "fingerprint": plan.fingerprint,
                "start": plan.start,
                "count": len(plan.windows),
                "sum": [float(v) for v in st[:channels]],
                "sumsq": [float(v) for v in st[channels : 2 * channels]],
                "npix": float(st[2 * channels]),
                "class_pixels": [int(v) for v in cp[:k]],
                "class_patches": [int(v) for v in st[2 * channels + 257 :][:k]],
                **(plan.pixel or {}),
                "resolution": plan.resolution,
            }
        )
    # The commit point: written after every shard of the batch is on disk.
    group.attrs.update({"sources": sources, "count": end, **stats_attrs(sources, channels)})
    return end
