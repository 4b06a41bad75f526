"""``classes``: the class map as a pyramidal OME-TIFF and, georeferenced, a COG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tilenet.outputs.formats.base import CLASSES_NODATA, Finished, register_format

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["Classes"]


@register_format
class Classes:
    """``classes.ome.tif`` (beside the ``classes.ome.zarr`` every run makes) and, for a
    georeferenced input, ``classes.tif``: a Cloud-Optimized GeoTIFF in its CRS."""

    name: ClassVar[str] = "classes"
    help: ClassVar[str] = (
        "classes.ome.tif, the class map as a pyramidal OME-TIFF (classes.ome.zarr is always "
        "written); for a georeferenced input also classes.tif, a COG in its CRS "
        f"({CLASSES_NODATA} = nodata)"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"classes"})
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        import numpy as np

        from tilenet.io.writers import write_ome_tiff

        classes = done.stores["classes"]
        with done.file("classes.ome.tif") as path:
            write_ome_tiff(
                path,
                classes,
                axes="yx",
                compression="zlib",
                method="mode",
                pixel_size=done.pixel_size,
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

    Where the input declares nodata, pixels whose bands are all nodata get
    :data:`CLASSES_NODATA` (the COG's nodata value) instead of a class.
    """
    import numpy as np

    from tilenet.io.raster import write_cog

    image, level = done.image, done.config.level
    nodata = image.nodata

    def missing(window: Any) -> Any:
        pixels = image.read(window, level, fill=nodata)
        none = np.isnan(pixels) if np.isnan(nodata) else pixels == nodata
        return np.all(none, axis=-1)

    mask = missing if nodata is not None and done.num_classes <= CLASSES_NODATA else None
    return write_cog(
        path,
        classes,
        crs=image.crs,
        transform=done.transform,
        nodata=CLASSES_NODATA if mask is not None else None,
        nodata_mask=mask,
        histogram=histogram,
        resampling="mode",
    )
