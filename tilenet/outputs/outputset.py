"""The outputs of one image's inference on a Location: created, resumed, finalized, published.

:class:`OutputSet` owns everything an inference run writes, by one code path for a local
folder and for a bucket prefix (:class:`~tilenet.io.location.Location`):

* the level-0 stores (``classes.ome.zarr``, ``probabilities.ome.zarr``: exactly the stores
  the asked-for formats read, :data:`~tilenet.outputs.formats.FORMATS`), written in place
  chunk by chunk; their pyramid and OME metadata come last, in finalize;
* the resume state in ``.tilenet/``: ``key.json`` (what the stores are computed from,
  :class:`~tilenet.outputs.resume.ResumeKey`) and one marker per finished band of grid rows
  (``region-NNNNN.json``), each written whole only after all of the band's chunks are, and
  for a band under way the rows written so far (``progress-NNNNN.json``,
  :mod:`tilenet.engine.pace`);
* finalize: each store's pyramid and metadata (and georeferencing), then every asked-for
  format's files (:class:`~tilenet.outputs.formats.Finished`);
* publish: ``config.yaml``, then ``summary.json`` last, then the resume state removed.

Commit protocol: ``summary.json`` is what marks a complete output. A prepare under a new key
removes it first (then the old resume state, then the stores are made anew, then the key),
and only publish writes it again. The output chunks are the grid's cores, so bands of whole
grid rows write disjoint chunks: any number of processes may fill the same stores without
locks (batch jobs on dask). A killed run leaves the stores and markers; the next prepare
with the same key keeps them and only the missing bands run again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilenet.config import InferConfig, to_yaml
from tilenet.errors import InputError, one_line, scrub_credentials
from tilenet.fsutil import remove_path
from tilenet.geometry import GeoTransform
from tilenet.io.location import Location
from tilenet.io.lock import HOLDER_FILES
from tilenet.outputs.formats import (
    CLASSES_NODATA,
    FORMATS,
    GEOREF_KEY,
    PYRAMID_FACTOR,
    Finished,
    resolve_formats,
    tag_georef,
)
from tilenet.outputs.resume import ResumeKey
from tilenet.outputs.sink import OutputSink

__all__ = [
    "BASE_STORES",
    "CLASSES_NODATA",
    "GEOREF_KEY",
    "STATE_DIR",
    "Finished",
    "OutputSet",
    "planned_bytes",
    "reclaimable_bytes",
    "stores_for",
    "tag_georef",
]

log = logging.getLogger(__name__)

#: Resume state beside the outputs (removed when the outputs are complete).
STATE_DIR = ".tilenet"
_KEY_FILE = "key.json"
#: The level-0 stores, in the order they are finalized, and how their pyramids downsample.
_METHODS = {"probabilities": "mean", "classes": "mode"}
#: Stores every run writes: the class map (the summary's class areas come with it).
BASE_STORES = frozenset({"classes"})


def stores_for(formats: Sequence[str]) -> list[str]:
    """The level-0 stores a run of ``formats`` writes: those the formats read, and
    :data:`BASE_STORES`.

    >>> stores_for(["probabilities_tif"]), stores_for(["preview"])
    (['probabilities', 'classes'], ['classes'])
    """
    need = set(BASE_STORES).union(*(FORMATS[f].needs for f in resolve_formats(formats)))
    return [n for n in _METHODS if n in need]


def planned_bytes(
    shape: tuple[int, int],
    num_classes: int,
    formats: Sequence[str],
    probabilities_dtype: str,
    *,
    georeferenced: bool,
) -> int:
    """Uncompressed bytes of a run's outputs: its level-0 stores with their pyramids (the
    class map as uint8, the probabilities when written) and the files of each format
    (:meth:`~tilenet.outputs.formats.OutputFormat.bytes_per_px`). An upper bound on the
    stores and rasters, which are compressed; vectors are not counted.

    >>> planned_bytes((1000, 1000), 3, ["preview"], "float16", georeferenced=False)
    1333333
    >>> planned_bytes((1000, 1000), 3, ["probabilities"], "float16", georeferenced=False)
    9333333
    >>> planned_bytes((1000, 1000), 3, ["classes", "instances"], "float16", georeferenced=True)
    9333333
    """
    import numpy as np

    names = resolve_formats(formats)
    per_px = 1.0  # the class map
    if "probabilities" in stores_for(names):
        per_px += num_classes * np.dtype(probabilities_dtype).itemsize
    per_px *= PYRAMID_FACTOR
    for name in names:
        per_px += FORMATS[name].bytes_per_px(num_classes, georeferenced=georeferenced)
    return int(int(shape[0]) * int(shape[1]) * per_px)


def reclaimable_bytes(out: Location) -> int:
    """Bytes a run into a local ``out`` may count as its own: the level-0 stores and resume
    state (work a resumed run keeps, or a new run removes) and the leftovers of killed runs
    (half-written files, scratch) that :meth:`OutputSet.prepare` removes. 0 in a bucket.
    """
    if out.local is None or not out.local.is_dir():
        return 0
    stores = {f"{s}.ome.zarr" for s in _METHODS}
    return sum(
        _usage(entry)
        for entry in out.local.iterdir()
        if entry.name in stores or entry.name == STATE_DIR or _leftover(entry.name)
    )


def _leftover(name: str) -> bool:
    """Whether ``name`` in an output is a killed run's half-written file or scratch."""
    return ".partial-" in name or name.startswith(".scratch-")


