"""``tilenet info``: describe an image without decoding its pixels."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from tilenet.cli._common import CONFIG_ITEMS, cli_config, config_section
from tilenet.errors import (
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    InputError,
    TilenetError,
    first_line,
    one_line,
)

__all__ = ["add_info"]


def add_info(sub: Any) -> None:
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
        help="image files, zarr stores or DICOM-WSI directories, each described in turn (an "
        "image that cannot be read is one error line and the others go on; exit 1 if some "
        "failed, 2 if all did; --json: one object, or an array for several); "
        + CONFIG_ITEMS.format(example="reader.max_pixels_eager=400000000"),
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_cmd_info, items_dest="items")


def _cmd_info(args: argparse.Namespace) -> int:
    from tilenet.io import open_image

    cfg, paths = cli_config(args.items, args, {})
    if not paths:
        raise InputError("give an image path")
    reader = asdict(config_section(cfg, "reader"))
    if len(paths) == 1:  # one image: its error is the run's (one line, exit 2)
        with open_image(paths[0], **reader) as img:
            _show(img.info(), as_json=args.json)
        return EXIT_OK
    failed, described = 0, []
    for path in paths:
        try:
            with open_image(path, **reader) as img:
                info = img.info()
        except (TilenetError, OSError) as exc:
            failed += 1
            print(f"tilenet: error: {one_line(exc, typed=False)}", file=sys.stderr)
            continue
        if args.json:
            described.append(info)
            continue
        if described:
            print()
        described.append(info)
        _show(info, as_json=False)
    if args.json:  # several images: one JSON array, in the order given (failures left out)
        print(json.dumps(described, indent=2))
    return EXIT_OK if not failed else EXIT_PARTIAL if failed < len(paths) else EXIT_USAGE


def _show(info: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
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
        crs = f"EPSG:{info['epsg']}" if info["epsg"] else first_line(info["crs"] or "none")
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
