"""Out-of-core connected-component labelling of a class map (:func:`label_instances`).

:func:`label_instances` turns a chunked (H, W) class map into an (H, W) uint32 map of
connected components (OME-Zarr), reading and writing one block at a time. The result is the
same partition as :func:`scipy.ndimage.label` run on the whole map, and the ids themselves
are deterministic (independent of the block size):

* ``per_class=True`` (default): pixels of different foreground classes are never the same
  object, each class is labelled on its own. Ids are **class-major**: all objects of the
  lowest class first, then the next class, ...; within a class, objects are numbered in
  raster order of their first (top-left-most) pixel. So the class of an id is a contiguous
  id range, recorded in the output's metadata.
* ``per_class=False``: components of the union of the foreground classes, numbered in raster
  order of their first pixel -- identical to ``scipy.ndimage.label`` on the foreground mask.

Algorithm (three sweeps over the blocks; labelling a block is cheap and deterministic, so it
is redone rather than stored):

1. label every block with scipy; give its labels provisional 64-bit ids (block offset + local
   label); compare the touching pixel rows/columns of neighbouring blocks (with the diagonal
   pairs for ``connectivity=2``) to collect equivalences; keep the first pixel and class of
   every label that touches a block edge (:func:`_sweep`).
2. union the equivalences (:func:`scipy.sparse.csgraph.connected_components`; :func:`_merge`);
   count the objects owned by each block row (an object is owned by the block row holding
   its first pixel) and class, which fixes the id range of every (class, block row)
   (:func:`_id_ranges`).
3. per block row: relabel its blocks, sort the first pixels of the objects it owns, assign
   ids; relabel each block again, map local labels to ids and write it (:func:`_write_ids`).

Memory: a few blocks, one image row of provisional ids, the merge tables (which scale with
the number of labels touching block edges) and the first-pixel table of one block row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import zarr
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tilenet.errors import ImageNotFoundError, InputError, UnsupportedFormatError, one_line
from tilenet.geometry import spans
from tilenet.io.writers import OmeZarrWriter
from tilenet.progress import progress_iter

__all__ = ["META_KEY", "block_shape", "label_instances", "open_2d"]

#: Name of the array attribute (on dataset "0") describing how the instances were made.
META_KEY = "tilenet_instances"
_MAX_ID = np.iinfo(np.uint32).max

_Read = Callable[[int, int, int, int], np.ndarray]


# -- input normalisation -----------------------------------------------------------------------
def open_2d(source: Any, what: str) -> tuple[Any, str]:
    """A 2-D zarr (or numpy) array from an array or a path to an OME-Zarr / zarr array."""
    label = what
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        label = str(p)
        if not p.is_dir():
            raise ImageNotFoundError(f"{p}: {what} not found; pass an OME-Zarr directory")
        try:
            node: Any = zarr.open(p, mode="r")
        except Exception as exc:
            raise UnsupportedFormatError(
                f"{p}: not a zarr store ({one_line(exc, typed=False)})"
            ) from exc
        if isinstance(node, zarr.Group):
            if "0" not in node:
                raise UnsupportedFormatError(f"{p}: OME-Zarr without dataset '0'")
            node = node["0"]
        source = node
    if not isinstance(source, (zarr.Array, np.ndarray)):
        raise InputError(f"{what} must be a zarr array or an OME-Zarr path, got {type(source)}")
    if source.ndim != 2:
        raise InputError(f"{label}: {what} must be 2-D (H, W), got shape {tuple(source.shape)}")
    if not np.issubdtype(source.dtype, np.integer):
        raise InputError(f"{label}: {what} must hold integers, got dtype {source.dtype}")
    if 0 in source.shape:
        raise InputError(f"{label}: {what} is empty (shape {tuple(source.shape)})")
    return source, label


def block_shape(chunk: int | Sequence[int] | None, arr: Any) -> tuple[int, int]:
    if chunk is None:
        chunks = getattr(arr, "chunks", None) or (1024, 1024)
        return int(chunks[-2]), int(chunks[-1])
    if isinstance(chunk, (int, np.integer)):
        chunk = (int(chunk), int(chunk))
    ch = tuple(int(c) for c in chunk)
    if len(ch) != 2 or min(ch) < 1:
        raise InputError(f"chunk must be a positive int or (h, w), got {chunk!r}")
    return ch[0], ch[1]


# -- pass helpers ------------------------------------------------------------------------------
def _first_pixels(lab: np.ndarray, n: int) -> np.ndarray:
    """Flat index of the first pixel of labels 1..n (scipy numbers labels in raster order)."""
    flat = lab.ravel()
    nz = np.flatnonzero(flat)
    v = flat[nz]
    new = np.empty(v.shape, bool)
    new[:1] = True
    new[1:] = v[1:] > np.maximum.accumulate(v)[:-1]
    first = nz[new]
    assert first.size == n, "scipy.ndimage.label did not number labels in raster order"
    return first


class _Labeller:
    """Labels one block: local labels 1..n, the class key and first pixel of each label."""

    def __init__(self, fg: np.ndarray | None, per_class: bool, connectivity: int) -> None:
        self.fg = fg
        self.per_class = per_class
        self.structure = ndi.generate_binary_structure(2, connectivity)

    def classes(self, block: np.ndarray) -> np.ndarray:
        if block.dtype == np.uint8:
            present = np.flatnonzero(np.bincount(block.ravel(), minlength=1))
        else:
            present = np.unique(block)
        if self.fg is None:
            return present[present != 0]
        return present[np.isin(present, self.fg)]

    def __call__(self, block: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        present = self.classes(block)
        labels = np.zeros(block.shape, np.int32)
        if not present.size:
            return labels, 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
        if not self.per_class:
            mask = block != 0 if self.fg is None else np.isin(block, present)
            n = ndi.label(mask, self.structure, output=labels)
            return labels, n, _first_pixels(labels, n), np.zeros(n, np.int64)
        firsts, keys, n = [], [], 0
        for c in present:
            lab, k = ndi.label(block == c, self.structure)
            if not k:
                continue
            firsts.append(_first_pixels(lab, k))
            keys.append(np.full(k, int(c), np.int64))
            m = lab > 0
            labels[m] = lab[m] + n
            n += k
        return labels, n, np.concatenate(firsts), np.concatenate(keys)


def _face_pairs(
    a: np.ndarray, b: np.ndarray, ka: np.ndarray, kb: np.ndarray, diag: bool
) -> list[np.ndarray]:
    """Equivalent (id_a, id_b) pairs between two touching pixel lines (ids, keys, 0 = none).

    Deduplicated, so the merge table grows with the objects crossing a face, not its length.
    """
    out = []
    shifts = [(slice(None), slice(None))]
    if diag:
        shifts += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))]
    for sa, sb in shifts:
        x, y = a[sa], b[sb]
        m = (x > 0) & (y > 0) & (ka[sa] == kb[sb])
        if m.any():
            out.append(np.stack([x[m], y[m]]))
    return [np.unique(np.concatenate(out, axis=1), axis=1)] if out else []


def _group_min(groups: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    res = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(res, groups, values)
    return res


# -- labelling ---------------------------------------------------------------------------------
def label_instances(
    classes: Any,
    out: str | os.PathLike[str],
    *,
    foreground: Iterable[int] | None = None,
    per_class: bool = True,
    connectivity: int = 1,
    chunk: int | Sequence[int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Label the connected components of the foreground of ``classes`` into ``out``.

    ``classes`` is a 2-D integer zarr array (a class map) or a path to an OME-Zarr whose
    dataset "0" is one. ``out`` becomes an OME-Zarr of (H, W) uint32 instance ids (0 =
    background) with a nearest-neighbour pyramid, written block by block and renamed into
    place when complete. ``foreground`` lists the class ids that count (default: every
    non-zero class); ``per_class`` separates touching objects of different classes (see the
    module docstring for the id order); ``connectivity`` is 1 (edge neighbours) or 2 (also
    diagonal); ``chunk`` is the block size, by default the chunks of ``classes``.

    Returns ``{"count": n_objects, "per_class_counts": {class_id: n}}`` (the per-class counts
    are empty when ``per_class=False``: a union object has no single class).
    """
    arr, label = open_2d(classes, "class map")
    if connectivity not in (1, 2):
        raise InputError(f"connectivity must be 1 or 2, got {connectivity!r}")
    fg = None
    if foreground is not None:
        fg = np.unique(np.asarray(list(foreground), dtype=np.int64))
        if not fg.size:
            raise InputError("foreground must list at least one class id")
    bh, bw = block_shape(chunk, arr)
    H, W = (int(s) for s in arr.shape)
    grid = _Grid(spans(H, bh), spans(W, bw), W, bh)
    labeller = _Labeller(fg, per_class, connectivity)

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(arr[y0:y1, x0:x1])

    sweep = _sweep(grid, labeller, read, diag=connectivity == 2, progress=progress)
    merge = _merge(sweep, grid)
    ranges = _id_ranges(sweep, merge, grid)
    total = ranges.total
    if total > _MAX_ID:
        raise InputError(f"{label}: {total} objects do not fit uint32 instance ids")
    meta: dict[str, Any] = {
        "source": label,
        "per_class": per_class,
        "connectivity": connectivity,
        "foreground": None if fg is None else fg.tolist(),
        "count": total,
    }
    if per_class:
        meta["class_ranges"] = ranges.class_ranges()  # ids are class-major
    writer = OmeZarrWriter(
        out, shape=(H, W), dtype=np.uint32, axes="yx", chunks=max(bh, bw), overwrite=True
    )
    with writer:
        _write_ids(writer.array, grid, labeller, read, sweep, merge, ranges, progress=progress)
        writer.array.attrs[META_KEY] = meta
        writer.finalize(method="nearest")
    return {
        "count": total,
        "per_class_counts": (
            {int(k): int(ranges.per_key[ranges.kidx[k]]) for k in ranges.all_keys}
            if per_class and total
            else {}
        ),
    }


