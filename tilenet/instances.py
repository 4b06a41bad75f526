"""Out-of-core instance labelling of a class map, and GeoJSON polygons of the instances.

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
   every label that touches a block edge.
2. union the equivalences (:func:`scipy.sparse.csgraph.connected_components`); count the
   objects owned by each block row (an object is owned by the block row holding its first
   pixel) and class, which fixes the id range of every (class, block row).
3. per block row: relabel its blocks, sort the first pixels of the objects it owns, assign
   ids; relabel each block again, map local labels to ids and write it.

Memory: a few blocks, one image row of provisional ids, the merge tables (which scale with
the number of labels touching block edges) and the first-pixel table of one block row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi
import zarr
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tilenet.errors import InputError, UnsupportedFormatError
from tilenet.fsutil import atomic_output
from tilenet.io.writers import DEFAULT_PALETTE, OmeZarrWriter

__all__ = ["label_instances", "write_geojson"]

#: Name of the array attribute (on dataset "0") describing how the instances were made.
META_KEY = "tilenet_instances"
_MAX_ID = np.iinfo(np.uint32).max


# -- input normalisation -----------------------------------------------------------------------
def _open_2d(source: Any, what: str) -> tuple[Any, str]:
    """A 2-D zarr (or numpy) array from an array or a path to an OME-Zarr / zarr array."""
    label = what
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        label = str(p)
        if not p.is_dir():
            raise InputError(f"{p}: {what} not found; pass an OME-Zarr directory")
        try:
            node = zarr.open(p, mode="r")
        except Exception as exc:
            raise UnsupportedFormatError(f"{p}: not a zarr store ({exc})") from exc
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


def _block_shape(chunk: int | Sequence[int] | None, arr: Any) -> tuple[int, int]:
    if chunk is None:
        chunks = getattr(arr, "chunks", None) or (1024, 1024)
        return int(chunks[-2]), int(chunks[-1])
    if isinstance(chunk, (int, np.integer)):
        chunk = (int(chunk), int(chunk))
    ch = tuple(int(c) for c in chunk)
    if len(ch) != 2 or min(ch) < 1:
        raise InputError(f"chunk must be a positive int or (h, w), got {chunk!r}")
    return ch[0], ch[1]


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _progress(it: Iterable[Any], enabled: bool, desc: str, total: int) -> Iterable[Any]:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, unit="block")


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


def _face_pairs(a: np.ndarray, b: np.ndarray, ka: np.ndarray, kb: np.ndarray, diag: bool):
    """Equivalent (id_a, id_b) pairs between two touching pixel lines (ids, keys, 0 = none)."""
    out = []
    shifts = [(slice(None), slice(None))]
    if diag:
        shifts += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))]
    for sa, sb in shifts:
        x, y = a[sa], b[sb]
        m = (x > 0) & (y > 0) & (ka[sa] == kb[sb])
        if m.any():
            out.append(np.stack([x[m], y[m]]))
    return out


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
    arr, label = _open_2d(classes, "class map")
    if connectivity not in (1, 2):
        raise InputError(f"connectivity must be 1 or 2, got {connectivity!r}")
    fg = None
    if foreground is not None:
        fg = np.unique(np.asarray(list(foreground), dtype=np.int64))
        if not fg.size:
            raise InputError("foreground must list at least one class id")
    bh, bw = _block_shape(chunk, arr)
    H, W = (int(s) for s in arr.shape)
    rows, cols = _blocks(H, bh), _blocks(W, bw)
    labeller = _Labeller(fg, per_class, connectivity)
    diag = connectivity == 2

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(arr[y0:y1, x0:x1])

    # -- pass 1: local labels, equivalences across block faces, edge-label table ----------
    nbx = len(cols)
    base = np.zeros((len(rows), nbx), np.int64)  # provisional id of label 0 of each block
    key_counts: list[dict[int, int]] = []  # per block: labels per class key
    pairs: list[np.ndarray] = []
    edge_gid, edge_fp, edge_key = [], [], []
    next_base = 0
    prev_bottom = prev_bottom_key = None
    blocks_iter = ((i, j) for i in range(len(rows)) for j in range(nbx))
    for i, j in _progress(blocks_iter, progress, "instances 1/3", len(rows) * nbx):
        (y0, y1), (x0, x1) = rows[i], cols[j]
        if j == 0:
            top = np.zeros(W, np.int64)
            top_key = np.full(W, -1, np.int64)
            bottom = np.zeros(W, np.int64)
            bottom_key = np.full(W, -1, np.int64)
            left = left_key = None
        lab, n, first, keys = labeller(read(y0, y1, x0, x1))
        base[i, j] = next_base
        gid = np.where(lab > 0, lab.astype(np.int64) + next_base, 0)
        kmap = np.concatenate([[-1], keys])
        pkey = kmap[lab]
        next_base += n
        uk, uc = np.unique(keys, return_counts=True)
        key_counts.append(dict(zip(uk.tolist(), uc.tolist(), strict=True)))
        if n:
            rim = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
            e = np.unique(rim[rim > 0])
            w = x1 - x0
            fp = first[e - 1]
            edge_gid.append(e + base[i, j])
            edge_fp.append((y0 + fp // w) * W + x0 + fp % w)
            edge_key.append(keys[e - 1])
        top[x0:x1], top_key[x0:x1] = gid[0], pkey[0]
        bottom[x0:x1], bottom_key[x0:x1] = gid[-1], pkey[-1]
        if left is not None:
            pairs += _face_pairs(left, gid[:, 0], left_key, pkey[:, 0], diag)
        left, left_key = gid[:, -1], pkey[:, -1]
        if j == nbx - 1:
            if prev_bottom is not None:
                pairs += _face_pairs(prev_bottom, top, prev_bottom_key, top_key, diag)
            prev_bottom, prev_bottom_key = bottom, bottom_key

    # -- union-find over the labels that touch a neighbour ---------------------------------
    if pairs:
        pa = np.concatenate(pairs, axis=1)
        nodes = np.unique(pa)
        ia, ib = np.searchsorted(nodes, pa[0]), np.searchsorted(nodes, pa[1])
        m = len(nodes)
        graph = coo_matrix((np.ones(ia.size, np.int8), (ia, ib)), shape=(m, m))
        ncomp, comp = connected_components(graph, directed=False)
        eg = np.concatenate(edge_gid)
        at = np.searchsorted(eg, nodes)
        node_fp = np.concatenate(edge_fp)[at]
        node_key = np.concatenate(edge_key)[at]
        comp_fp = _group_min(comp, node_fp, ncomp)
        comp_key = np.zeros(ncomp, np.int64)
        comp_key[comp] = node_key
    else:
        nodes = np.zeros(0, np.int64)
        comp = np.zeros(0, np.int64)
        ncomp = 0
        comp_fp = comp_key = np.zeros(0, np.int64)
    comp_band = (comp_fp // W) // bh
    node_block = np.searchsorted(base.ravel(), nodes - 1, side="right") - 1

    # -- ids: class-major, then raster order of the first pixel; fixed per (class, band) ----
    all_keys = sorted({k for d in key_counts for k in d})
    kidx = {k: t for t, k in enumerate(all_keys)}
    counts = np.zeros((len(rows), max(1, len(all_keys))), np.int64)
    for b, d in enumerate(key_counts):
        for k, c in d.items():
            counts[b // nbx, kidx[k]] += c
    if nodes.size:  # a merged label is not an object of its own block; its component is
        node_k = np.searchsorted(all_keys, node_key)
        np.subtract.at(counts, (node_block // nbx, node_k), 1)
        np.add.at(counts, (comp_band, np.searchsorted(all_keys, comp_key)), 1)
    per_key = counts.sum(axis=0)
    total = int(per_key.sum())
    if total > _MAX_ID:
        raise InputError(f"{label}: {total} objects do not fit uint32 instance ids")
    key_off = np.concatenate([[0], np.cumsum(per_key)[:-1]])
    band_off = np.cumsum(counts, axis=0) - counts + key_off  # first id - 1 per (band, key)
    comp_id = np.zeros(ncomp, np.int64)
    info: dict[str, Any] = {
        "count": total,
        "per_class_counts": (
            {int(k): int(per_key[kidx[k]]) for k in all_keys} if per_class and total else {}
        ),
    }

    # -- pass 2 + 3 per block row: assign ids, then write --------------------------------
    writer = OmeZarrWriter(
        out, shape=(H, W), dtype=np.uint32, axes="yx", chunks=max(bh, bw), overwrite=True
    )
    with writer:
        bands = _progress(range(len(rows)), progress, "instances 2/3", len(rows))
        for i in bands:
            y0, y1 = rows[i]
            tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            fps, kks = [], []
            for j, (x0, x1) in enumerate(cols):
                lab, n, first, keys = labeller(read(y0, y1, x0, x1))
                gids = np.arange(1, n + 1, dtype=np.int64) + base[i, j]
                pos = np.searchsorted(nodes, gids)
                merged = (pos < nodes.size) & (nodes[np.minimum(pos, nodes.size - 1)] == gids)
                inner = np.flatnonzero(~merged)
                w = x1 - x0
                fps.append((y0 + first[inner] // w) * W + x0 + first[inner] % w)
                kks.append(keys[inner])
                tables.append((inner, np.flatnonzero(merged), comp[pos[merged]]))
            own = np.flatnonzero(comp_band == i)
            fps.append(comp_fp[own])
            kks.append(comp_key[own])
            fp_all, k_all = np.concatenate(fps), np.concatenate(kks)
            ki = np.searchsorted(all_keys, k_all) if all_keys else k_all
            order = np.lexsort((fp_all, ki))
            ids = np.empty(order.size, np.int64)
            # rank within (band, key) = position in the sort minus the key's first position
            sk = ki[order]
            starts = np.searchsorted(sk, sk, side="left")
            ids[order] = band_off[i, sk] + (np.arange(order.size) - starts) + 1
            split = np.cumsum([t[0].size for t in tables])
            comp_id[own] = ids[split[-1] :] if tables else ids
            chunk_ids = np.split(ids[: split[-1]], split[:-1])
            for j, (x0, x1) in enumerate(cols):
                lab, n, _, _ = labeller(read(y0, y1, x0, x1))
                inner, merged_l, merged_c = tables[j]
                table = np.zeros(n + 1, np.uint32)
                table[inner + 1] = chunk_ids[j]
                table[merged_l + 1] = comp_id[merged_c]
                writer.array[y0:y1, x0:x1] = table[lab]
        meta: dict[str, Any] = {
            "source": label,
            "per_class": per_class,
            "connectivity": connectivity,
            "foreground": None if fg is None else fg.tolist(),
            "count": total,
        }
        if per_class:
            # id range [first, last] of each class (ids are class-major)
            meta["class_ranges"] = {
                str(k): [int(key_off[kidx[k]]) + 1, int(key_off[kidx[k]] + per_key[kidx[k]])]
                for k in all_keys
                if per_key[kidx[k]]
            }
        writer.array.attrs[META_KEY] = meta
        writer.finalize(method="nearest")
    return info
