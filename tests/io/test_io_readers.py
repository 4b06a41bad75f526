"""Readers: one shared test class runs against every format tilenet reads (TIFF layouts,
GeoTIFF through GDAL, slides through tifffile and OpenSlide, zarr, OME-Zarr, PNG, JPEG).

Each case writes a small image (with tifffile, zarr or Pillow) in tmp_path and records the
pixels it wrote, per pyramid level, so every read can be compared with the source.
"""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numcodecs
import numpy as np
import pytest
import tifffile
import zarr
from builders import pyramid_tiff
from PIL import Image

from tilenet.errors import CorruptImageError, ImageTooLargeError, InputError
from tilenet.geometry import Window
from tilenet.io import LazyImage, fingerprint, open_image, tiff

H, W = 100, 120


@dataclass
class Case:
    path: Path
    levels: list[np.ndarray]  # expected (h, w, C) pixels per level
    downsamples: list[tuple[float, float]]
    compression: str | None
    exact: bool = True
    chunks: tuple[int, int] | None = (32, 32)
    pixel_size: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _smooth_rgb(h: int = H, w: int = W) -> np.ndarray:
    """Smooth structured RGB (JPEG keeps it close), different in every channel."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [yy * 2, xx * 2, 128 + 60 * np.sin(yy / 9.0) * np.cos(xx / 7.0)], axis=-1
    ).astype(np.uint8)


def _noise(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


def _pyr(a: np.ndarray, n: int = 3) -> list[np.ndarray]:
    return [a[:: 2**k, :: 2**k] for k in range(n)]


def _hw(a: np.ndarray) -> np.ndarray:
    return a if a.ndim == 3 else a[:, :, None]


def _tiff(tmp: Path, name: str, data: np.ndarray, comp: str | None, **kw: Any) -> Case:
    p = tmp / name
    tifffile.imwrite(p, data, compression=comp, metadata=None, **kw)
    ch = kw.get("tile")
    names = {None: None, "zlib": "deflate", "lzw": "lzw", "zstd": "zstd", "jpeg": "jpeg"}
    return Case(p, [_hw(data)], [(1.0, 1.0)], names[comp], chunks=ch)


def case_tiff_jpeg_rgb(tmp: Path) -> Case:
    c = _tiff(
        tmp,
        "jpeg.tif",
        _smooth_rgb(),
        "jpeg",
        tile=(32, 32),
        photometric="rgb",
        compressionargs={"level": 95},
    )
    c.exact = False
    return c


def case_tiff_deflate(tmp: Path) -> Case:
    return _tiff(tmp, "deflate.tif", _noise((H, W, 3), np.uint8), "zlib", tile=(32, 32))


def case_tiff_lzw(tmp: Path) -> Case:
    return _tiff(tmp, "lzw.tif", _noise((H, W), np.uint8), "lzw", tile=(32, 32))


def case_tiff_zstd_uint16(tmp: Path) -> Case:
    return _tiff(tmp, "zstd.tif", _noise((H, W, 3), np.uint16), "zstd", tile=(32, 32))


def case_tiff_striped_uncompressed(tmp: Path) -> Case:
    return _tiff(tmp, "striped.tif", _noise((H, W, 3), np.uint8), None, rowsperstrip=7)


def case_tiff_striped_deflate(tmp: Path) -> Case:
    return _tiff(tmp, "strips.tif", _noise((H, W, 3), np.uint8), "zlib", rowsperstrip=7)


def case_tiff_page_per_channel(tmp: Path) -> Case:
    """Five 2-D pages, one per channel (tifffile reads them as a QYX series; zarr path)."""
    data = _noise((5, H, W), np.uint8)
    p = tmp / "pages5.tif"
    tifffile.imwrite(p, data, tile=(32, 32), photometric="minisblack", compression="zlib")
    return Case(p, [np.moveaxis(data, 0, 2)], [(1.0, 1.0)], "deflate")


def case_tiff_single_strip_bigendian(tmp: Path) -> Case:
    # tifffile's default for uncompressed data: one strip; read through a memory map.
    return _tiff(tmp, "be.tif", _noise((H, W), np.uint16), None, byteorder=">")


def case_bigtiff_lzw(tmp: Path) -> Case:
    return _tiff(tmp, "big.tif", _noise((H, W, 4), np.uint8), "lzw", tile=(32, 32), bigtiff=True)


def case_tiff_planar_uint16(tmp: Path) -> Case:
    data = _noise((5, H, W), np.uint16)
    p = tmp / "planar.tif"
    tifffile.imwrite(
        p, data, tile=(32, 32), photometric="minisblack", planarconfig="separate", metadata=None
    )
    return Case(p, [np.moveaxis(data, 0, 2)], [(1.0, 1.0)], None)


def case_tiff_float32(tmp: Path) -> Case:
    return _tiff(tmp, "f32.tif", _noise((H, W), np.float32), "zstd", tile=(32, 32))


def case_ome_tiff_subifds(tmp: Path) -> Case:
    p = tmp / "pyr.ome.tif"
    meta = {"axes": "CYX", "pixel_size": (0.25, 0.5)}
    pyr = pyramid_tiff(
        p, _noise((2, H, W), np.uint16), levels=3, **meta, compression="zlib", bigtiff=True
    )
    return Case(
        p,
        [np.moveaxis(lv, 0, 2) for lv in pyr],
        [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)],
        "deflate",
        pixel_size=(0.5, 0.25),
    )


def case_tiff_pyramid_pages(tmp: Path) -> Case:
    """libvips-style: each level its own page, no SubIFDs, no reduced-image flag."""
    pyr = _pyr(_noise((H, W, 3), np.uint8))
    p = tmp / "pages.tif"
    with tifffile.TiffWriter(p) as tw:
        for lv in pyr:
            tw.write(lv, tile=(32, 32), photometric="rgb", compression="zlib", metadata=None)
    return Case(p, pyr, [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)], "deflate")


def case_tiff_cog_overviews(tmp: Path) -> Case:
    """GDAL COG-style: reduced-resolution pages (NewSubfileType=1), with a resolution tag."""
    pyr = _pyr(_noise((H, W), np.uint8))
    p = tmp / "cog.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(
            pyr[0],
            tile=(32, 32),
            compression="zlib",
            metadata=None,
            resolution=(20000, 10000),
            resolutionunit="CENTIMETER",
        )
        for lv in pyr[1:]:
            tw.write(lv, tile=(32, 32), compression="zlib", subfiletype=1, metadata=None)
    return Case(
        p,
        [_hw(lv) for lv in pyr],
        [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)],
        "deflate",
        pixel_size=(1.0, 0.5),
    )


def case_zarr_v2(tmp: Path) -> Case:
    data = _noise((H, W, 3), np.uint8)
    p = tmp / "v2.zarr"
    z = zarr.create_array(
        p,
        shape=data.shape,
        chunks=(32, 32, 3),
        dtype=data.dtype,
        zarr_format=2,
        compressors=numcodecs.Zstd(level=1),
    )
    z[...] = data
    return Case(p, [data], [(1.0, 1.0)], "zstd")


def case_zarr_v3_chw(tmp: Path) -> Case:
    data = _noise((4, H, W), np.uint16)
    p = tmp / "v3.zarr"
    z = zarr.create_array(p, shape=data.shape, chunks=(1, 32, 32), dtype=data.dtype)
    z[...] = data
    return Case(p, [np.moveaxis(data, 0, 2)], [(1.0, 1.0)], "zstd")


def _ome_zarr(tmp: Path, name: str, version: str) -> Case:
    data = _noise((1, 2, H, W), np.float32)
    pyr = [data[..., :: 2**k, :: 2**k] for k in range(3)]
    p = tmp / name
    fmt = 2 if version == "0.4" else 3
    g = zarr.open_group(p, mode="w", zarr_format=fmt)
    for k, lv in enumerate(pyr):
        a = g.create_array(
            str(k),
            shape=lv.shape,
            chunks=(1, 1, 32, 32),
            dtype=lv.dtype,
            compressors=numcodecs.Zstd(level=1) if fmt == 2 else zarr.codecs.ZstdCodec(),
        )
        a[...] = lv
    ms = {
        "axes": [
            {"name": "t", "type": "time"},
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": [
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 1.0, 0.5 * 2**k, 0.5 * 2**k]}
                ],
            }
            for k in range(3)
        ],
    }
    if version == "0.4":
        g.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return Case(
        p,
        [np.moveaxis(lv[0], 0, 2) for lv in pyr],
        [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)],
        "zstd",
        pixel_size=(0.5, 0.5),
    )


def case_ome_zarr_v04(tmp: Path) -> Case:
    return _ome_zarr(tmp, "v04.ome.zarr", "0.4")


def case_ome_zarr_v05(tmp: Path) -> Case:
    return _ome_zarr(tmp, "v05.ome.zarr", "0.5")


def case_png_rgba(tmp: Path) -> Case:
    data = _noise((H, W, 4), np.uint8)
    p = tmp / "img.png"
    Image.fromarray(data).save(p)
    return Case(p, [data], [(1.0, 1.0)], "deflate", chunks=None)


def case_png_uint16(tmp: Path) -> Case:
    data = _noise((H, W), np.uint16)
    p = tmp / "img16.png"
    Image.fromarray(data).save(p)
    return Case(p, [data[:, :, None]], [(1.0, 1.0)], "deflate", chunks=None)


def case_jpeg(tmp: Path) -> Case:
    data = _smooth_rgb()
    p = tmp / "img.jpg"
    Image.fromarray(data).save(p, quality=95)
    return Case(p, [data], [(1.0, 1.0)], "jpeg", exact=False, chunks=None)


def case_geotiff_overviews(tmp: Path) -> Case:
    """A tiled GeoTIFF with internal overviews, written (and read) by GDAL through rasterio;
    a map CRS, so no pixel size in micrometres."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    data = _noise((3, H, W), np.uint8)
    p = tmp / "geo.tif"
    opts: dict[str, Any] = {"driver": "GTiff", "width": W, "height": H, "count": 3}
    opts.update(dtype="uint8", crs="EPSG:32633", transform=from_origin(5e5, 4.6e6, 0.5, 0.5))
    opts.update(tiled=True, blockxsize=32, blockysize=32, compress="deflate")
    with rasterio.open(p, "w", **opts) as dst:
        dst.write(data)
        dst.build_overviews([2, 4], Resampling.nearest)
    pyr = _pyr(np.moveaxis(data, 0, 2))
    return Case(p, pyr, [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)], "deflate")


