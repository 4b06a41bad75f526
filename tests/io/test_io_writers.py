"""Writers: OME-Zarr and OME-TIFF round trips, pyramids, atomicity, resume, previews."""

from __future__ import annotations

import os
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from tilenet.errors import InputError
from tilenet.fsutil import tmp_sibling
from tilenet.geometry import Window
from tilenet.io.base import LazyImage, Level
from tilenet.io.writers import (
    OmeZarrWriter,
    downsample2,
    pyramid_shapes,
    write_ome_tiff,
    write_preview_png,
)


@pytest.fixture
def rgb(rng: np.random.Generator) -> np.ndarray:
    """300 x 200 RGB with structure and noise (odd level sizes appear at 75 -> 38)."""
    yy, xx = np.mgrid[0:300, 0:200]
    base = np.stack([yy % 256, xx, (yy + xx) % 256], axis=-1)
    return ((base + rng.integers(0, 30, size=base.shape)) % 256).astype(np.uint8)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


# -- downsampling ----------------------------------------------------------------------------
def test_downsample_mean_odd_edges_average_what_exists() -> None:
    a = np.array([[0, 4, 9], [8, 12, 9], [100, 0, 7]], dtype=np.uint8)
    out = downsample2(a, "mean")
    assert out.dtype == np.uint8
    assert out.tolist() == [[6, 9], [50, 7]]


def test_downsample_mode_and_nearest_keep_label_values() -> None:
    a = np.array([[1, 1, 2, 3], [2, 1, 3, 3]], dtype=np.uint8)
    assert downsample2(a, "mode").tolist() == [[1, 3]]
    assert downsample2(a, "nearest").tolist() == [[1, 2]]
    # a 2-2 tie goes to the first value in row order
    assert downsample2(np.array([[5, 6], [6, 5]]), "mode").tolist() == [[5]]


def test_downsample_float_and_channels_last() -> None:
    a = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
    out = downsample2(a)
    assert out.shape == (2, 3, 2)
    np.testing.assert_allclose(out[0, 0], a[:2, :2].mean(axis=(0, 1)))


def test_pyramid_shapes_stop_at_min_side() -> None:
    assert pyramid_shapes((300, 200), min_side=64) == [(300, 200), (150, 100), (75, 50), (38, 25)]
    with pytest.raises(InputError):
        pyramid_shapes((10, 10), min_side=0)


# -- OME-Zarr --------------------------------------------------------------------------------
def _write_all(writer: OmeZarrWriter, data: np.ndarray, chunk: int, rows: range | None = None):
    h, w = data.shape[:2]
    for y in rows if rows is not None else range(0, h, chunk):
        for x in range(0, w, chunk):
            writer.write(y, x, data[y : y + chunk, x : x + chunk])


def test_ome_zarr_round_trip_levels_and_metadata(tmp_path: Path, rgb: np.ndarray) -> None:
    out = tmp_path / "img.ome.zarr"
    writer = OmeZarrWriter(
        out, shape=rgb.shape, dtype=np.uint8, axes="yxc", chunks=64, pixel_size=(0.25, 0.5)
    )
    assert not out.exists() and writer.tmp.exists()
    assert writer.shape == (300, 200, 3)
    _write_all(writer, rgb, 64)
    assert writer.finalize(method="mean", min_side=64) == out
    assert _leftovers(tmp_path) == []

    group = zarr.open_group(out, mode="r")
    ms = group.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [(a["name"], a["type"]) for a in ms["axes"]] == [
        ("c", "channel"),
        ("y", "space"),
        ("x", "space"),
    ]
    assert ms["axes"][1]["unit"] == "micrometer"
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, 0.25, 0.5], [1.0, 0.5, 1.0], [1.0, 1.0, 2.0], [1.0, 2.0, 4.0]]
    shapes = [group[d["path"]].shape for d in ms["datasets"]]
    assert shapes == [(3, 300, 200), (3, 150, 100), (3, 75, 50), (3, 38, 25)]
    assert group["0"].metadata.dimension_separator == "/"
    level0 = np.moveaxis(group["0"][:], 0, 2)
    np.testing.assert_array_equal(level0, rgb)
    expected = rgb
    for k in (1, 2, 3):
        expected = downsample2(expected, "mean")
        np.testing.assert_array_equal(np.moveaxis(group[str(k)][:], 0, 2), expected)
    assert len(group.attrs["omero"]["channels"]) == 3


