"""``probabilities``: the per-class probabilities as an OME-Zarr pyramid."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tilenet.outputs.formats.base import Finished, register_format

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["Probabilities"]


@register_format
class Probabilities:
    """``probabilities.ome.zarr``: the level-0 store itself, finalized by the output set."""

    name: ClassVar[str] = "probabilities"
    help: ClassVar[str] = (
        "probabilities.ome.zarr, (classes, H, W) in --probabilities-dtype with a mean pyramid"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"probabilities"})
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()

    def bytes_per_px(self, num_classes: int, *, georeferenced: bool) -> float:
        return 0.0  # the level-0 store itself

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        return {"probabilities": out.join("probabilities.ome.zarr")}
