"""What the subcommands share: config loading, help defaults, list flags, resolution flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "CONFIG_ITEMS",
    "Handler",
    "add_resolution_flags",
    "cli_config",
    "comma_list",
    "config_section",
    "help_default",
    "int_list",
]

Handler = Callable[[argparse.Namespace], int]

#: Help for the conf=FILE / key=value items a subcommand accepts.
CONFIG_ITEMS = "conf=FILE and section.key=value items (e.g. {example}) configure it as in training"


def help_default(section: type, key: str) -> str:
    """``default X`` for a help text, X read from the config dataclass (defaults live there)."""
    value = getattr(section(), key)
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"default {value}"


def cli_config(
    items: Sequence[str], args: argparse.Namespace, flags: dict[str, Sequence[str]]
) -> Any:
    """The config from ``items`` (conf=FILE, key=value) and the flags given; and the rest.

    Precedence: dataclass defaults < conf file < key=value < flags given on the command line
    (a flag left out is ``None`` and changes nothing). ``flags`` maps a config section to the
    argparse destinations that set its keys of the same name. Returns ``(cfg, rest)`` with the
    items that are neither conf= nor key=value, in order.
    """
    from omegaconf.errors import OmegaConfBaseException

    from tilenet.config import load_config, split_config_args
    from tilenet.errors import ConfigError, one_line

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
                raise ConfigError(f"{flag} {value!r}: {one_line(exc, typed=False)}") from None
    return cfg, rest


def config_section(cfg: Any, name: str) -> Any:
    """Section ``name`` of a loaded config as its dataclass instance."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg[name])


def add_resolution_flags(p: Any, *, infer: bool = False) -> None:
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
    p.add_argument(
        "--max-upsample",
        type=float,
        metavar="F",
        help="refuse a target finer than level 0 by more than F times (default 2: a file "
        "whose pixel size is wrong would otherwise plan a huge upsampled output)",
    )


def comma_list(text: str) -> list[str]:
    return [o.strip() for o in text.split(",") if o.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(o) for o in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated band numbers, got {text!r}"
        ) from None
