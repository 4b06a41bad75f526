"""``tilenet plan``: parameters, receptive field, halo and memory of a model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tilenet.cli._common import cli_config
from tilenet.errors import EXIT_OK

__all__ = ["add_plan"]


def add_plan(sub: Any) -> None:
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

    cfg, rest = cli_config(args.overrides, args, {})
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
