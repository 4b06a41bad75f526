"""Pixel size comes only from metadata that means one; a print DPI is not a pixel size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from tilenet.cli import main
from tilenet.io import open_image

RGB = np.zeros((48, 64, 3), np.uint8)


def _info_pixel_size(path: Path, capsys: pytest.CaptureFixture[str]) -> list[float] | None:
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["pixel_size"]


@pytest.mark.parametrize("dpi", [72, 300])
def test_print_dpi_tiff_has_no_pixel_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dpi: int
) -> None:
    """GDAL's and ImageMagick's defaults: a resolution in inches (300 dpi read as 84.67 µm)."""
    p = tmp_path / "print.tif"
    tifffile.imwrite(
        p, RGB, photometric="rgb", resolution=(dpi, dpi), resolutionunit="INCH", metadata=None
    )
    with tifffile.TiffFile(p) as tif:  # the file does carry the DPI
        assert tif.pages[0].resolution == (dpi, dpi)
        assert tif.pages[0].resolutionunit == tifffile.RESUNIT.INCH
    assert _info_pixel_size(p, capsys) is None
    assert main(["info", str(p)]) == 0
    assert "pixel size" not in capsys.readouterr().out


def test_resolution_without_unit_has_no_pixel_size(tmp_path: Path) -> None:
    p = tmp_path / "nounit.tif"
    tifffile.imwrite(p, RGB, photometric="rgb", resolution=(72, 72), resolutionunit="NONE")
    with open_image(p) as img:
        assert img.pixel_size is None


def test_ome_physical_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "img.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    # OME wins over a print DPI in the TIFF tags
    tifffile.imwrite(
        p, RGB, photometric="rgb", metadata=meta, resolution=(300, 300), resolutionunit="INCH"
    )
    assert _info_pixel_size(p, capsys) == [0.5, 0.5]


def test_ome_physical_size_units(tmp_path: Path) -> None:
    p = tmp_path / "nm.ome.tif"
    meta = {
        "axes": "YX",
        "PhysicalSizeY": 500,
        "PhysicalSizeYUnit": "nm",
        "PhysicalSizeX": 0.25,
        "PhysicalSizeXUnit": "µm",
    }
    tifffile.imwrite(p, RGB[..., 0], metadata=meta)
    with open_image(p) as img:
        assert img.pixel_size == pytest.approx((0.5, 0.25))


@pytest.mark.parametrize("unit", ["micron", "um", "\\u00B5m"])  # ImageJ escapes µ
def test_imagej_micron_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], unit: str
) -> None:
    p = tmp_path / "ij.tif"
    tifffile.imwrite(
        p, RGB[..., 0], imagej=True, resolution=(1 / 0.25, 1 / 0.4), metadata={"unit": unit}
    )
    with tifffile.TiffFile(p) as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"]
    assert _info_pixel_size(p, capsys) == pytest.approx([0.4, 0.25])


def test_imagej_inch_or_uncalibrated_has_no_pixel_size(tmp_path: Path) -> None:
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(
        inch, RGB[..., 0], imagej=True, resolution=(300, 300), metadata={"unit": "inch"}
    )
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, RGB[..., 0], imagej=True)
    for p in (inch, plain):
        with open_image(p) as img:
            assert img.pixel_size is None, p


def test_aperio_svs_mpp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "slide.svs"
    desc = (
        "Aperio Image Library v12.0.15 \r\n64x48 (32x32) JPEG/RGB Q=70"
        "|AppMag = 20|StripeWidth = 992|MPP = 0.4990|Left = 25.69"
    )
    tifffile.imwrite(
        p,
        RGB,
        photometric="rgb",
        tile=(32, 32),
        description=desc,
        metadata=None,
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    with tifffile.TiffFile(p) as tif:
        assert tif.is_svs
    assert _info_pixel_size(p, capsys) == [0.499, 0.499]


def test_centimetre_resolution_is_a_calibration(tmp_path: Path) -> None:
    """Slide scanners (NDPI, SCN) and tifffile write a real calibration in px/cm."""
    p = tmp_path / "cm.tif"
    tifffile.imwrite(
        p,
        RGB,
        photometric="rgb",
        resolution=(40000, 20000),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    with open_image(p) as img:
        assert img.pixel_size == pytest.approx((0.5, 0.25))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_png_jpeg_dpi_is_not_a_pixel_size(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"print{suffix}"
    Image.fromarray(RGB).save(p, dpi=(300, 300))
    with Image.open(p) as im:
        assert round(im.info["dpi"][0]) == 300
    with open_image(p) as img:
        assert img.pixel_size is None


def test_ome_zarr_scale_with_unit(tmp_path: Path) -> None:
    p = tmp_path / "img.ome.zarr"
    g = zarr.open_group(p, mode="w", zarr_format=2)
    g.create_array("0", shape=(48, 64), chunks=(32, 32), dtype="u1")[...] = 1
    axes = [
        {"name": "y", "type": "space", "unit": "nanometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    ds = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [250, 0.5]}]}]
    g.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": ds}]
    with open_image(p) as img:
        assert img.pixel_size == pytest.approx((0.25, 0.5))
    # a scale without a unit is in pixels, not micrometres
    g.attrs["multiscales"] = [
        {"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}], "datasets": ds}
    ]
    with open_image(p) as img:
        assert img.pixel_size is None
