"""The tiler: pixel-exact patches, labels, background skipping, resume and append."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from builders import pyramid_tiff

from tilenet.config import TilingConfig
from tilenet.errors import ImageNotFoundError, InputError, ShapeMismatchError, TilenetError
from tilenet.geometry import TileGrid
from tilenet.io.foreground import otsu_threshold
from tilenet.patches.tiler import tile_images


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy, xx, yy + xx], axis=-1) % 256
    return ((base + rng.integers(0, 30, (h, w, 3))) % 256).astype(np.uint8)


@pytest.fixture
def dataset(
    tmp_path: Path, rng: np.random.Generator
) -> tuple[list[Path], Path, list[np.ndarray], list[np.ndarray]]:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    imgs, labs, paths = [], [], []
    for i, (h, w) in enumerate([(150, 130), (96, 170), (40, 50)]):
        img = _image(rng, h, w)
        lab = rng.integers(0, 3, (h, w)).astype(np.uint8)
        p = tmp_path / "images" / f"img_{i}.tif"
        pyramid_tiff(p, img, compression="zlib")
        pyramid_tiff(tmp_path / "labels" / f"img_{i}.tif", lab, compression="zlib")
        imgs.append(img)
        labs.append(lab)
        paths.append(p)
    return paths, tmp_path / "labels", imgs, labs


def _window(a: np.ndarray, y: int, x: int, p: int) -> np.ndarray:
    """``a[y:y+p, x:x+p]`` zero-filled past the edge (what the reader returns)."""
    out = np.zeros((p, p, *a.shape[2:]), a.dtype)
    part = a[y : y + p, x : x + p]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _check_exact(store: Path, imgs: list[np.ndarray], labs: list[np.ndarray] | None, p: int) -> int:
    g = zarr.open_group(store, mode="r")
    n = g.attrs["count"]
    images, coords = g["images"][:n], g["coords"][:n]
    labels = g["labels"][:n] if labs is not None else None
    for k in range(n):
        i, level, y, x = (int(v) for v in coords[k])
        src = imgs[i][:: 2**level, :: 2**level]
        np.testing.assert_array_equal(images[k], _window(src, y, x, p))
        if labels is not None and labs is not None:
            np.testing.assert_array_equal(
                labels[k], _window(labs[i][:: 2**level, :: 2**level], y, x, p)
            )
    return n


def test_pixel_exact_with_labels(tmp_path: Path, dataset: tuple) -> None:
    paths, labdir, imgs, labs = dataset
    out = tile_images(
        [str(paths[0].parent)],
        labels=labdir,
        out=tmp_path / "s.zarr",
        patch=64,
        overlap=16,
        workers=2,
        chunk_patches=4,
        progress=False,
    )
    n = _check_exact(out, imgs, labs, 64)
    g = zarr.open_group(out, mode="r")
    # every distinct grid window is stored once, and they cover each image
    expected = sum(len(TileGrid.for_patches(a.shape[:2], 64, 16).windows()) for a in imgs)
    assert n == expected
    coords = g["coords"][:n]
    for i, a in enumerate(imgs):
        seen = np.zeros(a.shape[:2], bool)
        for _, _, y, x in coords[coords[:, 0] == i]:
            seen[y : y + 64, x : x + 64] = True
        assert seen.all()
    assert g["images"].shape == (n, 64, 64, 3) and g["images"].dtype == np.uint8
    assert g["labels"].shape == (n, 64, 64) and g["coords"].shape == (n, 4)
    at = g.attrs
    assert (at["patch"], at["overlap"], at["level"]) == (64, 16, 0)
    assert [s["path"] for s in at["sources"]] == [str(p.resolve()) for p in paths]
    assert all(s["fingerprint"] and s["shape"][2] == 3 for s in at["sources"])
    assert at["tilenet_version"]
    # statistics over the stored pixels that lie inside the images (no zero padding here
    # except for the small image, so compute the reference with a mask)
    vals = []
    for k in range(n):
        i, _, y, x = coords[k]
        h, w = imgs[i].shape[:2]
        vals.append(g["images"][k][: h - y, : w - x].reshape(-1, 3))
    ref = np.concatenate(vals).astype(np.float64)
    np.testing.assert_allclose(at["mean"], ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(at["std"], ref.std(0), rtol=1e-5)
    assert len(at["class_pixels"]) == 3 and sum(at["class_pixels"]) > 0
    # sharded: fewer files than chunks
    files = [f for f in (out / "images").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(files) < -(-n // 4)


def test_level_one_and_jpeg_pyramid(tmp_path: Path, rng: np.random.Generator) -> None:
    img = _image(rng, 256, 192)
    p = tmp_path / "scan.tif"
    pyramid_tiff(p, img, levels=3, compression="jpeg")
    decoded = [tifffile.imread(p, series=0, level=k) for k in range(3)]
    for level in (0, 1):
        out = tile_images(
            [p],
            out=tmp_path / f"l{level}.zarr",
            patch=48,
            overlap=8,
            level=level,
            workers=1,
            progress=False,
        )
        g = zarr.open_group(out, mode="r")
        n = g.attrs["count"]
        assert n == len(TileGrid.for_patches(decoded[level].shape[:2], 48, 8).windows())
        for k in range(n):
            _, lv, y, x = g["coords"][k]
            assert lv == level
            np.testing.assert_array_equal(g["images"][k], _window(decoded[level], y, x, 48))


def test_min_foreground_drops_background(tmp_path: Path) -> None:
    img = np.full((256, 256, 3), 235, np.uint8)
    img[40:110, 150:230] = 60  # "tissue": dark on a bright slide
    p = tmp_path / "slide.tif"
    pyramid_tiff(p, img, levels=3, compression="zlib")
    kw = {"patch": 64, "overlap": 0, "workers": 1, "progress": False}
    all_ = tile_images([p], out=tmp_path / "all.zarr", **kw)
    fg = tile_images([p], out=tmp_path / "fg.zarr", min_foreground=0.25, mask_max_side=64, **kw)
    n_all = zarr.open_group(all_, mode="r").attrs["count"]
    g = zarr.open_group(fg, mode="r")
    kept = g["coords"][: g.attrs["count"]]
    assert n_all == 16
    # tissue covers 4 patches (rows 0-1, cols 2-3); 3 of them with >= 25 % of their area
    frac = [((img[y : y + 64, x : x + 64, 0] < 128).mean()) for _, _, y, x in kept]
    assert len(kept) >= 1 and min(frac) >= 0.2
    assert len(kept) == sum(
        (img[y : y + 64, x : x + 64, 0] < 128).mean() >= 0.25
        for y in range(0, 256, 64)
        for x in range(0, 256, 64)
    )


def test_otsu_separates_two_modes(rng: np.random.Generator) -> None:
    v = np.concatenate([rng.normal(50, 5, 500), rng.normal(200, 5, 500)])
    assert 70 < otsu_threshold(v) < 180


def test_resume_and_append(tmp_path: Path, dataset: tuple) -> None:
    paths, labdir, imgs, labs = dataset
    out = tmp_path / "s.zarr"
    kw = {
        "labels": labdir,
        "out": out,
        "patch": 64,
        "overlap": 16,
        "chunk_patches": 4,
        "workers": 2,
        "progress": False,
    }
    tile_images([paths[0]], **kw)
    g = zarr.open_group(out, mode="r")
    n0 = g.attrs["count"]
    first = g["images"][:n0]

    # A failure while writing the next images (a tile of the second one does not decode):
    # nothing new is marked complete.
    intact = paths[1].read_bytes()
    with tifffile.TiffFile(paths[1]) as tf:
        offset, count = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
    broken = bytearray(intact)
    broken[offset : offset + count] = b"\xff" * count
    paths[1].write_bytes(bytes(broken))
    with pytest.raises(TilenetError):
        tile_images(paths, **kw)
    g = zarr.open_group(out, mode="r")
    assert g.attrs["count"] == n0 and len(g.attrs["sources"]) == 1
    paths[1].write_bytes(intact)

    # Rerun: the first image is skipped (its rows unchanged), the others appended.
    tile_images(paths, **kw)
    g = zarr.open_group(out, mode="r")
    assert len(g.attrs["sources"]) == 3
    np.testing.assert_array_equal(g["images"][:n0], first)
    n = _check_exact(out, imgs, labs, 64)
    assert n == sum(s["count"] for s in g.attrs["sources"])
    assert [s["start"] for s in g.attrs["sources"]] == [0, n0, n0 + g.attrs["sources"][1]["count"]]
    # and a third run changes nothing
    tile_images(paths, **kw)
    assert zarr.open_group(out, mode="r").attrs["count"] == n


def test_store_settings_must_match(tmp_path: Path, dataset: tuple) -> None:
    paths, _, _, _ = dataset
    out = tile_images([paths[2]], out=tmp_path / "s.zarr", patch=32, overlap=0, progress=False)
    with pytest.raises(InputError, match="patch=32"):
        tile_images([paths[0]], out=out, patch=64, overlap=0, progress=False)


def test_label_errors(tmp_path: Path, dataset: tuple, rng: np.random.Generator) -> None:
    paths, _, _, _ = dataset
    bad = tmp_path / "bad"
    bad.mkdir()
    pyramid_tiff(bad / "img_0.tif", rng.integers(0, 3, (10, 10)).astype(np.uint8))
    with pytest.raises(ShapeMismatchError, match=r"img_0\.tif: label image is 10x10"):
        tile_images([paths[0]], labels=bad, out=tmp_path / "x.zarr", progress=False)
    with pytest.raises(ImageNotFoundError, match="no label image named img_1"):
        tile_images([paths[1]], labels=bad, out=tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(ImageNotFoundError, match="matches no files"):
        tile_images([str(tmp_path / "nope*.tif")], out=tmp_path / "x.zarr", progress=False)
    with pytest.raises(InputError, match="even"):
        tile_images(paths, out=tmp_path / "x.zarr", overlap=3, progress=False)


def test_cli_tile(tmp_path: Path, dataset: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    from tilenet.cli import main

    paths, labdir, imgs, labs = dataset
    pattern = str(paths[0].parent / "img_*.tif")
    out = tmp_path / "c.zarr"
    rc = main(
        [
            "tile",
            pattern,
            "--labels",
            str(labdir),
            "--out",
            str(out),
            "--patch",
            "64",
            "--overlap",
            "16",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    assert _check_exact(out, imgs, labs, 64) > 0
    assert f"wrote {out}" in capsys.readouterr().out
    argv = ["tile", pattern, "--labels", str(labdir), "--out", str(out), "--patch", "64"]
    assert main([*argv, "--overlap", "16", "--workers", "1"]) == 0  # the old name still works
    assert "nothing new, every image is already in the store" in capsys.readouterr().out
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "broken.tif").write_bytes(b"II*\x00" + bytes(100))
    assert main(["tile", str(junk), "--out", str(tmp_path / "j.zarr")]) != 0
    out_text = capsys.readouterr().out
    assert "nothing written to" in out_text and "wrote" not in out_text
    rc = main(["tile", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "d.zarr")])
    assert rc == 2
    assert "missing.tif: no such file" in capsys.readouterr().err


def _procedural_tiles(h: int, w: int, t: int, ds: int):  # type: ignore[no-untyped-def]
    """Tiles of a procedural RGB slide (tissue disc on a bright background), row-major."""
    for y in range(0, h, t):
        for x in range(0, w, t):
            yy, xx = np.mgrid[y : y + t, x : x + t]
            r2 = ((yy * ds - 15000) ** 2 + (xx * ds - 15000) ** 2) / 1e8
            tissue = r2 < 1.0
            v = np.where(tissue, 90 + (yy * 7 + xx * 3) % 60, 235).astype(np.uint8)
            yield np.stack([v, (v * 0.8).astype(np.uint8), v], axis=-1)


@pytest.mark.slow
def test_bounded_memory_30000_rgb(tmp_path: Path) -> None:
    """Tiling a 30000 x 30000 RGB pyramidal JPEG TIFF peaks well under 2 GB RSS."""
    import subprocess
    import sys

    side, t = 30000, 512
    src = tmp_path / "huge.tif"
    with tifffile.TiffWriter(src, bigtiff=True) as tw:
        kw = {"tile": (t, t), "compression": "jpeg", "photometric": "rgb", "dtype": np.uint8}
        tw.write(_procedural_tiles(side, side, t, 1), shape=(side, side, 3), subifds=4, **kw)
        for k in range(1, 5):
            s = -(-side // 2**k)
            tw.write(_procedural_tiles(s, s, t, 2**k), shape=(s, s, 3), subfiletype=1, **kw)
    code = (
        "from tilenet.patches.tiler import tile_images\n"
        f"tile_images([{str(src)!r}], out={str(tmp_path / 'h.zarr')!r}, patch=256, overlap=32,"
        " min_foreground=0.5, workers=2, progress=False)\n"
        # VmHWM (kB), not ru_maxrss: ru_maxrss survives exec, so the child would report the
        # pytest process's own peak whenever that is higher (seen: 4.3 GB after other tests).
        "print(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))"
        ".split()[1])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mb = int(res.stdout.split()[-1]) / 1024
    g = zarr.open_group(tmp_path / "h.zarr", mode="r")
    n = g.attrs["count"]
    assert 1000 < n < len(TileGrid.for_patches((side, side), 256, 32).windows())
    assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB"
    # spot-check pixel exactness against tifffile's own decode of the same windows
    z = zarr.open_array(tifffile.imread(src, aszarr=True, level=0), mode="r")
    for k in (0, n // 2, n - 1):
        _, _, y, x = (int(v) for v in g["coords"][k])
        np.testing.assert_array_equal(g["images"][k], z[y : y + 256, x : x + 256])


def test_synthetic_dataset_end_to_end(tmp_path: Path) -> None:
    """`tilenet synth` then `tilenet tile` (pyramidal OME-TIFFs with label pyramids)."""
    from tilenet.cli import main

    syn = tmp_path / "syn"
    assert main(["synth", str(syn), "--size", "320", "--count", "2", "--seed", "1"]) == 0
    out = tmp_path / "syn.zarr"
    args = ["tile", str(syn / "images"), "--labels", str(syn / "labels"), "--out", str(out)]
    assert main([*args, "--patch", "128", "--overlap", "32", "--level", "1", "--quiet"]) == 0
    g = zarr.open_group(out, mode="r")
    assert g.attrs["class_names"] == ["background", "cell", "stroma"]
    imgs = [tifffile.imread(p, level=1) for p in sorted((syn / "images").glob("*.tif"))]
    labs = [tifffile.imread(p, level=1) for p in sorted((syn / "labels").glob("*.tif"))]
    n = g.attrs["count"]
    assert n == sum(len(TileGrid.for_patches(a.shape[:2], 128, 32).windows()) for a in imgs)
    for k in range(n):
        i, level, y, x = (int(v) for v in g["coords"][k])
        assert level == 1
        np.testing.assert_array_equal(g["images"][k], _window(imgs[i], y, x, 128))
        np.testing.assert_array_equal(g["labels"][k], _window(labs[i], y, x, 128))
    assert set(np.unique(g["labels"][:n])) <= {0, 1, 2}


# -- configuration (conf=FILE, key=value, flags) -------------------------------------------------
def _store(path: Path) -> tuple[int, int, int, int]:
    """(patch side, overlap, chunk_patches, count) of a patch store."""
    g: Any = zarr.open_group(path, mode="r")
    at = dict(g.attrs)
    assert g["images"].shape[1:3] == (at["patch"], at["patch"])
    return at["patch"], at["overlap"], at["chunk_patches"], at["count"]


def test_cli_tile_conf_file_then_overrides_then_flags(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    from tilenet.cli import main

    img = _image(rng, 200, 300)
    p = tmp_path / "scan.tif"
    pyramid_tiff(p, img, compression="zlib")
    conf = tmp_path / "tiling.yaml"
    conf.write_text("tiling:\n  patch: 128\n  overlap: 0\n  chunk_patches: 2\n")
    base = ["tile", str(p), "--quiet", f"conf={conf}"]

    assert main([*base, "--out", str(tmp_path / "a.zarr")]) == 0
    assert _store(tmp_path / "a.zarr") == (128, 0, 2, 2 * 3)  # ceil(200/128) x ceil(300/128)
    assert _check_exact(tmp_path / "a.zarr", [img], None, 128) == 6
    # key=value beats the file; a flag given beats both; keys not given keep the file's
    assert main([*base, "tiling.patch=100", "--out", str(tmp_path / "b.zarr")]) == 0
    assert _store(tmp_path / "b.zarr") == (100, 0, 2, 2 * 3)
    assert (
        main([*base, "tiling.patch=100", "--patch", "64", "--out", str(tmp_path / "c.zarr")]) == 0
    )
    assert _store(tmp_path / "c.zarr") == (64, 0, 2, 4 * 5)
    assert _check_exact(tmp_path / "c.zarr", [img], None, 64) == 20
    # without the file: the dataclass defaults
    assert main(["tile", str(p), "--quiet", "--out", str(tmp_path / "d.zarr")]) == 0
    default = TilingConfig()
    assert _store(tmp_path / "d.zarr")[:3] == (
        default.patch,
        default.overlap,
        default.chunk_patches,
    )
    # the level key reaches the tiler too
    assert main([*base, "tiling.level=1", "--out", str(tmp_path / "e.zarr")]) == 0
    level1: Any = zarr.open_group(tmp_path / "e.zarr", mode="r")
    coords = level1["coords"][:]
    assert (coords[:, 1] == 1).all() and len(coords) == 1 * 2  # 100 x 150 at level 1


def test_cli_tile_foreground_keys_reach_the_mask(tmp_path: Path) -> None:
    from tilenet.cli import main

    img = np.full((256, 256, 3), 235, np.uint8)
    img[40:110, 150:230] = 60  # "tissue": dark on a bright slide
    p = tmp_path / "slide.tif"
    pyramid_tiff(p, img, levels=3, compression="zlib")
    args = ["tile", str(p), "--quiet", "tiling.patch=64", "tiling.overlap=0"]
    fg = tmp_path / "fg.zarr"
    assert main([*args, "tiling.min_foreground=0.25", "--out", str(fg)]) == 0
    assert 1 <= _store(fg)[3] < 16
    # a 1-pixel mask (mask_max_side=1) of bright background cannot tell tissue apart:
    # every patch is kept, so the key really sizes the mask
    one = tmp_path / "one.zarr"
    assert (
        main([*args, "tiling.min_foreground=0.25", "tiling.mask_max_side=1", "--out", str(one)])
        == 0
    )
    assert _store(one)[3] == 16


def test_cli_tile_reader_limits_reach_the_readers(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from PIL import Image

    from tilenet.cli import main

    img = _image(rng, 40, 50)
    tif, png = tmp_path / "a.tif", tmp_path / "b.png"
    pyramid_tiff(tif, img, levels=1)
    Image.fromarray(img).save(png)
    conf = tmp_path / "reader.yaml"

    def failed(out: str, reader: str) -> set[str]:
        conf.write_text(f"reader:\n  {reader}: 1000\n")
        rc = main(["tile", str(tif), str(png), "--quiet", f"conf={conf}", "--out", out])
        lines = Path(out + ".manifest.jsonl").read_text().splitlines()
        bad = {Path(r["image"]).name for r in map(json.loads, lines) if r["status"] == "failed"}
        assert rc == (1 if bad else 0)
        return bad

    # 40 x 50 = 2000 pixels: above either limit of 1000
    assert failed(str(tmp_path / "eager.zarr"), "max_pixels_eager") == {"b.png"}
    assert failed(str(tmp_path / "all.zarr"), "max_pixels") == {"a.tif", "b.png"}
    assert "above the limit" in capsys.readouterr().out


def test_same_pixels_with_other_labels_are_another_source(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """Finished work is keyed by image and labels: two copies of one image with different
    label files are both stored, and a rerun skips both (issue: the second was dropped while
    the run said "2 done")."""
    img = _image(rng, 64, 64)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    paths = []
    for name, value in (("a", 1), ("b", 2)):
        p = tmp_path / "images" / f"{name}.tif"
        pyramid_tiff(p, img, levels=1)
        pyramid_tiff(tmp_path / "labels" / f"{name}.tif", np.full((64, 64), value, np.uint8))
        paths.append(p)
    out = tmp_path / "s.zarr"
    kw: dict[str, Any] = {"labels": tmp_path / "labels", "out": out, "patch": 32}
    tile_images(paths, overlap=0, progress=False, **kw)
    g = zarr.open_group(out, mode="r")
    sources = g.attrs["sources"]
    assert [Path(s["path"]).name for s in sources] == ["a.tif", "b.tif"]
    assert sources[0]["fingerprint"] == sources[1]["fingerprint"]
    assert sources[0]["labels_fingerprint"] != sources[1]["labels_fingerprint"]
    n = g.attrs["count"]
    assert sorted(np.unique(g["labels"][:n]).tolist()) == [1, 2]
    tile_images(paths, overlap=0, progress=False, **kw)
    assert zarr.open_group(out, mode="r").attrs["count"] == n


def test_labels_that_overlap_no_image_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A vector file whose polygons all lie off the raster: no patch, a warning for the store
    and "nothing written" (it said "wrote STORE" and "1 done" over 0 patches, silently)."""
    import json

    import rasterio
    from rasterio.transform import from_origin

    from tilenet.cli import main

    scene = tmp_path / "scene.tif"
    arr = np.random.default_rng(0).integers(0, 256, (3, 200, 240), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": 240, "height": 200, "count": 3, "dtype": "uint8"}
    transform = from_origin(600000, 5100000, 10, 10)
    with rasterio.open(scene, "w", crs="EPSG:32632", transform=transform, **profile) as ds:
        ds.write(arr)
    x0, y0 = 700000, 5200000  # 100 km off
    ring = [[x0, y0], [x0 + 500, y0], [x0 + 500, y0 - 500], [x0, y0 - 500], [x0, y0]]
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32632"}}
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"class": "wheat"},
    }
    fields = tmp_path / "fields.geojson"
    fields.write_text(json.dumps({"type": "FeatureCollection", "crs": crs, "features": [feature]}))
    out = tmp_path / "p.zarr"
    argv = ["tile", str(scene), "--vector-labels", str(fields), "--label-field", "class"]
    with pytest.warns(UserWarning) as caught:
        assert main([*argv, "--out", str(out), "--patch", "64", "--quiet"]) == 0
    said = [str(w.message) for w in caught]
    assert any(f"{out}: no patch to cut from 1 image(s)" in m for m in said), said
    printed = capsys.readouterr().out
    assert f"nothing written to {out}" in printed and "wrote" not in printed
