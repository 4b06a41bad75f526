"""The outputs of one image's inference: created, reopened to resume, finalized, summarised.

:class:`OutputSet` owns everything an inference run writes into its output directory:

* the level-0 stores (``classes.ome.zarr``, ``probabilities.ome.zarr``), written under
  temporary names (``.classes.ome.zarr.partial-PID``) and renamed into place only when
  complete, so nothing half-written ever looks finished;
* the resume state in ``.regions/``: ``key.json`` (what the partial stores were computed
  from: input fingerprint, model checksum, options, band layout) and one marker per finished
  band of grid rows (``region-NNNNN.json``), written atomically only after all of the band's
  chunks are on disk;
* finalize: pyramids, renames, the OME-TIFF, preview, instances and GeoJSON made from the
  finished class map (and for a georeferenced input ``classes.tif``, a Cloud-Optimized
  GeoTIFF in the input's CRS, the georeferencing in every OME-Zarr store's
  :data:`GEOREF_KEY` attribute, the instances also as ``instances.gpkg`` in that CRS),
  then ``config.yaml`` and ``summary.json``, and the resume state removed.

The output chunks are the grid's cores, so bands of whole grid rows write disjoint chunks:
any number of processes may fill the same partial stores without locks (batch jobs on dask).
A killed run leaves partial stores and markers; the next :meth:`OutputSet.prepare` with the
same key keeps them and only the missing bands run again. With another key everything
partial is discarded first.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilenet.config import InferConfig, to_yaml
from tilenet.errors import ImageNotFoundError, InputError, TilenetError, scrub_credentials
from tilenet.fsutil import remove_path, write_text_atomic
from tilenet.io.storage import is_url
from tilenet.io.writers import OmeZarrWriter, write_ome_tiff, write_preview_png
from tilenet.outputs.sink import OutputSink

__all__ = [
    "CLASSES_NODATA",
    "GEOREF_KEY",
    "REMOTE_STATE",
    "STATE_DIR",
    "Finalized",
    "OutputSet",
    "RemoteOutputSet",
    "tag_georef",
]

#: Resume state beside the outputs (removed when the outputs are complete).
STATE_DIR = ".regions"
_KEY_FILE = "key.json"
#: The class value of ``classes.tif`` pixels where the input had no data.
CLASSES_NODATA = 255
#: The attribute of a georeferenced input's OME-Zarr outputs holding their georeferencing:
#: ``crs`` (WKT), ``epsg`` (or null), ``transforms`` (per level path, GDAL order).
GEOREF_KEY = "tilenet:georef"
#: How each store's pyramid levels are downsampled.
_METHODS = {"probabilities": "mean", "classes": "mode"}


@dataclass(frozen=True)
class Finalized:
    """What :meth:`OutputSet.finalize` made."""

    #: Output name -> path.
    paths: dict[str, Path]
    #: Instance counts (None when instances were not made).
    instances: dict[str, Any] | None
    #: Pixels of ``classes.tif`` per value (georeferenced inputs only; index
    #: :data:`CLASSES_NODATA` counts the input's nodata area), else None.
    geotiff_histogram: Any = None
    #: Class regions written (:func:`tilenet.outputs.regions.write_class_regions`), else None.
    regions: dict[str, Any] | None = None
    #: Seconds spent writing the Cloud-Optimized GeoTIFFs (classes.tif, probabilities.tif).
    cog_s: float = 0.0


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


@dataclass
class OutputSet:
    """The stores and resume state of one image's inference in ``out`` (plain data: picklable).

    Made by :meth:`prepare`; ``stores`` maps each store name to where it is now (its partial
    temporary path, or its final path when a killed finalize had already renamed it).
    """

    out: str
    key: dict[str, Any]
    stores: dict[str, str]
    num_classes: int
    probabilities_dtype: str
    #: Band indices whose markers were found valid when prepared (work a rerun keeps).
    resumed: list[int] = field(default_factory=list)

    # -- making -----------------------------------------------------------------------------
    @classmethod
    def prepare(
        cls,
        out: str | os.PathLike[str],
        *,
        key: dict[str, Any],
        shape: tuple[int, int],
        chunk: int,
        class_names: Sequence[str],
        cfg: InferConfig,
        pixel_size: tuple[float, float] | None,
        bands: Sequence[tuple[int, int]],
        force: bool = False,
    ) -> OutputSet:
        """Reopen the partial outputs of an earlier run with the same ``key``, or start anew.

        The partial state is reused only when ``key.json`` equals ``key`` and every store is
        there, untouched by a finalize; otherwise markers and stores are discarded first
        (key file first, so a kill here leaves state that is discarded again next time). A
        store that a killed finalize already renamed into place (its ``finalized-<name>``
        marker is there, its partial gone) counts as finished. Leftovers of other runs
        (older partial stores, spill directories) are removed. A URL ``out`` gets a
        :class:`RemoteOutputSet`.
        """
        if cls is OutputSet and is_url(out):
            return RemoteOutputSet.prepare(
                out, key=key, shape=shape, chunk=chunk, class_names=class_names, cfg=cfg,
                pixel_size=pixel_size, bands=bands, force=force,
            )  # fmt: skip
        outp = Path(out)
        state = outp / STATE_DIR
        key_file = state / _KEY_FILE
        probs = {"probabilities", "probabilities_tif"} & set(cfg.outputs)
        names = ["classes"] + (["probabilities"] if probs else [])
        finals = {n: outp / f"{n}.ome.zarr" for n in names}
        same = (
            not force and key_file.is_file() and _read_json(key_file) == json.loads(json.dumps(key))
        )
        writers: dict[str, OmeZarrWriter] = {}
        finished: dict[str, Path] = {}
        if same:
            for name, final in finals.items():
                w = OmeZarrWriter.open_partial(final)
                if w is None and (state / f"finalized-{name}").is_file() and final.exists():
                    finished[name] = final  # renamed into place by a finalize killed later on
                    continue
                if w is None or not w.resumable:
                    same = False
                    break
                writers[name] = w
        if same and finished and len(list(state.glob("region-*.json"))) < len(bands):
            same = False  # band markers went missing after finalize began: start over
        if not same:
            finished = {}
            remove_path(key_file)
            remove_path(state)
            for final in finals.values():
                w = OmeZarrWriter.open_partial(final)
                if w is not None:
                    w.abort()
            k = len(class_names)
            writers = {
                "classes": OmeZarrWriter(
                    finals["classes"],
                    shape=shape,
                    dtype="uint8",
                    axes="yx",
                    chunks=chunk,  # chunk = tile core: a band of rows owns its chunks
                    pixel_size=pixel_size,
                    name="classes",
                    overwrite=True,
                    resumable=True,
                )
            }
            if "probabilities" in finals:
                writers["probabilities"] = OmeZarrWriter(
                    finals["probabilities"],
                    shape=(k, *shape),
                    dtype=cfg.probabilities_dtype,
                    axes="cyx",
                    chunks=chunk,
                    pixel_size=pixel_size,
                    name="probabilities",
                    channel_names=[str(n) for n in class_names],
                    overwrite=True,
                    resumable=True,
                )
            state.mkdir(parents=True, exist_ok=True)
            write_text_atomic(key_file, json.dumps(key, sort_keys=True))
        keep = {w.tmp.name for w in writers.values()}
        for p in outp.iterdir():  # e.g. a half-written OME-TIFF of a finalize that was killed
            if (".partial-" in p.name and p.name not in keep) or p.name.startswith(".infer-spill-"):
                remove_path(p)
        outputs = cls(
            out=str(outp),
            key=key,
            stores={
                **{n: str(p) for n, p in finished.items()},
                **{n: str(w.tmp) for n, w in writers.items()},
            },
            num_classes=len(class_names),
            probabilities_dtype=cfg.probabilities_dtype,
        )
        outputs.resumed = [i for i, rows in enumerate(bands) if outputs.band_record(i, rows)]
        return outputs

    # -- bands ------------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return Path(self.out) / STATE_DIR

    def _marker(self, band: int) -> Path:
        return self.state_dir / f"region-{band:05d}.json"

    def sink(self) -> OutputSink:
        """A sink writing into the partial stores (any process may hold one per band)."""
        import zarr

        probs = self.stores.get("probabilities")
        return OutputSink(
            num_classes=self.num_classes,
            probabilities=zarr.open_array(Path(probs) / "0", mode="r+") if probs else None,
            classes=zarr.open_array(Path(self.stores["classes"]) / "0", mode="r+"),
            probabilities_dtype=self.probabilities_dtype,
        )

    def spill_dir(self) -> Path:
        """Scratch space for blend modes (removed by the next prepare or by finalize)."""
        return Path(self.out) / f".infer-spill-{os.getpid()}"

    def band_record(self, band: int, rows: tuple[int, int]) -> dict[str, Any] | None:
        """The record of a finished band computed under this set's key, or None."""
        marker = self._marker(band)
        if not marker.is_file():
            return None
        rec = _read_json(marker)
        if rec.get("key") != json.loads(json.dumps(self.key)) or rec.get("rows") != list(rows):
            return None
        return rec

    def mark_band(self, band: int, record: dict[str, Any]) -> None:
        """Record a finished band; call only when all of its chunks are written."""
        write_text_atomic(self._marker(band), json.dumps({**record, "key": self.key}))

    def band_records(self, bands: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """The records of all ``bands``; an error when one is missing."""
        records = []
        for i, rows in enumerate(bands):
            rec = self.band_record(i, rows)
            if rec is None:
                raise InputError(f"{self.out}: band {i} (rows {rows}) is not finished; rerun")
            records.append(rec)
        return records

    # -- finalize ---------------------------------------------------------------------------
    def finalize_store(self, name: str) -> Path:
        """Pyramid + rename of one partial store, once: a marker says it is done.

        The marker is written before the rename: killed in between, the partial store is
        still there and is finalized again (:func:`build_pyramid` replaces levels >= 1).
        """
        final = Path(self.out) / f"{name}.ome.zarr"
        marker = self.state_dir / f"finalized-{name}"
        w = OmeZarrWriter.open_partial(final)
        if w is None:
            if marker.is_file() and final.exists():
                return final
            raise InputError(f"{self.out}: partial {name} store vanished; rerun")
        write_text_atomic(marker, "")
        return w.finalize(method=_METHODS[name])  # type: ignore[arg-type]

    def finalize(
        self,
        image: Any,
        cfg: InferConfig,
        *,
        class_names: Sequence[str],
        downsample: tuple[float, float],
        pixel_size: tuple[float, float] | None,
    ) -> Finalized:
        """Pyramids and renames, then the OME-TIFF, preview, instances and GeoJSON; for a
        georeferenced ``image`` also ``classes.tif``, a COG in its CRS."""
        import zarr

        out = Path(self.out)
        paths: dict[str, Path] = {}
        transform = None
        geotiff_histogram = None
        cog_s = 0.0
        if getattr(image, "transform", None) is not None:
            from tilenet.io.raster import scaled_transform

            transform = scaled_transform(image.transform, downsample)
        for name in ("probabilities", "classes"):
            if name in self.stores:
                paths[name] = self.finalize_store(name)
                if transform is not None:
                    tag_georef(paths[name], image.crs, transform)
        want = set(cfg.outputs)
        classes = zarr.open_group(paths["classes"], mode="r")
        if "classes" in want:
            paths["classes_tiff"] = write_ome_tiff(
                out / "classes.ome.tif",
                classes["0"],
                axes="yx",
                compression="zlib",
                method="mode",
                pixel_size=pixel_size,
            )
            if transform is not None:
                t_cog = time.perf_counter()
                geotiff_histogram = np.zeros(256, dtype=np.int64)
                paths["classes_geotiff"] = _write_classes_cog(
                    out,
                    classes["0"],
                    image,
                    cfg.level,
                    transform,
                    self.num_classes,
                    geotiff_histogram,
                )
                cog_s += time.perf_counter() - t_cog
        if "probabilities_tif" in want:
            t_cog = time.perf_counter()
            probs = zarr.open_group(paths["probabilities"], mode="r")["0"]
            paths["probabilities_geotiff"] = _write_probabilities_cog(
                out, probs, image, cfg.level, transform, class_names
            )
            cog_s += time.perf_counter() - t_cog
        if "preview" in want:
            # The overlay needs the image at the inferred level; only level 0 is addressable
            # as its own source, so other levels preview the class map alone.
            base = image if cfg.level == 0 else classes["0"]
            paths["preview"] = write_preview_png(out / "preview.png", base, overlay=classes["0"])
        result = None
        if want & {"instances", "geojson"}:
            from tilenet.outputs import instances

            result = instances.label_instances(
                classes["0"],
                out / "instances.ome.zarr",
                foreground=range(1, len(class_names)),
                chunk=cfg.chunk,
            )
            paths["instances"] = out / "instances.ome.zarr"
            if transform is not None:
                tag_georef(paths["instances"], image.crs, transform)
            if "geojson" in want and transform is not None:
                crs = image.crs
                instances.write_geojson(
                    paths["instances"],
                    out / "instances.geojson",
                    seed=f"{self.key.get('fingerprint')}:{self.key.get('model_checksum')}",
                    class_names=list(class_names),
                    transform=transform,
                    crs=crs,
                    wgs84=cfg.geojson_crs == "wgs84" and bool(crs),
                )
                instances.write_geopackage(
                    paths["instances"],
                    out / "instances.gpkg",
                    transform=transform,
                    crs=crs,
                    class_names=list(class_names),
                )
                paths["geojson"] = out / "instances.geojson"
                paths["geopackage"] = out / "instances.gpkg"
            elif "geojson" in want:
                # Level-0 pixels of the file (QuPath's frame), whatever level or pixel size
                # (a resampled view: tilenet.io.resolution) inference ran at.
                pt = image.pixel_transform(cfg.level)
                iso = abs(pt[1] - pt[5]) <= 1e-9 * abs(pt[5]) and pt[0] == pt[3] == 0
                instances.write_geojson(
                    paths["instances"],
                    out / "instances.geojson",
                    seed=f"{self.key.get('fingerprint')}:{self.key.get('model_checksum')}",
                    class_names=list(class_names),
                    downsample=float(pt[5]) if iso else 1,
                    transform=None if iso else pt,
                )
                paths["geojson"] = out / "instances.geojson"
        regions = None
        if want & {"geojson", "regions"}:
            regions = _write_regions(
                out, classes["0"], image, cfg, transform, class_names, self.key
            )
            paths["classes_geojson"] = out / "classes.geojson"
            if transform is not None:
                paths["classes_geopackage"] = out / "classes.gpkg"
        return Finalized(paths, result, geotiff_histogram, regions, cog_s)

    def publish(
        self, summary: dict[str, Any], cfg: InferConfig, sections: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write ``config.yaml`` (``sections``, e.g. reader and resolution, then ``infer``) and
        ``summary.json``, then drop the resume state."""
        out = Path(self.out)
        summary["outputs"]["config"] = str(out / "config.yaml")
        summary["outputs"]["summary"] = str(out / "summary.json")
        write_text_atomic(out / "config.yaml", _config_text(summary, cfg, sections))
        write_text_atomic(out / "summary.json", _summary_text(summary))
        remove_path(self.state_dir)
        remove_path(self.spill_dir())
        return summary


def tag_georef(store: str | os.PathLike[str], crs: str | None, transform: Sequence[float]) -> None:
    """Record the georeferencing of an OME-Zarr store in its :data:`GEOREF_KEY` attribute.

    ``transform`` is the GDAL-order geotransform of level 0; each level of the store's
    ``multiscales`` gets it scaled by that level's scale relative to level 0.
    """
    import zarr

    from tilenet.io.raster import describe_georef, scaled_transform

    group = zarr.open_group(store, mode="r+")
    ms: Any = group.attrs.get("multiscales") or [{"datasets": [{"path": "0"}]}]
    datasets = ms[0]["datasets"]

    def scale(d: dict[str, Any]) -> list[float]:
        ct = d.get("coordinateTransformations") or [{"scale": [1.0, 1.0]}]
        return [float(v) for v in ct[0].get("scale", [1.0, 1.0])[-2:]]

    base = scale(datasets[0])
    levels = {}
    for d in datasets:
        sy, sx = scale(d)
        levels[str(d["path"])] = list(
            scaled_transform(tuple(transform), (sy / base[0], sx / base[1]))
        )
    group.attrs[GEOREF_KEY] = {
        "crs": crs,
        "epsg": describe_georef(crs, None)["epsg"],
        "transform_order": "gdal",
        "transforms": levels,
    }


def _write_classes_cog(
    out: Path,
    classes: Any,
    image: Any,
    level: int,
    transform: tuple[float, ...],
    num_classes: int,
    histogram: Any,
) -> Path:
    """``classes.tif``: the class map as a COG in the input's CRS, scaled to the level run.

    Where the input declares nodata, pixels whose bands are all nodata get
    :data:`CLASSES_NODATA` (the COG's nodata value) instead of a class.
    """
    from tilenet.io.raster import write_cog

    nodata = image.nodata

    def missing(window: Any) -> Any:
        pixels = image.read(window, level, fill=nodata)
        none = np.isnan(pixels) if np.isnan(nodata) else pixels == nodata
        return np.all(none, axis=-1)

    mask = missing if nodata is not None and num_classes <= CLASSES_NODATA else None
    return write_cog(
        out / "classes.tif",
        classes,
        crs=image.crs,
        transform=transform,
        nodata=CLASSES_NODATA if mask is not None else None,
        nodata_mask=mask,
        histogram=histogram,
        resampling="mode",
    )


def _write_regions(
    out: Path,
    classes: Any,
    image: Any,
    cfg: InferConfig,
    transform: tuple[float, ...] | None,
    class_names: Sequence[str],
    key: dict[str, Any],
) -> dict[str, Any]:
    """``classes.geojson`` (QuPath annotations; for a georeferenced image in its CRS or in
    WGS84) and, georeferenced, ``classes.gpkg`` in its CRS: the merged class regions.

    A georeferenced image's regions come from ``classes.tif`` where it was written, so its
    nodata area is no region and the polygons overlay it exactly.
    """
    from tilenet.outputs import regions

    seed = f"{key.get('fingerprint')}:{key.get('model_checksum')}"
    source: Any = classes
    if transform is None:
        return regions.write_class_regions(
            classes,
            out / "classes.geojson",
            transform=image.pixel_transform(cfg.level),
            class_names=class_names,
            seed=seed,
        )
    if (out / "classes.tif").is_file() and "classes" in cfg.outputs:
        source = out / "classes.tif"
    return regions.write_class_regions(
        source,
        out / "classes.geojson",
        transform=transform,
        class_names=class_names,
        skip=(0, CLASSES_NODATA),
        crs=image.crs,
        wgs84=cfg.geojson_crs == "wgs84" and bool(image.crs),
        vector=out / "classes.gpkg",
        seed=seed,
    )


class _ProbabilityBytes:
    """A (k, H, W) probabilities store read as uint8 0..254 (p * 254; 255 is nodata)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.shape = tuple(store.shape)
        self.dtype = np.dtype("uint8")

    def __getitem__(self, key: Any) -> np.ndarray:
        p = np.asarray(self.store[key], dtype=np.float32)
        if self.store.dtype == np.uint8:
            p /= 255.0
        return np.clip(np.rint(p * 254.0), 0, 254).astype(np.uint8)


def _write_probabilities_cog(
    out: Path,
    probabilities: Any,
    image: Any,
    level: int,
    transform: tuple[float, ...] | None,
    class_names: Sequence[str],
) -> Path:
    """``probabilities.tif``: one band per class, a COG in the input's CRS (if it has one).

    Stored as uint8 ``round(p * 254)`` with a GDAL band scale of 1/254 (GDAL, QGIS and
    ``rasterio``'s ``scales`` read back p), so 255 is free for nodata: pixels where the
    input declares nodata get 255 in every band. uint8 and not float16, which GDAL's COG
    driver does not write; a quarter of float32's size. Overviews are averages; deflate at
    level 1 (measured on 4096² x 3 classes: 0.6 CPU s against 2.4 s at GDAL's default 6, 5
    against 4 MB).
    """
    from tilenet.io.raster import write_cog

    nodata = getattr(image, "nodata", None)

    def missing(window: Any) -> Any:
        nd = float(nodata)  # type: ignore[arg-type]
        pixels = image.read(window, level, fill=nd)
        none = np.isnan(pixels) if np.isnan(nd) else pixels == nd
        return np.all(none, axis=-1)

    with warnings.catch_warnings():
        if transform is None:  # a plain image's COG: pixels only, as asked
            from rasterio.errors import NotGeoreferencedWarning

            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return write_cog(
            out / "probabilities.tif",
            _ProbabilityBytes(probabilities),
            crs=getattr(image, "crs", None),
            transform=transform,
            nodata=CLASSES_NODATA if nodata is not None else None,
            nodata_mask=missing if nodata is not None else None,
            resampling="average",
            band_names=[str(n) for n in class_names],
            scale=1 / 254,
            level=1,  # noisy probabilities: deflate 1 is ~4x faster than 6, ~20 % larger
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# -- outputs in object storage ------------------------------------------------------------------
#: Resume state of a URL ``out`` (partial level-0 stores, key, band markers), under the output.
REMOTE_STATE = ".partial"


@dataclass
class RemoteOutputSet(OutputSet):
    """:class:`OutputSet` for a URL ``out`` (``s3://bucket/run``): object stores cannot rename.

    The level-0 stores are zarr arrays under ``out/.partial/`` written chunk by chunk by any
    worker (disjoint chunks per band, as locally), with ``key.json`` and the band markers
    beside them (an object appears whole or not at all, so a marker is atomic). Finalize
    copies the level-0 stores into a local temporary directory, makes every output there
    exactly as a local run does, and :meth:`publish` uploads them, ``summary.json`` last:
    ``summary.json`` is what marks ``out`` complete, so it is removed before anything is
    replaced. The resume state is removed only after the summary is up.
    """

    #: The local directory finalize made the outputs in (set by :meth:`finalize`).
    stage: str | None = None

    @classmethod
    def prepare(
        cls,
        out: str | os.PathLike[str],
        *,
        key: dict[str, Any],
        shape: tuple[int, int],
        chunk: int,
        class_names: Sequence[str],
        cfg: InferConfig,
        pixel_size: tuple[float, float] | None,
        bands: Sequence[tuple[int, int]],
        force: bool = False,
    ) -> RemoteOutputSet:
        """Reopen the partial state under ``out/.partial/`` made with an equal ``key``, or
        start anew (then an old ``summary.json`` is removed first: nothing looks complete)."""
        import zarr

        from tilenet.io.storage import join, read_bytes, remove, write_bytes, zarr_store

        url = str(out).rstrip("/")
        state = join(url, REMOTE_STATE)
        names = ["classes"] + (["probabilities"] if "probabilities" in cfg.outputs else [])
        stores = {n: join(state, f"{n}.zarr") for n in names}
        same = not force and _remote_json(join(state, _KEY_FILE)) == json.loads(json.dumps(key))
        if same:
            for store in stores.values():
                try:
                    read_bytes(join(store, ".zarray"))
                except TilenetError:
                    same = False
        if not same:
            remove(join(url, "summary.json"))
            remove(state)
            k = len(class_names)
            h, w = shape
            cy, cx = min(chunk, h), min(chunk, w)
            for name, store in stores.items():
                probs = name == "probabilities"
                zarr.create_array(
                    zarr_store(store, read_only=False),
                    shape=(k, h, w) if probs else (h, w),
                    chunks=(k, cy, cx) if probs else (cy, cx),
                    dtype=np.dtype(cfg.probabilities_dtype if probs else "uint8"),
                    fill_value=0,
                    zarr_format=2,
                    overwrite=True,
                )
            write_bytes(join(state, _KEY_FILE), json.dumps(key, sort_keys=True).encode())
        outputs = cls(
            out=url,
            key=key,
            stores=stores,
            num_classes=len(class_names),
            probabilities_dtype=cfg.probabilities_dtype,
        )
        outputs.resumed = [i for i, rows in enumerate(bands) if outputs.band_record(i, rows)]
        return outputs

    def _marker_url(self, band: int) -> str:
        from tilenet.io.storage import join

        return join(self.out, REMOTE_STATE, f"region-{band:05d}.json")

    def sink(self) -> OutputSink:
        """A sink writing into the partial stores in the bucket."""
        import zarr

        from tilenet.io.storage import zarr_store

        probs = self.stores.get("probabilities")
        return OutputSink(
            num_classes=self.num_classes,
            probabilities=(
                zarr.open_array(zarr_store(probs, read_only=False), mode="r+") if probs else None
            ),
            classes=zarr.open_array(zarr_store(self.stores["classes"], read_only=False), mode="r+"),
            probabilities_dtype=self.probabilities_dtype,
        )

    def spill_dir(self) -> Path:
        """Local scratch for blend modes (never shared: a blended image is one task)."""
        import hashlib
        import tempfile

        tag = hashlib.sha1(self.out.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"tilenet-spill-{tag}-{os.getpid()}"

    def band_record(self, band: int, rows: tuple[int, int]) -> dict[str, Any] | None:
        rec = _remote_json(self._marker_url(band))
        if rec.get("key") != json.loads(json.dumps(self.key)) or rec.get("rows") != list(rows):
            return None
        return rec

    def mark_band(self, band: int, record: dict[str, Any]) -> None:
        from tilenet.io.storage import write_bytes

        write_bytes(self._marker_url(band), json.dumps({**record, "key": self.key}).encode())

    def finalize(
        self,
        image: Any,
        cfg: InferConfig,
        *,
        class_names: Sequence[str],
        downsample: tuple[float, float],
        pixel_size: tuple[float, float] | None,
    ) -> Finalized:
        """Every output made locally (as :meth:`OutputSet.finalize`) from a copy of the
        level-0 stores; :meth:`publish` uploads them."""
        import tempfile

        import zarr

        from tilenet.geometry import iter_blocks
        from tilenet.io.storage import join, remove, zarr_store

        remove(join(self.out, "summary.json"))  # from here on ``out`` is not complete
        stage = Path(tempfile.mkdtemp(prefix="tilenet-out-"))
        local: dict[str, str] = {}
        for name, url in self.stores.items():
            src = zarr.open_array(zarr_store(url, read_only=True), mode="r")
            probs = name == "probabilities"
            h, w = src.shape[-2:]
            writer = OmeZarrWriter(
                stage / f"{name}.ome.zarr",
                shape=tuple(src.shape),
                dtype=src.dtype,
                axes="cyx" if probs else "yx",
                chunks=int(src.chunks[-1]),
                pixel_size=pixel_size,
                name=name,
                channel_names=[str(n) for n in class_names] if probs else None,
                resumable=True,
            )
            for win in iter_blocks((h, w), (int(src.chunks[-2]), int(src.chunks[-1]))):
                block = np.asarray(src[..., win.y : win.y1, win.x : win.x1])
                writer.write(win.y, win.x, np.moveaxis(block, 0, -1) if probs else block)
            local[name] = str(writer.tmp)
        staged = OutputSet(
            out=str(stage),
            key=self.key,
            stores=local,
            num_classes=self.num_classes,
            probabilities_dtype=self.probabilities_dtype,
        )
        self.stage = str(stage)
        return staged.finalize(
            image, cfg, class_names=class_names, downsample=downsample, pixel_size=pixel_size
        )

    def publish(
        self, summary: dict[str, Any], cfg: InferConfig, sections: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Upload the staged outputs and ``config.yaml``, then ``summary.json`` (last), then
        drop the resume state in the bucket and the local stage."""
        import shutil

        from tilenet.io.storage import join, remove, upload, write_bytes

        if self.stage is None:
            raise InputError(f"{self.out}: publish before finalize")
        stage = Path(self.stage)
        prefix = str(stage)
        summary["outputs"] = {
            k: join(self.out, os.path.relpath(v, prefix)) if str(v).startswith(prefix) else v
            for k, v in summary["outputs"].items()
        }
        summary["outputs"]["config"] = join(self.out, "config.yaml")
        summary["outputs"]["summary"] = join(self.out, "summary.json")
        write_text_atomic(stage / "config.yaml", _config_text(summary, cfg, sections))
        for entry in sorted(stage.iterdir()):
            if entry.name != STATE_DIR and not entry.name.startswith("."):
                upload(entry, join(self.out, entry.name))
        write_bytes(join(self.out, "summary.json"), _summary_text(summary).encode())
        remove(join(self.out, REMOTE_STATE))
        shutil.rmtree(stage, ignore_errors=True)
        remove_path(self.spill_dir())
        return summary


def _remote_json(url: str) -> dict[str, Any]:
    from tilenet.io.storage import read_bytes

    try:
        data = json.loads(read_bytes(url))
    except (ImageNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
