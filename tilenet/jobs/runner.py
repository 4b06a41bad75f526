"""The batch runner: plan each image, run its bands as tasks, record each in the manifest."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilenet.config import InferConfig, JobsConfig, ReaderConfig, ResolutionConfig
from tilenet.errors import EXIT_OK, EXIT_PARTIAL, TilenetError, one_line, scrub_credentials
from tilenet.io.location import location
from tilenet.io.lock import exclusive_output
from tilenet.io.storage import redact
from tilenet.jobs.executors import DaskExecutor, SerialExecutor
from tilenet.jobs.manifest import Manifest, unique_stems
from tilenet.outputs.resume import ResumeKey
from tilenet.progress import progress_bar, show_progress

if TYPE_CHECKING:
    from tilenet.engine.infer import ImagePlan

__all__ = ["JobItem", "JobReport", "format_report", "run_jobs", "tile_jobs"]


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
    return bool(outs) and all(location(str(p)).exists() for p in outs.values())


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
    config: InferConfig | None = None,
    **options: Any,
) -> JobReport:
    """Infer every image of ``inputs`` (files, directories, globs) into ``out_dir/<stem>/``.

    ``workers`` = 0 runs in this process; N > 0 starts a LocalCluster of N processes (one per
    GPU with CUDA); ``scheduler`` submits to an existing dask cluster (which must see the same
    file system). ``config`` is the typed :class:`tilenet.config.InferConfig`, used as it is;
    ``options`` are its fields, merged onto it (:func:`tilenet.engine.infer.resolve_options`).
    Crop-mode images with more than ``region_tiles`` tiles are split into row bands (see the
    module doc). ``threads`` is torch's intra-op threads per process (this one when serial,
    else each worker); by default torch's own in serial and ``cores // workers`` on a
    LocalCluster. Outputs are bit-identical across serial and distributed runs at equal
    ``threads``: CPU kernels round differently with another thread count (last float bit).
    ``reader`` sets the reader limits every image is opened with, ``resolution`` the pixel size
    each image runs at (:func:`tilenet.engine.infer.plan_image`).
    """
    from tilenet.engine.checkpoint import file_checksum, load_spec
    from tilenet.engine.infer import resolve_options
    from tilenet.io.paths import resolve_images

    t0 = time.time()
    cfg = resolve_options(options, config=config)
    reader = reader if reader is not None else ReaderConfig()
    spec = load_spec(model)  # a bad checkpoint (.pt or exported .onnx): exit 2
    model = str(Path(model).resolve())
    # Another pixel size than the default is not the same job.
    res = asdict(resolution) if resolution not in (None, ResolutionConfig()) else None
    template = ResumeKey.of("", file_checksum(model), cfg, resolution=res)
    out = location(out_dir)
    if out.local is not None:  # workers may run elsewhere (another cwd): absolute paths
        out = location(out.local.absolute())
        out.local.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    paths = resolve_images(inputs)
    items = [
        JobItem(str(p), s, out.join(s)) for p, s in zip(paths, unique_stems(paths), strict=True)
    ]
    manifest = Manifest(out)
    batch = _Batch(
        manifest=manifest,
        report=JobReport(out_dir=out.url, manifest=manifest.path),
        events=_Events(quiet=quiet, log_json=log_json, total_images=len(items)),
        base={k: v for k, v in template.to_dict().items() if k != "fingerprint"},
    )
    batch.events.emit("start", images=len(items), out=out.url, workers=workers, scheduler=scheduler)
    plan = partial(
        _plan_job, batch=batch, previous=manifest.records(), template=template, spec=spec,
        cfg=cfg, model=model, force=force, retry_failed=retry_failed,
        region_tiles=region_tiles, reader=reader, resolution=resolution,
    )  # fmt: skip
    todo = [job for job in map(plan, items) if job is not None]
    executor, threads = _executor(
        batch, todo, workers=workers, scheduler=scheduler, threads=threads
    )
    try:
        _run(batch, todo, executor, threads)
    finally:
        executor.close()
        batch.events.close()
    report = batch.report
    report.seconds = round(time.time() - t0, 3)
    batch.events.emit(
        "end",
        done=len(report.done),
        skipped=len(report.skipped),
        failed=len(report.failed),
        seconds=report.seconds,
    )
    return report


@dataclass
class _Batch:
    """What one :func:`run_jobs` call records into: the manifest, the report, the events."""

    manifest: Manifest
    report: JobReport
    events: _Events
    #: What every record holds: version, model checksum, options hash (and pixel size).
    base: dict[str, Any]

    def record(self, item: JobItem, status: str, **fields: Any) -> None:
        """One manifest line for ``item``; the report and the events follow it."""
        rec = {"image": redact(item.path), "stem": item.stem, "status": status, **self.base}
        rec.update(fields)
        rec.setdefault("time", round(time.time(), 3))
        self.manifest.append(rec)
        if status == "failed":
            self.report.failed[item.path] = str(fields.get("error"))
        elif status == "skipped":
            self.report.skipped.append(item.path)
        else:
            self.report.done.append(item.path)
        self.events.image_finished()
        shown = {k: v for k, v in fields.items() if k != "outputs"}
        self.events.emit(status, image=item.path, **shown)


@dataclass
class _Job:
    """An image to run: its plan, when it began, its fingerprint; the bands still running."""

    item: JobItem
    plan: ImagePlan
    fingerprint: str
    t0: float = field(default_factory=time.time)
    pending: set[int] = field(default_factory=set)
    closed: bool = False


def _plan_job(
    item: JobItem,
    *,
    batch: _Batch,
    previous: dict[str, dict[str, Any]],
    template: ResumeKey,
    spec: Any,
    cfg: Any,
    model: str,
    force: bool,
    retry_failed: bool,
    region_tiles: int,
    reader: ReaderConfig,
    resolution: ResolutionConfig | None,
) -> _Job | None:
    """Skip ``item`` (done before with the same key), keep it failed, or plan it (whole, or
    in bands of grid rows); None when there is nothing to run."""
    from tilenet.engine.infer import plan_image
    from tilenet.io import fingerprint, open_image

    try:
        fp = fingerprint(item.path)
    except (TilenetError, OSError) as exc:
        batch.record(item, "failed", error=one_line(exc), fingerprint=None)
        return None
    key = dataclasses.replace(template, fingerprint=fp)
    prev = previous.get(redact(item.path))
    if prev and not force and prev.get("stem") == item.stem:
        if all(prev.get(k) == v for k, v in key.to_dict().items()):
            if prev["status"] in ("done", "skipped") and _outputs_complete(prev):
                batch.record(item, "skipped", fingerprint=fp, outputs=prev["outputs"])
                return None
            if prev["status"] == "failed" and not retry_failed:
                error = prev.get("error")
                batch.record(item, "failed", fingerprint=fp, error=error, previous=True)
                return None
    try:
        with open_image(item.path, **asdict(reader)) as image:
            plan = plan_image(
                image, spec, cfg, item.out, model=model, region_tiles=region_tiles,
                key=key, force=force, reader=reader, resolution=resolution,
            )  # fmt: skip
    except Exception as exc:
        batch.record(item, "failed", fingerprint=fp, error=one_line(exc))
        return None
    return _Job(item, plan, fp)


def _executor(
    batch: _Batch, todo: list[_Job], *, workers: int, scheduler: str | None, threads: int | None
) -> tuple[SerialExecutor | DaskExecutor, int | None]:
    """Where the tasks run (this process, or a dask cluster), and torch's threads there."""
    if not todo or not (workers > 0 or scheduler):
        return SerialExecutor(), threads
    t_cluster = time.time()
    executor = DaskExecutor(workers=workers, scheduler=scheduler)
    batch.report.cluster_start_s = round(time.time() - t_cluster, 3)
    batch.report.dashboard = link = executor.dashboard
    if not scheduler and importlib.util.find_spec("bokeh") is None:
        link = f"{link} (pip install bokeh to serve it)"  # a local scheduler needs it
    batch.events.emit("dashboard", link=link)
    if not scheduler and threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))  # each its share of cores
    return executor, threads


