"""The ``tilenet`` command line. Thin: parse, build config, call one library function.

Exit codes: 0 ok, 1 some items of a batch failed, 2 bad input or usage. A
:class:`~tilenet.errors.TilenetError` prints one line on stderr (no traceback unless
``--debug``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from tilenet.config import InferConfig, JobsConfig, ReaderConfig, TilingConfig
from tilenet.errors import (
    EXIT_OK,
    EXIT_USAGE,
    InputError,
    credentials_scrubbed,
    run_guarded,
    scrub_credentials,
)
from tilenet.outputs.formats import FORMATS, formats_help

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
  tilenet tile scans/ --out p.zarr conf=my.yaml tiling.patch=512   # config file + override
  tilenet tile slides/ --annotations qupath_export/ --min-annotated 0.3 --out p.zarr
  tilenet tile scenes/ --vector-labels fields.gpkg --label-field crop --out p.zarr
  tilenet infer slides/ --model best.pt --out results --workers 2   # batch, resumable
config: tile, infer and info also take conf=FILE and section.key=value items (as training
does); flags given on the command line win over them, and they over the defaults
(python -m tilenet.train --print-config lists every key).
exit codes: 0 ok, 1 some items of a batch failed, 2 bad input or usage.
"""


#: Help for the conf=FILE / key=value items a subcommand accepts.
CONFIG_ITEMS = "conf=FILE and section.key=value items (e.g. {example}) configure it as in training"


def _default(section: type, key: str) -> str:
    """``default X`` for a help text, X read from the config dataclass (defaults live there)."""
    value = getattr(section(), key)
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"default {value}"


def _config(items: Sequence[str], args: argparse.Namespace, flags: dict[str, Sequence[str]]) -> Any:
    """The config from ``items`` (conf=FILE, key=value) and the flags given; and the rest.

    Precedence: dataclass defaults < conf file < key=value < flags given on the command line
    (a flag left out is ``None`` and changes nothing). ``flags`` maps a config section to the
    argparse destinations that set its keys of the same name. Returns ``(cfg, rest)`` with the
    items that are neither conf= nor key=value, in order.
    """
    from omegaconf.errors import OmegaConfBaseException

    from tilenet.config import load_config, split_config_args
    from tilenet.errors import ConfigError

    conf, overrides, rest = split_config_args(items)
    cfg = load_config(conf, overrides)
    for section, names in flags.items():
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            try:
                cfg[section][name] = value
            except OmegaConfBaseException as exc:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {value!r}: {str(exc).splitlines()[0]}") from None
    return cfg, rest


