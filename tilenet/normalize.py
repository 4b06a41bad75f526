"""Per-channel normalisation: the statistics and the arithmetic, in one place.

Statistics are computed once, when a patch store is written or images are sampled
(:func:`channel_stats`); that is where the standard deviation gets its floor
(:data:`STD_FLOOR`), so a constant channel never divides by zero. Everything that feeds a
model (training batches, inference tiles) then applies the stored ``mean``/``std`` as they
are, with :func:`normalize_` (or a :class:`Normalizer` made once and applied per batch):
``x = (x - mean) * (1 / std)``, in float32, in place. The same arithmetic everywhere means
a patch is fed to the model bit for bit the same in training and in inference.

Pixels without data (every channel equal to the image's ``nodata`` value, alpha 0, or a GDAL
mask: :meth:`tilenet.io.base.LazyImage.read_masked`) are left out of the statistics and get
:data:`tilenet.io.base.IGNORE_INDEX` in training labels. The network is given
:data:`NODATA_FILL` there, in the file's units before stain normalisation and
normalisation, in training and in inference alike, whatever value the file stores
(``docs/nodata.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "NODATA_FILL",
    "STD_FLOOR",
    "Normalizer",
    "channel_stats",
    "fill_nodata",
    "normalize_",
]

#: What the network is given where an image has no data, in the file's units (before stain
#: normalisation and normalisation): what a patch holds past an image's edge. Patch stores
#: hold it, streamed crops are filled with it, and inference fills tiles with it, so a model
#: sees such pixels in inference exactly as it saw them in training.
NODATA_FILL = 0


def fill_nodata(pixels: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """``pixels`` (h, w, C) with :data:`NODATA_FILL` where ``valid`` (h, w) is False: what the
    network is given there (a new array where anything changes; ``pixels`` itself else).

    >>> fill_nodata(np.full((1, 2, 1), 7), np.array([[True, False]]))[..., 0].tolist()
    [[7, 0]]
    """
    if valid is None or valid.all():
        return pixels
    return np.where(valid[..., None], pixels, np.asarray(NODATA_FILL, pixels.dtype))


#: Smallest standard deviation a statistic reports: sqrt(1e-12). The tiler floored the std
#: at 1e-6 and ``store_stats`` the variance at 1e-12; both give exactly this value
#: (``np.sqrt(1e-12) == 1e-6`` in float64), so stores and checkpoints keep their numbers.
STD_FLOOR = 1e-6


def channel_stats(
    sums: Sequence[float] | np.ndarray, sumsq: Sequence[float] | np.ndarray, count: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` (float64) from pixel sums, sums of squares and a count.

    ``std`` is the population standard deviation, at least :data:`STD_FLOOR`.

    >>> mean, std = channel_stats([6.0, 9.0], [14.0, 27.0], 3)
    >>> mean.tolist(), std.round(6).tolist()
    ([2.0, 3.0], [0.816497, 1e-06])
    """
    n = max(float(count), 1.0)
    mean = np.asarray(sums, dtype=np.float64) / n
    var = np.asarray(sumsq, dtype=np.float64) / n - mean**2
    return mean, np.maximum(np.sqrt(np.maximum(var, 0.0)), STD_FLOOR)


class Normalizer:
    """``x <- (x - mean) * (1 / std)`` per channel of (B, C, H, W) float32 batches, in place.

    ``mean`` and ``1 / std`` are made once, as float32 on ``device`` (the reciprocal is taken
    in float32 on the CPU, then moved), so applying it costs two elementwise passes.
    """

    def __init__(
        self,
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        *,
        device: Any = "cpu",
    ) -> None:
        import torch

        m = torch.as_tensor(mean, dtype=torch.float32).cpu()
        inv = 1.0 / torch.as_tensor(std, dtype=torch.float32).cpu()
        self.mean = m.to(device).view(1, -1, 1, 1)
        self.inv_std = inv.to(device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the float32 batch ``x`` in place; return it."""
        return x.sub_(self.mean).mul_(self.inv_std)


def normalize_(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Normalise the float32 (B, C, H, W) batch ``x`` in place with ``mean``/``std``; return it.

    >>> import torch
    >>> normalize_(torch.full((1, 2, 1, 1), 10.0), [2.0, 4.0], [4.0, 2.0]).flatten().tolist()
    [2.0, 3.0]
    """
    return Normalizer(mean, std, device=x.device)(x)
