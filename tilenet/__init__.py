"""tilenet: deep learning on images too large for memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tilenet._version import __version__

__all__ = ["Predictor", "__version__", "infer_image", "load_model", "open_image"]

if TYPE_CHECKING:
    from tilenet.engine.checkpoint import load_model
    from tilenet.engine.infer import infer_image
    from tilenet.engine.predictor import Predictor
    from tilenet.io import open_image


def __getattr__(name: str) -> Any:
    # Lazy, so `import tilenet` stays cheap (no torch import for `tilenet info`).
    if name == "open_image":
        from tilenet.io import open_image

        return open_image
    if name == "load_model":
        from tilenet.engine.checkpoint import load_model

        return load_model
    if name == "infer_image":
        from tilenet.engine.infer import infer_image

        return infer_image
    if name == "Predictor":
        from tilenet.engine.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'tilenet' has no attribute {name!r}")
