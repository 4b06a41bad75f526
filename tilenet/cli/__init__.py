"""The ``tilenet`` command line. Thin: parse, build config, call one library function.

Exit codes: 0 ok, 1 some items of a batch failed, 2 bad input or usage, 130 interrupted,
141 output pipe closed. A
:class:`~tilenet.errors.TilenetError` prints one line on stderr (no traceback unless
``--debug``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from tilenet.cli._common import Handler
from tilenet.cli.convert import add_convert
from tilenet.cli.demo import add_demo
from tilenet.cli.embed import add_embed
from tilenet.cli.export import add_export
from tilenet.cli.infer import INFER_FLAGS, add_infer
from tilenet.cli.info import add_info
from tilenet.cli.plan import add_plan
from tilenet.cli.synth import add_synth
from tilenet.cli.tile import TILE_FLAGS, add_tile
from tilenet.cli.tissue import add_tissue
from tilenet.cli.train import add_train
from tilenet.errors import EXIT_USAGE, credentials_scrubbed, run_guarded, scrub_credentials

__all__ = ["INFER_FLAGS", "TILE_FLAGS", "build_parser", "main"]


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
  tilenet tissue slides/ --out tissue/                # tissue masks + QuPath polygons
  tilenet infer slides/ --model best.pt --out results --workers 2   # batch, resumable
  tilenet export best.pt --out model.onnx              # then: infer --model model.onnx
  tilenet embed slides/ --encoder uni2-h --weights uni2h/ --out emb   # patch embeddings (.h5)
config: tile, infer and info also take conf=FILE and section.key=value items (as training
does); flags given on the command line win over them, and they over the defaults
(python -m tilenet.train --print-config lists every key).
exit codes: 0 ok; 1 some items of a batch failed (the others are done); 2 bad input or
usage (one line on stderr naming the file and the problem); 130 interrupted (Ctrl-C: a rerun
resumes); 141 the output pipe closed (e.g. piped into head).
"""


#: Subcommands in the order --help lists them.
COMMANDS: list[Callable[[Any], None]] = [
    add_info,
    add_convert,
    add_synth,
    add_tile,
    add_tissue,
    add_train,
    add_infer,
    add_embed,
    add_plan,
    add_demo,
    add_export,
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
