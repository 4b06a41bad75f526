"""``tilenet tile``: cut images (+ labels) into a chunked zarr patch store for training."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from tilenet.cli._common import (
    CONFIG_ITEMS,
    add_resolution_flags,
    cli_config,
    config_section,
    help_default,
    int_list,
)
from tilenet.config import TilingConfig
from tilenet.errors import scrub_credentials

__all__ = ["TILE_FLAGS", "TISSUE_FRACTION", "add_tile"]

#: The tissue fraction a patch needs with ``--tissue`` given alone.
TISSUE_FRACTION = 0.25


def add_tile(sub: Any) -> None:
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
    _add_label_flags(p)
    p.add_argument(
        "--out",
        required=True,
        help="output store (.zarr): a local path, or a bucket URL (s3://B/p.zarr), where the "
        "store is tiled in a local stage and uploaded when complete",
    )
    p.add_argument(
        "--patch", type=int, help=f"patch side in pixels ({help_default(TilingConfig, 'patch')})"
    )
    p.add_argument(
        "--overlap",
        type=int,
        help=f"overlap of neighbouring patches, even ({help_default(TilingConfig, 'overlap')})",
    )
    p.add_argument(
        "--level", type=int, help=f"pyramid level to cut ({help_default(TilingConfig, 'level')})"
    )
    add_resolution_flags(p)
    p.add_argument(
        "--min-foreground",
        type=float,
        help="drop patches whose foreground fraction (Otsu on a low-resolution level) is "
        f"below this, 0..1 ({help_default(TilingConfig, 'min_foreground')}: keep all)",
    )
    p.add_argument(
        "--tissue",
        type=float,
        nargs="?",
        const=TISSUE_FRACTION,
        metavar="FRACTION",
        help="keep only patches on tissue: at least FRACTION of the patch (default "
        f"{TISSUE_FRACTION} when given alone) on the tissue mask of `tilenet tissue` "
        "(saturation, Otsu, pen marks and dark borders out); off by default",
    )
    p.add_argument(
        "--bands",
        type=int_list,
        help="bands to keep, 1-based, in the model's order, e.g. 4,3,2 (all)",
    )
    p.add_argument(
        "--threads",
        "--workers",
        dest="workers",
        type=int,
        metavar="N",
        help="threads reading and writing patches in this process; --workers is the old name "
        "(infer's --workers are worker processes) "
        f"({help_default(TilingConfig, 'workers')})",
    )
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    p.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="one JSON object per event on stderr",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        default=None,
        help="when another run is tiling into the same --out, wait for it to end (then "
        "append or skip) instead of refusing with exit code 2",
    )
    p.set_defaults(handler=_cmd_tile, items_dest="images")


def _add_label_flags(p: Any) -> None:
    """--labels, --annotations, --vector-labels, --label-field, --outside, --min-annotated."""
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
        f"'background' ({help_default(TilingConfig, 'outside')}); nodata pixels are always ignored",
    )
    p.add_argument(
        "--min-annotated",
        type=float,
        help="keep only patches with at least this fraction annotated, 0..1 "
        f"({help_default(TilingConfig, 'min_annotated')})",
    )


#: Flags of ``tilenet tile`` by the config section whose key of the same name they set.
TILE_FLAGS: dict[str, Sequence[str]] = {
    "tiling": (
        "patch",
        "overlap",
        "level",
        "min_foreground",
        "tissue",
        "workers",
        "annotations",
        "vector_labels",
        "label_field",
        "outside",
        "min_annotated",
        "bands",
    ),
    "resolution": ("mpp", "gsd", "magnification", "assume_mpp", "max_upsample"),
    "jobs": ("quiet", "log_json", "wait"),
}


def _cmd_tile(args: argparse.Namespace) -> int:
    from tilenet.jobs import format_report, tile_jobs
    from tilenet.patches.patchstore import read_attrs

    cfg, images = cli_config(args.images, args, TILE_FLAGS)
    before = int((read_attrs(args.out) or {}).get("count", 0))
    report = tile_jobs(
        images,
        labels=args.labels,
        out=args.out,
        quiet=cfg.jobs.quiet,
        log_json=cfg.jobs.log_json,
        wait=cfg.jobs.wait,
        reader=config_section(cfg, "reader"),
        resolution=config_section(cfg, "resolution"),
        **asdict(config_section(cfg, "tiling")),
    )
    added = int((read_attrs(args.out) or {}).get("count", 0)) - before
    if report.done and added:
        print(scrub_credentials(f"wrote {args.out} ({added} patches)"))
    elif report.skipped and not report.failed:
        print(scrub_credentials(f"{args.out}: nothing new, every image is already in the store"))
    else:
        print(scrub_credentials(f"nothing written to {args.out}"))
    print(format_report(report))
    return report.exit_code
