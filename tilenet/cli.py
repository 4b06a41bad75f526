"""The ``tilenet`` command line. Thin: parse, build config, call one library function.

Exit codes: 0 ok, 1 some items of a batch failed, 2 bad input or usage. A
:class:`~tilenet.errors.TilenetError` prints one line on stderr (no traceback unless
``--debug``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tilenet.errors import EXIT_OK, EXIT_USAGE, run_guarded

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]

DESCRIPTION = """\
tilenet: deep learning on images too large for memory.

Cut gigapixel images into overlapping patches (tile), train a fully convolutional network
on streamed patches (python -m tilenet.train), and run seam-free tiled inference whose
outputs open in QuPath, napari and QGIS (infer). Memory is bounded by the tile, never by
the image.
"""

EPILOG = """\
examples:
  tilenet synth data/synth --size 2048 --count 4     # deterministic synthetic dataset
  tilenet info data/synth/images/synth_000.tif       # what is in an image
  tilenet convert scan.png scan.ome.tif               # any readable image -> pyramidal OME-TIFF
  tilenet tile data/synth/images --labels data/synth/labels --out patches.zarr
  tilenet infer slides/ --model best.pt --out results --workers 2   # batch, resumable
exit codes: 0 ok, 1 some items of a batch failed, 2 bad input or usage.
"""


def _add_info(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="describe an image: format, shape, dtype, levels, chunking, compression",
        description="Describe an image without decoding its pixels.",
    )
    p.add_argument("path", help="image file or zarr store")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from tilenet.io import open_image

    with open_image(args.path) as img:
        info = img.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"path:        {info['path']}")
    print(f"format:      {info['format']}")
    print(f"shape:       {' x '.join(map(str, info['shape']))}  (H x W x C)")
    print(f"dtype:       {info['dtype']}")
    print(f"compression: {info['compression'] or 'none'}")
    if info["pixel_size"]:
        print(f"pixel size:  {info['pixel_size'][0]:g} x {info['pixel_size'][1]:g} um")
    print("levels:")
    for i, (shape, ds, ch) in enumerate(
        zip(info["levels"], info["downsamples"], info["chunks"], strict=True)
    ):
        chunk = f"tiles {ch[0]}x{ch[1]}" if ch else "untiled"
        print(f"  {i}: {shape[0]} x {shape[1]}  (downsample {ds[0]:g}, {chunk})")
    return EXIT_OK


def _add_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert any readable image to a tiled pyramidal OME-TIFF or OME-Zarr (streamed)",
        description=(
            "Convert an image to a tiled, pyramidal OME-TIFF (.tif/.tiff) or OME-Zarr (.zarr), "
            "chunk by chunk, so any size works in bounded memory. Lossless by default: level 0 "
            "holds the input's pixels exactly."
        ),
    )
    p.add_argument("input", help="input image")
    p.add_argument("output", help="output path ending in .tif, .tiff or .zarr")
    p.add_argument("--tile", type=int, default=512, help="tile/chunk size (default 512)")
    p.add_argument(
        "--compression",
        default=None,
        help="TIFF: zlib (default), zstd, lzw or none, all lossless, or jpeg: LOSSY (quality "
        "90, 8-bit grey or RGB only), much smaller. zarr: blosc (default), lz4, zlib, zstd or "
        "none, all lossless",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(handler=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from tilenet.io import convert

    out = convert(
        args.input, args.output, tile=args.tile, compression=args.compression, force=args.force
    )
    print(f"wrote {out}")
    return EXIT_OK


def _add_synth(sub: Any) -> None:
    p = sub.add_parser(
        "synth",
        help="make a deterministic synthetic dataset (images + label maps)",
        description=(
            "Write OUT_DIR/images/*.tif (tiled pyramidal RGB) and OUT_DIR/labels/*.tif "
            "(uint8 class maps: 0 background, 1 cell, 2 stroma), generated chunk by chunk."
        ),
    )
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    p.add_argument("--count", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from tilenet.synth import synthesize

    paths = synthesize(args.out_dir, size=args.size, count=args.count, seed=args.seed)
    for img, lab in paths:
        print(f"{img}  {lab}")
    return EXIT_OK


def _add_tile(sub: Any) -> None:
    p = sub.add_parser(
        "tile",
        help="cut images (+ label images) into a chunked zarr patch store for training",
        description=(
            "Cut images into PATCH x PATCH patches overlapping by OVERLAP pixels and write them "
            "to a sharded zarr v3 store (images, labels, coords, plus statistics). Patches are "
            "bit-exact copies of the source. Rerunning into an existing store skips images "
            "already complete and appends new ones; an interrupted run resumes. An unreadable "
            "image is recorded as failed in OUT.manifest.jsonl and the others are still tiled "
            "(exit 1)."
        ),
    )
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    p.add_argument(
        "--labels",
        default=None,
        help="label images: a directory (matched to images by file name), a glob, or a "
        "pattern with {stem} such as 'masks/{stem}_mask.tif'; same size as the images",
    )
    p.add_argument("--out", required=True, help="output store (.zarr)")
    p.add_argument("--patch", type=int, default=256, help="patch side in pixels (default 256)")
    p.add_argument(
        "--overlap", type=int, default=32, help="overlap of neighbouring patches, even (default 32)"
    )
    p.add_argument("--level", type=int, default=0, help="pyramid level to cut (default 0)")
    p.add_argument(
        "--min-foreground",
        type=float,
        default=0.0,
        help="drop patches whose foreground fraction (Otsu on a low-resolution level) is "
        "below this, 0..1 (default 0: keep all)",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel dask threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-json", action="store_true", help="one JSON object per event on stderr")
    p.set_defaults(handler=_cmd_tile)


def _cmd_tile(args: argparse.Namespace) -> int:
    from tilenet.jobs import format_report, tile_jobs

    report = tile_jobs(
        args.images,
        labels=args.labels,
        out=args.out,
        patch=args.patch,
        overlap=args.overlap,
        level=args.level,
        min_foreground=args.min_foreground,
        workers=args.workers,
        quiet=args.quiet,
        log_json=args.log_json,
    )
    print(f"wrote {args.out}")
    print(format_report(report))
    return report.exit_code


def _add_infer(sub: Any) -> None:
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
        "images already done (exit 1 if any image failed)",
    )
    p.add_argument(
        "--model", required=True, metavar="CKPT", help="checkpoint (.pt) written by training"
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument("--tile", type=int, help="tile (read window) side in pixels (default 1024)")
    p.add_argument(
        "--mode",
        choices=["crop", "gaussian", "linear"],
        help="crop: keep cores, exact (default); gaussian/linear: weighted blend of overlaps",
    )
    p.add_argument(
        "--overlap", type=float, help="blend overlap as a fraction of the tile (default 0.25)"
    )
    p.add_argument(
        "--halo", type=int, help="crop-mode halo in pixels (default: the receptive field)"
    )
    p.add_argument("--level", type=int, help="pyramid level to run on (default 0)")
    p.add_argument("--batch", type=int, help="tiles per forward pass (default 4)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    p.add_argument("--tta", action="store_true", default=None, help="average over 4 flips")
    p.add_argument(
        "--outputs",
        help="comma-separated subset of probabilities,classes,instances,preview,geojson "
        "(default probabilities,classes,instances,preview)",
    )
    p.add_argument(
        "--probabilities-dtype",
        choices=["float16", "uint8", "float32"],
        help="storage of probabilities (default float16; uint8 = p*255)",
    )
    p.add_argument(
        "--min-foreground",
        type=float,
        help="skip tiles whose low-resolution foreground fraction is below this (default 0)",
    )
    p.add_argument("--readers", type=int, help="tile reader threads (default 2)")
    p.add_argument(
        "--heap",
        choices=("reuse", "flat"),
        help="host memory policy: reuse (default) keeps freed buffers for the next batch, "
        "fast on a CPU; flat returns every large buffer at once, so peak RSS stays flat on "
        "gigapixel images at 1.4-1.8x slower CPU forward passes",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="batch on a dask LocalCluster of N worker processes (one per GPU with CUDA); "
        "0 = in this process (default)",
    )
    p.add_argument("--scheduler", metavar="ADDRESS", help="batch on an existing dask cluster")
    p.add_argument("--retry-failed", action="store_true", help="batch: retry earlier failures")
    p.add_argument("--force", action="store_true", help="batch: redo every image")
    p.add_argument(
        "--log-json", action="store_true", help="batch: one JSON object per event on stderr"
    )
    p.add_argument(
        "--region-tiles",
        type=int,
        help="batch, crop mode: split images with more tiles into row bands of about this "
        "many tiles, run in parallel and resumed band by band (default 256)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="batch: torch threads per process (default: all cores serially, cores/N per "
        "worker); serial and distributed outputs are bit-identical at equal --threads",
    )
    p.set_defaults(handler=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tilenet.infer import infer_image

    keys: tuple[str, ...] = ("tile", "mode", "overlap", "halo", "level", "batch", "device")
    keys += ("precision", "tta", "probabilities_dtype", "min_foreground", "readers", "heap")
    options = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.outputs is not None:
        options["outputs"] = [o.strip() for o in args.outputs.split(",") if o.strip()]
    job_flags = args.workers or args.scheduler or args.retry_failed or args.force or args.log_json
    job_flags = job_flags or args.region_tiles is not None or args.threads is not None
    single = len(args.inputs) == 1 and Path(args.inputs[0]).is_file()
    if job_flags or not single:
        from tilenet.jobs import format_report, run_jobs

        report = run_jobs(
            args.inputs,
            args.model,
            args.out,
            workers=args.workers,
            scheduler=args.scheduler,
            retry_failed=args.retry_failed,
            force=args.force,
            quiet=args.quiet,
            log_json=args.log_json,
            region_tiles=256 if args.region_tiles is None else args.region_tiles,
            threads=args.threads,
            **options,
        )
        print(format_report(report))
        return report.exit_code
    summary = infer_image(
        args.inputs[0],
        args.model,
        args.out,
        progress=not args.quiet and sys.stderr.isatty(),
        **options,
    )
    for name, path in summary["outputs"].items():
        print(f"{name}: {path}")
    print(f"{summary['tiles']} tiles in {summary['timings']['total_s']:.1f} s")
    return EXIT_OK


def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="parameters, receptive field, halo and memory of a model; the batch that fits",
        description=(
            "Explain what a model costs before running it: parameter count (and what a fully "
            "connected layer on the same tile would need), receptive field, stride and the "
            "halo that makes tiled inference exact, activation memory per tile (forward only "
            "for inference, forward+backward for training) and the largest batch that fits a "
            "memory budget per tile size and precision. With CUDA, also the peak memory "
            "measured for one batch. The model comes from the config's 'model' section."
        ),
        epilog="example: tilenet plan conf=conf/demo.yaml model.name=unet_resnet34 --tile 2048",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="conf=PATH (a YAML config) and dotted overrides such as model.name=unet "
        "or model.kwargs.depth=3",
    )
    p.add_argument(
        "--memory", default=None, help="memory budget, e.g. 80GiB (default: the GPU's, else 16GiB)"
    )
    p.add_argument("--tile", type=int, default=1024, help="tile side in pixels (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="batch for the estimate (default 1)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        action="append",
        help="precision(s) to show (repeatable; default all three)",
    )
    p.add_argument(
        "--no-measure", action="store_true", help="skip the CUDA measurement even with a GPU"
    )
    p.add_argument("--json", action="store_true", help="print the same figures as JSON")
    p.set_defaults(handler=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from tilenet.config import load_config
    from tilenet.errors import ConfigError
    from tilenet.plan import format_plan, plan_model

    conf = [o.split("=", 1)[1] for o in args.overrides if o.startswith("conf=")]
    if len(conf) > 1:
        raise ConfigError("give conf=PATH at most once")
    rest = [o for o in args.overrides if not o.startswith("conf=")]
    cfg = load_config(conf[0] if conf else None, rest)
    result = plan_model(
        cfg.model,
        tile=args.tile,
        batch=args.batch,
        memory=args.memory,
        precisions=args.precision,
        measure=False if args.no_measure else None,
    )
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return EXIT_OK


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on synthetic data: synth, tile, train, infer, score (minutes)",
        description=(
            "Make a small synthetic dataset (tilenet synth), tile it, train with "
            "conf/demo.yaml, run tilenet infer on a held-out synthetic image and print its "
            "foreground Dice against the labels and the output paths. DIR/demo.json holds "
            "dice, seconds and the outputs. About 5 minutes on 2 CPU cores."
        ),
    )
    p.add_argument(
        "--out",
        default="tilenet-demo",
        metavar="DIR",
        help="directory for everything (default ./tilenet-demo)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from tilenet.demo import run_demo

    result = run_demo(args.out, progress=not args.quiet and sys.stderr.isatty())
    print(f"foreground Dice (mean over classes): {result['dice']:.4f}")
    print(f"foreground Dice (binary):            {result['dice_foreground_binary']:.4f}")
    print(f"seconds: {result['seconds']}")
    for name, path in result["outputs"].items():
        print(f"{name}: {path}")
    return EXIT_OK


#: Subcommands in the order --help lists them.
COMMANDS: list[Callable[[Any], None]] = [
    _add_info,
    _add_convert,
    _add_synth,
    _add_tile,
    _add_infer,
    _add_plan,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilenet",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"tilenet {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _version() -> str:
    from tilenet import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler: Handler = args.handler
    return run_guarded(lambda: handler(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
