"""``tilenet convert``: any readable image to a tiled pyramidal OME-TIFF or OME-Zarr."""

from __future__ import annotations

import argparse
from typing import Any

from tilenet.errors import EXIT_OK, scrub_credentials

__all__ = ["add_convert"]


def add_convert(sub: Any) -> None:
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
