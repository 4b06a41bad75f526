"""``preview``: a small PNG of the image with the class map over it."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from tilenet.outputs.formats.base import Finished, register_format

if TYPE_CHECKING:
    from tilenet.io.location import Location

__all__ = ["Preview"]


@register_format
class Preview:
    """``preview.png``: the image (level 0 runs) or the class map, classes coloured over it."""

    name: ClassVar[str] = "preview"
    help: ClassVar[str] = "preview.png, the image with the classes over it (longer side 1024)"
    needs: ClassVar[frozenset[str]] = frozenset({"classes"})
    after: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()

    def write(self, done: Finished, out: Location) -> dict[str, str]:
        from tilenet.io.writers import write_preview_png

        classes = done.stores["classes"]
        # The overlay needs the image at the inferred level; only level 0 is addressable
        # as its own source, so other levels preview the class map alone.
        base = done.image if done.config.level == 0 else classes
        with done.file("preview.png") as path:
            write_preview_png(path, base, overlay=classes)
        return {"preview": out.join("preview.png")}
