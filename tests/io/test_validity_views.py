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
import rasterio
import tifffile
import zarr
from PIL import Image
from rasterio.transform import from_origin

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
        assert summary["nodata_px"] == int(invalid.sum())  # not georeferenced: counted too
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


def _area_cover(valid: np.ndarray, f: float, shape: tuple[int, int]) -> np.ndarray:
    """The fraction (float64) of each view pixel ``[i*f, (i+1)*f)`` that ``valid`` covers."""

    def weights(n_out: int, n_in: int) -> np.ndarray:
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            lo, hi = i * f, (i + 1) * f
            for j in range(int(lo), min(n_in, int(np.ceil(hi)))):
                m[i, j] = min(hi, j + 1) - max(lo, j)
        return m / m.sum(1, keepdims=True)

    wy, wx = weights(shape[0], valid.shape[0]), weights(shape[1], valid.shape[1])
    return np.asarray(wy @ valid.astype(np.float64) @ wx.T)


def _gdal_masked(path: Path, hidden: int, kind: str) -> np.ndarray:
    """An RGB scene written by GDAL with an alpha band or an internal mask where ``_rgba``
    has no data; ``hidden`` is what the pixels without data hold. Returns the invalid mask."""
    rgba, invalid = _rgba()
    rgb = np.moveaxis(rgba[:, :, :3], -1, 0).copy()
    rgb[:, invalid] = hidden
    profile: dict[str, Any] = {
        "driver": "GTiff", "height": H, "width": W, "dtype": "uint8", "tiled": True,
        "blockxsize": 16, "blockysize": 16, "crs": "EPSG:32633",
        "transform": from_origin(500_000.0, 4_600_000.0, 10.0, 10.0),
    }  # fmt: skip
    if kind == "alpha":
        with rasterio.open(path, "w", count=4, photometric="rgb", alpha="YES", **profile) as ds:
            ds.write(np.concatenate([rgb, rgba[None, :, :, 3]]))
    else:
        with (
            rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
            rasterio.open(path, "w", count=3, **profile) as ds,
        ):
            ds.write(rgb)
            ds.write_mask(rgba[:, :, 3])
    return invalid


@pytest.mark.parametrize(
    ("kind", "gsd"), [("alpha", 20.0), ("mask", 15.0), ("mask", 20.0), ("alpha", 10.0)]
)
def test_resampled_view_carries_the_dataset_mask(tmp_path: Path, kind: str, gsd: float) -> None:
    """A view at another pixel size (``--gsd``) has the source's mask: a view pixel has no
    data where valid pixels cover less than half of it; what hides under the mask gets no
    weight; pixels and mask are the same whatever window they are read in."""
    f = gsd / 10.0
    views = []
    for hidden in (0, 250):
        path = tmp_path / f"{kind}-{hidden}.tif"
        invalid = _gdal_masked(path, hidden, kind)
        image = open_image(path)
        v = view(image, bands=[1, 2, 3], resolution=ResolutionConfig(gsd=gsd)).image
        shape = v.levels[0].shape
        assert v.masked and shape == (int(H / f), int(W / f))
        whole, valid = v.read_masked(Window(0, 0, *shape))
        assert valid is not None
        cover = _area_cover(~invalid, f, shape)
        np.testing.assert_array_equal(valid, cover >= 0.5)
        assert 0 < (~valid).sum() < valid.size
        # seam-free: the same pixels and mask read in odd windows, some reaching outside
        for y, x, h, w in [(-2, -3, 9, 11), (5, 7, 13, 9), (shape[0] - 4, shape[1] - 5, 8, 9)]:
            px, ok = v.read_masked(Window(y, x, h, w))
            inside = Window(y, x, h, w).clip(*shape)
            rel = inside.relative_to(Window(y, x, h, w)).slices
            assert ok is not None and not ok.sum() > ok[rel].sum()
            np.testing.assert_array_equal(px[rel], whole[inside.slices])
            np.testing.assert_array_equal(ok[rel], valid[inside.slices])
        views.append((whole, valid))
        image.close()
    (a, va), (b, vb) = views
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(a[va], b[va])  # the hidden values never reach valid pixels