def _usage(path: Path) -> int:
    """Disk blocks in use under ``path`` (a file or a folder), in bytes; links not followed."""
    files = [path] if not path.is_dir() else [Path(r, f) for r, _, fs in os.walk(path) for f in fs]
    total = 0
    for file in files:
        with contextlib.suppress(OSError):  # removed meanwhile
            total += file.lstat().st_blocks * 512
    return total


def _config_text(summary: dict[str, Any], cfg: InferConfig, sections: dict[str, Any] | None) -> str:
    """The resolved config of one run, as ``config.yaml`` beside its outputs: the sections it
    ran with (reader limits, the pixel size it ran at), then ``infer``; a comment names the
    model. ``tilenet infer IMG conf=config.yaml --model M`` repeats the run. Like
    :func:`_summary_text`, no URL in it keeps its credentials."""
    text = to_yaml({**(sections or {}), "infer": cfg})
    if summary.get("model"):
        text += f"# model: {summary['model']}\n"
    return scrub_credentials(text)


def _summary_text(summary: dict[str, Any]) -> str:
    """``summary.json``'s text, without credentials in any URL it names (an input as given)."""
    return scrub_credentials(json.dumps(summary, indent=2)) + "\n"


def _store(out: Location, name: str) -> Location:
    return out.child(f"{name}.ome.zarr")


def _level0(out: Location, name: str, *, read_only: bool) -> Any:
    import zarr

    store = _store(out, name).child("0").zarr_store(read_only=read_only)
    return zarr.open_array(store, mode="r" if read_only else "r+")


def _read_level0(out: Location, name: str) -> Any:
    import zarr

    return zarr.open_array(out.local_copy(f"{name}.ome.zarr/0"), mode="r")


