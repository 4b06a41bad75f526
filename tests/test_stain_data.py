"""``data.stain``: training batches stain-normalised (tilenet.stain) before augmentation."""

from __future__ import annotations

from pathlib import Path

import tifffile
import torch
from PIL import Image
from test_stain import synthetic_he

from tilenet.config import AugmentConfig, DataConfig
from tilenet.patches.data import build_loader
from tilenet.patches.tiler import tile_images
from tilenet.stain import Macenko


def test_loader_normalises_each_patch_to_the_reference(tmp_path: Path) -> None:
    img = tmp_path / "he.tif"
    tifffile.imwrite(img, synthetic_he(1, size=96, h_gain=1.4, e_gain=0.7), photometric="rgb")
    store = tile_images([img], out=tmp_path / "p.zarr", patch=48, overlap=0, progress=False)
    ref = synthetic_he(0)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    cfg = DataConfig(
        val_stores=[str(store)], patch=48, batch_size=4, output="uint8", normalize=False
    )
    cfg.augment = AugmentConfig(enabled=False)
    (raw, _), *_ = list(build_loader(cfg, train=False))
    cfg.stain = str(tmp_path / "ref.png")
    (got, _), *_ = list(build_loader(cfg, train=False))
    assert raw.shape == got.shape == (4, 3, 48, 48) and got.dtype == torch.uint8
    want, ok = Macenko().fit(ref).normalize(raw.contiguous())
    assert ok[1:].all()  # the first patch is mostly glass
    assert torch.equal(got, want) and not torch.equal(got, raw)