def _section(cfg: Any, name: str) -> Any:
    """Section ``name`` of a loaded config as its dataclass instance."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg[name])


def _add_info(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="describe an image: format, shape, dtype, levels, chunking, compression, MPP",
        description=(
            "Describe an image without decoding its pixels. Whole-slide images also show the "
            "scanner vendor, the microns per pixel (MPP, y x) of level 0 and of every level, the "
            "objective power, and the associated images (label, macro, thumbnail), which are "
            "never pyramid levels. --json carries the same as mpp, level_mpp, vendor, "
            "objective_power and associated_images."
        ),
    )
    p.add_argument(
        "items",
        nargs="+",
        metavar="PATH",
        help="image file, zarr store, or DICOM-WSI directory; "
        + CONFIG_ITEMS.format(example="reader.max_pixels_eager=400000000"),
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_cmd_info, items_dest="items")


def _cmd_info(args: argparse.Namespace) -> int:
    from tilenet.io import open_image

    cfg, paths = _config(args.items, args, {})
    if len(paths) != 1:
        raise InputError(f"give one image path, got {len(paths)}: {' '.join(paths) or '-'}")
    with open_image(paths[0], **asdict(_section(cfg, "reader"))) as img:
        info = img.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"path:        {info['path']}")
    print(f"format:      {info['format']}")
    print(f"shape:       {' x '.join(map(str, info['shape']))}  (H x W x C)")
    print(f"dtype:       {info['dtype']}")
    print(f"compression: {info['compression'] or 'none'}")
    if info["vendor"]:
        print(f"vendor:      {info['vendor']}")
    if info["pixel_size"]:
        print(f"pixel size:  {info['pixel_size'][0]:g} x {info['pixel_size'][1]:g} um")
        print(f"mpp:         {info['mpp'][0]:g} x {info['mpp'][1]:g}  (y x, um per pixel)")
    if info["objective_power"]:
        print(f"objective:   {info['objective_power']:g}x")
    if info["crs"] or info["transform"]:
        crs = f"EPSG:{info['epsg']}" if info["epsg"] else (info["crs"] or "none").splitlines()[0]
        print(f"crs:         {crs[:100]}")
        coefs = ", ".join(f"{v:.10g}" for v in info["transform"] or [])
        print(f"transform:   {coefs}  (GDAL order)")
        if info["gsd"]:
            units = info["crs_units"] or "CRS units"
            print(f"gsd:         {info['gsd'][0]:g} x {info['gsd'][1]:g} {units}")
    if info["nodata"] is not None:
        print(f"nodata:      {info['nodata']:g}")
    if info["bands"]:
        print(f"bands:       {', '.join(info['bands'])}")
    print("levels:")
    for i, (shape, ds, ch) in enumerate(
        zip(info["levels"], info["downsamples"], info["chunks"], strict=True)
    ):
        chunk = f"tiles {ch[0]}x{ch[1]}" if ch else "untiled"
        mpp = ""
        if info["level_mpp"]:
            mpp = "  mpp {:.4g} x {:.4g}".format(*info["level_mpp"][i])
        print(f"  {i}: {shape[0]} x {shape[1]}  (downsample {ds[0]:g}, {chunk}){mpp}")
    if info["associated_images"]:
        print("associated images (not levels):")
        for name, (h, w) in info["associated_images"].items():
            print(f"  {name}: {h} x {w}")
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
    p.add_argument(
        "output",
        help="output path ending in .tif, .tiff or .zarr; a bucket URL is converted in a "
        "local stage and uploaded when complete",
    )
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
    print(scrub_credentials(f"wrote {out}"))
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
    from tilenet.patches.synth import synthesize

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
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, directories or glob patterns; "
        + CONFIG_ITEMS.format(example="tiling.chunk_patches=16"),
    )
    p.add_argument(
        "--labels",
        default=None,
        help="label images: a directory (matched to images by file name), a glob, or a "
        "pattern with {stem} such as 'masks/{stem}_mask.tif'; same size as the images",
    )
    p.add_argument(
        "--annotations",
        default=None,
        metavar="FILE|DIR|PATTERN",
        help="labels from QuPath annotations instead: GeoJSON exports (classification.name) in "
        "level-0 pixels, matched to images by name (DIR/{stem}.geojson); rasterized per patch, "
        "patches cut only where annotations are",
    )
    p.add_argument(
        "--vector-labels",
        default=None,
        metavar="FILE",
        help="labels from one vector file (GeoPackage, Shapefile, GeoJSON, FlatGeobuf) in any "
        "CRS, reprojected to each raster; scenes it misses are skipped with a warning",
    )
    p.add_argument(
        "--label-field",
        default=None,
        help="the field (property) holding the class name (needed with --vector-labels; "
        "QuPath: classification.name)",
    )
    p.add_argument(
        "--outside",
        choices=("ignore", "background"),
        default=None,
        help="pixels outside every polygon: ignored by the loss (255) or class 0 "
        f"'background' ({_default(TilingConfig, 'outside')}); nodata pixels are always ignored",
    )
    p.add_argument(
        "--min-annotated",
        type=float,
        help="keep only patches with at least this fraction annotated, 0..1 "
        f"({_default(TilingConfig, 'min_annotated')})",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output store (.zarr): a local path, or a bucket URL (s3://B/p.zarr), where the "
        "store is tiled in a local stage and uploaded when complete",
    )
    p.add_argument(
        "--patch", type=int, help=f"patch side in pixels ({_default(TilingConfig, 'patch')})"
    )
    p.add_argument(
        "--overlap",
        type=int,
        help=f"overlap of neighbouring patches, even ({_default(TilingConfig, 'overlap')})",
    )
    p.add_argument(
        "--level", type=int, help=f"pyramid level to cut ({_default(TilingConfig, 'level')})"
    )
    _add_resolution_flags(p)
    p.add_argument(
        "--min-foreground",
        type=float,
        help="drop patches whose foreground fraction (Otsu on a low-resolution level) is "
        f"below this, 0..1 ({_default(TilingConfig, 'min_foreground')}: keep all)",
    )
    p.add_argument(
        "--bands",
        type=_int_list,
        help="bands to keep, 1-based, in the model's order, e.g. 4,3,2 (all)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help=f"parallel dask threads ({_default(TilingConfig, 'workers')})",
    )
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    p.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="one JSON object per event on stderr",
    )
    p.set_defaults(handler=_cmd_tile, items_dest="images")


def _add_resolution_flags(p: Any, *, infer: bool = False) -> None:
    """--mpp, --gsd, --magnification, --assume-mpp (the ``resolution`` config section)."""
    p.add_argument(
        "--mpp",
        type=float,
        metavar="UM",
        help="work at this pixel size in µm per pixel, e.g. --mpp 0.5: run at 0.5 µm/px: the "
        "nearest finer pyramid level, resampled by the rest per window (area averaging; a "
        "level within resolution.tolerance, 5%%, is used as is)"
        + ("; default: the pixel size the checkpoint was trained at" if infer else ""),
    )
    p.add_argument(
        "--gsd",
        type=float,
        metavar="SIZE",
        help="georeferenced rasters: work at this ground sample distance in the CRS's units "
        "per pixel, e.g. --gsd 10 (metres in a UTM zone): the nearest finer overview, "
        "resampled by the rest; outputs get the scaled geotransform",
    )
    p.add_argument(
        "--magnification",
        type=float,
        metavar="X",
        help="slides stating their objective power: work at this magnification, e.g. 10 on a "
        "40x scan = 4x its level-0 pixel size",
    )
    p.add_argument(
        "--assume-mpp",
        type=float,
        metavar="UM",
        help="the pixel size (µm) of an image whose file states none (for --mpp)",
    )


#: Flags of ``tilenet tile`` by the config section whose key of the same name they set.
TILE_FLAGS: dict[str, Sequence[str]] = {
    "tiling": (
        "patch",
        "overlap",
        "level",
        "min_foreground",
        "workers",
        "annotations",
        "vector_labels",
        "label_field",
        "outside",
        "min_annotated",
        "bands",
    ),
    "resolution": ("mpp", "gsd", "magnification", "assume_mpp"),
    "jobs": ("quiet", "log_json"),
}


def _cmd_tile(args: argparse.Namespace) -> int:
    from tilenet.jobs import format_report, tile_jobs

    cfg, images = _config(args.images, args, TILE_FLAGS)
    report = tile_jobs(
        images,
        labels=args.labels,
        out=args.out,
        quiet=cfg.jobs.quiet,
        log_json=cfg.jobs.log_json,
        reader=_section(cfg, "reader"),
        resolution=_section(cfg, "resolution"),
        **asdict(_section(cfg, "tiling")),
    )
    print(scrub_credentials(f"wrote {args.out}"))
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
        "images already done (exit 1 if any image failed). "
        + CONFIG_ITEMS.format(example="infer.mode=gaussian jobs.workers=2"),
    )
    p.add_argument(
        "--model", required=True, metavar="CKPT", help="checkpoint (.pt) written by training"
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory")
    p.add_argument(
        "--tile",
        type=int,
        help=f"tile (read window) side in pixels ({_default(InferConfig, 'tile')})",
    )
    p.add_argument(
        "--mode",
        choices=["crop", "gaussian", "linear"],
        help="crop: keep cores, exact; gaussian/linear: weighted blend of overlaps "
        f"({_default(InferConfig, 'mode')})",
    )
    p.add_argument(
        "--overlap",
        type=float,
        help=f"blend overlap as a fraction of the tile ({_default(InferConfig, 'overlap')})",
    )
    p.add_argument(
        "--halo", type=int, help="crop-mode halo in pixels (default: the receptive field)"
    )
    p.add_argument(
        "--level", type=int, help=f"pyramid level to run on ({_default(InferConfig, 'level')})"
    )
    _add_resolution_flags(p, infer=True)
    p.add_argument(
        "--bands",
        type=_int_list,
        help="input bands for the model, 1-based, in the model's order, e.g. 4,3,2 (all)",
    )
    p.add_argument(
        "--batch", type=int, help=f"tiles per forward pass ({_default(InferConfig, 'batch')})"
    )
    p.add_argument(
        "--device", help=f"cpu, cuda, cuda:N or auto ({_default(InferConfig, 'device')})"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help=_default(InferConfig, "precision"),
    )
    p.add_argument("--tta", action="store_true", default=None, help="average over 4 flips")
    p.add_argument(
        "--outputs",
        type=_comma_list,
        help=f"comma-separated subset of {','.join(FORMATS)} ({formats_help()}) "
        f"({_default(InferConfig, 'outputs')})",
    )
    p.add_argument(
        "--geojson-crs",
        choices=["input", "wgs84"],
        help="georeferenced inputs: instances.geojson and classes.geojson in the input's CRS "
        f"or in lon/lat (RFC 7946) ({_default(InferConfig, 'geojson_crs')})",
    )
    p.add_argument(
        "--probabilities-dtype",
        choices=["float16", "uint8", "float32"],
        help="storage of probabilities, uint8 = p*255 "
        f"({_default(InferConfig, 'probabilities_dtype')})",
    )
    p.add_argument(
        "--min-foreground",
        type=float,
        help="skip tiles whose low-resolution foreground fraction is below this "
        f"({_default(InferConfig, 'min_foreground')})",
    )
    p.add_argument(
        "--readers", type=int, help=f"tile reader threads ({_default(InferConfig, 'readers')})"
    )
    p.add_argument(
        "--heap",
        choices=("reuse", "flat", "trim", "system"),
        help="host memory policy during the run (restored after it): reuse keeps freed "
        "buffers for the next batch, fast on a CPU, and goes flat if the heap it keeps "
        "passes twice the first batch's working set; flat returns every large buffer at "
        "once, for the lowest peak RSS at 1.2-1.8x slower CPU forward passes; trim and "
        "system leave glibc's settings alone (trim still hands free memory back every 8 "
        f"batches) ({_default(InferConfig, 'heap')})",
    )
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    p.add_argument(
        "--workers",
        type=int,
        help="batch on a dask LocalCluster of N worker processes (one per GPU with CUDA); "
        f"0 = in this process ({_default(JobsConfig, 'workers')})",
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
        f"of one image in parallel ({_default(JobsConfig, 'region_tiles')})",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per process (default: all cores serially, cores/N per "
        "worker); serial and distributed outputs are bit-identical at equal --threads",
    )
    p.set_defaults(handler=_cmd_infer, items_dest="inputs")


def _comma_list(text: str) -> list[str]:
    return [o.strip() for o in text.split(",") if o.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(o) for o in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated band numbers, got {text!r}"
        ) from None


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
        "tta",
        "outputs",
        "probabilities_dtype",
        "geojson_crs",
        "min_foreground",
        "readers",
        "heap",
    ),
    "resolution": ("mpp", "gsd", "magnification", "assume_mpp"),
    "jobs": (
        "workers",
        "scheduler",
        "retry_failed",
        "force",
        "quiet",
        "log_json",
        "region_tiles",
        "threads",
    ),
}


def _cmd_infer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tilenet.engine.infer import infer_image
    from tilenet.io.storage import is_image_url

    cfg, inputs = _config(args.inputs, args, INFER_FLAGS)
    if not inputs:
        raise InputError("no INPUT image given (only conf=FILE / key=value items)")
    options = asdict(_section(cfg, "infer"))
    jobs: JobsConfig = _section(cfg, "jobs")
    reader: ReaderConfig = _section(cfg, "reader")
    if args.level is not None:  # an explicit level: not the checkpoint's pixel size
        cfg.resolution.from_checkpoint = False
    resolution = _section(cfg, "resolution")
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
            **asdict(jobs),
            **options,
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
    p.set_defaults(handler=_cmd_plan, items_dest="overrides")


def _cmd_plan(args: argparse.Namespace) -> int:
    from tilenet.engine.plan import format_plan, plan_model
    from tilenet.errors import ConfigError

    cfg, rest = _config(args.overrides, args, {})
    if rest:
        raise ConfigError(
            f"{rest[0]!r} is not conf=FILE or section.key=value (e.g. model.name=unet)"
        )
    # The input bands the model takes, as the config picks them (a checkpoint records them).
    picked = next((k for k in ("infer", "data", "tiling") if cfg[k].bands), None)
    result = plan_model(
        cfg.model,
        tile=args.tile,
        batch=args.batch,
        memory=args.memory,
        precisions=args.precision,
        measure=False if args.no_measure else None,
        bands=list(cfg[picked].bands) if picked else None,
        bands_from=f"{picked}.bands" if picked else None,
    )
    if cfg.model.weights:  # plan reads no files; the weights must still fit the model
        from tilenet.engine.checkpoint import load_weights
        from tilenet.models import create_model_from_config

        load_weights(create_model_from_config(cfg.model), cfg.model.weights)
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
    from tilenet.cli.demo import run_demo

    result = run_demo(args.out, progress=not args.quiet)
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
    from tilenet._version import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Items after a flag (``tile IMG --out S conf=FILE``) belong to the subcommand's items
    # list; argparse alone leaves a positional list split by flags unrecognised.
    dest: str | None = getattr(args, "items_dest", None)
    if extra:
        if dest is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, dest).extend(extra)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler: Handler = args.handler
    show = warnings.formatwarning
    # A warning is one line, as errors are (the source line means nothing to a user).
    warnings.formatwarning = lambda msg, *a, **k: (
        f"tilenet: warning: {scrub_credentials(str(msg))}\n"
    )
    try:
        with credentials_scrubbed():
            return run_guarded(lambda: handler(args), debug=args.debug)
    finally:
        warnings.formatwarning = show


if __name__ == "__main__":
    sys.exit(main())
