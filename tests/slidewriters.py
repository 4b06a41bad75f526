"""Whole-slide test files made with tifffile, shared by the slide tests: an Aperio-layout SVS
and a Philips-like TIFF, in the layouts OpenSlide's drivers accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

__all__ = ["APERIO_DESC", "philips_xml", "write_aperio_svs", "write_philips_tiff"]

#: The first line of an Aperio ImageDescription (OpenSlide's aperio driver looks for it).
APERIO_DESC = "Aperio Image Library v12.0.15 \r\n"


def write_aperio_svs(
    path: Path,
    img: np.ndarray,
    *,
    mpp: float,
    levels: tuple[int, ...] = (4, 16),
    label: np.ndarray | None = None,
    macro: np.ndarray | None = None,
) -> Path:
    """An Aperio-layout SVS of ``img`` (H, W, 3 uint8): a description starting with "Aperio"
    and carrying ``AppMag = 20|MPP = mpp``, tiled JPEG level 0, a stripped thumbnail as the
    second page, reduced levels every ``levels`` pixels (as scanners round up), then the
    optional label (LZW) and macro (JPEG) pages named on the description's second line."""
    h, w = img.shape[:2]
    jpeg: dict[str, Any] = {"photometric": "rgb", "compression": "jpeg", "metadata": None}
    jpeg["compressionargs"] = {"level": 90}
    meta = f"|AppMag = 20|MPP = {mpp}|Date = 12/01/26"
    with tifffile.TiffWriter(path) as tw:
        desc = f"{APERIO_DESC}{w}x{h} (256x256) JPEG/RGB Q=90{meta}"
        tw.write(img, tile=(256, 256), description=desc, **jpeg)
        thumb = img[::8, ::8]
        desc = f"{APERIO_DESC}{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]}{meta}"
        tw.write(thumb, description=desc, **jpeg)
        for f in levels:
            lv = img[::f, ::f]
            desc = f"{APERIO_DESC}{w}x{h} -> {lv.shape[1]}x{lv.shape[0]}{meta}"
            tw.write(lv, tile=(256, 256), description=desc, **jpeg)
        if label is not None:
            desc = f"{APERIO_DESC}label {label.shape[1]}x{label.shape[0]}"
            tw.write(
                label,
                description=desc,
                subfiletype=1,
                photometric="rgb",
                compression="lzw",
                metadata=None,
            )
        if macro is not None:
            desc = f"{APERIO_DESC}macro {macro.shape[1]}x{macro.shape[0]}"
            tw.write(macro, description=desc, subfiletype=9, **jpeg)
    return path


def philips_xml(mpp_mm: float, factors: tuple[int, ...]) -> str:
    """The DPUfsImport description OpenSlide's philips driver reads pixel spacings (mm) from."""

    def spacing(v: float) -> str:
        return (
            '<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" '
            f'PMSVR="IDoubleArray">&quot;{v}&quot; &quot;{v}&quot;</Attribute>'
        )

    levels = "".join(
        f'<DataObject ObjectType="PixelDataRepresentation">{spacing(mpp_mm * f)}</DataObject>'
        for f in factors
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
        f"{spacing(mpp_mm)}"
        '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" '
        'PMSVR="IDataObjectArray"><Array><DataObject ObjectType="DPScannedImage">'
        '<Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" '
        'PMSVR="IString">WSI</Attribute>'
        '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" '
        f'Element="0x8B01" PMSVR="IDataObjectArray"><Array>{levels}</Array></Attribute>'
        "</DataObject></Array></Attribute></DataObject>\n"
    )


def write_philips_tiff(
    path: Path, levels: list[np.ndarray], *, mpp_mm: float, factors: tuple[int, ...], tile: int
) -> Path:
    """A Philips-like TIFF (OpenSlide's philips driver and tifffile's ``is_philips`` accept
    it) of ``levels``: Software "Philips DP...", a DPUfsImport XML description with the
    pixel spacings (mm) of level 0 scaled by ``factors``."""
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            tw.write(
                lv,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                software="Philips DP v1.0",
                description=philips_xml(mpp_mm, factors) if i == 0 else "level",
                metadata=None,
                subfiletype=0 if i == 0 else 1,
            )
    return path
