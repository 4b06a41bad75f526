"""The output-format seam: what a format is, what it is given, and the registry.

A format (one module in this package) declares its ``name`` (what ``--outputs`` names), a
``help`` line (the CLI lists them), the level-0 stores it reads (``needs``: "classes",
"probabilities"), an upper bound of what its files take on disk (``bytes_per_px``) and the
formats whose files it reads (``after``: asking for it asks for
them, and they are written first; ``uses``: read where written anyway, written first). :meth:`OutputFormat.write` makes its files from a
:class:`Finished` run into a :class:`~tilenet.io.location.Location` and returns
``{output name: path or URL}`` for the summary.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tilenet.config import InferConfig
from tilenet.errors import ConfigError
from tilenet.geometry import GeoTransform
from tilenet.io.crs import GEOREF_KEY
from tilenet.outputs.sink import NODATA_CLASS

if TYPE_CHECKING:
    import numpy as np

    from tilenet.io.location import Location

__all__ = [
    "CLASSES_NODATA",
    "FORMATS",
    "GEOREF_KEY",
    "PYRAMID_FACTOR",
    "Finished",
    "OutputFormat",
    "order_formats",
    "register_format",
    "resolve_formats",
    "tag_georef",
]

#: The class value of pixels where the input had no data, in every class output
#: (:data:`tilenet.outputs.sink.NODATA_CLASS`).
CLASSES_NODATA = NODATA_CLASS


@dataclass
class Finished:
    """A run whose bands are all written: what formats make their files from.

    ``stores`` holds the level-0 arrays (read only) by store name; ``transform`` is the
    GDAL-order geotransform of the level run, None for an image without a CRS. Formats add
    to the accumulators (``histogram``, ``cog_s``, ``instances``, ``regions``) what the
    summary reports, and write files through :meth:`file`.
    """

    out: Location
    #: The image as run (input bands picked, at the pixel size run at).
    image: Any
    config: InferConfig
    class_names: list[str]
    stores: dict[str, Any]
    transform: tuple[float, ...] | None
    crs: str | None
    pixel_size: tuple[float, float] | None
    #: What feature UUIDs derive from (:attr:`tilenet.outputs.resume.ResumeKey.seed`).
    seed: str
    #: Local copies of files written to a bucket, for formats that read them.
    stage: Path
    #: Files written so far: name -> a local path to read it at.
    files: dict[str, Path] = field(default_factory=dict)
    #: What the summary lists: output name -> path or URL.
    outputs: dict[str, str] = field(default_factory=dict)
    #: Pixels of ``classes.tif`` per value (index :data:`CLASSES_NODATA`: the nodata area).
    histogram: np.ndarray | None = None
    #: Seconds spent writing Cloud-Optimized GeoTIFFs.
    cog_s: float = 0.0
    #: Instance counts (:func:`tilenet.outputs.instances.label_instances`), when made.
    instances: dict[str, Any] | None = None
    #: Class regions written (:func:`tilenet.outputs.regions.write_class_regions`), when made.
    regions: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @contextlib.contextmanager
    def file(self, name: str) -> Iterator[Path]:
        """A local path to write output ``name`` at; put in place when the block ends."""
        with self.out.local_file(name, stage=self.stage) as path:
            yield path
        local = self.out.local
        self.files[name] = local / name if local is not None else path


class OutputFormat(Protocol):
    """One ``--outputs`` value: its files, what it reads, how it writes them."""

    #: What ``--outputs`` names.
    name: ClassVar[str]
    #: One line for the CLI's help.
    help: ClassVar[str]
    #: The level-0 stores it reads ("classes", "probabilities").
    needs: ClassVar[frozenset[str]]
    #: Formats whose files it reads: asked for with it, written before it.
    after: ClassVar[tuple[str, ...]]
    #: Formats whose files it reads where the run writes them anyway (written before it).
    uses: ClassVar[tuple[str, ...]]

    def write(self, done: Finished, out: Location) -> dict[str, str]: ...

    def bytes_per_px(self, num_classes: int, *, georeferenced: bool) -> float:
        """An upper bound of its own files' uncompressed bytes per level-0 pixel, pyramids
        included (the level-0 stores it reads are counted once, by the output set); 0 for
        files that grow with the objects found (vectors) or not at all (a thumbnail)."""
        ...


#: Pyramid levels add at most a third to level 0 (each level a quarter of the last).
PYRAMID_FACTOR = 4 / 3

#: Every format by name, in the order they are written (:func:`order_formats`).
FORMATS: dict[str, OutputFormat] = {}


def register_format(cls: type[Any]) -> type[Any]:
    """Class decorator: add a format to :data:`FORMATS`."""
    if cls.name in FORMATS:
        raise ValueError(f"two output formats are named {cls.name!r}")
    FORMATS[cls.name] = cls()
    return cls


def order_formats() -> None:
    """Put :data:`FORMATS` in writing order: each after the formats it reads, else by name.

    Fails on a format that reads an unknown one, or on a cycle.
    """
    ordered: dict[str, OutputFormat] = {}
    visiting: set[str] = set()

    def visit(name: str, by: str) -> None:
        if name in ordered:
            return
        if name not in FORMATS:
            raise ValueError(f"output format {by!r} reads an unknown format {name!r}")
        if name in visiting:
            raise ValueError(f"output formats read each other: {name!r} and {by!r}")
        visiting.add(name)
        fmt = FORMATS[name]
        for dep in (*fmt.after, *fmt.uses):
            visit(dep, name)
        ordered[name] = fmt

    for name in sorted(FORMATS):
        visit(name, name)
    FORMATS.clear()
    FORMATS.update(ordered)


def resolve_formats(names: Iterable[str]) -> list[str]:
    """The formats to write for ``names`` (with those they read), in :data:`FORMATS` order.

    An unknown name is an error listing the valid ones.
    """
    want: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in FORMATS:
            raise ConfigError(f"unknown output {name!r}; choose from {', '.join(FORMATS)}")
        if name not in want:
            want.add(name)
            todo.extend(FORMATS[name].after)
    return [n for n in FORMATS if n in want]


def tag_georef(store: Any, crs: str | None, transform: Sequence[float]) -> None:
    """Record the georeferencing of an OME-Zarr store in its :data:`GEOREF_KEY` attribute.

    ``store`` is a path or a zarr store. ``transform`` is the GDAL-order geotransform of
    level 0; each level of the store's ``multiscales`` gets it scaled by that level's scale
    relative to level 0.
    """
    import zarr

    from tilenet.io.crs import describe_georef

    if isinstance(store, str | os.PathLike):
        store = os.fspath(store)
    group = zarr.open_group(store, mode="r+")
    ms: Any = group.attrs.get("multiscales") or [{"datasets": [{"path": "0"}]}]
    datasets = ms[0]["datasets"]

    def scale(d: dict[str, Any]) -> list[float]:
        ct = d.get("coordinateTransformations") or [{"scale": [1.0, 1.0]}]
        return [float(v) for v in ct[0].get("scale", [1.0, 1.0])[-2:]]

    base, gt = scale(datasets[0]), GeoTransform(*transform)
    levels = {}
    for d in datasets:
        sy, sx = scale(d)
        levels[str(d["path"])] = list(gt.scaled((sy / base[0], sx / base[1])))
    group.attrs[GEOREF_KEY] = {
        "crs": crs,
        "epsg": describe_georef(crs, None)["epsg"],
        "transform_order": "gdal",
        "transforms": levels,
    }
