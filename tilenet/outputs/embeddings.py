"""Feature files: patch embeddings of one image as they stream, under TRIDENT's names.

Layout (both formats): ``features`` float32 (N, D) and ``coords`` int64 (N, 2), each row the
(x, y) top-left corner of a patch in level-0 pixels, with the attributes TRIDENT writes on
``coords`` (``patch_size``, ``patch_size_level0``, ``level0_magnification``,
``target_magnification``, ``overlap``, ``level0_width``, ``level0_height``, ``name``,
``savetodir``) and on ``features`` (``name``, ``savetodir``, ``encoder``), plus what TRIDENT
lacks (exact ``mpp``, ``mpp_level0``, encoder, ``weights_sha256``, ``pooling``,
``precision``, tissue parameters, ``crs``/``transform`` for rasters) and the whole record as
JSON in the root attribute ``tilenet``. A ``None`` is stored as the string ``'None'`` (as
TRIDENT does).

Writers are a registry (:data:`FEATURE_WRITERS`: ``h5``, ``zarr``). Rows are appended per
batch into ``<final>.partial``; :meth:`FeatureWriter.checkpoint` flushes and records the
rows on disk in ``<final>.partial.json`` with the run's key and a checksum of the last
rows; :meth:`FeatureWriter.start` resumes from it (rows past the marker are dropped) and
:meth:`FeatureWriter.publish` renames the finished file into place. A partial file that
cannot be opened or whose checksum differs is started again, so a resumed file always
equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tilenet.fsutil import write_text_atomic

__all__ = ["FEATURE_WRITERS", "FeatureWriter", "H5Features", "ZarrFeatures", "finished_key"]

#: Rows per storage chunk along N (one batch of a typical run).
CHUNK_ROWS = 256


def _attr(value: Any) -> Any:
    """An attribute value h5py and zarr both store: None -> 'None', lists as arrays/lists."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _digest(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features, dtype=np.float32).tobytes()).hexdigest()


