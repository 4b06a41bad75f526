"""``instances``: connected objects of each class, labelled into an OME-Zarr."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tilenet.outputs.formats.base import PYRAMID_FACTOR, Finished, register_format, tag_georef

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["Instances"]


@register_format
class Instances:
    """``instances.ome.zarr``: (H, W) uint32 object ids (0 = background), globally unique."""

    name: ClassVar[str] = "instances"
    help: ClassVar[str] = "instances.ome.zarr, uint32 ids of the connected objects of each class"
    needs: ClassVar[frozenset[str]] = frozenset({"classes"})
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()

    def bytes_per_px(self, num_classes: int, *, georeferenced: bool) -> float:
        return 4 * PYRAMID_FACTOR  # uint32 ids with a pyramid

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        from tilenet.outputs import instances

        with done.file("instances.ome.zarr") as path:
            done.instances = instances.label_instances(
                done.stores["classes"],
                path,
                foreground=range(1, done.num_classes),
                chunk=done.config.chunk,
            )
            if done.transform is not None:
                tag_georef(path, done.crs, done.transform)
        return {"instances": out.join("instances.ome.zarr")}
