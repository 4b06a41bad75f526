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

__all__ = ["describe_georef", "display_name", "ogc_name", "parse", "to_wgs84"]


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
