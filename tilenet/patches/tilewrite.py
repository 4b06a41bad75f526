"""Write planned patches into a patch store, shard by shard, and commit them.

:func:`write_batch` gives a group of :class:`~tilenet.patches.tileplan.ImagePlan` rows past
the store's ``count``, writes one shard per dask task (each reads its windows and returns
partial statistics) and then commits the group: its ``sources`` entries, ``count`` and the
store statistics, written only after every shard is on disk.

Pixels without data (the image's validity mask: nodata, alpha 0, a dataset mask; see
:meth:`~tilenet.io.base.LazyImage.read_masked`) are stored as
:data:`~tilenet.normalize.NODATA_FILL` (0), as the part of a patch past the image's
edge is, whatever value the file uses for them: two files differing only in their nodata
value give identical patches. Their label is 255 (ignored by the loss) and they are left out
of the store's statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tilenet.config import ResolutionConfig
from tilenet.io.base import IGNORE_INDEX
from tilenet.normalize import fill_nodata
from tilenet.patches.patchstore import ARRAYS, COORDS, IMAGES, LABELS, stats_attrs
from tilenet.patches.tileplan import ImagePlan, open_at

__all__ = ["write_batch"]


def _write_range(
    store: Any,
    plans: list[ImagePlan],
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
        img, level = open_at(plan.path, limits, resolution, level, plan.bands)
        vec = plan.vector
        lab = open_image(plan.label, **limits) if plan.label is not None and vec is None else None
        if lab is not None:
            lab = label_view(lab, img)
        try:
            for g in range(a, b):
                win = plan.windows[g - plan.start]
                i = g - lo
                data, valid = img.read_masked(win, level)
                imgs[i] = fill_nodata(data, valid)
                coords[i] = (src_index[k], level, win.y, win.x)
                # stats over the part inside the image only (zero padding is not data)
                inside = win.clip(*img.levels[level].shape).relative_to(win)
                # no data (nodata, alpha 0, masked): not in the stats, label ignored
                none = None if valid is None else ~valid
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


def write_batch(
    out: Path,
    group: Any,
    batch: list[ImagePlan],
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
                "labels_fingerprint": plan.labels_fingerprint,
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
