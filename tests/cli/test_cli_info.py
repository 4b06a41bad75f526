"""``tilenet info``: describes an image through open_image without decoding pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from builders import pyramid_tiff

from tilenet.cli import main


def _pyramid_tiff(path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (2, 96, 128), dtype=np.uint16)
    meta = {"axes": "CYX", "pixel_size": (0.25, 0.25)}
    pyramid_tiff(path, data, **meta, compression="zlib", bigtiff=True)


def test_info_json_pyramid_tiff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "slide.ome.tif"
    _pyramid_tiff(p)
    assert main(["info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [96, 128, 2]
    assert info["dtype"] == "uint16"
    assert info["levels"] == [[96, 128], [48, 64]]
    assert info["downsamples"] == [[1.0, 1.0], [2.0, 2.0]]
    assert info["chunks"] == [[32, 32], [32, 32]]
    assert info["compression"] == "deflate"
    assert info["format"] == "ome-tiff"
    assert info["pixel_size"] == [0.25, 0.25]


def test_info_json_zarr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "img.zarr"
    z = zarr.create_array(p, shape=(3, 70, 90), chunks=(1, 32, 32), dtype="u1")
    z[...] = 5
    assert main(["info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [70, 90, 3]
    assert info["dtype"] == "uint8"
    assert info["levels"] == [[70, 90]]


def test_info_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "slide.ome.tif"
    _pyramid_tiff(p)
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "96 x 128 x 2" in out
    assert "1: 48 x 64  (downsample 2, tiles 32x32)" in out
    assert "pixel size:  0.25 x 0.25 um" in out


def test_info_reader_section_sets_the_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    png = tmp_path / "scan.png"
    Image.fromarray(np.zeros((60, 50, 3), np.uint8)).save(png)
    tif = tmp_path / "slide.ome.tif"
    _pyramid_tiff(tif)  # 96 x 128
    conf = tmp_path / "reader.yaml"
    conf.write_text("reader:\n  max_pixels_eager: 2000\n")
    # PNG is decoded whole: 60 x 50 = 3000 pixels is above max_pixels_eager from the file...
    assert main(["info", str(png), f"conf={conf}"]) == 2
    assert "too large to read whole (limit 2,000 pixels)" in capsys.readouterr().err
    # ...a key=value after it raises the limit again; a tiled TIFF is not read whole
    assert main(["info", str(png), f"conf={conf}", "reader.max_pixels_eager=3000"]) == 0
    assert main(["info", str(tif), f"conf={conf}"]) == 0
    capsys.readouterr()
    # max_pixels guards every header, from the command line too
    assert main(["info", str(tif), "reader.max_pixels=12287", "--json"]) == 2
    assert "above the limit of 12,287" in capsys.readouterr().err
    assert main(["info", str(tif), "--json", "reader.max_pixels=12288"]) == 0


def test_info_describes_each_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The usage line says PATH [PATH ...]: each is described in turn; one that cannot be
    read is one error line and the rest go on (exit 1), all failing is exit 2."""
    p = tmp_path / "slide.ome.tif"
    _pyramid_tiff(p)
    missing = tmp_path / "missing.tif"
    assert main(["info", str(p), str(p), "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["shape"] for i in infos] == [[96, 128, 2], [96, 128, 2]]
    assert main(["info", str(p), str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out.count("path:") == 1
    assert err.count("tilenet: error") == 1 and "missing.tif" in err and "Traceback" not in err
    assert main(["info", str(missing), str(missing)]) == 2
    assert capsys.readouterr().err.count("tilenet: error") == 2