@dataclass(frozen=True)
class _Grid:
    """The blocks: row and column spans, the map's width and the block height."""

    rows: list[tuple[int, int]]
    cols: list[tuple[int, int]]
    width: int
    bh: int


@dataclass
class _Sweep:
    """What pass 1 keeps: provisional id bases, label counts per class key, the equivalent
    pairs across block faces, and the edge labels' ids, first pixels and keys."""

    base: np.ndarray
    key_counts: list[dict[int, int]] = field(default_factory=list)
    pairs: list[np.ndarray] = field(default_factory=list)
    edge_gid: list[np.ndarray] = field(default_factory=list)
    edge_fp: list[np.ndarray] = field(default_factory=list)
    edge_key: list[np.ndarray] = field(default_factory=list)


def _sweep(grid: _Grid, labeller: _Labeller, read: _Read, *, diag: bool, progress: bool) -> _Sweep:
    """Pass 1: local labels, equivalences across block faces, the edge-label table."""
    rows, cols, W = grid.rows, grid.cols, grid.width
    nbx = len(cols)
    sw = _Sweep(np.zeros((len(rows), nbx), np.int64))  # provisional id of label 0 per block
    next_base = 0
    prev_bottom: np.ndarray | None = None
    prev_bottom_key = left = left_key = np.zeros(0, np.int64)
    top = top_key = bottom = bottom_key = np.zeros(0, np.int64)
    blocks_iter = ((i, j) for i in range(len(rows)) for j in range(nbx))
    for i, j in progress_iter(
        blocks_iter, desc="instances 1/3", unit="block", total=len(rows) * nbx, enabled=progress
    ):
        (y0, y1), (x0, x1) = rows[i], cols[j]
        if j == 0:
            top = np.zeros(W, np.int64)
            top_key = np.full(W, -1, np.int64)
            bottom = np.zeros(W, np.int64)
            bottom_key = np.full(W, -1, np.int64)
            left = left_key = np.zeros(0, np.int64)
        lab, n, first, keys = labeller(read(y0, y1, x0, x1))
        sw.base[i, j] = next_base
        gid = np.where(lab > 0, lab.astype(np.int64) + next_base, 0)
        kmap = np.concatenate([[-1], keys])
        pkey = kmap[lab]
        next_base += n
        uk, uc = np.unique(keys, return_counts=True)
        sw.key_counts.append(dict(zip(uk.tolist(), uc.tolist(), strict=True)))
        if n:
            rim = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
            e = np.unique(rim[rim > 0])
            w = x1 - x0
            fp = first[e - 1]
            sw.edge_gid.append(e + sw.base[i, j])
            sw.edge_fp.append((y0 + fp // w) * W + x0 + fp % w)
            sw.edge_key.append(keys[e - 1])
        top[x0:x1], top_key[x0:x1] = gid[0], pkey[0]
        bottom[x0:x1], bottom_key[x0:x1] = gid[-1], pkey[-1]
        if left.size:
            sw.pairs += _face_pairs(left, gid[:, 0], left_key, pkey[:, 0], diag)
        left, left_key = gid[:, -1], pkey[:, -1]
        if j == nbx - 1:
            if prev_bottom is not None:
                sw.pairs += _face_pairs(prev_bottom, top, prev_bottom_key, top_key, diag)
            prev_bottom, prev_bottom_key = bottom, bottom_key
    return sw


@dataclass(frozen=True)
class _Merge:
    """The union of the labels touching a neighbour: the merged provisional ids (``nodes``,
    sorted), their component, and per component its first pixel, key and block row."""

    nodes: np.ndarray
    comp: np.ndarray
    ncomp: int
    comp_fp: np.ndarray
    comp_key: np.ndarray
    node_key: np.ndarray
    comp_band: np.ndarray
    node_block: np.ndarray


def _merge(sw: _Sweep, grid: _Grid) -> _Merge:
    """Union-find over the labels that touch a neighbour."""
    node_key = np.zeros(0, np.int64)
    if sw.pairs:
        pa = np.concatenate(sw.pairs, axis=1)
        nodes = np.unique(pa)
        ia, ib = np.searchsorted(nodes, pa[0]), np.searchsorted(nodes, pa[1])
        m = len(nodes)
        graph = coo_matrix((np.ones(ia.size, np.int8), (ia, ib)), shape=(m, m))
        ncomp, comp = connected_components(graph, directed=False)
        eg = np.concatenate(sw.edge_gid)
        at = np.searchsorted(eg, nodes)
        node_fp = np.concatenate(sw.edge_fp)[at]
        node_key = np.concatenate(sw.edge_key)[at]
        comp_fp = _group_min(comp, node_fp, ncomp)
        comp_key = np.zeros(ncomp, np.int64)
        comp_key[comp] = node_key
    else:
        nodes = np.zeros(0, np.int64)
        comp = np.zeros(0, np.int64)
        ncomp = 0
        comp_fp = comp_key = np.zeros(0, np.int64)
    comp_band = (comp_fp // grid.width) // grid.bh
    node_block = np.searchsorted(sw.base.ravel(), nodes - 1, side="right") - 1
    return _Merge(nodes, comp, ncomp, comp_fp, comp_key, node_key, comp_band, node_block)


@dataclass(frozen=True)
class _IdRanges:
    """Ids: class-major, then raster order of the first pixel; fixed per (class, band)."""

    all_keys: list[int]
    kidx: dict[int, int]
    per_key: np.ndarray
    key_off: np.ndarray
    band_off: np.ndarray  # first id - 1 per (band, key)

    @property
    def total(self) -> int:
        return int(self.per_key.sum())

    def class_ranges(self) -> dict[str, list[int]]:
        """The id range [first, last] of each class with objects."""
        off, n = self.key_off, self.per_key
        return {
            str(k): [int(off[self.kidx[k]]) + 1, int(off[self.kidx[k]] + n[self.kidx[k]])]
            for k in self.all_keys
            if n[self.kidx[k]]
        }


def _id_ranges(sw: _Sweep, mg: _Merge, grid: _Grid) -> _IdRanges:
    nbx = len(grid.cols)
    all_keys = sorted({k for d in sw.key_counts for k in d})
    kidx = {k: t for t, k in enumerate(all_keys)}
    counts = np.zeros((len(grid.rows), max(1, len(all_keys))), np.int64)
    for b, d in enumerate(sw.key_counts):
        for k, c in d.items():
            counts[b // nbx, kidx[k]] += c
    if mg.nodes.size:  # a merged label is not an object of its own block; its component is
        node_k = np.searchsorted(all_keys, mg.node_key)
        np.subtract.at(counts, (mg.node_block // nbx, node_k), 1)
        np.add.at(counts, (mg.comp_band, np.searchsorted(all_keys, mg.comp_key)), 1)
    per_key = counts.sum(axis=0)
    key_off = np.concatenate([[0], np.cumsum(per_key)[:-1]])
    band_off = np.cumsum(counts, axis=0) - counts + key_off
    return _IdRanges(all_keys, kidx, per_key, key_off, band_off)


def _write_ids(
    out_arr: Any,
    grid: _Grid,
    labeller: _Labeller,
    read: _Read,
    sw: _Sweep,
    mg: _Merge,
    ids_of: _IdRanges,
    *,
    progress: bool,
) -> None:
    """Passes 2 and 3, one block row at a time: assign ids, then write the blocks."""
    rows, cols, W = grid.rows, grid.cols, grid.width
    nodes, all_keys = mg.nodes, ids_of.all_keys
    comp_id = np.zeros(mg.ncomp, np.int64)
    bands = progress_iter(
        range(len(rows)), desc="instances 2/3", unit="block", total=len(rows), enabled=progress
    )
    for i in bands:
        y0, y1 = rows[i]
        tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        fps, kks = [], []
        for j, (x0, x1) in enumerate(cols):
            lab, n, first, keys = labeller(read(y0, y1, x0, x1))
            gids = np.arange(1, n + 1, dtype=np.int64) + sw.base[i, j]
            pos = np.minimum(np.searchsorted(nodes, gids), max(nodes.size - 1, 0))
            merged = nodes[pos] == gids if nodes.size else np.zeros(n, bool)
            inner = np.flatnonzero(~merged)
            w = x1 - x0
            fps.append((y0 + first[inner] // w) * W + x0 + first[inner] % w)
            kks.append(keys[inner])
            tables.append((inner, np.flatnonzero(merged), mg.comp[pos[merged]]))
        own = np.flatnonzero(mg.comp_band == i)
        fps.append(mg.comp_fp[own])
        kks.append(mg.comp_key[own])
        fp_all, k_all = np.concatenate(fps), np.concatenate(kks)
        ki = np.searchsorted(all_keys, k_all) if all_keys else k_all
        order = np.lexsort((fp_all, ki))
        ids = np.empty(order.size, np.int64)
        # rank within (band, key) = position in the sort minus the key's first position
        sk = ki[order]
        starts = np.searchsorted(sk, sk, side="left")
        ids[order] = ids_of.band_off[i, sk] + (np.arange(order.size) - starts) + 1
        split = np.cumsum([t[0].size for t in tables])
        comp_id[own] = ids[split[-1] :] if tables else ids
        chunk_ids = np.split(ids[: split[-1]], split[:-1])
        for j, (x0, x1) in enumerate(cols):
            lab, n, _, _ = labeller(read(y0, y1, x0, x1))
            inner, merged_l, merged_c = tables[j]
            table = np.zeros(n + 1, np.uint32)
            table[inner + 1] = chunk_ids[j]
            table[merged_l + 1] = comp_id[merged_c]
            out_arr[y0:y1, x0:x1] = table[lab]