def test_ome_zarr_label_map_mode_pyramid(tmp_path: Path, rng: np.random.Generator) -> None:
    labels = rng.integers(0, 4, size=(130, 90), dtype=np.uint8)
    out = tmp_path / "classes.zarr"
    with OmeZarrWriter(out, shape=labels.shape, dtype=np.uint8, chunks=32) as writer:
        _write_all(writer, labels, 32)
        writer.finalize(method="mode", min_side=40)
    group = zarr.open_group(out, mode="r")
    ms = group.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert "unit" not in ms["axes"][0]
    assert ms["type"] == "mode"
    np.testing.assert_array_equal(group["1"][:], downsample2(labels, "mode"))
    assert set(np.unique(group["2"][:])) <= set(range(4))


@pytest.mark.parametrize(
    ("dtype", "cname", "shuffle"), [(np.uint8, "zstd", 1), (np.float32, "lz4", 2)]
)
def test_ome_zarr_default_codec_by_dtype(
    tmp_path: Path, rng: np.random.Generator, dtype: type, cname: str, shuffle: int
) -> None:
    """Label maps get zstd (small, compressible); float maps lz4 + bit-shuffle (fast)."""
    data = rng.random((3, 40, 50)).astype(dtype)
    out = tmp_path / "p.ome.zarr"
    with OmeZarrWriter(out, shape=data.shape, dtype=dtype, axes="cyx", chunks=32) as w:
        w.array[:] = data
        w.finalize(min_side=16)
    arr = zarr.open_group(out, mode="r")["0"]
    (codec,) = arr.compressors
    assert (codec.cname, codec.shuffle) == (cname, shuffle)
    np.testing.assert_array_equal(np.asarray(arr), data)
    assert zarr.open_group(out, mode="r")["1"].compressors == arr.compressors


def test_ome_zarr_refuses_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "x.zarr"
    out.mkdir()
    with pytest.raises(InputError, match="already exists"):
        OmeZarrWriter(out, shape=(8, 8), dtype=np.uint8)
    with pytest.raises(InputError, match="axes"):
        OmeZarrWriter(tmp_path / "y.zarr", shape=(8, 8), dtype=np.uint8, axes="xy")


def test_ome_zarr_exception_leaves_no_output(tmp_path: Path, rgb: np.ndarray) -> None:
    out = tmp_path / "img.zarr"
    with (
        pytest.raises(RuntimeError),
        OmeZarrWriter(out, shape=rgb.shape, dtype=np.uint8, axes="yxc", chunks=64) as writer,
    ):
        writer.write(0, 0, rgb[:64, :64])
        raise RuntimeError("crash mid-write")
    assert not out.exists()
    assert _leftovers(tmp_path) == []
    assert OmeZarrWriter.open_partial(out) is None


