"""``tilenet train``: the training command, the same as ``python -m tilenet.train``."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_train"]

TRAIN_EPILOG = """\
examples:
  tilenet train conf=conf/demo.yaml                 # synthetic data, made on first use; CPU
  tilenet train conf=conf/demo.yaml train.steps=20 data.batch_size=4    # file, then overrides
  tilenet train conf=conf/demo.yaml train.out_dir=runs/a train.resume=true   # continue a run
  tilenet train conf=conf/demo.yaml --print-config  # the resolved config; nothing is trained
  torchrun --nproc_per_node=4 -m tilenet.train conf=conf/pathology.yaml     # DDP

tilenet train is python -m tilenet.train: the same arguments, the same run. The last line
printed is `run_dir: DIR`. Exit codes: 0 ok, 2 bad input or config.
"""


def add_train(sub: Any) -> None:
    # tilenet.train imports no torch until it trains: the parser stays cheap.
    from tilenet.train import HELP, add_arguments

    p = sub.add_parser(
        "train",
        help="train a segmentation model on streamed patches: conf=FILE key=value ...",
        description=HELP,
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(handler=_cmd_train, items_dest="items")


def _cmd_train(args: argparse.Namespace) -> int:
    from tilenet.train import parse_items, run_training

    conf, overrides = parse_items(args.items)
    return run_training(conf, overrides, print_config=args.print_config)
