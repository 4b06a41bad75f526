"""``geojson``: the instances as polygons (and, through ``regions``, the class regions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tilenet.outputs.formats.base import Finished, register_format

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["GeoJson"]


@register_format
class GeoJson:
    """``instances.geojson`` (QuPath detections; a georeferenced image's in its CRS or in
    WGS84) and, georeferenced, ``instances.gpkg`` in its CRS; asks for ``instances`` (it
    reads them) and ``regions`` (``classes.geojson``)."""

    name: ClassVar[str] = "geojson"
    help: ClassVar[str] = (
        "QuPath detections instances.geojson and merged class regions classes.geojson as "
        "QuPath annotations, in level-0 pixels; for a georeferenced input in map "
        "coordinates, plus instances.gpkg and classes.gpkg"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"classes"})
    after: ClassVar[tuple[str, ...]] = ("instances", "regions")
    uses: ClassVar[tuple[str, ...]] = ()

    def bytes_per_px(self, num_classes: int, *, georeferenced: bool) -> float:
        return 0.0  # vectors: they grow with the objects found

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        from tilenet.outputs import instances

        labels = done.files["instances.ome.zarr"]
        if done.transform is not None:
            with done.file("instances.geojson") as path:
                instances.write_geojson(
                    labels,
                    path,
                    seed=done.seed,
                    class_names=done.class_names,
                    transform=done.transform,
                    crs=done.crs,
                    wgs84=done.config.geojson_crs == "wgs84" and bool(done.crs),
                )
            with done.file("instances.gpkg") as path:
                instances.write_geopackage(
                    labels,
                    path,
                    transform=done.transform,
                    crs=done.crs,
                    class_names=done.class_names,
                )
            return {
                "geojson": out.join("instances.geojson"),
                "geopackage": out.join("instances.gpkg"),
            }
        # Level-0 pixels of the file (QuPath's frame), whatever level or pixel size (a
        # resampled view: tilenet.io.resolution) inference ran at.
        pt = done.image.pixel_transform(done.config.level)
        iso = abs(pt[1] - pt[5]) <= 1e-9 * abs(pt[5]) and pt[0] == pt[3] == 0
        with done.file("instances.geojson") as path:
            instances.write_geojson(
                labels,
                path,
                seed=done.seed,
                class_names=done.class_names,
                downsample=float(pt[5]) if iso else 1,
                transform=None if iso else pt,
            )
        return {"geojson": out.join("instances.geojson")}