def case_svs_aperio(tmp: Path) -> Case:
    """An Aperio-layout SVS (tests/slidewriters.py): JPEG tiles, a reduced level every 4 px."""
    from slidewriters import write_aperio_svs

    data = _smooth_rgb()
    p = write_aperio_svs(tmp / "slide.svs", data, mpp=0.5, levels=(4,))
    pyr = [data, data[::4, ::4]]
    return Case(
        p, pyr, [(1.0, 1.0), (4.0, 4.0)], "jpeg", exact=False, chunks=(256, 256),
        pixel_size=(0.5, 0.5),
    )  # fmt: skip


def case_slide_openslide(tmp: Path) -> Case:
    """A Philips-like JPEG TIFF read through OpenSlide (its tiles are the vendor's)."""
    pytest.importorskip("openslide")
    from slidewriters import write_philips_tiff

    data = _smooth_rgb()
    pyr = [data, data[::2, ::2]]
    p = write_philips_tiff(tmp / "slide.tiff", pyr, mpp_mm=0.0005, factors=(1, 2), tile=32)
    return Case(p, pyr, [(1.0, 1.0), (2.0, 2.0)], "vendor", exact=False, pixel_size=(0.5, 0.5))


CASES: dict[str, Callable[[Path], Case]] = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    return CASES[request.param](tmp_path)


