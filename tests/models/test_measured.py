"""Receptive fields that are right or honest: a model the tracer cannot follow is measured.

``torch.fx`` cannot trace a module whose layers are held outside the module tree (smp's
``dpn68`` encoder: "module is not installed as a submodule"). Such a model is not refused:
its receptive field is measured from the gradient support of the centre output pixel, it is
reported not exact with the reason, and it runs in blend mode with that field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from tilenet.engine.infer import infer_image
from tilenet.errors import ModelError
from tilenet.models import ModelSpec, TileModel, analyze, exactness
from tilenet.models.receptive import measure


class _Listed(TileModel):
    """Three convolutions (radius 1 + 2 + 1 = 4) held in a plain list, as dpn68's blocks
    are held where torch.fx does not look."""

    def __init__(self) -> None:
        super().__init__(in_channels=3, num_classes=2)
        torch.manual_seed(0)
        self.convs = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2)]
        self.convs.append(nn.Conv2d(8, 2, 3, padding=1))

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x)) if conv is not self.convs[-1] else conv(x)
        return x


def test_an_untraceable_model_is_measured_reported_and_runs_in_blend_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _Listed()
    with pytest.raises(ModelError, match="not installed as a submodule"):
        analyze(model)
    an = measure(model, reason="cannot trace _Listed")
    # 4, plus one stride (1) of margin
    assert an.receptive_field == 5 and an.interval == ((-5, 5), (-5, 5))
    model.analysis, model.receptive_field = an, an.receptive_field
    exact, why = exactness(model)
    assert exact is False and why is not None
    assert why.startswith("not traced (cannot trace _Listed)") and "5 px measured" in why

    spec = ModelSpec(
        name="listed", in_channels=3, num_classes=2, stride=an.stride,
        receptive_field=an.receptive_field, mean=[128.0] * 3, std=[50.0] * 3,
        exact=exact, exact_reason=why,
    )  # fmt: skip
    img = tmp_path / "img.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(img, rng.integers(0, 256, (100, 90, 3), dtype=np.uint8), photometric="rgb")
    opts = {"tile": 64, "device": "cpu", "probabilities_dtype": "float32"}
    s = infer_image(img, (model, spec), tmp_path / "out", mode="gaussian", **opts)
    assert s["mode"] == "gaussian" and s["exact"] is False and s["receptive_field"] == 5
    with caplog.at_level("WARNING", logger="tilenet.engine.predictor"):
        infer_image(img, (model, spec), tmp_path / "crop", **opts)  # crop mode runs, and warns
    assert "crop mode is not exact (not traced" in caplog.text
