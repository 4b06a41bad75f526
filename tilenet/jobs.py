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
Every image is planned with :func:`tilenet.engine.infer.plan_image`: a crop-mode image with more
than ``region_tiles`` tiles is split into bands of whole grid rows, run as separate tasks
(:func:`tilenet.engine.infer.run_band`) into the same partial stores (disjoint chunks: workers need
no locks), and one finalize task (:func:`tilenet.engine.infer.finish`) makes the outputs, exactly as
``tilenet infer`` does for one image. A band's marker is written only after all its chunks
are, and holds the job key (fingerprint + model checksum + options hash), so a changed
input, model or options invalidates the partial state. After a SIGKILL a rerun redoes only
the bands without a marker; a kill during finalize redoes only the finalize. Instance
labelling is global in finalize, so the result equals a single-worker run.
Gaussian/linear blending writes each chunk from several tiles of neighbouring rows, so those
modes are never split (one task per image).
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any

from tilenet.config import JobsConfig, ReaderConfig, ResolutionConfig
from tilenet.errors import EXIT_OK, EXIT_PARTIAL, TilenetError, scrub_credentials
from tilenet.fsutil import safe_stem
from tilenet.io.lock import exclusive_output
from tilenet.io.storage import is_url, redact
from tilenet.progress import progress_bar, show_progress

if TYPE_CHECKING:
    from tilenet.engine.infer import ImagePlan

__all__ = [
    "JobItem",
    "JobReport",
    "format_report",
    "local_cluster",
    "read_manifest",
    "run_jobs",
    "tile_jobs",
    "unique_stems",
]

