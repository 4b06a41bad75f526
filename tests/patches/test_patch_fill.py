"""Pixels without data are stored (and cropped) as one documented fill, not the file's nodata
value: two GeoTIFFs (written by GDAL through rasterio) that differ only in their nodata
value give identical patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
import zarr
from rasterio.transform import from_origin

from tilenet.normalize import NODATA_FILL
from tilenet.patches.crops import RandomCropDataset
from tilenet.patches.tiler import tile_images

H, W = 40, 44


def _scene(path: Path, nodata: float) -> np.ndarray:
    """A float32 2-band scene with ``nodata`` in a block, a line and the last column (every
    band); returns the mask of pixels without data."""
    rng = np.random.default_rng(11)
    data = rng.normal(100.0, 20.0, (2, H, W)).astype(np.float32)
    invalid = np.zeros((H, W), bool)
    invalid[5:19, 9:30] = True
    invalid[27, :] = True
    invalid[:, -1] = True
    data[:, invalid] = nodata
    profile = {"driver": "GTiff", "height": H, "width": W, "count": 2, "dtype": "float32",
               "crs": "EPSG:32633", "transform": from_origin(0.0, 400.0, 10.0, 10.0)}  # fmt: skip
    with rasterio.open(path, "w", nodata=nodata, **profile) as ds:
        ds.write(data)
    return invalid


def test_stores_and_crops_do_not_depend_on_the_nodata_value(tmp_path: Path) -> None:
    stores, crops = [], []
    for value in (-9999.0, -32768.0):
        img = tmp_path / f"scene{int(value)}.tif"
        invalid = _scene(img, value)
        store = tmp_path / f"p{int(value)}.zarr"
        tile_images(
            [img], out=store, patch=16, overlap=0, min_foreground=0, progress=False, workers=1
        )
        group = zarr.open_group(store, mode="r")
        images, coords = np.asarray(group["images"][:]), np.asarray(group["coords"][:])
        for (_, _, y, x), patch in zip(coords, images, strict=True):
            inv = invalid[y : y + 16, x : x + 16]
            assert (patch[: inv.shape[0], : inv.shape[1]][inv] == NODATA_FILL).all()
        stores.append((images, group.attrs["mean"]))
        ds = RandomCropDataset([img], None, patch=16, samples_per_epoch=6, normalize=False)
        crops.append(torch.cat([x for x, _ in ds]))
    (a, mean_a), (b, mean_b) = stores
    np.testing.assert_array_equal(a, b)
    assert mean_a == mean_b
    assert not (crops[0] < -1000).any()
    torch.testing.assert_close(crops[0], crops[1], rtol=0, atol=0)
