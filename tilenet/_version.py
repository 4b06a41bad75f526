"""The package version, from the installed distribution's metadata (pyproject.toml's
``version``), so that no module imports the root package for it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tilenet")
except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