@dataclass
class OutputSet:
    """The stores and resume state of one image's inference in ``out`` (plain data: picklable).

    Made by :meth:`prepare`. ``formats`` are the formats to write (with those they read), in
    the order they are written; ``stores`` the level-0 stores.
    """

    out: Location
    key: ResumeKey
    formats: tuple[str, ...]
    stores: tuple[str, ...]
    class_names: tuple[str, ...]
    probabilities_dtype: str
    pixel_size: tuple[float, float] | None
    #: Band indices whose markers were found valid when prepared (work a rerun keeps).
    resumed: list[int] = field(default_factory=list)

    # -- making -----------------------------------------------------------------------------
    @classmethod
    def prepare(
        cls,
        out: Location,
        *,
        key: ResumeKey,
        shape: tuple[int, int],
        chunk: int,
        class_names: Sequence[str],
        cfg: InferConfig,
        pixel_size: tuple[float, float] | None,
        bands: Sequence[tuple[int, int]],
        force: bool = False,
    ) -> OutputSet:
        """Reopen the stores of an earlier run with the same ``key``, or start anew.

        They are kept only when ``.tilenet/key.json`` equals ``key`` and every store is
        there with its shape and type; otherwise ``summary.json`` is removed first (nothing
        looks complete), then the resume state, then the stores are made anew and the key
        written last (a kill in between is discarded again next time). Leftovers of killed
        runs (half-written files, scratch) are removed.
        """
        formats = resolve_formats(cfg.outputs)
        stores = stores_for(formats)
        k = len(class_names)
        dtypes: dict[str, str] = {"classes": "uint8", "probabilities": cfg.probabilities_dtype}
        shapes = {"classes": tuple(shape), "probabilities": (k, *shape)}
        state = out.child(STATE_DIR)
        same = not force and key.matches(state.read_json(_KEY_FILE))
        for name in stores if same else ():
            try:
                arr = _level0(out, name, read_only=True)
            except Exception:  # missing or torn: start over
                same = False
                break
            if tuple(arr.shape) != shapes[name] or str(arr.dtype) != dtypes[name]:
                same = False
                break
        if not same:
            _start_over(out, stores, shapes, dtypes, chunk)
            state.write_bytes(_KEY_FILE, json.dumps(key.to_dict(), sort_keys=True).encode())
        for name in out.names():  # e.g. a half-written OME-TIFF of a finalize that was killed
            if _leftover(name):
                out.remove(name)
        outputs = cls(
            out=out,
            key=key,
            formats=tuple(formats),
            stores=tuple(stores),
            class_names=tuple(str(n) for n in class_names),
            probabilities_dtype=cfg.probabilities_dtype,
            pixel_size=pixel_size,
        )
        outputs.resumed = [i for i, rows in enumerate(bands) if outputs.band_record(i, rows)]
        return outputs

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def url(self) -> str:
        """Where the outputs are (a folder or a URL)."""
        return self.out.url

    # -- bands ------------------------------------------------------------------------------
    def sink(self) -> OutputSink:
        """A sink writing into the level-0 stores (any process may hold one per band)."""
        has = "probabilities" in self.stores
        return OutputSink(
            num_classes=self.num_classes,
            probabilities=_level0(self.out, "probabilities", read_only=False) if has else None,
            classes=_level0(self.out, "classes", read_only=False),
            probabilities_dtype=self.probabilities_dtype,
        )

    def spill_dir(self) -> str:
        """Local scratch for blend modes (removed by the next prepare or by publish)."""
        return str(self.out.scratch() / "spill")

    def spill_store(self) -> Any:
        """A zarr store for blend modes' spilled sums that outlives a kill (in ``.tilenet/``,
        removed with the resume state)."""
        return self.out.child(STATE_DIR, "spill").zarr_store(read_only=False)

    def band_record(self, band: int, rows: tuple[int, int]) -> dict[str, Any] | None:
        """The record of a finished band computed under this set's key, or None."""
        rec = self.out.child(STATE_DIR).read_json(_marker(band))
        if rec is None or not self.key.matches(rec.get("key")) or rec.get("rows") != list(rows):
            return None
        return rec

    def mark_band(self, band: int, record: dict[str, Any]) -> None:
        """Record a finished band; call only when all of its chunks are written."""
        data = json.dumps({**record, "key": self.key.to_dict()}).encode()
        state = self.out.child(STATE_DIR)
        state.write_bytes(_marker(band), data)
        if int(record.get("steps", 1)) > 1:  # run in steps: its progress marker goes
            state.remove(_progress(band))

    def band_progress(self, band: int, rows: tuple[int, int]) -> dict[str, Any] | None:
        """The record of the rows of an unfinished band written so far under this set's key
        (``done``: the next row to run; in blend modes ``added`` and ``restart``), or None."""
        rec = self.out.child(STATE_DIR).read_json(_progress(band))
        if rec is None or not self.key.matches(rec.get("key")) or rec.get("rows") != list(rows):
            return None
        if "restart" in rec:  # blend modes: positions in the tile order (engine.blendsteps)
            return rec
        done = rec.get("done")
        return rec if isinstance(done, int) and rows[0] < done < rows[1] else None

    def mark_progress(self, band: int, record: dict[str, Any]) -> None:
        """Record the rows of band ``band`` written so far (``record["done"]``: the next row
        to run); call only when all of their chunks are written."""
        data = json.dumps({**record, "key": self.key.to_dict()}).encode()
        self.out.child(STATE_DIR).write_bytes(_progress(band), data)

    def band_records(self, bands: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """The records of all ``bands``; an error when one is missing."""
        records = []
        for i, rows in enumerate(bands):
            rec = self.band_record(i, rows)
            if rec is None:
                raise InputError(f"{self.url}: band {i} (rows {rows}) is not finished; rerun")
            records.append(rec)
        return records

    def abandon(self) -> int:
        """After a failed run (an exception; a SIGKILL leaves all to the next prepare):
        remove this process's temporaries (scratch, ``.partial-PID`` files), and the stores
        and resume state too when no band or step was recorded, so nothing is left that a
        rerun would keep. Returns the number of bands and steps kept for a rerun (said in a
        log line). Never raises: a failure here is logged, not put over the run's own error.
        """
        try:
            remove_path(self.out.scratch())
            mine = f".partial-{os.getpid()}"
            for name in self.out.names():
                if mine in name:
                    self.out.remove(name)
            state = self.out.child(STATE_DIR)
            kept = sum(n.startswith(("region-", "progress-")) for n in state.names())
            if not kept:
                for name in self.stores:
                    _store(self.out, name).remove()
                _drop_state(self.out)
        except Exception as exc:
            log.warning("%s: could not clean up after the failure: %s", self.url, one_line(exc))
            return 0
        if kept:
            log.warning("%s: finished work kept; the same command resumes it", self.url)
        return kept

    # -- finalize and publish ---------------------------------------------------------------
    def finalize_store(self, name: str) -> Any:
        """Build the pyramid of store ``name`` and write its OME metadata (last); its zarr
        store. Done again, it gives the same store (level 0 is never changed)."""
        import zarr

        from tilenet.io.writers import finish_ome_zarr

        store = _store(self.out, name).zarr_store(read_only=False)
        finish_ome_zarr(
            zarr.open_group(store, mode="r+", zarr_format=2),
            method=_METHODS[name],  # type: ignore[arg-type]
            pixel_size=self.pixel_size,
            name=name,
            channel_names=list(self.class_names) if name == "probabilities" else None,
        )
        return store

    def finalize(
        self, image: Any, cfg: InferConfig, *, downsample: tuple[float, float]
    ) -> Finished:
        """Each store's pyramid, OME metadata and georeferencing, then every format's files
        (``image`` as run; ``downsample``: of the level run, for the georeferencing).

        Run again after a kill, it makes the same files again (level 0 is never changed).
        """
        transform = None
        if getattr(image, "transform", None) is not None:
            transform = GeoTransform(*image.transform).scaled(downsample)
        crs = getattr(image, "crs", None)
        outputs: dict[str, str] = {}
        for name in self.stores:
            store = self.finalize_store(name)
            if transform is not None:
                tag_georef(store, crs, transform)
            if name == "classes" and getattr(image, "masked", False):
                _tag_nodata(store)
            outputs[name] = _store(self.out, name).url
        done = Finished(
            out=self.out,
            image=image,
            config=cfg,
            class_names=list(self.class_names),
            # Read by several formats: from local disk (a bucket's copied once).
            stores={n: _read_level0(self.out, n) for n in self.stores},
            transform=transform,
            crs=crs,
            pixel_size=self.pixel_size,
            seed=self.key.seed,
            stage=self.out.scratch() / "stage",
            outputs=outputs,
        )
        for name in self.formats:
            done.outputs.update(FORMATS[name].write(done, self.out))
        return done

    def publish(
        self, summary: dict[str, Any], cfg: InferConfig, sections: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write ``config.yaml`` (``sections``, e.g. reader and resolution, then ``infer``),
        then ``summary.json`` (last: it marks the outputs complete), then drop the resume
        state and the scratch space."""
        summary["outputs"]["config"] = self.out.join("config.yaml")
        summary["outputs"]["summary"] = self.out.join("summary.json")
        self.out.write_bytes("config.yaml", _config_text(summary, cfg, sections).encode())
        self.out.write_bytes("summary.json", _summary_text(summary).encode())
        _drop_state(self.out)
        remove_path(self.out.scratch())
        return summary


def _tag_nodata(store: Any) -> None:
    """Record :data:`CLASSES_NODATA` as the class store's nodata value (in its
    :data:`GEOREF_KEY` attribute, where tilenet's readers look, with any georeferencing)."""
    import zarr

    group = zarr.open_group(store, mode="r+")
    geo: Any = group.attrs.get(GEOREF_KEY) or {}
    group.attrs[GEOREF_KEY] = {**geo, "nodata": CLASSES_NODATA}


def _drop_state(out: Location) -> None:
    """Remove the resume state in ``.tilenet/``, never the writer's lock or lease kept there
    (:data:`tilenet.io.lock.HOLDER_FILES`): removing the folder unlinked the lock under its
    holder, and a second run started together then took a new one and wrote beside it."""
    state = out.child(STATE_DIR)
    names = state.names()
    if not any(n in HOLDER_FILES for n in names):
        out.remove(STATE_DIR)
        return
    for name in names:
        if name not in HOLDER_FILES:
            state.remove(name)


def _marker(band: int) -> str:
    return f"region-{band:05d}.json"


def _progress(band: int) -> str:
    return f"progress-{band:05d}.json"


def _start_over(
    out: Location,
    stores: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    chunk: int,
) -> None:
    """``summary.json`` removed, then the resume state, then empty level-0 stores made."""
    from tilenet.io.writers import create_ome_zarr

    out.remove("summary.json")  # from here on ``out`` is not complete
    _drop_state(out)
    remove_path(out.scratch())
    for name in stores:
        _store(out, name).remove()
        create_ome_zarr(
            _store(out, name).zarr_store(read_only=False),
            shape=shapes[name],
            dtype=dtypes[name],
            axes="yx" if name == "classes" else "cyx",
            chunks=chunk,  # chunk = tile core: a band of rows owns its chunks
        )
