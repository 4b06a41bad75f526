"""Output formats, one module each, found here; :data:`FORMATS` lists them in writing order.

Adding a format is one module in this package (a class with ``name``, ``help``, ``needs``,
``after``, ``uses``, ``bytes_per_px`` and ``write``, decorated with :func:`register_format`) and its row in
``tests/outputs/test_formats.py``.
"""

from __future__ import annotations

import importlib
import pkgutil

from tilenet.outputs.formats.base import (
    CLASSES_NODATA,
    FORMATS,
    GEOREF_KEY,
    PYRAMID_FACTOR,
    Finished,
    OutputFormat,
    order_formats,
    register_format,
    resolve_formats,
    tag_georef,
)

__all__ = [
    "CLASSES_NODATA",
    "FORMATS",
    "GEOREF_KEY",
    "PYRAMID_FACTOR",
    "Finished",
    "OutputFormat",
    "formats_help",
    "register_format",
    "resolve_formats",
    "tag_georef",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")  # registers its format
order_formats()


def formats_help() -> str:
    """What ``--outputs`` may name, one ``name: help`` per format (the CLI's help text)."""
    return "; ".join(f"{name}: {fmt.help}" for name, fmt in FORMATS.items())