def test_ome_zarr_resume_after_crash_in_another_process(tmp_path: Path, rgb: np.ndarray) -> None:
    out = tmp_path / "img.ome.zarr"
    with (
        pytest.raises(RuntimeError),
        OmeZarrWriter(
            out, shape=rgb.shape, dtype=np.uint8, axes="yxc", chunks=64, name="img", resumable=True
        ) as writer,
    ):
        _write_all(writer, rgb, 64, rows=range(0, 128, 64))
        raise RuntimeError("crash")
    assert not out.exists()
    # as if the crashed run had another pid
    crashed = tmp_path / f".{out.name}.partial-999999"
    os.replace(tmp_sibling(out), crashed)

    resumed = OmeZarrWriter.open_partial(out)
    assert resumed is not None
    assert resumed.shape == (300, 200, 3) and resumed.chunks == (64, 64)
    assert not crashed.exists()
    np.testing.assert_array_equal(resumed.read(Window(0, 0, 128, 200)), rgb[:128])
    _write_all(resumed, rgb, 64, rows=range(128, 300, 64))
    resumed.finalize(min_side=64)
    group = zarr.open_group(out, mode="r")
    np.testing.assert_array_equal(np.moveaxis(group["0"][:], 0, 2), rgb)
    assert group.attrs["multiscales"][0]["name"] == "img"
    assert "tilenet_writer" not in group.attrs
    assert _leftovers(tmp_path) == []


# -- OME-TIFF --------------------------------------------------------------------------------
def _levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        return [lv.asarray() for lv in tif.series[0].levels]


def test_ome_tiff_round_trip_pyramid(tmp_path: Path, rgb: np.ndarray) -> None:
    out = tmp_path / "img.ome.tif"
    write_ome_tiff(out, rgb, tile=64, compression="zlib", pixel_size=(0.5, 0.5), min_side=64)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (64, 64)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.photometric == tifffile.PHOTOMETRIC.RGB
        assert len(page.subifds) == 3
        assert tif.series[0].axes == "YXS"
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    levels = _levels(out)
    assert [lv.shape for lv in levels] == [(300, 200, 3), (150, 100, 3), (75, 50, 3), (38, 25, 3)]
    expected = rgb
    for lv in levels:
        np.testing.assert_array_equal(lv, expected)
        expected = downsample2(expected, "mean")
    assert _leftovers(tmp_path) == []


def test_ome_tiff_jpeg_default_for_rgb(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:300, 0:200]
    smooth = np.stack([yy * 0.8, xx, 255 - yy * 0.8], axis=-1).astype(np.uint8)
    out = tmp_path / "img.tif"
    write_ome_tiff(out, smooth, tile=128)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
        level0 = tif.series[0].levels[0].asarray()
    # lossy, but quality 90 on a smooth image stays close
    assert np.abs(level0.astype(int) - smooth.astype(int)).mean() < 2


def test_ome_tiff_from_zarr_cyx_float_and_labels(tmp_path: Path, rng: np.random.Generator) -> None:
    probs = zarr.create_array(
        tmp_path / "p.zarr", shape=(5, 100, 70), chunks=(5, 32, 32), dtype=np.float32
    )
    data = rng.random((5, 100, 70), dtype=np.float32)
    probs[:] = data
    out = write_ome_tiff(tmp_path / "p.tif", probs, tile=32, min_side=32, axes="cyx")
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    levels = _levels(out)
    np.testing.assert_array_equal(levels[0], np.moveaxis(data, 0, 2))
    np.testing.assert_allclose(levels[1], downsample2(np.moveaxis(data, 0, 2)), rtol=1e-6)

    labels = rng.integers(0, 3, size=(100, 70), dtype=np.uint8)
    out = write_ome_tiff(tmp_path / "l.tif", labels, tile=32, method="mode", min_side=32)
    levels = _levels(out)
    assert levels[0].shape == (100, 70)
    np.testing.assert_array_equal(levels[0], labels)
    np.testing.assert_array_equal(levels[1], downsample2(labels, "mode"))


@dataclass
class _FailingImage(LazyImage):
    """Reads a real array but fails after ``ok`` windows (a disk error mid-conversion)."""

    data: np.ndarray | None = None
    ok: int = 0

    def _read(self, window: Window, level: int) -> np.ndarray:
        if self.ok <= 0:
            raise OSError("disk gone")
        self.ok -= 1
        assert self.data is not None
        return self.data[window.slices]


