"""The sink: finished probability regions written to the level-0 stores, class areas counted.

Pixels without data in the input (nodata, alpha 0, a dataset mask: the engine's probabilities
are NaN there) are written as :data:`NODATA_CLASS` in the class map and as 0 for every class
in the probabilities, and are in no class area.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tilenet.geometry import Window

__all__ = ["NODATA_CLASS", "OutputSink", "quantize_probabilities"]

#: The class-map value of pixels without data (uint8 class maps hold classes 0..254).
NODATA_CLASS = 255


def quantize_probabilities(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities in [0, 1] as stored: float32, float16, or uint8 (p * 255, rounded).

    >>> quantize_probabilities(np.array([0.0, 0.5, 1.0]), "uint8").tolist()
    [0, 128, 255]
    """
    if dtype == "uint8":
        return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)
    return probs.astype(dtype, copy=False)


class OutputSink:
    """Receives finished float32 probability regions (C, h, w) and writes the outputs.

    ``probabilities`` (C, H, W) and ``classes`` (H, W) are level-0 zarr arrays (either may be
    None). Class areas (pixel counts) accumulate in :attr:`area`, pixels without data (NaN
    probabilities) in :attr:`nodata`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        probabilities: Any | None = None,
        classes: Any | None = None,
        probabilities_dtype: str = "float16",
    ) -> None:
        self.num_classes = num_classes
        self.probabilities = probabilities
        self.classes = classes
        self.probabilities_dtype = probabilities_dtype
        self.area = np.zeros(num_classes, dtype=np.int64)
        self.nodata = 0

    def write(self, window: Window, probs: np.ndarray) -> None:
        if probs.shape != (self.num_classes, window.h, window.w):
            raise ValueError(f"region {probs.shape} does not fit window {window}")
        ys, xs = window.slices
        invalid = np.isnan(probs[0])
        masked = bool(invalid.any())
        if masked:
            probs = np.where(invalid, np.float32(0), probs)
        labels = probs.argmax(axis=0).astype(np.uint8)
        if masked:
            labels[invalid] = NODATA_CLASS
            self.nodata += int(invalid.sum())
        self.area += np.bincount(labels.ravel(), minlength=self.num_classes)[: self.num_classes]
        if self.classes is not None:
            self.classes[ys, xs] = labels
        if self.probabilities is not None:
            self.probabilities[:, ys, xs] = quantize_probabilities(probs, self.probabilities_dtype)
