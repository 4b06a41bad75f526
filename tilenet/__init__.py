"""tilenet: deep learning on images too large for memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "open_image"]

if TYPE_CHECKING:
    from tilenet.io import open_image


def __getattr__(name: str) -> Any:
    # Lazy, so `import tilenet` stays cheap (no torch import for `tilenet info`).
    if name == "open_image":
        from tilenet.io import open_image

        return open_image
    raise AttributeError(f"module 'tilenet' has no attribute {name!r}")
