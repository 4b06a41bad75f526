"""Coordinate reference systems: the one owner of what tilenet says and does with a CRS.

A CRS travels through tilenet as text (WKT, or ``"EPSG:n"`` as a user writes it). This module
parses it, describes it (EPSG code, linear units, ground sample distance), names it (the OGC
URN GeoJSON's ``crs`` member carries; a short name for messages), and reprojects points to
WGS84 longitude/latitude.

rasterio (GDAL/PROJ) is imported lazily, inside each function: importing :mod:`tilenet.io`
stays cheap, and an image without a CRS never loads it. No reader module is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tilenet.errors import InputError, one_line

__all__ = [
    "GEOREF_KEY",
    "describe_georef",
    "display_name",
    "geotiff_tags",
    "ogc_name",
    "parse",
    "to_wgs84",
    "zarr_georef",
]

#: The OME-Zarr group attribute holding georeferencing: {"crs": WKT, "epsg", "transform_order":
#: "gdal", "transforms": {level path: 6 numbers}, "nodata"} (OME-NGFF has no CRS yet).
GEOREF_KEY = "tilenet:georef"


def parse(value: Any, what: str) -> Any:
    """``value`` (WKT, ``"EPSG:n"``, a rasterio CRS) as a rasterio ``CRS``; a one-line
    :class:`~tilenet.errors.InputError` naming ``what`` (the file it comes from) otherwise."""
    from rasterio.crs import CRS

    try:
        return CRS.from_user_input(value)
    except Exception as exc:
        raise InputError(f"{what}: cannot read its CRS ({one_line(exc, typed=False)})") from None


def describe_georef(crs: str | None, transform: Sequence[float] | None) -> dict[str, Any]:
    """``epsg`` (where the CRS has one), ``crs_units`` and ``gsd`` (y, x) in those units
    (from a GDAL-order ``transform``); None where unknown.

    >>> describe_georef(None, (500000.0, 10.0, 0.0, 4e6, 0.0, -10.0))
    {'epsg': None, 'crs_units': None, 'gsd': [10.0, 10.0]}
    """
    epsg = units = None
    if crs:
        from rasterio.crs import CRS

        try:
            c = CRS.from_wkt(crs)
            epsg = c.to_epsg()
            units = c.linear_units if c.is_projected else "degree" if c.is_geographic else None
        except Exception:
            pass
    gsd = None
    if transform:
        _, a, b, _, d, e = transform
        gsd = [math.hypot(b, e), math.hypot(a, d)]
    return {"epsg": epsg, "crs_units": units, "gsd": gsd}


def ogc_name(crs: str) -> str:
    """The name GeoJSON's ``crs`` member gives ``crs``: an OGC URN where it has an EPSG code,
    else its WKT.

    >>> ogc_name("EPSG:32632")
    'urn:ogc:def:crs:EPSG::32632'
    """
    from rasterio.crs import CRS

    epsg = CRS.from_user_input(crs).to_epsg()
    return f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs


def display_name(crs: Any) -> str:
    """A short name for messages: ``EPSG:32632``, ``IAU_2015:49900``, else the WKT's name.

    >>> display_name(parse("EPSG:4326", "x"))
    'EPSG:4326'
    """
    try:
        auth = crs.to_authority()
    except Exception:
        auth = None
    if auth:
        return f"{auth[0]}:{auth[1]}"
    wkt = str(crs.to_wkt()) if hasattr(crs, "to_wkt") else str(crs)
    name = wkt.split('"')[1] if wkt.count('"') >= 2 else wkt
    return name[:80]


def to_wgs84(crs: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function taking points (n, 2) as (x, y) in ``crs`` to (n, 2) (longitude, latitude).

    >>> to_wgs84("EPSG:4326")(np.array([[8.5, 47.25]])).tolist()
    [[8.5, 47.25]]
    """
    from rasterio.warp import transform as warp

    def project(xy: np.ndarray) -> np.ndarray:
        xs, ys = warp(crs, "EPSG:4326", xy[:, 0].tolist(), xy[:, 1].tolist())
        return np.c_[xs, ys]

    return project


def geotiff_tags(
    crs: str | None, transform: Sequence[float] | None, nodata: float | None
) -> list[tuple[int, str, int, Any, bool]]:
    """GeoTIFF tags (tifffile ``extratags``) that put a level-0 page at ``transform`` in
    ``crs`` with ``nodata``, as GDAL writes them: ModelPixelScale + ModelTiepoint (or a
    ModelTransformation when rotated), a GeoKeyDirectory naming the EPSG code, GDAL_NODATA.

    A CRS without an EPSG code cannot be named by GeoKeys alone: InputError (write OME-Zarr,
    which keeps the WKT).
    """
    tags: list[tuple[int, str, int, Any, bool]] = []
    if transform is not None:
        x0, a, b, y0, d, e = (float(v) for v in transform)
        if b == 0 and d == 0:
            tags.append((33550, "d", 3, (a, -e, 0.0), True))  # ModelPixelScaleTag
            tags.append((33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True))  # ModelTiepoint
        else:
            matrix = (a, b, 0.0, x0, d, e, 0.0, y0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
            tags.append((34264, "d", 16, matrix, True))  # ModelTransformationTag
    if crs:
        from rasterio.crs import CRS

        parsed = CRS.from_user_input(crs)
        epsg = parsed.to_epsg()
        if epsg is None:
            raise InputError(
                f"CRS {display_name(parsed)!r} has no EPSG code, so GeoTIFF keys cannot name "
                "it; write OME-Zarr (.zarr), which keeps the CRS as WKT"
            )
        geographic = bool(parsed.is_geographic)
        keys = [1, 1, 0, 3]  # version 1.1.0, 3 keys, sorted by id
        keys += [1024, 0, 1, 2 if geographic else 1]  # GTModelType: geographic / projected
        keys += [1025, 0, 1, 1]  # GTRasterType: PixelIsArea
        keys += [2048 if geographic else 3072, 0, 1, int(epsg)]
        tags.append((34735, "H", len(keys), tuple(keys), True))  # GeoKeyDirectoryTag
    if nodata is not None:
        tags.append((42113, "s", 0, f"{nodata:.17g}", True))  # GDAL_NODATA
    return tags


def zarr_georef(attrs: Any) -> tuple[str | None, tuple[float, ...] | None, float | None]:
    """(crs, level-0 transform, nodata) recorded in an OME-Zarr group's :data:`GEOREF_KEY`
    attribute, or Nones."""
    geo = attrs.get(GEOREF_KEY) if hasattr(attrs, "get") else None
    if not isinstance(geo, dict):
        return None, None, None
    transforms = geo.get("transforms") or {}
    first = transforms.get("0") if isinstance(transforms, dict) else None
    if first is None and isinstance(transforms, dict) and transforms:
        first = next(iter(transforms.values()))
    transform = tuple(float(v) for v in first) if first and len(first) == 6 else None
    nodata = geo.get("nodata")
    return geo.get("crs"), transform, float(nodata) if nodata is not None else None