MANIFEST = "manifest.jsonl"


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
    text = _RemoteManifest.read(str(path)) if is_url(path) else None
    p = Path(path)
    if text is None and not p.is_file():
        return latest
    for line in (p.read_text() if text is None else text).splitlines():
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
            fh.write(scrub_credentials(json.dumps(record, sort_keys=True)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class _RemoteManifest:
    """:class:`_Manifest` in object storage (no appends there): the whole object is rewritten
    after each record (a few hundred bytes per image), so it is always whole."""

    def __init__(self, url: str) -> None:
        self.path = url
        self._text = self.read(url)
        if self._text and not self._text.endswith("\n"):
            self._text += "\n"

    @staticmethod
    def read(url: str) -> str:
        from tilenet.io.storage import read_bytes

        try:
            return read_bytes(url).decode()
        except FileNotFoundError:
            return ""

    def append(self, record: dict[str, Any]) -> None:
        from tilenet.io.storage import write_bytes

        self._text += scrub_credentials(json.dumps(record, sort_keys=True)) + "\n"
        write_bytes(self.path, self._text.encode())


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
        self.show = show_progress(not quiet and not log_json)

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"images {self.images_done}/{self.total_images}")

    def add_tiles(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()
        elif self.show:  # made at the first work (tqdm disables itself at total=0)
            self.bar = progress_bar(n, unit="tile", desc="infer")
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
            line = json.dumps(rec, sort_keys=True, default=str)
            print(scrub_credentials(line), file=sys.stderr, flush=True)
        elif event == "dashboard" or (not self.quiet and event == "failed"):
            msg = fields.get("error") or fields.get("link")
            line = f"{event}: {fields.get('image', '')} {msg}".replace("  ", " ")
            line = scrub_credentials(line)
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- tasks (run on workers; every task returns data, never raises) ---------------------------
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


def _task_bands(plan: ImagePlan, bands: Sequence[int], threads: int | None) -> dict[str, Any]:
    """Run ``bands`` of ``plan`` (each recorded as done when written); their records."""
    from tilenet.engine.infer import run_band
    from tilenet.engine.predictor import Predictor
    from tilenet.runtime import torch_threads

    with torch_threads(threads), plan.open() as image:
        predictor = Predictor(plan.model, plan.config, cache=True)
        records = [run_band(plan, i, predictor, image) for i in bands]
    return {"bands": list(bands), "tiles": sum(r["tiles"] for r in records), "records": records}


def _task_finish(plan: ImagePlan) -> dict[str, Any]:
    """Pyramids, renames, OME-TIFF/preview/instances; the summary as ``tilenet infer`` writes."""
    from tilenet.engine.infer import finish

    with plan.open() as image:
        return finish(plan, image)


def _task_image(plan: ImagePlan, threads: int | None) -> dict[str, Any]:
    """An image in one task: its pending bands, then finish."""
    _task_bands(plan, plan.pending, threads)
    return _task_finish(plan)


def _outputs_complete(rec: dict[str, Any]) -> bool:
    outs = rec.get("outputs") or {}
    return bool(outs) and all(_exists(str(p)) for p in outs.values())


def _exists(path: str) -> bool:
    if not is_url(path):
        return Path(path).exists()
    from tilenet.io.storage import info

    try:
        info(path)
    except FileNotFoundError:
        return False
    return True


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
            self.cluster = local_cluster(workers)
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


def local_cluster(workers: int, *, gpus: int | None = None) -> Any:
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
@exclusive_output("out_dir", what="tilenet infer (batch)")
def run_jobs(
    inputs: Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = JobsConfig.workers,
    scheduler: str | None = JobsConfig.scheduler,
    retry_failed: bool = JobsConfig.retry_failed,
    force: bool = JobsConfig.force,
    quiet: bool = JobsConfig.quiet,
    log_json: bool = JobsConfig.log_json,
    region_tiles: int = JobsConfig.region_tiles,
    threads: int | None = JobsConfig.threads,
    reader: ReaderConfig | None = None,
    resolution: ResolutionConfig | None = None,
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
    kernels round differently with another thread count (last float bit). ``reader`` sets
    the reader limits every image is opened with, ``resolution`` the pixel size each image
    runs at (:func:`tilenet.engine.infer.plan_image`).
    """
    from tilenet._version import __version__
    from tilenet.engine.checkpoint import file_checksum, load_checkpoint
    from tilenet.engine.infer import options_hash, plan_image, resolve_options
    from tilenet.io import fingerprint, open_image
    from tilenet.io.paths import resolve_images
    from tilenet.models import ModelSpec

    t0 = time.time()
    cfg = resolve_options(options)
    reader = reader if reader is not None else ReaderConfig()
    spec = ModelSpec.coerce(load_checkpoint(model)["spec"])  # a bad checkpoint: exit 2
    model = str(Path(model).resolve())
    base: dict[str, Any] = {
        "tilenet_version": __version__,
        "model_checksum": file_checksum(model),
        "options_hash": options_hash(cfg),
    }
    if resolution is not None and resolution != ResolutionConfig():
        base["resolution"] = asdict(resolution)  # another pixel size: not the same job
    paths = resolve_images(inputs)
    out: Any = str(out_dir).rstrip("/") if is_url(out_dir) else Path(out_dir).absolute()
    if is_url(out):  # object storage: outputs, resume state and the manifest in the bucket
        from tilenet.io.storage import join

        items = [
            JobItem(str(p), s, join(out, s))
            for p, s in zip(paths, unique_stems(paths), strict=True)
        ]
        manifest: _Manifest | _RemoteManifest = _RemoteManifest(join(out, MANIFEST))
    else:  # workers may run elsewhere (another cwd): absolute paths
        out.mkdir(parents=True, exist_ok=True)
        items = [
            JobItem(str(p), s, str(out / s))
            for p, s in zip(paths, unique_stems(paths), strict=True)
        ]
        manifest = _Manifest(out / MANIFEST)
    previous = read_manifest(manifest.path)
    report = JobReport(out_dir=str(out), manifest=str(manifest.path))
    events = _Events(quiet=quiet, log_json=log_json, total_images=len(items))
    events.emit("start", images=len(items), out=str(out), workers=workers, scheduler=scheduler)

    def record(item: JobItem, status: str, **fields: Any) -> None:
        rec = {"image": redact(item.path), "stem": item.stem, "status": status, **base, **fields}
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

    # Decide per image: skip, keep failed, or plan it (whole, or in bands of grid rows).
    todo: list[tuple[JobItem, dict[str, Any]]] = []
    for item in items:
        try:
            fp = fingerprint(item.path)
        except (TilenetError, OSError) as exc:
            record(item, "failed", error=_one_line(exc), fingerprint=None)
            continue
        key = {"fingerprint": fp, **base}
        prev = previous.get(redact(item.path))
        same = bool(prev) and all(prev.get(k) == v for k, v in key.items())  # type: ignore[union-attr]
        same = same and prev.get("stem") == item.stem  # type: ignore[union-attr]
        if prev and same and not force:
            if prev["status"] in ("done", "skipped") and _outputs_complete(prev):
                record(item, "skipped", fingerprint=fp, outputs=prev["outputs"])
                continue
            if prev["status"] == "failed" and not retry_failed:
                record(item, "failed", fingerprint=fp, error=prev.get("error"), previous=True)
                continue
        try:
            with open_image(item.path, **asdict(reader)) as image:
                plan = plan_image(
                    image, spec, cfg, item.out, model=model, region_tiles=region_tiles,
                    key=key, force=force, reader=reader, resolution=resolution,
                )  # fmt: skip
        except Exception as exc:
            record(item, "failed", fingerprint=fp, error=_one_line(exc))
            continue
        todo.append((item, {"plan": plan, "t0": time.time(), "fingerprint": fp}))

    executor: _SerialExecutor | _DaskExecutor
    n_cores = os.cpu_count() or 1
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
    by_stem = {item.stem: (item, job) for item, job in todo}
    try:
        for item, job in todo:
            plan = job["plan"]
            events.add_tiles(len(plan.grid))
            events.tiles(sum(len(plan.tiles(i)) for i in plan.outputs.resumed))
            if len(plan.bands) == 1:
                executor.submit("image", item.stem, _task_image, plan, threads)
                continue
            job["pending"] = set(plan.pending)
            for i in plan.pending:
                executor.submit("region", (item.stem, i), _task_bands, plan, [i], threads)
            if not job["pending"]:
                executor.submit("finalize", item.stem, _task_finish, plan)
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
                rec = res["result"]["records"][0]
                events.tiles(res["result"]["tiles"])
                events.emit("region", image=item.path, region=key[1], rows=rec["rows"])
                job["pending"].discard(key[1])
                if not job["pending"]:
                    executor.submit("finalize", item.stem, _task_finish, job["plan"])
                continue
            summary = res["result"]
            if kind == "image":
                plan = job["plan"]
                events.tiles(sum(len(plan.tiles(i)) for i in plan.pending))
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
    """``tilenet tile`` as a batch job: :func:`tilenet.patches.tiler.tile_images` with failures recorded.

    The patch store keeps its own per-image completion record (source fingerprints, committed
    with the shards); this adds what batches share: ``<out>.manifest.jsonl`` with one line per
    image (done / skipped / failed), one-line reasons, the failure table and exit code 1 when
    an image failed, while the others are still tiled.
    """

    from tilenet._version import __version__
    from tilenet.io.paths import resolve_images
    from tilenet.io.sniff import fingerprint
    from tilenet.patches.patchstore import source_fingerprints
    from tilenet.patches.tiler import tile_images

    t0 = time.time()
    # A bucket: the store is tiled locally and uploaded (tilenet.patches.tiler), the manifest beside it.
    store: Any = str(out).rstrip("/") if is_url(out) else Path(out)
    paths = resolve_images(images)
    manifest: _Manifest | _RemoteManifest = (
        _RemoteManifest(store + ".manifest.jsonl")
        if isinstance(store, str)
        else _Manifest(store.with_name(store.name + ".manifest.jsonl"))
    )
    report = JobReport(out_dir=redact(str(store)), manifest=redact(str(manifest.path)))
    events = _Events(quiet=True, log_json=log_json, total_images=len(paths))
    events.emit("start", images=len(paths), out=redact(str(store)))

    before = source_fingerprints(store) if isinstance(store, str) or store.exists() else set()
    failures: dict[str, str] = {}
    tile_images(
        paths, out=store, failures=failures, progress=not quiet and not log_json, **tile_options
    )
    after = source_fingerprints(store)
    for p in paths:
        rec: dict[str, Any] = {"image": str(p), "tilenet_version": __version__}
        rec["time"] = round(time.time(), 3)
        if str(p) in failures:
            status = "failed"
            rec["error"] = report.failed[str(p)] = failures[str(p)]
        else:
            fp = fingerprint(p)
            rec["fingerprint"] = fp
            rec["outputs"] = {"store": redact(str(store))}
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
