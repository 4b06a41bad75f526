"""What a TIFF says about its pixels beyond the pixels: the physical pixel size (OME,
Aperio, ImageJ, metric resolution tags; never a print DPI) and an Aperio SVS's vendor extras."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Any

__all__ = ["pixel_size", "svs_extras"]

# Length units of OME PhysicalSize*Unit and ImageJ's 'unit' -> micrometres. Not 'inch': an
# ImageJ unit of inch is a print DPI that ImageJ took over from the file.
_UNIT_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,  # MICRO SIGN, as OME writes it
    "μm": 1.0,  # GREEK SMALL LETTER MU
    "\\u00b5m": 1.0,  # ImageJ's escaped µm, lower-cased
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}
# Micrometres per ResolutionUnit that a calibrated writer uses: 3 centimetre (NDPI, Leica
# SCN, tifffile, libvips), 4 mm and 5 µm (non-standard extensions). Not 2 (inch) and not
# 1 (none): there the tags hold a print DPI, e.g. GDAL's and ImageMagick's 72/300 dpi.
_RESOLUTION_UNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}
# "...|AppMag = 20|MPP = 0.4990|..." in an Aperio SVS ImageDescription: µm per level-0 pixel.
_SVS_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_SVS_APPMAG = re.compile(r"\|\s*AppMag\s*=\s*([0-9]*\.?[0-9]+)")


def pixel_size(tf: Any, page: Any) -> tuple[float, float] | None:
    """Level 0's physical pixel size (y, x) in µm, only from metadata that means one.

    In order: OME ``PhysicalSizeY/X`` (with units), an Aperio SVS description's ``MPP``, an
    ImageJ calibration (its ``unit`` with the resolution tags), resolution tags in a metric
    ResolutionUnit. A resolution in inches or without a unit is a print DPI: None.
    """
    size = _ome_pixel_size(tf)
    if size is None and tf.is_svs:
        match = _SVS_MPP.search(tf.pages[0].description or "")
        size = _positive(float(match.group(1)), float(match.group(1))) if match else None
    if size is not None:
        return size
    try:
        xres, yres = (float(r) for r in page.resolution)
        unit = int(page.resolutionunit)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    per_unit_um = _RESOLUTION_UNIT_UM.get(unit)
    if tf.is_imagej:  # ImageJ's unit, not the tag, says what the resolution counts per
        ij_unit = str((tf.imagej_metadata or {}).get("unit", "")).strip().lower()
        per_unit_um = _UNIT_UM.get(ij_unit)
    if per_unit_um is None or not (xres > 0 and yres > 0):
        return None
    return _positive(per_unit_um / yres, per_unit_um / xres)


def svs_extras(tf: Any) -> dict[str, Any]:
    """An Aperio SVS's vendor, objective power (``AppMag``) and associated images."""
    if not tf.is_svs:
        return {}
    match = _SVS_APPMAG.search(tf.pages[0].description or "")
    power = float(match.group(1)) if match else None
    assoc = {}
    for s in tf.series[1:]:
        if s.kind == "svs" and s.name and "Y" in s.axes and "X" in s.axes:
            assoc[s.name.lower()] = (
                int(s.shape[s.axes.index("Y")]),
                int(s.shape[s.axes.index("X")]),
            )
    return {
        "vendor": "aperio",
        "objective_power": power if power and math.isfinite(power) else None,
        "associated_images": assoc,
    }


def _ome_pixel_size(tf: Any) -> tuple[float, float] | None:
    if not (tf.is_ome and tf.ome_metadata):
        return None
    try:
        root = ET.fromstring(tf.ome_metadata)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    sizes = []
    for ax in ("Y", "X"):
        value = pixels.get(f"PhysicalSize{ax}")
        unit = _UNIT_UM.get(pixels.get(f"PhysicalSize{ax}Unit", "µm"))  # OME's default: µm
        if value is None or unit is None:
            return None
        try:
            sizes.append(float(value) * unit)
        except ValueError:
            return None
    return _positive(sizes[0], sizes[1])


def _positive(y: float, x: float) -> tuple[float, float] | None:
    ok = all(math.isfinite(v) and v > 0 for v in (y, x))
    return (y, x) if ok else None
