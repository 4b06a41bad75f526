"""``regions``: the merged regions of each class as polygons."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from tilenet.outputs.formats.base import CLASSES_NODATA, Finished, register_format

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["Regions"]


@register_format
class Regions:
    """``classes.geojson`` (QuPath annotations; a georeferenced image's in its CRS or in WGS84)
    and, georeferenced, ``classes.gpkg`` in its CRS.

    Background (0) and pixels without data (:data:`CLASSES_NODATA`) are no region. A
    georeferenced image's regions come from ``classes.tif`` where this run wrote it (the
    ``classes`` format, written first), so the polygons overlay it exactly.
    """

    name: ClassVar[str] = "regions"
    help: ClassVar[str] = "classes.geojson (and classes.gpkg) alone: merged class regions"
    needs: ClassVar[frozenset[str]] = frozenset({"classes"})
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ("classes",)

    def bytes_per_px(self, num_classes: int, *, georeferenced: bool) -> float:
        return 0.0  # vectors: they grow with the regions found

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        from tilenet.outputs import regions

        classes = done.stores["classes"]
        if done.transform is None:
            with done.file("classes.geojson") as geojson:
                done.regions = regions.write_class_regions(
                    classes,
                    geojson,
                    transform=done.image.pixel_transform(done.config.level),
                    class_names=done.class_names,
                    skip=(0, CLASSES_NODATA),
                    seed=done.seed,
                )
            return {"classes_geojson": out.join("classes.geojson")}
        source: Any = done.files.get("classes.tif", classes)
        with done.file("classes.geojson") as geojson, done.file("classes.gpkg") as gpkg:
            done.regions = regions.write_class_regions(
                source,
                geojson,
                transform=done.transform,
                class_names=done.class_names,
                skip=(0, CLASSES_NODATA),
                crs=done.crs,
                wgs84=done.config.geojson_crs == "wgs84" and bool(done.crs),
                vector=gpkg,
                seed=done.seed,
            )
        return {
            "classes_geojson": out.join("classes.geojson"),
            "classes_geopackage": out.join("classes.gpkg"),
        }