def _run(
    batch: _Batch, todo: list[_Job], executor: SerialExecutor | DaskExecutor, threads: int | None
) -> None:
    """Submit every job's tasks (a whole image, or its bands then a finalize); record each
    image as its last task ends."""
    events = batch.events
    by_stem = {job.item.stem: job for job in todo}
    for job in todo:
        plan, stem = job.plan, job.item.stem
        events.add_tiles(len(plan.grid))
        events.tiles(sum(len(plan.tiles(i)) for i in plan.outputs.resumed))
        if len(plan.bands) == 1:
            executor.submit("image", stem, _task_image, plan, threads)
            continue
        job.pending = set(plan.pending)
        for i in plan.pending:
            executor.submit("region", (stem, i), _task_bands, plan, [i], threads)
        if not job.pending:
            executor.submit("finalize", stem, _task_finish, plan)
    for res in executor.results():
        kind, key = res["kind"], res["key"]
        job = by_stem[key[0] if kind == "region" else key]
        if job.closed:
            continue
        if not res["ok"]:
            job.closed = True
            batch.record(job.item, "failed", fingerprint=job.fingerprint, error=res["error"])
            continue
        if kind == "region":
            rec = res["result"]["records"][0]
            events.tiles(res["result"]["tiles"])
            events.emit("region", image=job.item.path, region=key[1], rows=rec["rows"])
            job.pending.discard(key[1])
            if not job.pending:
                executor.submit("finalize", job.item.stem, _task_finish, job.plan)
            continue
        summary = res["result"]
        if kind == "image":
            events.tiles(sum(len(job.plan.tiles(i)) for i in job.plan.pending))
        job.closed = True
        batch.record(
            job.item,
            "done",
            fingerprint=job.fingerprint,
            outputs=summary["outputs"],
            timings={**summary["timings"], "wall_s": round(time.time() - job.t0, 3)},
            tiles=summary["tiles"],
        )


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
    where = location(out)
    store: Any = where.local if where.local is not None else where.url
    paths = resolve_images(images)
    manifest = Manifest.at(where.url + ".manifest.jsonl")
    report = JobReport(out_dir=redact(str(store)), manifest=redact(manifest.path))
    events = _Events(quiet=True, log_json=log_json, total_images=len(paths))
    events.emit("start", images=len(paths), out=redact(str(store)))

    before = source_fingerprints(store) if where.exists() else set()
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