def test_infer_at_gsd_marks_the_resampled_mask(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """``infer --gsd`` on a masked raster: classes are the nodata class exactly where the
    resampled view has no data, and the class areas count the valid view pixels only."""
    path = tmp_path / "scene.tif"
    invalid = _gdal_masked(path, 250, "mask")
    out = tmp_path / "out"
    opts: dict[str, Any] = {"tile": 16, "device": "cpu", "outputs": ["classes"]}
    summary = infer_image(path, tiny_checkpoint, out, resolution=ResolutionConfig(gsd=20.0), **opts)
    classes = _classes(out)
    want = _area_cover(~invalid, 2.0, classes.shape) < 0.5
    np.testing.assert_array_equal(classes == 255, want)
    assert sum(summary["class_area_px"].values()) == int((~want).sum())
    assert summary["nodata_px"] == int(want.sum())


def _drop_tile(path: Path, page: int, tile: int) -> None:
    """Make tile ``tile`` of ``page`` missing, as sparse slides store it: byte count 0."""
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[page].tags["TileByteCounts"]
        size = {3: 2, 4: 4, 16: 8}[int(tag.dtype)]
        at, order = tag.valueoffset + tile * size, tf.byteorder
    with path.open("r+b") as f:
        f.seek(at)
        f.write((0).to_bytes(size, "little" if order == "<" else "big"))


def test_openslide_transparent_areas_are_masked(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A sparse Philips TIFF (tifffile writes it, a tile of each level with byte count 0):
    OpenSlide reads the missing tiles as transparent; tilenet still shows them as background
    (white) and masks exactly those pixels, at every level and in the outputs. The same slide
    with every tile is not masked."""
    from slidewriters import write_philips_tiff

    rng = np.random.default_rng(2)
    img = rng.integers(40, 200, (128, 192, 3), dtype=np.uint8)
    full = write_philips_tiff(
        tmp_path / "full.tiff", [img, img[::2, ::2]], mpp_mm=0.00025, factors=(1, 2), tile=32
    )
    with open_image(full) as image:  # fully scanned: not masked, read as before
        assert type(image).__name__ == "SlideImage" and not image.masked
        assert image.read_masked(Window(0, 0, 128, 192))[1] is None
    path = write_philips_tiff(
        tmp_path / "sparse.tiff", [img, img[::2, ::2]], mpp_mm=0.00025, factors=(1, 2), tile=32
    )
    _drop_tile(path, 0, 7)  # row 1, column 1 of 6 columns: pixels 32:64, 32:64
    _drop_tile(path, 1, 0)  # level 1: the first tile (level-0 pixels 0:64, 0:64)
    invalid = np.zeros((128, 192), bool)
    invalid[32:64, 32:64] = True
    with open_image(path) as image:
        assert type(image).__name__ == "SlideImage" and image.masked
        pixels, valid = image.read_masked(Window(0, 0, 128, 192))
        assert valid is not None
        np.testing.assert_array_equal(~valid, invalid)
        assert (pixels[invalid] == 255).all()  # composited on white, as before
        lv1 = image.valid(Window(0, 0, 64, 96), 1)
        assert lv1 is not None and int((~lv1).sum()) == 32 * 32 and not lv1[:32, :32].any()
    out = tmp_path / "out"
    opts: dict[str, Any] = {"tile": 32, "device": "cpu", "outputs": ["classes"]}
    summary = infer_image(path, tiny_checkpoint, out, **opts)
    np.testing.assert_array_equal(_classes(out) == 255, invalid)
    assert sum(summary["class_area_px"].values()) == int((~invalid).sum())
    assert summary["nodata_px"] == 32 * 32
    assert summary["nodata_area_um2"] == pytest.approx(32 * 32 * 0.25 * 0.25)


def test_a_hole_at_level_0_only_is_masked_too(tmp_path: Path) -> None:
    """A Philips TIFF missing one level-0 tile whose level-1 tile is there: the coarsest
    level shows no transparent pixel, but the tile byte counts say the slide is sparse, so
    the hole is masked (before, it was read as white background and classified)."""
    import openslide
    from slidewriters import write_philips_tiff

    rng = np.random.default_rng(3)
    img = rng.integers(40, 200, (128, 192, 3), dtype=np.uint8)
    path = write_philips_tiff(
        tmp_path / "sparse0.tiff", [img, img[::2, ::2]], mpp_mm=0.00025, factors=(1, 2), tile=32
    )
    _drop_tile(path, 0, 8)  # row 1, column 2: pixels 32:64, 64:96
    with openslide.OpenSlide(str(path)) as slide:  # the coarsest level: fully opaque
        coarse = np.asarray(slide.read_region((0, 0), 1, (96, 64)))
        assert (coarse[:, :, 3] == 255).all()
    with open_image(path) as image:
        assert type(image).__name__ == "SlideImage" and image.masked
        _, valid = image.read_masked(Window(0, 0, 128, 192))
        assert valid is not None
        want = np.zeros((128, 192), bool)
        want[32:64, 64:96] = True
        np.testing.assert_array_equal(~valid, want)


def test_sparse_svs_read_by_tifffile_masks_what_openslide_leaves_transparent(
    tmp_path: Path,
) -> None:
    """An Aperio SVS (tifffile reads it) with a tile left out (byte count 0): the missing
    tile has no data exactly where OpenSlide's own read of the file is transparent; the same
    file with every tile is not masked."""
    import openslide
    from slidewriters import write_aperio_svs

    img = np.random.default_rng(4).integers(40, 200, (512, 768, 3), dtype=np.uint8)
    full = write_aperio_svs(tmp_path / "full.svs", img, mpp=0.5, levels=(4,))
    with open_image(full) as image:
        assert type(image).__name__ == "TiffImage" and not image.masked
    sparse = write_aperio_svs(tmp_path / "sparse.svs", img, mpp=0.5, levels=(4,))
    _drop_tile(sparse, 0, 4)  # row 1, column 1 of 3 columns: pixels 256:512, 256:512
    with openslide.OpenSlide(str(sparse)) as slide:
        transparent = np.asarray(slide.read_region((0, 0), 0, (768, 512)))[:, :, 3] == 0
    assert int(transparent.sum()) == 256 * 256 and transparent[256:, 256:512].all()
    with open_image(sparse) as image:
        assert type(image).__name__ == "TiffImage" and image.masked
        valid = image.valid(Window(-8, 0, 520, 768))
        assert valid is not None and not valid[:8].any()
        np.testing.assert_array_equal(~valid[8:], transparent)
        # the level-1 page has every tile: its pixels have data (OpenSlide 4.0.1 shows the
        # level-0 hole there too, but the file holds those pixels)
        lv1 = image.valid(Window(0, 0, 128, 192), 1)
        assert lv1 is not None and lv1.all()


def test_masked_view_read_from_threads(tmp_path: Path) -> None:
    """Reader threads sharing one resampled masked view get each window's own mask."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "scene.tif"
    _gdal_masked(path, 0, "alpha")
    with open_image(path) as image:
        v = view(image, bands=[1, 2, 3], resolution=ResolutionConfig(gsd=15.0)).image
        shape = v.levels[0].shape
        whole, valid = v.read_masked(Window(0, 0, *shape))
        assert valid is not None
        rng = np.random.default_rng(0)
        wins = [
            Window(int(y), int(x), 6, 7)
            for y, x in zip(
                rng.integers(0, shape[0] - 6, 60), rng.integers(0, shape[1] - 7, 60), strict=True
            )
        ]
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(v.read_masked, wins))
    for win, (px, ok) in zip(wins, got, strict=True):
        np.testing.assert_array_equal(px, whole[win.slices])
        np.testing.assert_array_equal(ok, valid[win.slices])
