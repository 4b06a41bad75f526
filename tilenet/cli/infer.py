"""``tilenet infer``: tiled inference of a checkpoint on one image or a batch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from tilenet.cli._common import (
    CONFIG_ITEMS,
    add_resolution_flags,
    cli_config,
    comma_list,
    config_section,
    help_default,
    int_list,
)
from tilenet.config import InferConfig, JobsConfig, ReaderConfig
from tilenet.errors import EXIT_OK, InputError
from tilenet.outputs.formats import FORMATS, formats_help

__all__ = ["INFER_FLAGS", "TISSUE_ANY", "add_infer"]

#: The tissue fraction ``--tissue`` alone asks of a tile: any tissue at all keeps it.
TISSUE_ANY = 1e-6


def add_infer(sub: Any) -> None:
    p = sub.add_parser(
        "infer",
        help="tiled inference of a checkpoint on a (huge) image: OME-Zarr/OME-TIFF/PNG outputs",
        description=(
            "Run a trained model over INPUT tile by tile and stitch the result out of core into "
            "OUT_DIR: probabilities.ome.zarr (C, H, W), classes.ome.zarr and classes.ome.tif "
            "(argmax), instances.ome.zarr, preview.png, summary.json and config.yaml. The "
            "checkpoint carries the model, its normalisation and class names. Crop mode "
            "(default) keeps each tile's core and equals one whole-image pass exactly for "
            "models without GroupNorm/InstanceNorm; gaussian/linear blend overlapping tiles."
        ),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files (TIFF/OME-TIFF/zarr/PNG/...), directories or glob patterns. One "
        "file writes into OUT_DIR directly; several, a directory or a glob run a batch job: "
        "OUT_DIR/<image stem>/ per image plus OUT_DIR/manifest.jsonl, and a rerun skips "
        "images already done (exit 1 if any image failed). "
        + CONFIG_ITEMS.format(example="infer.mode=gaussian jobs.workers=2"),
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="CKPT",
        help="checkpoint (.pt) written by training, or a .onnx written by tilenet export "
        "(run through onnxruntime)",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument(
        "--tile",
        type=int,
        help=f"tile (read window) side in pixels ({help_default(InferConfig, 'tile')})",
    )
    p.add_argument(
        "--mode",
        choices=["crop", "gaussian", "linear"],
        help="crop: keep cores, exact; gaussian/linear: weighted blend of overlaps "
        f"({help_default(InferConfig, 'mode')})",
    )
    p.add_argument(
        "--overlap",
        type=float,
        help=f"blend overlap as a fraction of the tile ({help_default(InferConfig, 'overlap')})",
    )
    p.add_argument(
        "--halo", type=int, help="crop-mode halo in pixels (default: the receptive field)"
    )
    p.add_argument(
        "--level", type=int, help=f"pyramid level to run on ({help_default(InferConfig, 'level')})"
    )
    add_resolution_flags(p, infer=True)
    p.add_argument(
        "--bands",
        type=int_list,
        help="input bands for the model, 1-based, in the model's order, e.g. 4,3,2 (all)",
    )
    p.add_argument(
        "--batch", type=int, help=f"tiles per forward pass ({help_default(InferConfig, 'batch')})"
    )
    p.add_argument(
        "--device", help=f"cpu, cuda, cuda:N or auto ({help_default(InferConfig, 'device')})"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 on a GPU that has it, else fp16 there; fp32 on the CPU "
        f"({help_default(InferConfig, 'precision')})",
    )
    p.add_argument(
        "--decode",
        choices=["auto", "cpu", "gpu"],
        help="where JPEG tiles are decoded: auto = on the GPU (nvJPEG, batched) for 8-bit "
        "JPEG when the model runs there, else by the reader; cpu = the reader; gpu = the GPU "
        f"(an error without CUDA) ({help_default(InferConfig, 'decode')})",
    )
    p.add_argument("--tta", action="store_true", default=None, help="average over 4 flips")
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="run the model through torch.compile (compiled at the first batch: worth it on "
        "long runs; outputs equal eager's to float rounding) (off)",
    )
    p.add_argument(
        "--no-disk-check",
        dest="disk_check",
        action="store_false",
        default=None,
        help="write even where the outputs (uncompressed) exceed the disk's free space",
    )
    _add_output_flags(p)
    p.add_argument(
        "--min-foreground",
        type=float,
        help="skip tiles whose low-resolution foreground fraction is below this "
        f"({help_default(InferConfig, 'min_foreground')})",
    )
    p.add_argument(
        "--tissue",
        type=float,
        nargs="?",
        const=TISSUE_ANY,
        metavar="FRACTION",
        help="skip tiles off tissue (written as class 0): those whose tissue fraction on the "
        "mask of `tilenet tissue` is below FRACTION; alone: tiles with no tissue at all "
        f"({help_default(InferConfig, 'tissue')}: off)",
    )
    p.add_argument(
        "--stain",
        metavar="REF_IMAGE",
        help="normalise the stain to this RGB reference image or region (H&E): fitted once; "
        "each input's stains are estimated once, on its tissue, so tiles meet without seams. "
        "Default: the normaliser a model trained with data.stain stores; 'none': off",
    )
    p.add_argument(
        "--stain-method",
        choices=("macenko", "reinhard"),
        help=f"stain normaliser ({help_default(InferConfig, 'stain_method')})",
    )
    p.add_argument(
        "--readers", type=int, help=f"tile reader threads ({help_default(InferConfig, 'readers')})"
    )
    p.add_argument(
        "--heap",
        choices=("reuse", "flat", "trim", "system"),
        help="host memory policy during the run (restored after it): reuse keeps freed "
        "buffers for the next batch, fast on a CPU, and goes flat if the heap it keeps "
        "passes twice the first batch's working set; flat returns every large buffer at "
        "once, for the lowest peak RSS at 1.2-1.8x slower CPU forward passes; trim and "
        "system leave glibc's settings alone (trim still hands free memory back every 8 "
        f"batches) ({help_default(InferConfig, 'heap')})",
    )
    _add_job_flags(p)
    p.set_defaults(handler=_cmd_infer, items_dest="inputs")


def _add_output_flags(p: Any) -> None:
    """--outputs, --geojson-crs, --probabilities-dtype: what a run writes."""
    p.add_argument(
        "--outputs",
        type=comma_list,
        help=f"comma-separated subset of {','.join(FORMATS)} ({formats_help()}) "
        f"({help_default(InferConfig, 'outputs')})",
    )
    p.add_argument(
        "--geojson-crs",
        choices=["input", "wgs84"],
        help="georeferenced inputs: instances.geojson and classes.geojson in the input's CRS "
        f"or in lon/lat (RFC 7946) ({help_default(InferConfig, 'geojson_crs')})",
    )
    p.add_argument(
        "--probabilities-dtype",
        choices=["float16", "uint8", "float32"],
        help="storage of probabilities, uint8 = p*255 "
        f"({help_default(InferConfig, 'probabilities_dtype')})",
    )


def _add_job_flags(p: Any) -> None:
    """--quiet, --workers ... --threads: the ``jobs`` section (batch runs, bands, threads)."""
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    p.add_argument(
        "--workers",
        type=int,
        help="batch on a dask LocalCluster of N worker processes (one per GPU with CUDA); "
        f"0 = in this process ({help_default(JobsConfig, 'workers')})",
    )
    p.add_argument("--scheduler", metavar="ADDRESS", help="batch on an existing dask cluster")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="batch: retry earlier failures",
    )
    p.add_argument("--force", action="store_true", default=None, help="batch: redo every image")
    p.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="batch: one JSON object per event on stderr",
    )
    p.add_argument(
        "--region-tiles",
        type=int,
        help="crop mode: run images with more tiles in row bands of about this many tiles; "
        "a rerun after an interruption keeps the finished bands, and a batch runs the bands "
        f"of one image in parallel ({help_default(JobsConfig, 'region_tiles')})",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per process (default: all cores serially, cores/N per "
        "worker); serial and distributed outputs are bit-identical at equal --threads",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        default=None,
        help="when another run is writing the same --out, wait for it to end (then resume "
        "or redo) instead of refusing with exit code 2",
    )


#: Flags of ``tilenet infer`` by the config section whose key of the same name they set.
INFER_FLAGS: dict[str, Sequence[str]] = {
    "infer": (
        "tile",
        "mode",
        "overlap",
        "halo",
        "level",
        "bands",
        "batch",
        "device",
        "precision",
        "decode",
        "tta",
        "compile",
        "outputs",
        "probabilities_dtype",
        "geojson_crs",
        "min_foreground",
        "tissue",
        "stain",
        "stain_method",
        "readers",
        "heap",
        "disk_check",
    ),
    "resolution": ("mpp", "gsd", "magnification", "assume_mpp", "max_upsample"),
    "jobs": (
        "workers",
        "scheduler",
        "retry_failed",
        "force",
        "quiet",
        "log_json",
        "region_tiles",
        "threads",
        "wait",
    ),
}


def _cmd_infer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tilenet.engine.infer import infer_image
    from tilenet.io.storage import is_image_url

    cfg, inputs = cli_config(args.inputs, args, INFER_FLAGS)
    if not inputs:
        raise InputError("no INPUT image given (only conf=FILE / key=value items)")
    infer: InferConfig = config_section(cfg, "infer")
    jobs: JobsConfig = config_section(cfg, "jobs")
    reader: ReaderConfig = config_section(cfg, "reader")
    if args.level is not None:  # an explicit level: not the checkpoint's pixel size
        cfg.resolution.from_checkpoint = False
    resolution = config_section(cfg, "resolution")
    # A batch job (manifest, per-image directories) when asked for one by a job option.
    batch = any((jobs.workers, jobs.scheduler, jobs.retry_failed, jobs.force, jobs.log_json))
    single = len(inputs) == 1 and (Path(inputs[0]).is_file() or is_image_url(inputs[0]))
    if batch or not single:
        from tilenet.jobs import format_report, run_jobs

        report = run_jobs(
            inputs,
            args.model,
            args.out,
            reader=reader,
            resolution=resolution,
            config=infer,
            **asdict(jobs),
        )
        print(format_report(report))
        return report.exit_code
    from tilenet.runtime import torch_threads

    with torch_threads(jobs.threads):
        summary = infer_image(
            inputs[0],
            args.model,
            args.out,
            progress=not jobs.quiet,
            region_tiles=jobs.region_tiles,
            reader=reader,
            resolution=resolution,
            wait=jobs.wait,
            config=infer,
        )
    for name, path in summary["outputs"].items():
        print(f"{name}: {path}")
    print(f"{summary['tiles']} tiles in {summary['timings']['total_s']:.1f} s")
    if summary.get("tiles_skipped"):
        print(
            f"tilenet: skipped {summary['tiles_skipped']} of {summary['tiles']} tiles "
            "(off tissue or foreground; written as class 0)",
            file=sys.stderr,
        )
    return EXIT_OK
