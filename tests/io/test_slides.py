"""Whole-slide images: slides written by public tools (tifffile: an Aperio-layout SVS, a
generic pyramidal TIFF and a Philips-like TIFF; pydicom: a DICOM-WSI series) read through
tilenet exactly as openslide-python reads them, with the same MPP; bad slides fail in one
line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from slidewriters import write_aperio_svs, write_philips_tiff

from tilenet.cli import main
from tilenet.errors import CorruptImageError, UnsupportedFormatError
from tilenet.geometry import Window
from tilenet.io import open_image
from tilenet.io.slide import SlideImage, open_slide
from tilenet.io.tiff import TiffImage

openslide = pytest.importorskip("openslide")
pytestmark = pytest.mark.timeout(120)

H, W = 1000, 1500  # SVS level 0; levels 1/4 exact, 1/16 rounded (63 x 94): not an integer
DICOM_SHAPE = (1024, 1536)
DICOM_MPP = 0.25


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth stain-like structure plus noise: JPEG keeps it, and no two windows agree."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            140 + 90 * np.sin(yy / 37) * np.cos(xx / 23),
            120 + 80 * np.cos((xx + yy) / 51),
            150 + 60 * np.sin(xx / 17 + seed),
        ],
        axis=-1,
    )
    noise = np.random.default_rng(seed).normal(0, 8, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _level(img: np.ndarray, f: int) -> np.ndarray:
    """A reduced level of ceil(H / f) x ceil(W / f) pixels (as scanners round up)."""
    return img[::f, ::f] if f > 1 else img


def write_svs(path: Path, *, pyramid: bool = True) -> Path:
    """An Aperio-layout SVS (0.499 µm/px, levels 1/4 and 1/16 unless not ``pyramid``) with
    a thumbnail, a label and a macro."""
    return write_aperio_svs(
        path,
        _tissue(H, W),
        mpp=0.4990,
        levels=(4, 16) if pyramid else (),
        label=_tissue(100, 120, 1),
        macro=_tissue(150, 400, 2),
    )


def write_generic_tiff(path: Path) -> Path:
    """A pyramidal tiled TIFF, one page per level (libvips' layout; OpenSlide's generic-tiff)
    with a level whose downsample is not an integer (1600 / 534) and several 512² blocks."""
    img = _tissue(1600, 1700, 3)
    with tifffile.TiffWriter(path) as tw:
        for f in (1, 3):
            tw.write(
                _level(img, f),
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                metadata=None,
                subfiletype=0 if f == 1 else 1,
            )
    return path


def write_philips(path: Path) -> Path:
    """A Philips-like TIFF, 0.25 µm/px, levels 1 and 1/4."""
    img = _tissue(1024, 1536, 5)
    levels = [_level(img, f) for f in (1, 4)]
    return write_philips_tiff(path, levels, mpp_mm=0.00025, factors=(1, 4), tile=256)


def write_dicom(folder: Path, *, levels: tuple[int, ...] = (1, 4)) -> Path:
    """A DICOM-WSI series written with pydicom: VL Whole Slide Microscopy Image objects, one
    file per level, TILED_FULL, baseline JPEG frames (encoded by imagecodecs)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    sop = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.77.1.6")
    folder.mkdir()
    img = _tissue(*DICOM_SHAPE, seed=4)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    tile = 256
    for i, f in enumerate(levels):
        lv = _level(img, f)
        h, w = lv.shape[:2]
        frames = []
        for ty in range(-(-h // tile)):
            for tx in range(-(-w // tile)):
                t = np.zeros((tile, tile, 3), np.uint8)
                part = lv[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]
                t[: part.shape[0], : part.shape[1]] = part
                frames.append(imagecodecs.jpeg8_encode(t, level=95, outcolorspace="ycbcr"))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.SOPClassUID, ds.SOPInstanceUID = sop, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality, ds.PatientName, ds.PatientID = "SM", "Test^Slide", "1"
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            if f == 1
            else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.Rows = ds.Columns = tile
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfFrames = len(frames)
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.ImagedVolumeHeight = DICOM_SHAPE[0] * DICOM_MPP / 1000  # mm
        ds.ImagedVolumeWidth = DICOM_SHAPE[1] * DICOM_MPP / 1000
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing = [DICOM_MPP * f / 1000] * 2  # mm, (row, column)
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        path = Dataset()
        path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = Sequence([path])
        ds.NumberOfOpticalPaths = 1
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"level{i}.dcm", enforce_file_format=True)
    assert pydicom.dcmread(folder / "level0.dcm").NumberOfFrames == 24
    return folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("slides")
    return {
        "svs": write_svs(tmp / "slide.svs"),
        "generic": write_generic_tiff(tmp / "generic.tif"),
        "dicom": write_dicom(tmp / "dicom"),
        "philips": write_philips(tmp / "slide.tiff"),
    }


def _openslide_rgb(slide: Any, level: int, window: Window) -> np.ndarray:
    ds = slide.level_downsamples[level]
    region = slide.read_region(
        (round(window.x * ds), round(window.y * ds)), level, (window.w, window.h)
    )
    rgba = np.asarray(region)
    assert rgba[:, :, 3].min() == 255  # fully scanned test slides: nothing to composite
    return rgba[:, :, :3]


def _windows(shape: tuple[int, int], seed: int) -> list[Window]:
    """Random windows inside the level, plus windows over each edge and corner."""
    h, w = shape
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(6):
        wh, ww = int(rng.integers(1, min(h, 300) + 1)), int(rng.integers(1, min(w, 300) + 1))
        out.append(
            Window(int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1)), wh, ww)
        )
    out += [Window(h - 40, w - 50, 90, 120), Window(-30, -20, 70, 60), Window(h - 10, 5, 40, 33)]
    return out


def _assert_reads_like_openslide(img: Any, path: Path, levels: list[int]) -> None:
    with openslide.OpenSlide(path) as ref:
        assert [lv.shape[::-1] for lv in img.levels] == list(ref.level_dimensions)
        props = ref.properties
        if "openslide.mpp-x" in props:
            mpp = (float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"]))
            assert img.pixel_size == mpp
        else:
            assert img.pixel_size is None
        assert img.vendor == props["openslide.vendor"]
        assert sorted(img.associated_images) == sorted(ref.associated_images)
        for name, (ah, aw) in img.associated_images.items():
            assert ref.associated_images[name].size == (aw, ah)
        for level in levels:
            for win in _windows(img.levels[level].shape, seed=level):
                got = img.read(win, level)
                inside = win.clip(*img.levels[level].shape)
                rel = inside.relative_to(win)
                if float(ref.level_downsamples[level]).is_integer():
                    want = _openslide_rgb(ref, level, inside)
                else:  # read in blocks anchored at the level's origin (one block here)
                    assert max(img.levels[level].shape) <= 512
                    whole = Window(0, 0, *img.levels[level].shape)
                    want = _openslide_rgb(ref, level, whole)[inside.slices]
                np.testing.assert_array_equal(got[rel.slices], want, err_msg=f"{win} @ {level}")
                outside = np.ones(got.shape[:2], bool)
                outside[rel.slices] = False
                assert (got[outside] == 0).all()  # the LazyImage contract: fill outside


def test_svs_reads_through_tifffile_like_openslide(slides: dict[str, Path]) -> None:
    with open_image(slides["svs"]) as img:
        assert isinstance(img, TiffImage)  # measured faster than OpenSlide (bench_slides)
        assert img.pixel_size == (0.499, 0.499) and img.objective_power == 20.0
        assert img.vendor == "aperio"
        assert img.associated_images == {
            "thumbnail": (125, 188),
            "label": (100, 120),
            "macro": (150, 400),
        }
        # As OpenSlide reports them (1, 3.99.., 15.9..), not rounded to 1/4/16.
        with openslide.OpenSlide(slides["svs"]) as ref:
            want = [(d, d) for d in ref.level_downsamples]
        assert [lv.downsample for lv in img.levels] == want and want[2][0] != 16.0
        # Levels 0 and 1 (integer downsamples): the same pixels as OpenSlide.
        _assert_reads_like_openslide(img, slides["svs"], levels=[0, 1])
        # Level 2 (downsample 15.9 to OpenSlide): tilenet gives the stored pixels, where
        # OpenSlide shifts the level by a sub-pixel fraction (module docstring of io.slide).
        with tifffile.TiffFile(slides["svs"]) as tf:
            stored = tf.series[0].levels[2].asarray()
        np.testing.assert_array_equal(img.read(Window(0, 0, 63, 94), 2), stored)


def test_svs_through_openslide_reader(slides: dict[str, Path]) -> None:
    with open_slide(slides["svs"]) as img, openslide.OpenSlide(slides["svs"]) as ref:
        assert isinstance(img, SlideImage) and img.format == "openslide-aperio"
        assert img.objective_power == 20.0
        _assert_reads_like_openslide(img, slides["svs"], levels=[0, 1, 2])
        label = np.asarray(ref.associated_images["label"].convert("RGB"))
        np.testing.assert_array_equal(img.associated_image("label"), label)
        with pytest.raises(UnsupportedFormatError, match="no associated image 'slide'"):
            img.associated_image("slide")


def test_dicom_series_reads_like_openslide(slides: dict[str, Path]) -> None:
    folder = slides["dicom"]
    for path in (folder, folder / "level1.dcm"):  # the directory, or any file of the series
        with open_image(path) as img:
            assert isinstance(img, SlideImage)
            assert img.format == "openslide-dicom" and img.compression == "jpeg"
            assert img.shape == (*DICOM_SHAPE, 3)
            assert img.pixel_size == (DICOM_MPP, DICOM_MPP)
            with openslide.OpenSlide(folder / "level0.dcm") as ref:
                assert [lv.downsample for lv in img.levels] == [
                    (d, d) for d in ref.level_downsamples
                ]
    with open_image(folder) as img:
        _assert_reads_like_openslide(img, folder / "level0.dcm", levels=[0, 1])


def test_philips_tiff_goes_to_openslide(slides: dict[str, Path]) -> None:
    """A vendor TIFF that tifffile parses but only OpenSlide reads faithfully (sparse tiles,
    padded levels): open_image hands it to OpenSlide."""
    with open_image(slides["philips"]) as img:
        assert isinstance(img, SlideImage) and img.vendor == "philips"
        assert img.pixel_size == (0.25, 0.25)
        _assert_reads_like_openslide(img, slides["philips"], levels=[0, 1])


def test_dicom_series_without_file_extensions(slides: dict[str, Path], tmp_path: Path) -> None:
    """PACS exports often name DICOM files by UID, without ``.dcm``: known by content."""
    folder = tmp_path / "export"
    folder.mkdir()
    for i, f in enumerate(sorted(slides["dicom"].iterdir())):
        (folder / f"1.2.3.{i}").write_bytes(f.read_bytes())
    with open_image(folder) as img:
        assert img.vendor == "dicom" and img.shape == (*DICOM_SHAPE, 3)


def test_level_downsamples_are_openslides(slides: dict[str, Path]) -> None:
    """Every level's downsample is OpenSlide's ``level_downsamples`` (the mean of the height
    and width ratios), through tifffile and through OpenSlide alike, on pyramids whose levels
    are not exact divisions of level 0; reading a level is unchanged."""
    for name in ("svs", "generic"):
        with openslide.OpenSlide(slides[name]) as ref:
            want = [(d, d) for d in ref.level_downsamples]
        with open_image(slides[name]) as img, open_slide(slides[name]) as via_openslide:
            assert isinstance(img, TiffImage)
            assert [lv.downsample for lv in img.levels] == want, name
            assert [lv.downsample for lv in via_openslide.levels] == want, name
            assert not all(d.is_integer() for d, _ in want[1:]), name
    with open_image(slides["generic"]) as img, tifffile.TiffFile(slides["generic"]) as tf:
        h, w = img.levels[1].shape
        np.testing.assert_array_equal(img.read(Window(0, 0, h, w), 1), tf.pages[1].asarray())


def test_non_integer_level_pixels_do_not_depend_on_the_window(slides: dict[str, Path]) -> None:
    """OpenSlide shifts a level with a non-integer downsample by where the read starts; tilenet
    reads such levels in fixed blocks, so a pixel is the same in every window (seam-free)."""
    path = slides["generic"]
    with open_slide(path) as img, openslide.OpenSlide(path) as ref:
        assert img.vendor == "generic-tiff" and img.pixel_size is None
        assert not float(ref.level_downsamples[1]).is_integer()
        h, w = img.levels[1].shape
        whole = img.read(Window(0, 0, h, w), 1)
        for win in (Window(3, 7, 520, 540), Window(500, 501, 30, 40), Window(h - 5, w - 9, 5, 9)):
            np.testing.assert_array_equal(img.read(win, 1), whole[win.slices])
        block = _openslide_rgb(ref, 1, Window(0, 512, 22, 40))  # block (0, 1), off its edge
        np.testing.assert_array_equal(whole[0:22, 512:552], block)
        _assert_reads_like_openslide(img, path, levels=[0])
        # OpenSlide's shift leaves the level's last column partly transparent: composited
        # onto white (no background colour declared), never onto black.
        rgba = np.asarray(ref.read_region((round(512 * ref.level_downsamples[1]), 0), 1, (55, 8)))
        alpha = rgba[:, -1, 3:].astype(np.float64) / 255
        assert 0 < alpha.min() < 1
        white = np.rint(rgba[:, -1, :3] * alpha + 255 * (1 - alpha))
        np.testing.assert_array_equal(whole[0:8, w - 1], white)
    with open_image(path) as img:  # open_image keeps a generic TIFF on tifffile
        assert isinstance(img, TiffImage) and len(img.levels) == 2


def test_single_level_svs_thumbnail_is_not_a_level(tmp_path: Path) -> None:
    p = write_svs(tmp_path / "flat.svs", pyramid=False)
    with open_image(p) as img, openslide.OpenSlide(p) as ref:
        assert len(img.levels) == ref.level_count == 1
        assert sorted(img.associated_images) == ["label", "macro", "thumbnail"]


def test_info_json_and_text(slides: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(slides["svs"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "aperio" and info["objective_power"] == 20.0
    assert info["mpp"] == [0.499, 0.499]
    with openslide.OpenSlide(slides["svs"]) as ref:  # level 2: 15.9x to OpenSlide, not 16x
        assert info["level_mpp"] == [[0.499 * d, 0.499 * d] for d in ref.level_downsamples]
    assert info["associated_images"] == {
        "thumbnail": [125, 188],
        "label": [100, 120],
        "macro": [150, 400],
    }
    assert len(info["levels"]) == 3
    assert main(["info", str(slides["dicom"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "dicom" and info["mpp"] == [DICOM_MPP, DICOM_MPP]
    assert info["objective_power"] is None and info["associated_images"] == {}
    assert main(["info", str(slides["svs"])]) == 0
    out = capsys.readouterr().out
    assert "vendor:      aperio" in out and "objective:   20x" in out
    assert (
        "mpp:         0.499 x 0.499" in out
        and "(downsample 4, tiles 256x256)  mpp 1.996 x 1.996" in out
    )
    assert "associated images (not levels):\n  thumbnail: 125 x 188\n  label: 100 x 120" in out


def test_png_and_plain_tiff_do_not_import_openslide(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(_tissue(32, 32)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", _tissue(32, 32), tile=(16, 16), metadata=None)
    code = (
        "import sys; from tilenet.io import open_image\n"
        "for p in sys.argv[1:]: open_image(p).close()\n"
        "assert 'openslide' not in sys.modules"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a.png"), str(tmp_path / "a.tif")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr


# -- bad input: one line naming the file, exit 2 -------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tilenet: error: "), err
    for needle in needles:
        assert needle in err, err


def test_truncated_svs(
    slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = tmp_path / "cut.svs"
    data = slides["svs"].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    _one_line_error(capsys, ["info", str(cut)], str(cut), "truncated")
    with pytest.raises(UnsupportedFormatError, match=r"cut\.svs: not a whole-slide format"):
        open_slide(cut)  # OpenSlide refuses it too, with its own words


def test_truncated_dicom_tiles(
    slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "cut"
    folder.mkdir()
    for f in slides["dicom"].iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.name == "level0.dcm" else data)
    with open_image(folder) as img:  # the header and frame index are intact
        img.read(Window(0, 0, 64, 64))  # the first frames are there
        with pytest.raises(CorruptImageError, match=r"cut: cannot decode window .*libdicom"):
            img.read(Window(900, 1400, 100, 100))
    _one_line_error(capsys, ["convert", str(folder), str(tmp_path / "out.tif")], str(folder))
    assert not (tmp_path / "out.tif").exists()


def test_dicom_series_without_its_full_resolution_file(
    slides: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "level1.dcm").write_bytes((slides["dicom"] / "level1.dcm").read_bytes())
    _one_line_error(capsys, ["info", str(folder)], str(folder), "lacks its full-resolution level")


def test_dicom_that_is_not_a_slide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "ct.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    _one_line_error(capsys, ["info", str(p)], str(p), "not a whole-slide format OpenSlide reads")


def test_mirax_without_its_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "case.mrxs"
    p.write_bytes(b"\xff\xd8\xff\xe0 a MIRAX index")
    _one_line_error(capsys, ["info", str(p)], str(p), "without its data folder", "Slidedat.ini")
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "Slidedat.ini").write_text("[GENERAL]\nSLIDE_ID=1\n")
    _one_line_error(capsys, ["info", str(p)], str(p), "OpenSlide cannot open it", "IMAGENUMBER_X")


def test_folder_without_dicom_or_zarr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(capsys, ["info", str(tmp_path)], "nor a DICOM series")
