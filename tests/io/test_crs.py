"""io.crs: the one owner of CRS parsing, naming, description and reprojection to WGS84."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.crs import CRS

from tilenet.errors import InputError
from tilenet.io.crs import describe_georef, display_name, ogc_name, parse, to_wgs84

UTM32 = CRS.from_epsg(32632).to_wkt()


def test_describe_georef_reads_epsg_units_and_gsd() -> None:
    info = describe_georef(UTM32, (500000.0, 10.0, 0.0, 4e6, 0.0, -20.0))
    assert info == {"epsg": 32632, "crs_units": "metre", "gsd": [20.0, 10.0]}
    assert describe_georef(CRS.from_epsg(4326).to_wkt(), None)["crs_units"] == "degree"


def test_ogc_name_is_a_urn_with_an_epsg_code_else_the_wkt() -> None:
    assert ogc_name(UTM32) == "urn:ogc:def:crs:EPSG::32632"
    local = 'LOCAL_CS["grid",UNIT["metre",1],AXIS["x",EAST],AXIS["y",NORTH]]'
    assert ogc_name(local) == local


def test_parse_names_the_file_on_a_bad_crs() -> None:
    with pytest.raises(InputError, match=r"^labels\.gpkg: cannot read its CRS \("):
        parse("not a crs", "labels.gpkg")
    assert display_name(parse(UTM32, "x")) == "EPSG:32632"


def test_to_wgs84_reprojects_points() -> None:
    lonlat = to_wgs84(UTM32)(np.array([[500000.0, 0.0], [500000.0, 5e6]]))
    assert lonlat.shape == (2, 2)
    np.testing.assert_allclose(lonlat[0], [9.0, 0.0], atol=1e-9)  # the zone's central meridian
    assert lonlat[1, 0] == pytest.approx(9.0) and 45 < lonlat[1, 1] < 45.2
