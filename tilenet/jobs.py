"""Batch inference over many images, serially or on dask.distributed, with lossless resume.

``run_jobs(inputs, model, out_dir, **options)`` is what ``tilenet infer DIR|GLOB|FILE...``
runs. Each image's outputs go to ``out_dir/<stem>/`` (:func:`tilenet.fsutil.safe_stem`, made
unique when two inputs collide). ``out_dir/manifest.jsonl`` gets one line per image and run:
status (done / failed / skipped), outputs, input fingerprint, tilenet version, model checksum,
options hash, timings and the one-line error of a failure. Only the client writes it.

Rerunning skips images whose last record is done/skipped with the same fingerprint, model and
options and whose outputs all exist; failures stay failed unless ``retry_failed``; ``force``
redoes everything. A failure of one image never stops the others.

Progress is one tqdm bar over all tiles of all images (tiles/s, ETA, images done/total; on a
terminal, advanced as images and bands finish). ``log_json`` writes one JSON object per event
to stderr instead: ``start``, ``dashboard``, ``region``, ``done``, ``skipped``, ``failed``,
``end``.

Regions
-------
A crop-mode image with more than ``region_tiles`` tiles is split into bands of whole grid
rows. The output chunks are the grid's cores (see :func:`tilenet.infer.plan_grid`), so two
bands write disjoint chunks of the same partial stores: workers need no locks. A band's
marker (``<stem>/.regions/region-NNNNN.json``) is written atomically only after all its chunks
are written, and holds the job key (fingerprint + model checksum + options hash), so a
changed input, model or options invalidates the partial state. After a SIGKILL a rerun
redoes only the bands without a marker; a kill during finalize redoes only the finalize (a
store already renamed into place is kept). When all bands are done one finalize step builds the
pyramids, renames the stores into place, and makes the OME-TIFF, preview and instances from
the finished class map (instance labelling is global there, so the result equals a
single-worker run). Gaussian/linear blending writes each chunk from several tiles of
neighbouring rows, so those modes are never split (one task per image).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tilenet.errors import EXIT_OK, EXIT_PARTIAL, InputError, TilenetError
from tilenet.fsutil import atomic_output, remove_path, safe_stem

__all__ = [
    "JobItem",
    "JobReport",
    "format_report",
    "read_manifest",
    "run_jobs",
    "tile_jobs",
    "unique_stems",
]

MANIFEST = "manifest.jsonl"
_STATE_DIR = ".regions"
_KEY_FILE = "key.json"
#: Options that change how fast, not what is computed.
_NOT_HASHED = ("readers", "device")


@dataclass(frozen=True)
class JobItem:
    """One image of a batch: its input, output directory and what it will do."""

    path: str
    stem: str
    out: str


@dataclass
class JobReport:
    """What a batch did; ``exit_code`` is 0 when nothing failed, else 1."""

    out_dir: str
    manifest: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: Seconds spent starting/connecting the dask cluster (part of ``seconds``).
    cluster_start_s: float = 0.0
    dashboard: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.failed else EXIT_OK


# -- names and the manifest ------------------------------------------------------------------
def unique_stems(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``safe_stem`` of each path, with ``-2``, ``-3``... appended where names collide.

    >>> unique_stems(["a/x.tif", "b/x.tif", "c/y.png", "x-2.tif"])
    ['x', 'x-3', 'y', 'x-2']
    """
    stems = [safe_stem(Path(p).name) for p in paths]
    taken = set(stems)
    seen: set[str] = set()
    out = []
    for s in stems:
        name, i = s, 2
        while name in seen:
            while f"{s}-{i}" in taken or f"{s}-{i}" in seen:
                i += 1
            name = f"{s}-{i}"
        seen.add(name)
        out.append(name)
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The latest record per image (by input path); a torn last line (a kill) is ignored."""
    latest: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if not p.is_file():
        return latest
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "image" in rec:
            latest[str(rec["image"])] = rec
    return latest


class _Manifest:
    """Appends records, one JSON line each, flushed and fsynced (the client is the only writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # A killed run may leave a torn last line: start ours on a fresh line.
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("ab") as fh:
                fh.write(b"\n")

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, TilenetError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# -- events: progress bar, quiet, JSON logs ---------------------------------------------------
class _Events:
    """One progress display over all images and tiles, or JSON lines, or nothing."""

    def __init__(self, *, quiet: bool, log_json: bool, total_images: int) -> None:
        self.quiet, self.log_json = quiet, log_json
        self.total_images = total_images
        self.images_done = 0
        self.bar: Any = None
        # A bar redrawn with carriage returns is noise in a log file: only on a terminal.
        self.show = not quiet and not log_json and sys.stderr.isatty()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"images {self.images_done}/{self.total_images}")

    def add_tiles(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()
        elif self.show:  # made at the first work (tqdm disables itself at total=0)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, unit="tile", desc="infer", dynamic_ncols=True)
            self._postfix()

    def tiles(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def image_finished(self) -> None:
        self.images_done += 1
        self._postfix()

    def emit(self, event: str, **fields: Any) -> None:
        if self.log_json:
            rec = {"event": event, "time": round(time.time(), 3), **fields}
            print(json.dumps(rec, sort_keys=True, default=str), file=sys.stderr, flush=True)
        elif event == "dashboard" or (not self.quiet and event == "failed"):
            msg = fields.get("error") or fields.get("link")
            line = f"{event}: {fields.get('image', '')} {msg}".replace("  ", " ")
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- tasks (run on workers; every task returns data, never raises) ---------------------------
_MODELS: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {}


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _guarded(kind: str, key: Any, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a task; turn its exception into a one-line error in the result."""
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:
        return {"kind": kind, "key": key, "ok": False, "error": _one_line(exc)}
    return {
        "kind": kind,
        "key": key,
        "ok": True,
        "result": result,
        "seconds": time.perf_counter() - t0,
    }


def _task_image(
    path: str, model: str, out: str, options: dict[str, Any], threads: int | None
) -> dict[str, Any]:
    """Whole-image inference (no regions): exactly ``tilenet infer`` on one image."""
    from tilenet.infer import infer_image

    _set_threads(threads)
    return infer_image(path, model, out, **options)


def _cached_model(model: str, device: Any) -> tuple[Any, dict[str, Any]]:
    from tilenet.checkpoint import load_model

    key = (str(model), str(device))
    if key not in _MODELS:
        from tilenet.infer import prepare_model

        module, spec = load_model(model, device=device)
        _MODELS[key] = (prepare_model(module), spec)
    return _MODELS[key]


def _task_region(
    path: str,
    model: str,
    options: dict[str, Any],
    rows: tuple[int, int],
    stores: dict[str, str],
    marker: str,
    job_key: dict[str, str],
    threads: int | None,
) -> dict[str, Any]:
    """Compute grid rows ``rows`` into the partial stores; then write the region's marker."""
    import numpy as np
    import zarr

    from tilenet.infer import (
        _device,
        _execute,
        _foreground_fractions,
        plan_grid,
        resolve_options,
    )
    from tilenet.io import open_image
    from tilenet.stitch import CropStitcher, OutputSink

    _set_threads(threads)
    cfg = resolve_options(options)
    device = _device(cfg.device)
    module, spec = _cached_model(model, device)
    t0 = time.perf_counter()
    with open_image(path) as image:
        grid, _ = plan_grid(image.levels[cfg.level].shape, spec, cfg)
        tiles = [t for r in range(*rows) for t in grid.row(r)]
        skip = np.zeros(len(tiles), dtype=bool)
        if cfg.min_foreground > 0:
            skip = _foreground_fractions(tiles, image, cfg.level) < cfg.min_foreground
        probs = stores.get("probabilities")
        sink = OutputSink(
            num_classes=int(spec["num_classes"]),
            probabilities=zarr.open_array(Path(probs) / "0", mode="r+") if probs else None,
            classes=zarr.open_array(Path(stores["classes"]) / "0", mode="r+"),
            probabilities_dtype=cfg.probabilities_dtype,
        )
        stitcher = CropStitcher(sink)
        stats = _execute(image, module, spec, grid, tiles, skip, stitcher, cfg, device, False)
        stitcher.close()
    record = {
        "key": job_key,
        "rows": list(rows),
        "tiles": len(tiles),
        "tiles_run": int((~skip).sum()),
        "area": [int(a) for a in sink.area],
        "seconds": round(time.perf_counter() - t0, 3),
        "model_s": round(stats["model_s"], 3),
    }
    # Written only now, when every chunk of the band is on disk: the marker is the proof.
    with atomic_output(marker) as tmp:
        tmp.write_text(json.dumps(record))
    return record


def _task_finalize(
    path: str, model: str, out: str, options: dict[str, Any], t_start: float
) -> dict[str, Any]:
    """Pyramids, rename into place, OME-TIFF/preview/instances; the summary as infer writes it."""
    from tilenet import __version__
    from tilenet.checkpoint import load_checkpoint
    from tilenet.infer import _config_yaml, _extra_outputs, _write_text, plan_grid, resolve_options
    from tilenet.io import open_image

    cfg = resolve_options(options)
    spec = load_checkpoint(model)["spec"]
    outp = Path(out)
    state = outp / _STATE_DIR
    markers = sorted(state.glob("region-*.json"))
    records = [json.loads(m.read_text()) for m in markers]
    k = int(spec["num_classes"])
    names = [str(n) for n in (spec.get("class_names") or [f"class_{i}" for i in range(k)])]
    area = [sum(r["area"][i] for r in records) for i in range(k)]
    t_fin = time.perf_counter()
    paths: dict[str, Path] = {}
    with open_image(path) as image:
        grid, halo = plan_grid(image.levels[cfg.level].shape, spec, cfg)
        ds = image.levels[cfg.level].downsample
        pixel_size = None
        if image.pixel_size:
            pixel_size = (image.pixel_size[0] * ds[0], image.pixel_size[1] * ds[1])
        if "probabilities" in cfg.outputs:
            paths["probabilities"] = _finalize_store(outp, "probabilities", "mean")
        classes_path = paths["classes"] = _finalize_store(outp, "classes", "mode")
        n_inst = _extra_outputs(image, outp, classes_path, cfg, names, pixel_size, paths)
        px_area = None
        if image.pixel_size:
            px_area = image.pixel_size[0] * ds[0] * image.pixel_size[1] * ds[1]
        shape = list(image.levels[cfg.level].shape)
    n_tiles = sum(r["tiles"] for r in records)
    n_run = sum(r["tiles_run"] for r in records)
    summary: dict[str, Any] = {
        "tilenet_version": __version__,
        "input": str(path),
        "model": str(model),
        "model_name": spec["name"],
        "shape": shape,
        "level": cfg.level,
        "mode": cfg.mode,
        "tile": grid.tile[0],  # as run (crop mode may shrink the requested tile)
        "halo": halo,
        "stride": int(spec["stride"]),
        "receptive_field": int(spec["receptive_field"]),
        "tiles": n_tiles,
        "tiles_run": n_run,
        "tiles_skipped": n_tiles - n_run,
        "regions": len(records),
        "precision": cfg.precision,
        "class_names": names,
        "class_area_px": dict(zip(names, area, strict=True)),
        "class_area_um2": {n: a * px_area for n, a in zip(names, area, strict=True)}
        if px_area
        else None,
        "instances": n_inst
        and {
            "count": int(n_inst["count"]),
            "per_class": {
                names[int(c)]: int(n) for c, n in n_inst.get("per_class_counts", {}).items()
            },
        },
        "timings": {
            "regions_s": round(sum(r["seconds"] for r in records), 3),
            "model_s": round(sum(r["model_s"] for r in records), 3),
            "finalize_s": round(time.perf_counter() - t_fin, 3),
            "total_s": round(time.time() - t_start, 3),
        },
        "outputs": {name: str(p) for name, p in paths.items()},
    }
    summary["outputs"]["config"] = str(outp / "config.yaml")
    summary["outputs"]["summary"] = str(outp / "summary.json")
    _write_text(outp / "config.yaml", _config_yaml(cfg, str(model)))
    _write_text(outp / "summary.json", json.dumps(summary, indent=2) + "\n")
    remove_path(state)
    return summary


def _finalize_store(out: Path, name: str, method: Any) -> Path:
    """Pyramid + rename of one partial store, once: a marker says it is done.

    The marker is written before the rename: killed in between, the partial store is still
    there and is finalized again (:func:`build_pyramid` replaces levels >= 1).
    """
    from tilenet.io.writers import OmeZarrWriter

    final = out / f"{name}.ome.zarr"
    marker = out / _STATE_DIR / f"finalized-{name}"
    w = OmeZarrWriter.open_partial(final)
    if w is None:
        if marker.is_file() and final.exists():
            return final
        raise InputError(f"{out}: partial {name} store vanished; rerun")
    with atomic_output(marker) as tmp:
        tmp.write_text("")
    return w.finalize(method=method)


# -- planning (client) -----------------------------------------------------------------------
def _options_hash(cfg: Any) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in _NOT_HASHED}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _outputs_complete(rec: dict[str, Any]) -> bool:
    outs = rec.get("outputs") or {}
    return bool(outs) and all(Path(p).exists() for p in outs.values())


def _bands(rows: int, cols: int, region_tiles: int) -> list[tuple[int, int]]:
    """Bands of whole grid rows with about ``region_tiles`` tiles each.

    >>> _bands(5, 4, 8)
    [(0, 2), (2, 4), (4, 5)]
    """
    per = max(1, region_tiles // max(1, cols))
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def _prepare_regions(
    item: JobItem,
    spec: dict[str, Any],
    cfg: Any,
    shape: tuple[int, int],
    grid: Any,
    job_key: dict[str, str],
    *,
    pixel_size: tuple[float, float] | None,
    n_bands: int,
    force: bool,
) -> dict[str, str]:
    """Open (resume) or create the partial stores of a split image; returns their paths.

    The partial state is reused only when ``key.json`` matches ``job_key`` and every store is
    there, untouched by a finalize; otherwise markers and stores are discarded first (key
    file first, so a kill here leaves state that is discarded again next time). A store that
    a killed finalize already renamed into place (its ``finalized-<name>`` marker is there,
    its partial gone) counts as finished.
    """
    from tilenet.io.writers import OmeZarrWriter

    out = Path(item.out)
    state = out / _STATE_DIR
    key_file = state / _KEY_FILE
    want_probs = "probabilities" in cfg.outputs
    finals = {"classes": out / "classes.ome.zarr"}
    if want_probs:
        finals["probabilities"] = out / "probabilities.ome.zarr"
    same = not force and key_file.is_file() and json.loads(key_file.read_text()) == job_key
    writers = {}
    finished: dict[str, Path] = {}
    if same:
        for name, final in finals.items():
            w = OmeZarrWriter.open_partial(final)
            if w is None and (state / f"finalized-{name}").is_file() and final.exists():
                # No partial left and our marker (this state's): renamed into place by a
                # finalize that was killed later on.
                finished[name] = final
                continue
            # Not resumable: a finalize that was killed already replaced the writer's state
            # (pixel size, names); the store must be remade so the metadata is right.
            if w is None or not w.resumable:
                same = False
                break
            writers[name] = w
    if same and finished and len(list(state.glob("region-*.json"))) < n_bands:
        same = False  # band markers went missing after finalize began: start over
    if not same:
        finished = {}
        remove_path(key_file)
        remove_path(state)
        for final in finals.values():
            w = OmeZarrWriter.open_partial(final)
            if w is not None:
                w.abort()
        k = int(spec["num_classes"])
        names = [str(n) for n in (spec.get("class_names") or [f"class_{i}" for i in range(k)])]
        writers = {
            "classes": OmeZarrWriter(
                finals["classes"],
                shape=shape,
                dtype="uint8",
                axes="yx",
                chunks=grid.core[0],  # chunk = tile core: a band of rows owns its chunks
                pixel_size=pixel_size,
                name="classes",
                overwrite=True,
                resumable=True,
            )
        }
        if want_probs:
            writers["probabilities"] = OmeZarrWriter(
                finals["probabilities"],
                shape=(k, *shape),
                dtype=cfg.probabilities_dtype,
                axes="cyx",
                chunks=grid.core[0],
                pixel_size=pixel_size,
                name="probabilities",
                channel_names=names,
                overwrite=True,
                resumable=True,
            )
        state.mkdir(parents=True, exist_ok=True)
        with atomic_output(key_file) as tmp:
            tmp.write_text(json.dumps(job_key))
    keep = {w.tmp.name for w in writers.values()}
    for p in out.iterdir():  # e.g. a half-written OME-TIFF of a finalize that was killed
        if (".partial-" in p.name and p.name not in keep) or p.name.startswith(".infer-spill-"):
            remove_path(p)
    # Finished stores only exist once every band is done, so no band task will ask for them.
    return {
        **{n: str(p) for n, p in finished.items()},
        **{n: str(w.tmp) for n, w in writers.items()},
    }


def _remove_stale(out: Path) -> None:
    """Drop what an interrupted earlier run left in ``out`` (partial stores, band state).

    Safe because one batch owns its output directories; the final outputs are kept until
    the new run replaces them.
    """
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name == _STATE_DIR or ".partial-" in p.name or p.name.startswith(".infer-spill-"):
            remove_path(p)


# -- executors --------------------------------------------------------------------------------
class _SerialExecutor:
    """Runs tasks in this process, in submission order."""

    dashboard: str | None = None

    def __init__(self) -> None:
        self._queue: deque[tuple[Any, ...]] = deque()

    def submit(self, *args: Any) -> None:
        self._queue.append(args)

    def results(self) -> Iterator[dict[str, Any]]:
        while self._queue:
            yield _guarded(*self._queue.popleft())

    def close(self) -> None:
        pass


class _DaskExecutor:
    """Submits tasks to a dask.distributed cluster; yields results as they complete."""

    def __init__(self, *, workers: int, scheduler: str | None) -> None:
        from dask.distributed import Client, as_completed

        self.cluster: Any = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            self.cluster = _local_cluster(workers)
            self.client = Client(self.cluster)
        self.dashboard: str | None = self.client.dashboard_link
        self._ac = as_completed()
        self._tags: dict[Any, tuple[Any, Any]] = {}  # to attribute a lost worker's failure

    def submit(self, *args: Any) -> None:
        fut = self.client.submit(_guarded, *args, pure=False)
        self._tags[fut.key] = (args[0], args[1])
        self._ac.add(fut)

    def results(self) -> Iterator[dict[str, Any]]:
        for fut in self._ac:
            try:
                yield fut.result()
            except Exception as exc:  # a worker died (killed, out of memory)
                kind, key = self._tags[fut.key]
                yield {"kind": kind, "key": key, "ok": False, "error": _one_line(exc)}
            fut.release()

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            # A worker that ran torch can take > 4 s to exit on a busy machine; the nanny then
            # kills it (harmless: its work is done) and warns. Keep that warning out of logs.
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                self.cluster.close()
            finally:
                nanny.setLevel(level)


def _local_cluster(workers: int, *, gpus: int | None = None) -> Any:
    """N worker processes of one thread; with CUDA, one worker per GPU pinned to it.

    Pinning sets ``CUDA_VISIBLE_DEVICES`` per worker process, so each sees its GPU as cuda:0.
    """
    from dask.distributed import LocalCluster

    gpus = _cuda_count() if gpus is None else gpus
    if gpus:
        from dask.distributed import Nanny, Scheduler, SpecCluster

        n = min(workers, gpus) if workers else gpus
        specs = {
            f"gpu-{i}": {
                "cls": Nanny,
                "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}},
            }
            for i in range(n)
        }
        return SpecCluster(
            scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
            workers=specs,
        )
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # a free port: several jobs may share the machine
    )


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


# -- the runner --------------------------------------------------------------------------------
def run_jobs(
    inputs: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 0,
    scheduler: str | None = None,
    retry_failed: bool = False,
    force: bool = False,
    quiet: bool = False,
    log_json: bool = False,
    region_tiles: int = 256,
    threads: int | None = None,
    **options: Any,
) -> JobReport:
    """Infer every image of ``inputs`` (files, directories, globs) into ``out_dir/<stem>/``.

    ``workers`` = 0 runs in this process; N > 0 starts a LocalCluster of N processes (one per
    GPU with CUDA); ``scheduler`` submits to an existing dask cluster (which must see the same
    file system). ``options`` are :class:`tilenet.config.InferConfig` fields. Crop-mode images
    with more than ``region_tiles`` tiles are split into row bands (see the module doc).
    ``threads`` is torch's intra-op threads per process (this one when serial, else each
    worker); by default torch's own in serial and ``cores // workers`` on a LocalCluster.
    Outputs are bit-identical across serial and distributed runs at equal ``threads``: CPU
    kernels round differently with another thread count (last float bit).
    """
    from tilenet import __version__
    from tilenet.checkpoint import file_checksum, load_checkpoint
    from tilenet.infer import plan_grid, resolve_options
    from tilenet.io import open_image
    from tilenet.io.paths import resolve_images
    from tilenet.io.sniff import fingerprint

    t0 = time.time()
    cfg = resolve_options(options)
    options = {k: v for k, v in asdict(cfg).items()}
    spec = load_checkpoint(model)["spec"]  # a bad checkpoint is a usage error (exit 2)
    model = str(Path(model).resolve())
    base = {
        "tilenet_version": __version__,
        "model_checksum": file_checksum(model),
        "options_hash": _options_hash(cfg),
    }
    paths = resolve_images(inputs)
    out = Path(out_dir).absolute()  # workers may run elsewhere (another cwd)
    out.mkdir(parents=True, exist_ok=True)
    items = [
        JobItem(str(p), s, str(out / s)) for p, s in zip(paths, unique_stems(paths), strict=True)
    ]
    manifest = _Manifest(out / MANIFEST)
    previous = read_manifest(manifest.path)
    report = JobReport(out_dir=str(out), manifest=str(manifest.path))
    events = _Events(quiet=quiet, log_json=log_json, total_images=len(items))
    events.emit("start", images=len(items), out=str(out), workers=workers, scheduler=scheduler)

    def record(item: JobItem, status: str, **fields: Any) -> None:
        rec = {"image": item.path, "stem": item.stem, "status": status, **base, **fields}
        rec.setdefault("time", round(time.time(), 3))
        manifest.append(rec)
        if status == "failed":
            report.failed[item.path] = str(fields.get("error"))
        elif status == "skipped":
            report.skipped.append(item.path)
        else:
            report.done.append(item.path)
        events.image_finished()
        events.emit(status, image=item.path, **{k: v for k, v in fields.items() if k != "outputs"})

    # Decide per image: skip, keep failed, run whole, or run in regions.
    todo: list[tuple[JobItem, dict[str, Any]]] = []
    for item in items:
        try:
            fp = fingerprint(item.path)
        except (TilenetError, OSError) as exc:
            record(item, "failed", error=_one_line(exc), fingerprint=None)
            continue
        key = {"fingerprint": fp, **base}
        prev = previous.get(item.path)
        same = bool(prev) and all(prev.get(k) == v for k, v in key.items())  # type: ignore[union-attr]
        same = same and prev.get("stem") == item.stem  # type: ignore[union-attr]
        if prev and same and not force:
            if prev["status"] in ("done", "skipped") and _outputs_complete(prev):
                record(item, "skipped", fingerprint=fp, outputs=prev["outputs"])
                continue
            if prev["status"] == "failed" and not retry_failed:
                record(item, "failed", fingerprint=fp, error=prev.get("error"), previous=True)
                continue
        job: dict[str, Any] = {"key": key, "t0": time.time(), "fingerprint": fp}
        try:
            with open_image(item.path) as image:
                if not 0 <= cfg.level < len(image.levels):
                    raise InputError(f"{item.path}: level {cfg.level} does not exist")
                shape = image.levels[cfg.level].shape
                ds = image.levels[cfg.level].downsample
                ps = image.pixel_size
                pixel_size = (ps[0] * ds[0], ps[1] * ds[1]) if ps else None
            grid, _ = plan_grid(shape, spec, cfg)
            job["tiles"] = len(grid)
            rows, cols = grid.counts
            if cfg.mode == "crop" and len(grid) > region_tiles and rows > 1:
                job["bands"] = _bands(rows, cols, region_tiles)
                # The band layout is part of what a marker proves (rows differ per layout).
                job["key"] = {**key, "band_rows": job["bands"][0][1]}
                job["stores"] = _prepare_regions(
                    item, spec, cfg, shape, grid, job["key"], pixel_size=pixel_size,
                    n_bands=len(job["bands"]), force=force,
                )  # fmt: skip
            else:
                _remove_stale(Path(item.out))
        except Exception as exc:
            record(item, "failed", fingerprint=fp, error=_one_line(exc))
            continue
        todo.append((item, job))

    executor: _SerialExecutor | _DaskExecutor
    n_cores = os.cpu_count() or 1
    restore: int | None = None
    if todo and (workers > 0 or scheduler):
        t_cluster = time.time()
        executor = _DaskExecutor(workers=workers, scheduler=scheduler)
        report.cluster_start_s = round(time.time() - t_cluster, 3)
        report.dashboard = executor.dashboard
        link = executor.dashboard
        if not scheduler and importlib.util.find_spec("bokeh") is None:
            link = f"{link} (pip install bokeh to serve it)"  # a local scheduler needs it
        events.emit("dashboard", link=link)
        if not scheduler and threads is None:
            threads = max(1, n_cores // max(1, workers))  # each worker its share of cores
    else:
        executor = _SerialExecutor()
        if threads:
            import torch

            restore = torch.get_num_threads()
    by_stem = {item.stem: (item, job) for item, job in todo}
    try:
        for item, job in todo:
            events.add_tiles(job["tiles"])
            if "bands" not in job:
                executor.submit(
                    "image", item.stem, _task_image, item.path, model, item.out, options, threads
                )
                continue
            state = Path(item.out) / _STATE_DIR
            job["pending"] = set()
            for i, rows in enumerate(job["bands"]):
                marker = state / f"region-{i:05d}.json"
                done = json.loads(marker.read_text()) if marker.is_file() else {}
                if done.get("key") == job["key"] and done.get("rows") == list(rows):
                    events.tiles(done["tiles"])
                    continue
                job["pending"].add(i)
                args = (item.path, model, options, rows, job["stores"], str(marker), job["key"])
                executor.submit("region", (item.stem, i), _task_region, *args, threads)
            if not job["pending"]:
                executor.submit(
                    "finalize", item.stem, _task_finalize, item.path, model, item.out, options,
                    job["t0"],
                )  # fmt: skip
        for res in executor.results():
            kind, key = res["kind"], res["key"]
            stem = key[0] if kind == "region" else key
            item, job = by_stem[stem]
            if job.get("closed"):
                continue
            if not res["ok"]:
                job["closed"] = True
                record(item, "failed", fingerprint=job["fingerprint"], error=res["error"])
                continue
            if kind == "region":
                events.tiles(res["result"]["tiles"])
                events.emit("region", image=item.path, region=key[1], rows=res["result"]["rows"])
                job["pending"].discard(key[1])
                if not job["pending"]:
                    executor.submit(
                        "finalize", item.stem, _task_finalize, item.path, model, item.out,
                        options, job["t0"],
                    )  # fmt: skip
                continue
            summary = res["result"]
            if kind == "image":
                events.tiles(job["tiles"])
            job["closed"] = True
            record(
                item,
                "done",
                fingerprint=job["fingerprint"],
                outputs=summary["outputs"],
                timings={**summary["timings"], "wall_s": round(time.time() - job["t0"], 3)},
                tiles=summary["tiles"],
            )
    finally:
        executor.close()
        events.close()
        _set_threads(restore)  # a serial run leaves the caller's torch threads as they were
    report.seconds = round(time.time() - t0, 3)
    events.emit(
        "end",
        done=len(report.done),
        skipped=len(report.skipped),
        failed=len(report.failed),
        seconds=report.seconds,
    )
    return report


def tile_jobs(
    images: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    quiet: bool = False,
    log_json: bool = False,
    **tile_options: Any,
) -> JobReport:
    """``tilenet tile`` as a batch job: :func:`tilenet.tiler.tile_images` with failures recorded.

    The patch store keeps its own per-image completion record (source fingerprints, committed
    with the shards); this adds what batches share: ``<out>.manifest.jsonl`` with one line per
    image (done / skipped / failed), one-line reasons, the failure table and exit code 1 when
    an image failed, while the others are still tiled.
    """
    import zarr

    from tilenet import __version__
    from tilenet.io.paths import resolve_images
    from tilenet.io.sniff import fingerprint
    from tilenet.tiler import tile_images

    t0 = time.time()
    store = Path(out)
    paths = resolve_images(images)
    manifest = _Manifest(store.with_name(store.name + ".manifest.jsonl"))
    report = JobReport(out_dir=str(store), manifest=str(manifest.path))
    events = _Events(quiet=True, log_json=log_json, total_images=len(paths))
    events.emit("start", images=len(paths), out=str(store))

    def sources() -> set[str]:
        try:
            attrs = zarr.open_group(store, mode="r").attrs
        except Exception:
            return set()
        found: Any = attrs.get("sources", [])
        return {str(s["fingerprint"]) for s in found}

    before = sources() if store.exists() else set()
    failures: dict[str, str] = {}
    tile_images(
        paths, out=store, failures=failures, progress=not quiet and not log_json, **tile_options
    )
    after = sources()
    for p in paths:
        rec: dict[str, Any] = {"image": str(p), "tilenet_version": __version__}
        rec["time"] = round(time.time(), 3)
        if str(p) in failures:
            status = "failed"
            rec["error"] = report.failed[str(p)] = failures[str(p)]
        else:
            fp = fingerprint(p)
            rec["fingerprint"] = fp
            rec["outputs"] = {"store": str(store)}
            status = "skipped" if fp in before else "done" if fp in after else "failed"
            if status == "failed":
                rec["error"] = report.failed[str(p)] = "not in the store after tiling"
            else:
                (report.skipped if status == "skipped" else report.done).append(str(p))
        manifest.append({**rec, "status": status})
        events.emit(status, image=str(p), error=rec.get("error"))
    report.seconds = round(time.time() - t0, 3)
    events.emit(
        "end", done=len(report.done), skipped=len(report.skipped), failed=len(report.failed)
    )
    return report


def format_report(report: JobReport) -> str:
    """The closing summary: counts, then a table of the failures (path, reason)."""
    lines = [
        f"{len(report.done)} done, {len(report.skipped)} skipped, {len(report.failed)} failed "
        f"in {report.seconds:.1f} s; manifest: {report.manifest}"
    ]
    if report.failed:
        width = min(60, max(len(p) for p in report.failed))
        lines.append(f"{'FAILED':<{width}}  REASON")
        lines.extend(f"{p:<{width}}  {e}" for p, e in sorted(report.failed.items()))
    return "\n".join(lines)
