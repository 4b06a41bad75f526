"""Multispectral training data: band selection (``--bands``, ``data.bands``), statistics that
leave nodata out, and nodata pixels ignored by the loss, on a 4-band uint16 GeoTIFF with
nodata written by GDAL (through rasterio)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin

from tilenet.cli import main
from tilenet.config import DataConfig
from tilenet.data import build_loader, store_stats
from tilenet.errors import InputError
from tilenet.io.base import IGNORE_INDEX, nodata_mask

H, W = 64, 96
BANDS = [4, 2]


def _write(path: Path, data: np.ndarray, nodata: float | None) -> None:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs="EPSG:32633",
        transform=from_origin(500000.0, 4000000.0, 10.0, 10.0),
        nodata=nodata,
        tiled=True,
        blockxsize=32,
        blockysize=32,
    ) as dst:
        dst.write(data)


@pytest.fixture
def scene(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """images/scene.tif: 4 bands of uint16 (band b around b * 1000), nodata 0 in a top-left
    block and a stripe; labels/scene.tif: classes 1 and 2 everywhere, nodata area included."""
    rng = np.random.default_rng(0)
    data = np.stack([b * 1000 + rng.integers(0, 500, (H, W)) for b in (1, 2, 3, 4)])
    data = data.astype(np.uint16)
    data[:, :20, :30] = 0
    data[:, 40:43, :] = 0
    data[1, 50:52, :] = 0  # one band only: still data
    labels = (1 + (np.arange(W)[None, :] >= W // 2) * np.ones((H, 1), int)).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _write(tmp_path / "images" / "scene.tif", data, 0)
    _write(tmp_path / "labels" / "scene.tif", labels[None], None)
    return tmp_path / "images", tmp_path / "labels", data, labels


def _valid_stats(data: np.ndarray, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std per band over the pixels where not every band is nodata (0)."""
    sel = data[[b - 1 for b in bands]].astype(np.float64)
    valid = (data != 0).any(0)
    px = sel[:, valid]
    return px.mean(1), px.std(1)


def test_nodata_mask_needs_every_band() -> None:
    px = np.array([[[0, 0], [0, 3]], [[5, 0], [0, 0]]], np.uint16)
    assert nodata_mask(px, 0).tolist() == [[True, False], [False, True]]  # type: ignore[union-attr]
    assert nodata_mask(px, None) is None
    f = np.array([[[np.nan, np.nan], [np.nan, 1.0]]])
    assert nodata_mask(f, float("nan")).tolist() == [[True, False]]  # type: ignore[union-attr]


def test_tile_keeps_bands_ignores_nodata_in_stats_and_labels(
    scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels, data, lab = scene
    out = tmp_path / "s.zarr"
    argv = ["tile", str(images), "--labels", str(labels), "--out", str(out), "--bands", "4,2"]
    assert main([*argv, "--patch", "32", "--overlap", "0", "--quiet"]) == 0
    group: Any = zarr.open_group(out, mode="r")
    attrs: dict[str, Any] = dict(group.attrs)
    imgs, labs, coords = (np.asarray(group[k][:]) for k in ("images", "labels", "coords"))
    assert imgs.shape == (6, 32, 32, 2) and imgs.dtype == np.uint16
    none = (data == 0).all(0)
    for img, lb, (_, _, y, x) in zip(imgs, labs, coords, strict=True):
        win = np.s_[y : y + 32, x : x + 32]
        np.testing.assert_array_equal(img, np.moveaxis(data[[3, 1]][(slice(None), *win)], 0, -1))
        np.testing.assert_array_equal(lb, np.where(none[win], IGNORE_INDEX, lab[win]))
    assert (labs == IGNORE_INDEX).sum() == none.sum() > 0
    mean, std = _valid_stats(data, BANDS)
    np.testing.assert_allclose(attrs["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(attrs["std"], std, rtol=1e-9)
    # All bands, with nodata counted, would be far off: band 4's mean is near 4250.
    assert abs(mean[0] - 4250) < 30


def test_random_crops_pick_bands_and_ignore_nodata(
    scene: tuple[Path, Path, np.ndarray, np.ndarray],
) -> None:
    images, labels, data, _ = scene
    st = store_stats([images], bands=BANDS)
    mean, std = _valid_stats(data, BANDS)
    assert st["channels"] == 2
    np.testing.assert_allclose(st["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(st["std"], std, rtol=1e-9)
    cfg = DataConfig(
        images=str(images),
        labels=str(labels),
        bands=BANDS,
        patch=32,
        batch_size=8,
        samples_per_epoch=16,
    )
    cfg.augment.enabled = False
    loader = build_loader(cfg, train=True)
    ds = loader.dataset
    assert ds.channels == 2  # type: ignore[attr-defined]
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-9)  # type: ignore[attr-defined]
    seen = 0
    for x, y in loader:
        raw = x.numpy() * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
        none = (np.abs(raw) < 0.5).all(1)
        assert np.array_equal(y.numpy() == IGNORE_INDEX, none)
        assert set(np.unique(y.numpy()[~none]).tolist()) <= {1, 2}
        seen += int(none.sum())
    assert seen > 0


def test_band_errors(scene: tuple[Path, Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images = scene[0]
    with pytest.raises(InputError, match=r"bands \[5\] do not exist; the image has bands 1..4"):
        store_stats([images], bands=[5])
    cfg = DataConfig(stores=[str(tmp_path / "s.zarr")], bands=BANDS)
    with pytest.raises(InputError, match=r"data\.bands picks the bands of data\.images"):
        build_loader(cfg, train=True)