def _assert_pixels(case: Case, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if case.exact:
        np.testing.assert_array_equal(got, want)
    else:
        diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
        # JPEG error is largest in small edge regions of padded tiles.
        assert diff.mean() < 8 and diff.max() < 64


class TestReader:
    """Runs against every case: same contract for every format."""

    def test_describes_without_decoding(self, case: Case) -> None:
        with open_image(case.path) as img:
            assert isinstance(img, LazyImage)
            h, w, c = case.levels[0].shape
            assert img.shape == (h, w, c)
            assert img.dtype == case.levels[0].dtype
            assert [lv.shape for lv in img.levels] == [a.shape[:2] for a in case.levels]
            assert [lv.downsample for lv in img.levels] == case.downsamples
            assert img.compression == case.compression
            assert img.chunks == case.chunks
            if case.pixel_size is not None:
                assert img.pixel_size == pytest.approx(case.pixel_size)

    @pytest.mark.parametrize("win", [(0, 0, 100, 120), (5, 7, 40, 50), (31, 33, 3, 70)])
    def test_reads_windows(self, case: Case, win: tuple[int, int, int, int]) -> None:
        window = Window(*win)
        with open_image(case.path) as img:
            _assert_pixels(case, img.read(window), case.levels[0][window.slices])

    def test_reads_every_level(self, case: Case) -> None:
        with open_image(case.path) as img:
            for k, want in enumerate(case.levels):
                lh, lw = want.shape[:2]
                _assert_pixels(case, img.read(Window(1, 2, lh - 1, lw - 2), k), want[1:, 2:])

    def test_outside_is_zero_filled(self, case: Case) -> None:
        with open_image(case.path) as img:
            got = img.read(Window(-10, W - 20, 30, 50))
            assert got.shape == (30, 50, img.channels)
            assert not got[:10].any() and not got[:, 20:].any()
            _assert_pixels(case, got[10:, :20], case.levels[0][:20, W - 20 :])
            assert not img.read(Window(H + 5, 0, 8, 8)).any()

    def test_concurrent_reads(self, case: Case) -> None:
        with open_image(case.path) as img:
            wins = [Window(y, x, 24, 40) for y in range(0, H, 24) for x in range(0, W, 40)]
            out: dict[Window, np.ndarray] = {}

            def work(ws: list[Window]) -> None:
                for win in ws:
                    out[win] = img.read(win)

            threads = [threading.Thread(target=work, args=(wins[i::3],)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for win in wins:
                inside = win.clip(H, W)
                _assert_pixels(
                    case, out[win][: inside.h, : inside.w], case.levels[0][inside.slices]
                )


def test_bad_level_is_input_error(tmp_path: Path) -> None:
    c = case_tiff_lzw(tmp_path)
    with open_image(c.path) as img, pytest.raises(InputError, match="level 3 does not exist"):
        img.read(Window(0, 0, 4, 4), 3)


def test_window_reads_decode_only_intersecting_tiles(tmp_path: Path) -> None:
    """A 50000^2 tiled TIFF (made from one pre-compressed tile): a 512^2 window decodes the 4
    tiles it overlaps (1 when aligned), and memory stays far below the 2.5 GB image."""
    tile = imagecodecs.zlib_encode(np.full((512, 512), 7, np.uint8))
    n = (-(-50_000 // 512)) ** 2
    p = tmp_path / "huge.tif"
    tifffile.imwrite(
        p,
        iter([tile] * n),
        shape=(50_000, 50_000),
        dtype=np.uint8,
        tile=(512, 512),
        compression="zlib",
        bigtiff=True,
    )
    tracemalloc.start()
    try:
        with open_image(p) as img:
            assert img.shape == (50_000, 50_000, 1)
            got = img.read(Window(30_000, 20_000, 512, 512))  # not tile-aligned: 2x2 tiles
            assert (got == 7).all()
            assert img.tiles_decoded == 4
            img.read(Window(1024, 2048, 512, 512))  # tile-aligned: one tile
            assert img.tiles_decoded == 5
            img.read(Window(30_000, 20_100, 512, 512))  # same tiles: served from the cache
            assert img.tiles_decoded == 5
            for i in range(160):  # 40 MiB of distinct tiles: the tile cache stays bounded
                img.read(Window(512 * (i // 40), 512 * (i % 40), 512, 512))
            assert img.tiles_decoded == 5 + 160 - 1  # (2, 4) was read before, still cached
            assert 0 < tiff.tile_cache_bytes() <= tiff.TILE_CACHE_BYTES
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_png_above_eager_limit_refused_before_decoding(tmp_path: Path) -> None:
    c = case_png_rgba(tmp_path)
    with pytest.raises(ImageTooLargeError, match="tilenet convert"):
        open_image(c.path, max_pixels_eager=1000)
    with open_image(c.path, max_pixels_eager=None) as img:  # what convert uses
        np.testing.assert_array_equal(img.read(Window(0, 0, H, W)), c.levels[0])


def test_header_above_max_pixels_refused(tmp_path: Path) -> None:
    c = case_tiff_deflate(tmp_path)
    with pytest.raises(ImageTooLargeError, match="above the limit"):
        open_image(c.path, max_pixels=H * W - 1)
    z = case_zarr_v2(tmp_path)
    with pytest.raises(ImageTooLargeError, match="above the limit"):
        open_image(z.path, max_pixels=100)


def test_corrupt_tile_data_fails_on_read(tmp_path: Path) -> None:
    c = case_tiff_deflate(tmp_path)
    with tifffile.TiffFile(c.path, mode="r+b") as tf:
        tag = tf.pages[0].tags["TileOffsets"]
        tag.overwrite((8,) * len(tag.value))  # inside the file, but not deflate data
    with open_image(c.path) as img, pytest.raises(CorruptImageError, match=r"deflate\.tif"):
        img.read(Window(0, 0, 10, 10))


def test_ambiguous_zarr_array_refused(tmp_path: Path) -> None:
    p = tmp_path / "cube.zarr"
    zarr.create_array(p, shape=(40, 50, 60), chunks=(8, 8, 8), dtype="u1")
    with pytest.raises(InputError, match="cannot tell which axes"):
        open_image(p)


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    c = case_tiff_lzw(tmp_path)
    fp = fingerprint(c.path)
    assert fp == fingerprint(c.path) and len(fp) == 64
    data = bytearray(c.path.read_bytes())
    data[-1] ^= 0xFF
    c.path.write_bytes(data)
    assert fingerprint(c.path) != fp
    z = case_ome_zarr_v04(tmp_path)
    fz = fingerprint(z.path)
    g = zarr.open_group(z.path, mode="r+")
    g.attrs["changed"] = True
    assert fingerprint(z.path) != fz
