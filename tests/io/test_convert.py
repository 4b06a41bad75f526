"""``convert``: any readable image to pyramidal OME-TIFF / OME-Zarr, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from tilenet.cli import main
from tilenet.errors import InputError
from tilenet.geometry import Window
from tilenet.io import convert, open_image
from tilenet.io.writers import downsample2


@pytest.fixture
def big_rgb(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:300, 0:220]
    base = np.stack([yy % 256, xx, (yy * 2 + xx) % 256], axis=-1)
    return ((base + rng.integers(0, 20, size=base.shape)) % 256).astype(np.uint8)


def test_png_to_ome_tiff_lossless(tmp_path: Path, big_rgb: np.ndarray) -> None:
    src = tmp_path / "scan.png"
    Image.fromarray(big_rgb).save(src)
    out = convert(src, tmp_path / "scan.ome.tif", tile=64, compression="zlib")
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled
        assert len(tif.pages[0].subifds) == 1  # 300 -> 150 <= 256
        levels = [lv.asarray() for lv in tif.series[0].levels]
    np.testing.assert_array_equal(levels[0], big_rgb)
    np.testing.assert_array_equal(levels[1], downsample2(big_rgb))
    with open_image(out) as img:
        assert img.shape == (300, 220, 3)
        assert len(img.levels) == 2


def test_tiff_to_ome_zarr_pixel_equality(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(0, 4000, size=(600, 130), dtype=np.uint16)
    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, data, tile=(64, 64))
    out = convert(src, tmp_path / "plain.ome.zarr", tile=32)
    group = zarr.open_group(out, mode="r")
    ms = group.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    np.testing.assert_array_equal(group["0"][:], data)
    assert [group[d["path"]].shape for d in ms["datasets"]] == [(600, 130), (300, 65), (150, 33)]
    with open_image(out) as img:
        assert img.shape == (600, 130, 1)
        np.testing.assert_array_equal(img.to_dask().compute()[:, :, 0], data)


def test_ome_zarr_to_ome_tiff_round_trip(tmp_path: Path, big_rgb: np.ndarray) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(big_rgb).save(src)
    zarr_out = convert(src, tmp_path / "a.zarr", tile=64)
    tif_out = convert(zarr_out, tmp_path / "a.tif", tile=64, compression="none")
    np.testing.assert_array_equal(tifffile.imread(tif_out), big_rgb)


def test_convert_refuses_overwrite_without_force(tmp_path: Path, big_rgb: np.ndarray) -> None:
    src = tmp_path / "in.png"
    Image.fromarray(big_rgb).save(src)
    out = tmp_path / "out.tif"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists"):
        convert(src, out)
    assert out.read_bytes() == b"precious"
    convert(src, out, force=True, tile=64)
    assert tifffile.imread(out).shape == (300, 220, 3)


def test_convert_rejects_unknown_extension_and_bad_options(
    tmp_path: Path, big_rgb: np.ndarray
) -> None:
    src = tmp_path / "in.png"
    Image.fromarray(big_rgb).save(src)
    with pytest.raises(InputError, match=r"out\.jpg: unknown output format"):
        convert(src, tmp_path / "out.jpg")
    with pytest.raises(InputError, match="multiple of 16"):
        convert(src, tmp_path / "out.tif", tile=10)
    with pytest.raises(InputError, match="zarr compression"):
        convert(src, tmp_path / "out.zarr", compression="jpeg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_cli_convert(
    tmp_path: Path, big_rgb: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.png"
    Image.fromarray(big_rgb).save(src)
    out = tmp_path / "out.tif"
    assert main(["convert", str(src), str(out), "--tile", "64"]) == 0
    assert "wrote" in capsys.readouterr().out
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE  # lossless default
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), big_rgb)
    assert main(["convert", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "x.bmp")]) == 2
    assert main(["convert", str(tmp_path / "missing.png"), str(tmp_path / "y.tif")]) == 2


def _rgb_source(path: Path, data: np.ndarray, codec: str) -> Path:
    """``data`` (8-bit RGB) as a real file: a tiled TIFF with ``codec``, or a zarr array."""
    if codec == "zarr":
        z = zarr.create_array(path, shape=data.shape, chunks=(64, 64, 3), dtype=data.dtype)
        z[...] = data
    else:
        tifffile.imwrite(path, data, photometric="rgb", tile=(64, 64), compression=codec)
    return path


@pytest.mark.parametrize("codec", ["zlib", "lzw", "zstd", "zarr"])
@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_convert_is_lossless_by_default(
    tmp_path: Path, big_rgb: np.ndarray, codec: str, suffix: str
) -> None:
    src = _rgb_source(tmp_path / ("in.zarr" if codec == "zarr" else "in.tif"), big_rgb, codec)
    if codec != "zarr":
        with tifffile.TiffFile(src) as tif:  # the input really is what the name says
            assert tif.pages[0].compression.name.lower() in {codec, "adobe_deflate"}
    out = convert(src, tmp_path / f"out{suffix}", tile=64)
    with open_image(out) as img:
        assert img.shape == big_rgb.shape
        np.testing.assert_array_equal(img.read(Window(0, 0, 300, 220)), big_rgb)


def test_jpeg_still_available_and_lossy(
    tmp_path: Path, big_rgb: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _rgb_source(tmp_path / "in.tif", big_rgb, "zlib")
    out = tmp_path / "out.tif"
    assert main(["convert", str(src), str(out), "--tile", "64", "--compression", "jpeg"]) == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
        level0 = tif.series[0].levels[0].asarray()
    assert level0.shape == big_rgb.shape
    diff = np.abs(level0.astype(int) - big_rgb.astype(int))
    assert 0 < diff.mean() < 12  # close, not equal: jpeg is lossy
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "LOSSY" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_convert_keeps_what_a_geotiff_knows(tmp_path: Path, suffix: str) -> None:
    """CRS, transform, nodata and band names survive convert (they were dropped without a
    word): the output opens in tilenet and in GDAL at the same place, pixels unchanged."""
    import rasterio
    from rasterio.transform import from_origin

    src = tmp_path / "scene.tif"
    data = np.random.default_rng(3).integers(-50, 3000, (2, 96, 80)).astype(np.int16)
    data[:, :5, :7] = -9999
    profile = {"driver": "GTiff", "height": 96, "width": 80, "count": 2, "dtype": "int16",
               "crs": "EPSG:32633", "transform": from_origin(500000, 4e6, 10, 10),
               "nodata": -9999, "tiled": True, "blockxsize": 32, "blockysize": 32}  # fmt: skip
    with rasterio.open(src, "w", **profile) as ds:
        ds.write(data)
        ds.descriptions = ("red", "nir")
    out = tmp_path / f"scene{suffix}"
    convert(src, out, tile=32)
    with open_image(src) as a, open_image(out) as b:
        assert b.crs is not None and "32633" in (b.info()["epsg"] and str(b.info()["epsg"]))
        assert tuple(b.transform) == tuple(a.transform)
        assert b.nodata == -9999
        np.testing.assert_array_equal(b.read(Window(0, 0, 96, 80)), a.read(Window(0, 0, 96, 80)))
    if suffix == ".ome.tif":  # GDAL (QGIS) reads the same place from the GeoTIFF keys
        with rasterio.open(out) as ds:
            assert ds.crs.to_epsg() == 32633 and ds.nodata == -9999
            assert tuple(ds.transform)[:6] == tuple(from_origin(500000, 4e6, 10, 10))[:6]


def test_convert_refuses_a_crs_geotiff_keys_cannot_name(tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    src = tmp_path / "local.tif"
    crs = "+proj=tmerc +lat_0=0 +lon_0=13.37 +k=0.9996 +x_0=500000 +y_0=0 +ellps=GRS80 +units=m"
    with rasterio.open(src, "w", driver="GTiff", height=32, width=32, count=1, dtype="uint8",
                       crs=crs, transform=from_origin(400000, 5e6, 2, 2)) as ds:  # fmt: skip
        ds.write(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(InputError, match=r"local\.tif: .*no EPSG code.*OME-Zarr"):
        convert(src, tmp_path / "out.ome.tif", tile=32)
    convert(src, tmp_path / "out.ome.zarr", tile=32)  # the WKT travels in a zarr
    with open_image(tmp_path / "out.ome.zarr") as img:
        assert img.crs is not None and "13.37" in img.crs
