"""``classes``: the class map as a pyramidal OME-TIFF and, georeferenced, a COG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tilenet.outputs.formats.base import CLASSES_NODATA, PYRAMID_FACTOR, Finished, register_format

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["Classes"]


@register_format
class Classes:
    """``classes.ome.tif`` (beside the ``classes.ome.zarr`` every run makes) and, for a
    georeferenced input, ``classes.tif``: a Cloud-Optimized GeoTIFF in its CRS.

    Pixels without data are :data:`CLASSES_NODATA` in all three (the sink wrote them so);
    for an input that can have such pixels (:attr:`tilenet.io.base.LazyImage.masked`) the
    TIFFs say so in GDAL's nodata tag, which QGIS and GDAL honour."""

    name: ClassVar[str] = "classes"
    help: ClassVar[str] = (
        "classes.ome.tif, the class map as a pyramidal OME-TIFF (classes.ome.zarr is always "
        "written); for a georeferenced input also classes.tif, a COG in its CRS "
        f"({CLASSES_NODATA} = nodata)"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"classes"})
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()

    def bytes_per_px(self, num_classes: int, *, georeferenced: bool) -> float:
        # classes.ome.tif, and classes.tif for a georeferenced input: uint8 pyramids
        return (2 if georeferenced else 1) * PYRAMID_FACTOR

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        import numpy as np

        from tilenet.io.crs import geotiff_tags
        from tilenet.io.writers import write_ome_tiff

        classes = done.stores["classes"]
        masked = bool(getattr(done.image, "masked", False))
        with done.file("classes.ome.tif") as path:
            write_ome_tiff(
                path,
                classes,
                axes="yx",
                compression="zlib",
                method="mode",
                pixel_size=done.pixel_size,
                extratags=geotiff_tags(None, None, CLASSES_NODATA) if masked else (),
            )
        paths = {"classes_tiff": out.join("classes.ome.tif")}
        if done.transform is not None:
            t0 = time.perf_counter()
            done.histogram = np.zeros(256, dtype=np.int64)
            with done.file("classes.tif") as path:
                _write_classes_cog(path, classes, done, done.histogram)
            done.cog_s += time.perf_counter() - t0
            paths["classes_geotiff"] = out.join("classes.tif")
        return paths


def _write_classes_cog(path: Path, classes: Any, done: Finished, histogram: Any) -> Path:
    """``classes.tif``: the class map as a COG in the input's CRS, scaled to the level run.

    Pixels without data are :data:`CLASSES_NODATA` in the class map already; for an input
    that can have them it is the COG's nodata value.
    """
    from tilenet.io.raster import write_cog

    image = done.image
    return write_cog(
        path,
        classes,
        crs=image.crs,
        transform=done.transform,
        nodata=CLASSES_NODATA if image.masked else None,
        histogram=histogram,
        resampling="mode",
    )
