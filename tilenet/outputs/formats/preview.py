"""``preview``: a small PNG of the image with the class map over it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from tilenet.outputs.formats.base import CLASSES_NODATA, Finished, register_format

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["Preview"]

#: The colour of pixels without data in the preview (shaded over the image like a class).
NODATA_COLOUR = (0, 0, 0)


def _palette() -> Any:
    """The default palette for classes 1..254 (repeated as the writer repeats it), 255
    entries long: the writer takes class ``c``'s colour at ``c % 255``, so
    :data:`CLASSES_NODATA` gets entry 0, :data:`NODATA_COLOUR` (class 0 is never coloured)."""
    import numpy as np

    from tilenet.io.writers import DEFAULT_PALETTE

    pal = np.asarray(DEFAULT_PALETTE, dtype=np.uint8)
    out = pal[np.arange(CLASSES_NODATA) % len(pal)]
    out[CLASSES_NODATA % len(out)] = NODATA_COLOUR
    return out


@register_format
class Preview:
    """``preview.png``: the image (level 0 runs) or the class map, classes coloured over it;
    pixels without data shaded with :data:`NODATA_COLOUR`."""

    name: ClassVar[str] = "preview"
    help: ClassVar[str] = "preview.png, the image with the classes over it (longer side 1024)"
    needs: ClassVar[frozenset[str]] = frozenset({"classes"})
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()

    def bytes_per_px(self, num_classes: int, *, georeferenced: bool) -> float:
        return 0.0  # a thumbnail of bounded size

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        from tilenet.io.writers import write_preview_png

        classes = done.stores["classes"]
        # The overlay needs the image at the inferred level; only level 0 is addressable
        # as its own source, so other levels preview the class map alone.
        base = done.image if done.config.level == 0 else classes
        with done.file("preview.png") as path:
            write_preview_png(path, base, overlay=classes, palette=_palette())
        return {"preview": out.join("preview.png")}
