"""``tilenet embed`` over many images: one task per image, serially or on dask.

Each image goes to ``out/features/<stem>.h5`` (:func:`tilenet.engine.embed.embed_image`);
``out/manifest.jsonl`` gets a line per image (done / skipped / failed, patches, seconds, the
one-line error). A finished feature file with the same run key (input fingerprint,
encoder, weights, options) is skipped; an interrupted one resumes from its marker. A
failure of one image never stops the others. Workers load the encoder once per process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tilenet.config import ReaderConfig, ResolutionConfig
from tilenet.io.location import location
from tilenet.jobs.executors import DaskExecutor, SerialExecutor
from tilenet.jobs.manifest import Manifest, unique_stems
from tilenet.jobs.runner import JobReport
from tilenet.progress import progress_bar, show_progress

__all__ = ["embed_jobs"]

#: Encoders loaded in this process, by (name, weights): a worker loads one once.
_ENCODERS: dict[tuple[str, str | None], Any] = {}


def _task_embed(
    path: str, stem: str, out: str, encoder: str, weights: str | None, options: dict[str, Any]
) -> dict[str, Any]:
    """Embed one image (runs on a worker); its result as plain data."""
    from tilenet.engine.embed import embed_image
    from tilenet.engine.weights import load_encoder
    from tilenet.runtime import torch_threads

    key = (encoder, weights)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder(encoder, weights)
    threads = options.pop("threads", None)
    with torch_threads(threads):
        r = embed_image(path, _ENCODERS[key], out, stem=stem, **options)
    return {
        "path": r.path,
        "patches": r.patches,
        "skipped": r.skipped,
        "rows_resumed": r.rows_resumed,
        "seconds": round(r.seconds, 3),
    }


def embed_jobs(
    inputs: Sequence[str | os.PathLike[str]],
    encoder: str,
    out: str | os.PathLike[str],
    *,
    weights: str | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    threads: int | None = None,
    quiet: bool = False,
    force: bool = False,
    wait: bool = False,
    resolution: ResolutionConfig | None = None,
    reader: ReaderConfig | None = None,
    **options: Any,
) -> JobReport:
    """Embed every image of ``inputs`` (files, directories, globs) into ``out/features/``.

    ``options`` go to :func:`~tilenet.engine.embed.embed_image` (``config``, ``keep``,
    ``transform``, ``extra_attrs``: on dask they must pickle). ``workers`` > 0 starts a
    LocalCluster of that many processes; ``scheduler`` uses a running one.
    """
    from tilenet.engine.weights import load_encoder
    from tilenet.io.paths import resolve_images

    t0 = time.time()
    root = Path(out).absolute()
    root.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in resolve_images(inputs)]
    manifest = Manifest(location(root))
    report = JobReport(out_dir=str(root), manifest=manifest.path)
    options = {**options, "resolution": resolution, "reader": reader, "force": force, "wait": wait}
    executor: SerialExecutor | DaskExecutor
    if workers > 0 or scheduler:
        executor = DaskExecutor(workers=workers, scheduler=scheduler)
        if not scheduler and threads is None:
            threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    else:  # load here: a bad weights file or encoder name is exit 2 before any image
        _ENCODERS[(encoder, weights)] = load_encoder(encoder, weights)
        executor = SerialExecutor()
    bar = progress_bar(len(paths), desc="embed", unit="image", enabled=show_progress(not quiet))
    try:
        for p, stem in zip(paths, unique_stems(paths), strict=True):
            opts = {**options, "threads": threads}
            executor.submit("embed", p, _task_embed, p, stem, str(root), encoder, weights, opts)
        for res in executor.results():
            _record(manifest, report, res)
            bar.update(1)
    finally:
        bar.close()
        executor.close()
    report.seconds = round(time.time() - t0, 3)
    return report


def _record(manifest: Manifest, report: JobReport, res: dict[str, Any]) -> None:
    image = str(res["key"])
    rec: dict[str, Any] = {"image": image, "time": round(time.time(), 3)}
    if not res["ok"]:
        rec.update(status="failed", error=res["error"])
        report.failed[image] = res["error"]
    else:
        r = res["result"]
        status = "skipped" if r["skipped"] else "done"
        rec.update(status=status, **r)
        (report.skipped if r["skipped"] else report.done).append(image)
    manifest.append(rec)