def test_ome_tiff_failure_mid_write_leaves_nothing(tmp_path: Path, rgb: np.ndarray) -> None:
    img = _FailingImage(
        path=tmp_path / "in.tif",
        format="test",
        dtype=np.dtype(np.uint8),
        channels=3,
        levels=[Level((300, 200))],
        data=rgb,
        ok=5,
    )
    out = tmp_path / "out.tif"
    with pytest.raises(Exception, match="disk gone"):
        write_ome_tiff(out, img, tile=64, compression="zlib", min_side=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@dataclass
class _Ramp(LazyImage):
    """A cheap computed image of any size (no array behind it)."""

    def _read(self, window: Window, level: int) -> np.ndarray:
        yy, xx = np.ogrid[window.y : window.y1, window.x : window.x1]
        v = ((yy + xx) % 251).astype(np.uint8)
        return np.broadcast_to(v[:, :, None], (window.h, window.w, 3))


@pytest.mark.slow  # ~7-13 s; default: the OME-TIFF round trips
def test_ome_tiff_memory_is_bounded_by_the_tile(tmp_path: Path) -> None:
    """A 4096^2 RGB image is 48 MiB; writing it with 256-px tiles must peak far below."""
    img = _Ramp(
        path=tmp_path / "ramp",
        format="test",
        dtype=np.dtype(np.uint8),
        channels=3,
        levels=[Level((4096, 4096))],
    )
    tracemalloc.start()
    try:
        write_ome_tiff(tmp_path / "big.tif", img, tile=256, compression="zlib")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        levels = tif.series[0].levels
        assert [lv.shape[0] for lv in levels] == [4096, 2048, 1024, 512, 256]
        np.testing.assert_array_equal(
            levels[0].asarray()[4000:, 4000:], img.read(Window(4000, 4000, 96, 96))
        )


def test_ome_tiff_rejects_bad_options(tmp_path: Path, rgb: np.ndarray) -> None:
    with pytest.raises(InputError, match="jpeg"):
        write_ome_tiff(tmp_path / "f.tif", rgb.astype(np.float32), compression="jpeg")
    with pytest.raises(InputError, match="compression"):
        write_ome_tiff(tmp_path / "f.tif", rgb, compression="gif")
    with pytest.raises(InputError, match="multiple of 16"):
        write_ome_tiff(tmp_path / "f.tif", rgb, tile=100)
    with pytest.raises(InputError, match="axes"):
        write_ome_tiff(tmp_path / "f.tif", np.zeros((40, 40, 40), np.uint8))
    assert list(tmp_path.iterdir()) == []


# -- PNG preview -----------------------------------------------------------------------------
def test_preview_from_ome_zarr_with_overlay(tmp_path: Path, rgb: np.ndarray) -> None:
    store = tmp_path / "img.zarr"
    with OmeZarrWriter(store, shape=rgb.shape, dtype=np.uint8, axes="yxc", chunks=64) as w:
        _write_all(w, rgb, 64)
        w.finalize(min_side=32)
    classes = np.zeros((300, 200), np.uint8)
    classes[:, 100:] = 1
    plain = write_preview_png(tmp_path / "plain.png", store, max_side=90)
    over = write_preview_png(tmp_path / "over.png", store, max_side=90, overlay=classes, alpha=0.5)
    with Image.open(plain) as a, Image.open(over) as b:
        assert max(a.size) <= 90 and a.size == b.size == (60, 90)
        pa, pb = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert np.array_equal(pa[:, :25], pb[:, :25])  # class 0 is not drawn
    assert np.abs(pa[:, 35:] - pb[:, 35:]).mean() > 10  # class 1 is tinted


def test_preview_strided_without_pyramid(tmp_path: Path) -> None:
    data = np.zeros((2000, 300), np.uint16)
    data[:1000] = 1000
    out = write_preview_png(tmp_path / "p.png", data, max_side=100)
    with Image.open(out) as im:
        assert im.size == (15, 100)
        arr = np.asarray(im)
    assert arr[:45].min() > arr[55:].max()