class FeatureWriter:
    """Appends (features, coords) rows to ``final`` (written as ``<final>.partial``).

    ``key`` identifies the run (input, encoder, weights, options): a marker of another key
    is not resumed. ``attrs`` holds ``coords``, ``features`` and ``root`` attribute dicts.
    """

    suffix: ClassVar[str] = ""

    def __init__(self, final: Path, *, dim: int, key: str, attrs: dict[str, dict[str, Any]]):
        self.final = Path(final)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.marker = self.final.with_name(self.final.name + ".partial.json")
        self.dim, self.key, self.attrs = dim, key, attrs
        self.rows = 0
        self._last: np.ndarray | None = None

    # -- what each format implements ------------------------------------------------------
    def _create(self) -> None:
        raise NotImplementedError

    def _reopen(self, rows: int, tail: int) -> np.ndarray:
        """Open the partial file, cut it to ``rows``; return its last ``tail`` feature rows."""
        raise NotImplementedError

    def _append(self, features: np.ndarray, coords: np.ndarray) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    @staticmethod
    def read_key(path: Path) -> str | None:
        """The run key stored in a finished file, or None."""
        raise NotImplementedError

    # -- the protocol ---------------------------------------------------------------------
    def start(self) -> int:
        """Open for writing; return the rows kept from an interrupted run with this key."""
        rows = self._resume_rows()
        if rows:
            return rows
        self._remove(self.partial)
        self.marker.unlink(missing_ok=True)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._create()
        self.rows = 0
        return 0

    def _resume_rows(self) -> int:
        try:
            marker = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return 0
        if marker.get("key") != self.key or not self.partial.exists():
            return 0
        rows, tail = int(marker["rows"]), int(marker.get("tail_rows", 0))
        try:
            last = self._reopen(rows, tail)
        except Exception:  # torn by the kill: start again
            self._safe_close()
            return 0
        if tail and _digest(last) != marker.get("tail_sha256"):
            self._safe_close()
            return 0
        self.rows = rows
        return rows

    def _safe_close(self) -> None:
        try:
            self._close()
        except Exception:
            pass

    def append(self, features: np.ndarray, coords: np.ndarray) -> None:
        """Append one batch: features (n, D) float32, coords (n, 2) int64."""
        features = np.asarray(features, dtype=np.float32)
        coords = np.asarray(coords, dtype=np.int64)
        if features.shape != (len(coords), self.dim) or coords.shape[1:] != (2,):
            raise ValueError(f"expected ({len(coords)}, {self.dim}) features, got {features.shape}")
        if len(coords):
            self._append(features, coords)
            self.rows += len(coords)
            self._last = features

    def checkpoint(self) -> None:
        """Make the rows so far survive a kill: flush, then the marker."""
        self._flush()
        rec: dict[str, Any] = {"key": self.key, "rows": self.rows}
        if self._last is not None:
            rec.update(tail_rows=len(self._last), tail_sha256=_digest(self._last))
        write_text_atomic(self.marker, json.dumps(rec))

    def publish(self, **root: Any) -> Path:
        """Finish: ``root`` attributes added, the file renamed into place, the marker gone."""
        self.attrs["root"].update(root)
        self._finish_attrs()
        self._close()
        self._remove(self.final)
        os.replace(self.partial, self.final)
        self.marker.unlink(missing_ok=True)
        return self.final

    def close(self) -> None:
        """Stop without publishing (the partial file and marker stay for a resume)."""
        self._safe_close()

    def _finish_attrs(self) -> None:
        pass

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class H5Features(FeatureWriter):
    """TRIDENT's ``.h5`` (h5py): resizable datasets, chunked by :data:`CHUNK_ROWS` rows."""

    suffix = ".h5"
    _f: Any = None

    def _create(self) -> None:
        import h5py

        self._f = h5py.File(self.partial, "w")
        self._f.create_dataset(
            "features",
            shape=(0, self.dim),
            maxshape=(None, self.dim),
            dtype="float32",
            chunks=(CHUNK_ROWS, self.dim),
        )
        self._f.create_dataset(
            "coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(CHUNK_ROWS, 2)
        )
        for ds in ("coords", "features"):
            for k, v in self.attrs[ds].items():
                self._f[ds].attrs[k] = _attr(v)
        self._f.flush()

    def _reopen(self, rows: int, tail: int) -> np.ndarray:
        import h5py

        self._f = h5py.File(self.partial, "r+")
        feats, coords = self._f["features"], self._f["coords"]
        if feats.shape[0] < rows or coords.shape[0] < rows or feats.shape[1] != self.dim:
            raise ValueError("partial file shorter than its marker")
        feats.resize(rows, axis=0)
        coords.resize(rows, axis=0)
        return np.asarray(feats[max(0, rows - tail) : rows])

    def _append(self, features: np.ndarray, coords: np.ndarray) -> None:
        n0, n = self.rows, len(coords)
        for name, data in (("features", features), ("coords", coords)):
            ds = self._f[name]
            ds.resize(n0 + n, axis=0)
            ds[n0 : n0 + n] = data

    def _flush(self) -> None:
        self._f.flush()

    def _finish_attrs(self) -> None:
        for k, v in self.attrs["root"].items():
            self._f.attrs[k] = _attr(v)

    def _close(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()
            self._f = None

    @staticmethod
    def read_key(path: Path) -> str | None:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                rec = json.loads(f.attrs["tilenet"])
        except Exception:
            return None
        return rec.get("key") if isinstance(rec, dict) else None


class ZarrFeatures(FeatureWriter):
    """The same arrays and attributes in a zarr group (a directory ``<stem>.zarr``)."""

    suffix = ".zarr"
    _g: Any = None

    def _create(self) -> None:
        import zarr

        self._g = zarr.open_group(str(self.partial), mode="w")
        f = self._g.create_array(
            "features", shape=(0, self.dim), chunks=(CHUNK_ROWS, self.dim), dtype="float32"
        )
        c = self._g.create_array("coords", shape=(0, 2), chunks=(CHUNK_ROWS, 2), dtype="int64")
        c.attrs.update({k: _attr(v) for k, v in self.attrs["coords"].items()})
        f.attrs.update({k: _attr(v) for k, v in self.attrs["features"].items()})

    def _reopen(self, rows: int, tail: int) -> np.ndarray:
        import zarr

        self._g = zarr.open_group(str(self.partial), mode="r+")
        feats, coords = self._g["features"], self._g["coords"]
        if feats.shape[0] < rows or coords.shape[0] < rows or feats.shape[1] != self.dim:
            raise ValueError("partial store shorter than its marker")
        feats.resize((rows, self.dim))
        coords.resize((rows, 2))
        return np.asarray(feats[max(0, rows - tail) : rows])

    def _append(self, features: np.ndarray, coords: np.ndarray) -> None:
        n0, n = self.rows, len(coords)
        self._g["features"].resize((n0 + n, self.dim))
        self._g["features"][n0 : n0 + n] = features
        self._g["coords"].resize((n0 + n, 2))
        self._g["coords"][n0 : n0 + n] = coords

    def _flush(self) -> None:
        pass  # every chunk is a file written at once

    def _finish_attrs(self) -> None:
        self._g.attrs.update({k: _attr(v) for k, v in self.attrs["root"].items()})

    def _close(self) -> None:
        self._g = None

    @staticmethod
    def read_key(path: Path) -> str | None:
        import zarr

        try:
            rec = json.loads(zarr.open_group(str(path), mode="r").attrs["tilenet"])  # type: ignore[arg-type]
        except Exception:
            return None
        return rec.get("key") if isinstance(rec, dict) else None


#: Feature file formats by ``--format`` value.
FEATURE_WRITERS: dict[str, type[FeatureWriter]] = {"h5": H5Features, "zarr": ZarrFeatures}


def finished_key(path: Path, fmt: str) -> str | None:
    """The run key of a finished feature file of format ``fmt``, None if absent or partial."""
    return FEATURE_WRITERS[fmt].read_key(path) if path.exists() else None
