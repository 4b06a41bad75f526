"""Fully convolutional segmentation models, each declaring its stride and receptive field.

>>> from tilenet.models import create_model
>>> m = create_model("tiny", in_channels=1, num_classes=2)
>>> m.stride, m.receptive_field
(2, 4)
"""

from __future__ import annotations

from tilenet.models import (  # noqa: F401  (register)
    resnet_unet,
    smp_models,
    tiny,
    torchvision_seg,
    unet,
)
from tilenet.models.receptive import Analysis, analyze, exactness, model_memory
from tilenet.models.registry import (
    TileModel,
    create_model,
    create_model_from_config,
    list_models,
    register_model,
)
from tilenet.models.spec import ModelSpec

__all__ = [
    "Analysis",
    "ModelSpec",
    "TileModel",
    "analyze",
    "create_model",
    "create_model_from_config",
    "exactness",
    "list_models",
    "model_memory",
    "register_model",
]
