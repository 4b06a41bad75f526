"""Batch inference over many images, serially or on dask.distributed, with lossless resume.

``run_jobs(inputs, model, out_dir, config=InferConfig(...))`` (or keyword options, its fields)
is what ``tilenet infer DIR|GLOB|FILE...`` runs. Each image's outputs go to ``out_dir/<stem>/``
(:func:`tilenet.fsutil.safe_stem`, made unique when two inputs collide).
``out_dir/manifest.jsonl`` gets one line per image and run: status (done / failed / skipped),
outputs, input fingerprint, tilenet version, model checksum, options hash, timings and the
one-line error of a failure. Only the client writes it.

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

from tilenet.jobs.executors import local_cluster
from tilenet.jobs.manifest import MANIFEST, Manifest, read_manifest, unique_stems
from tilenet.jobs.runner import JobItem, JobReport, format_report, run_jobs, tile_jobs

__all__ = [
    "MANIFEST",
    "JobItem",
    "JobReport",
    "Manifest",
    "format_report",
    "local_cluster",
    "read_manifest",
    "run_jobs",
    "tile_jobs",
    "unique_stems",
]
