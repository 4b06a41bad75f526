"""Input paths: directories, globs and files to images; label images matched by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tilenet.errors import ImageNotFoundError, InputError
from tilenet.io.paths import class_names_near, match_by_stem, match_labels, resolve_images
from tilenet.io.vector import match_annotations


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_resolve_images_dirs_globs_files_deduplicated(tmp_path: Path) -> None:
    a, b, c = tmp_path / "d" / "b.tif", tmp_path / "d" / "a.png", tmp_path / "e" / "c.tiff"
    _real(a, b, c)
    _touch(tmp_path / "d" / "notes.txt")
    with pytest.warns(UserWarning, match=r"skipped 1 not an image by its content \(notes\.txt\)"):
        got = resolve_images([tmp_path / "d", str(tmp_path / "e" / "*.tiff"), a])
    assert got == [b.resolve(), a.resolve(), c.resolve()]
    with pytest.raises(ImageNotFoundError, match="matches no files"):
        resolve_images([str(tmp_path / "nope*.tif")])
    with pytest.raises(ImageNotFoundError, match="no such file"):
        resolve_images([tmp_path / "missing.tif"])
    with pytest.raises(InputError, match="no input images"):
        resolve_images([])


def _real(*paths: Path) -> None:
    """Tiny real images (a TIFF or a PNG by the name's suffix)."""
    import numpy as np
    import tifffile
    from PIL import Image

    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".png":
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(p)
        else:
            tifffile.imwrite(p, np.zeros((4, 4), np.uint8))


def test_directory_scans_go_by_content(tmp_path: Path) -> None:
    """A folder with a DICOM series, a MIRAX slide, a VRT and a TIFF without a known suffix is
    scanned as `tilenet info` opens them (they were skipped without a word); what is not an
    image is named in one warning."""
    d = tmp_path / "d"
    _real(d / "scan.dat")  # a TIFF by content
    (d / "series").mkdir()
    (d / "series" / "level0.dcm").write_bytes(bytes(128) + b"DICM" + bytes(64))
    (d / "slide.mrxs").write_text("[GENERAL]\n")
    (d / "slide").mkdir()  # MIRAX data folder: part of slide.mrxs, not reported
    (d / "mosaic.vrt").write_text('<VRTDataset rasterXSize="4" rasterYSize="4"></VRTDataset>')
    (d / "notes.txt").write_text("not pixels")
    (d / "empty.tif").write_bytes(b"")
    with pytest.warns(UserWarning) as rec:
        got = resolve_images([d])
    assert [p.name for p in got] == ["mosaic.vrt", "scan.dat", "series", "slide.mrxs"]
    (msg,) = [str(w.message) for w in rec]
    assert "1 empty (empty.tif)" in msg and "1 not an image by its content (notes.txt)" in msg


def test_a_symlinked_slide_keeps_its_own_name(tmp_path: Path) -> None:
    """Annotations are matched by the link's name, not the target's."""
    target = tmp_path / "store" / "0a1b2c.tif"
    _real(target)
    (tmp_path / "slides").mkdir()
    link = tmp_path / "slides" / "patient7.tif"
    link.symlink_to(target)
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "patient7.geojson").write_text(
        '{"type": "FeatureCollection", "features": []}'
    )
    got = resolve_images([tmp_path / "slides"])
    assert got == [link]
    assert match_annotations(got, tmp_path / "ann") == [tmp_path / "ann" / "patient7.geojson"]
    assert resolve_images([link, target]) == [link]  # one file, once


def test_match_labels_by_stem_suffix_and_pattern(tmp_path: Path) -> None:
    imgs = [tmp_path / "im" / "s1.tif", tmp_path / "im" / "s2.ome.tif"]
    labs = [tmp_path / "lab" / "s1_mask.png", tmp_path / "lab" / "s2.tif"]
    _touch(*imgs, *labs)
    assert match_labels(imgs, tmp_path / "lab") == labs
    assert match_labels(imgs, str(tmp_path / "lab" / "*")) == labs
    assert match_labels(imgs[:1], str(tmp_path / "lab" / "{stem}_mask.png")) == labs[:1]
    with pytest.raises(ImageNotFoundError, match=r"s2_mask\.png: label image"):
        match_labels(imgs, str(tmp_path / "lab" / "{stem}_mask.png"))
    with pytest.raises(ImageNotFoundError, match="no label image named s3"):
        match_labels([tmp_path / "s3.tif"], tmp_path / "lab")


def test_class_names_near(tmp_path: Path) -> None:
    lab = tmp_path / "labels" / "a.tif"
    _touch(lab)
    assert class_names_near([lab]) == []
    (tmp_path / "classes.json").write_text(json.dumps({"1": "tumour", "0": "background"}))
    assert class_names_near([lab]) == ["background", "tumour"]


def test_match_by_stem_one_rule_for_labels_and_annotations(tmp_path: Path) -> None:
    imgs = [tmp_path / "a.svs", "s3://bucket/slides/b.ome.tif?versionId=3"]
    anns = [tmp_path / "ann" / "a.svs.geojson", tmp_path / "ann" / "b.json"]
    _touch(*anns, tmp_path / "ann" / "a.png")
    assert match_annotations(imgs, tmp_path / "ann") == anns
    assert match_annotations(imgs, str(tmp_path / "ann" / "*.*json")) == anns
    assert match_by_stem(imgs[:1], tmp_path / "ann", suffixes=(".png",), what="mask") == [
        tmp_path / "ann" / "a.png"
    ]
    with pytest.raises(ImageNotFoundError, match=r"b\.ome\.tif\?versionId=3: no mask named b\.\*"):
        match_by_stem(imgs, tmp_path / "ann", suffixes=(".png",), what="mask")
    with pytest.raises(ImageNotFoundError, match=r"no such annotation file, directory or pattern"):
        match_annotations(imgs, tmp_path / "nowhere")


def test_match_by_stem_takes_a_file_for_one_image_only(tmp_path: Path) -> None:
    one = tmp_path / "x.geojson"
    _touch(one)
    assert match_annotations(["s3://b/slide.svs"], one) == [one]
    assert match_labels([tmp_path / "s.tif"], one) == [one]
    with pytest.raises(InputError, match=r"x\.geojson: one annotation file for 2 images"):
        match_annotations([tmp_path / "a.svs", tmp_path / "b.svs"], one)
