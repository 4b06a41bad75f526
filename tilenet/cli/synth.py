"""``tilenet synth``: a deterministic synthetic dataset (images + label maps)."""

from __future__ import annotations

import argparse
from typing import Any

from tilenet.errors import EXIT_OK

__all__ = ["add_synth"]


def add_synth(sub: Any) -> None:
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
