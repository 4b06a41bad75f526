"""Target pixel size (--mpp / --gsd): level choice, per-window resampling without seams,
outputs in the file's frame, errors, and the checkpoint's training pixel size as default.

Slides are OME-TIFF pyramids written by tifffile (0.5 µm/px, levels at downsample 1, 4, 16);
rasters are GeoTIFFs written by GDAL through rasterio with overviews. The model is a ``tiny``
registry model with hand-set weights that marks pixels brighter than mid-grey as class 1, so
a bright disk drawn at a known level-0 position must come out there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from tilenet.cli import main
from tilenet.config import ResolutionConfig, load_config
from tilenet.engine.checkpoint import save_checkpoint
from tilenet.engine.infer import infer_image
from tilenet.errors import ConfigError, InputError
from tilenet.geometry import Window
from tilenet.io import open_image
from tilenet.io.base import LazyImage, Level
from tilenet.io.resolution import at_resolution, label_view
from tilenet.models import ModelSpec, create_model

H, W = 512, 640
#: The disk's centre (y, x) and radius in level-0 pixels.
CY, CX, R = 200, 300, 48


def _disk(h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.full((h, w, 3), 20, np.uint8)
    arr[(yy - CY) ** 2 + (xx - CX) ** 2 <= R * R] = 230
    return arr


def _slide(path: Path, arr: np.ndarray, mpp: float | None = 0.5) -> Path:
    """An OME-TIFF pyramid with levels at downsample 1, 4, 16 (block means)."""
    levels = [arr]
    for f in (4, 16):
        h, w = arr.shape[0] // f, arr.shape[1] // f
        levels.append(
            arr[: h * f, : w * f].reshape(h, f, w, f, 3).mean((1, 3)).round().astype(np.uint8)
        )
    meta: dict[str, Any] = {"axes": "YXS"}
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], subifds=2, tile=(64, 64), photometric="rgb", metadata=meta)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, tile=(16, 16), photometric="rgb")
    return path


def _bright_model(path: Path, resolution: dict[str, Any] | None = None) -> Path:
    """``tiny`` with weights set so that class 1 wins where the channel mean exceeds 128."""
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=2, width=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        conv = model.enc[0]
        conv.weight[0, :, 1, 1] = 1.0 / 3.0
        bn = model.enc[1]
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        model.head.weight[1, 0, 0, 0] = 1.0
        model.head.bias[1] = -128.0
    spec = ModelSpec.from_model(model, class_names=["background", "disk"])
    if resolution is not None:
        spec = ModelSpec.from_dict({**spec.to_dict(), "resolution": resolution})
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


def _geojson_bounds(path: Path) -> tuple[float, float, float, float]:
    from shapely.geometry import shape

    feats = json.loads(path.read_text())["features"]
    assert len(feats) == 1, [f["properties"] for f in feats]
    assert feats[0]["properties"]["classification"]["name"] == "disk"
    return shape(feats[0]["geometry"]).bounds


OPTS: dict[str, Any] = {
    "tile": 64,
    "outputs": ["probabilities", "classes", "instances", "geojson"],
    "probabilities_dtype": "float32",
    "device": "cpu",
}


# -- slides ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _slide(tmp_path_factory.mktemp("slide") / "slide.ome.tif", _disk())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bright_model(tmp_path_factory.mktemp("model") / "m.pt")


@pytest.mark.parametrize(
    ("mpp", "level", "factor", "as_is"), [(2.0, 1, 1.0, True), (1.0, 0, 2.0, False)]
)
def test_infer_at_mpp(
    slide: Path, model: Path, tmp_path: Path, mpp: float, level: int, factor: float, as_is: bool
) -> None:
    """--mpp 2.0 runs level 1 (downsample 4) as is; --mpp 1.0 resamples level 0 by 2."""
    out = tmp_path / "out"
    assert main(["infer", str(slide), "--model", str(model), "--out", str(out), "--mpp", str(mpp),
                 "--tile", "64", "--outputs", "classes,instances,geojson", "--quiet"]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    res = s["resolution"]
    assert res["chosen_by"] == "requested" and res["requested"] == {"mpp": mpp}
    assert res["source_level"] == level and res["factor"] == [factor, factor]
    assert res["used_as_is"] is as_is and (res.get("note") == "level used as is") is as_is
    assert res["pixel_size"] == [mpp, mpp]
    scale = mpp / 0.5
    assert s["shape"] == [round(H / scale), round(W / scale)]
    # the outputs carry the effective pixel size
    with open_image(out / "classes.ome.zarr") as cz, open_image(out / "classes.ome.tif") as ct:
        assert cz.pixel_size == pytest.approx((mpp, mpp))
        assert ct.pixel_size == pytest.approx((mpp, mpp))
    # µm² areas from the effective pixel size: the disk's area within its outline's pixels
    assert s["class_area_um2"]["disk"] == pytest.approx(np.pi * (R * 0.5) ** 2, rel=0.08)
    # instances.geojson in level-0 pixels of the file, whatever resolution inference ran at
    x0, y0, x1, y1 = _geojson_bounds(out / "instances.geojson")
    tol = scale + 1
    assert abs(x0 - (CX - R)) <= tol and abs(x1 - (CX + R + 1)) <= tol
    assert abs(y0 - (CY - R)) <= tol and abs(y1 - (CY + R + 1)) <= tol
    # config.yaml is the resolved config: the pixel size it ran at, and a rerun from it (no
    # --mpp) runs at that pixel size again and writes the same class map.
    cfg = load_config(out / "config.yaml")
    assert cfg.resolution.mpp == mpp and cfg.infer.tile == 64
    if as_is:
        return  # the rerun once, on the resampled case
    again = tmp_path / "again"
    assert main(["infer", str(slide), f"conf={out / 'config.yaml'}", "--model", str(model),
                 "--out", str(again), "--quiet"]) == 0  # fmt: skip
    s2 = json.loads((again / "summary.json").read_text())
    assert s2["resolution"]["pixel_size"] == [mpp, mpp] and s2["shape"] == s["shape"]
    with open_image(out / "classes.ome.zarr") as a, open_image(again / "classes.ome.zarr") as b:
        whole = Window(0, 0, a.shape[0], a.shape[1])
        np.testing.assert_array_equal(a.read(whole), b.read(whole))


def test_tolerance_and_magnification(slide: Path) -> None:
    with open_image(slide) as img:
        # within 5 %: level 1 as is; outside it: level 0 resampled
        _, res = at_resolution(img, ResolutionConfig(mpp=2.08))
        assert res is not None and res.source_level == 1 and res.used_as_is
        _, res = at_resolution(img, ResolutionConfig(mpp=2.08, tolerance=0.01))
        assert res is not None and res.source_level == 1 and not res.used_as_is
        assert res.factor == pytest.approx((1.04, 1.04))
        _, res = at_resolution(img, ResolutionConfig(mpp=1.96, tolerance=0.01))
        assert (
            res is not None and res.source_level == 0 and res.factor == pytest.approx((3.92, 3.92))
        )
        # no target: the image itself, read at the caller's level
        same, none = at_resolution(img, ResolutionConfig())
        assert same is img and none is None
        img.objective_power = 40.0
        view, res = at_resolution(img, ResolutionConfig(magnification=10.0))
        assert res is not None and res.source_level == 1 and res.used_as_is
        assert view.pixel_size == (2.0, 2.0) and view.levels[0].shape == (128, 160)
        # the view's further levels are the source's coarser ones, relative to its level 0
        assert [lv.downsample for lv in view.levels] == [(1.0, 1.0), (4.0, 4.0)]
        assert view.pixel_transform(1) == (0.0, 16.0, 0.0, 0.0, 0.0, 16.0)


def test_seam_free_crop_mode_at_non_integer_factor(slide: Path, tmp_path: Path) -> None:
    """Crop mode at --mpp 0.8 (level 0 resampled by 1.6) equals one whole-image pass."""
    from tilenet.engine.checkpoint import load_model
    from tilenet.engine.predictor import predict

    ckpt = tmp_path / "m.pt"
    torch.manual_seed(1)
    net = create_model("tiny", in_channels=3, num_classes=3, width=4)
    spec = ModelSpec.from_model(net, mean=[120.0] * 3, std=[60.0] * 3)
    save_checkpoint(ckpt, {"spec": spec, "model": net.state_dict()})
    rng = np.random.default_rng(0)
    arr = np.clip(_disk(160, 200).astype(int) + rng.integers(-20, 20, (160, 200, 3)), 0, 255)
    img = _slide(tmp_path / "small.ome.tif", arr.astype(np.uint8))
    rc = ResolutionConfig(mpp=0.8)
    s = infer_image(img, ckpt, tmp_path / "out", resolution=rc, **{**OPTS, "tile": 32})
    assert s["tiles"] > 4 and s["resolution"]["factor"] == [1.6, 1.6] and s["exact"]
    with open_image(img) as im:
        view, _ = at_resolution(im, rc)
        h, w = view.levels[0].shape
        whole = view.read(Window(0, 0, h, w))
    model, spec = load_model(ckpt)
    x = (whole.astype(np.float32) - 120.0) / 60.0
    x = np.pad(x, ((0, h % 2), (0, w % 2), (0, 0)))  # the model's stride is 2
    with torch.inference_mode():
        ref = predict(model, torch.from_numpy(x).permute(2, 0, 1)[None].contiguous())
    ref = ref[0, :, :h, :w].numpy()
    got = np.asarray(zarr.open_group(tmp_path / "out" / "probabilities.ome.zarr")["0"][:])
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) < 1e-4


@dataclass
class _Mem(LazyImage):
    """An in-memory image (test double of the reader contract; pixels come from ``data``)."""

    data: list[np.ndarray] = field(default_factory=list)

    def _read(self, window: Window, level: int) -> np.ndarray:
        return self.data[level][window.slices]


_BASE = np.random.default_rng(3).integers(0, 256, (90, 110, 2)).astype(np.uint8)
_BASE[10:30, 40:70] = 7  # a nodata patch


@settings(max_examples=60, deadline=None)
@given(
    f=st.floats(0.6, 5.0),
    nodata=st.booleans(),
    win=st.tuples(st.integers(-3, 40), st.integers(-3, 40), st.integers(1, 30), st.integers(1, 30)),
)
def test_a_pixel_does_not_depend_on_its_window(
    f: float, nodata: bool, win: tuple[int, int, int, int]
) -> None:
    img = _Mem(
        Path("mem"), "mem", np.dtype("uint8"), 2, [Level(_BASE.shape[:2])],
        pixel_size=(0.25, 0.25), nodata=7.0 if nodata else None, data=[_BASE],
    )  # fmt: skip
    view, res = at_resolution(img, ResolutionConfig(mpp=0.25 * f, tolerance=0.0))
    assert res is not None
    h, w = view.levels[0].shape
    big = view.read(Window(-5, -5, h + 10, w + 10))
    sub = view.read(Window(*win))
    expect = np.zeros_like(sub)
    y, x, wh, ww = win
    ys, xs = slice(max(y, 0), min(y + wh, h)), slice(max(x, 0), min(x + ww, w))
    if ys.stop > ys.start and xs.stop > xs.start:
        expect[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = big[
            ys.start + 5 : ys.stop + 5, xs.start + 5 : xs.stop + 5
        ]
    np.testing.assert_array_equal(sub, expect)
    # labels: nearest on the same grid, only values that exist in the source
    lab = label_view(img, view)
    assert lab.levels[0].shape == (h, w)
    assert set(np.unique(lab.read(Window(0, 0, h, w)))) <= set(np.unique(_BASE))


def test_area_average_and_nodata() -> None:
    base = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    img = _Mem(Path("m"), "m", np.dtype("uint8"), 1, [Level((8, 8))], pixel_size=(1.0, 1.0),
               data=[base])  # fmt: skip
    view, _ = at_resolution(img, ResolutionConfig(mpp=2.0))
    got = view.read(Window(0, 0, 4, 4))[..., 0]
    ref = base[..., 0].reshape(4, 2, 4, 2).astype(float).mean((1, 3))
    np.testing.assert_array_equal(got, np.rint(ref))
    # nodata gets no weight; a view pixel mostly over nodata is nodata
    img.nodata = 0.0
    nod = base.copy()
    nod[0, 0] = nod[0, 1] = nod[1, 0] = 0  # 4 of pixel (0, 0)'s samples (one was 0 already)
    nod[2, 2] = 0  # 1 of 4 samples of pixel (1, 1)
    img.data = [nod]
    got = at_resolution(img, ResolutionConfig(mpp=2.0))[0].read(Window(0, 0, 4, 4))[..., 0]
    assert got[0, 0] == 0
    assert got[1, 1] == round((27 + 26 + 19) / 3)


# -- rasters ---------------------------------------------------------------------------------
def _geotiff(path: Path, arr: np.ndarray) -> tuple[float, ...]:
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    t = from_origin(500000.0, 4_200_000.0, 10.0, 10.0)
    prof = {
        "driver": "GTiff", "height": arr.shape[0], "width": arr.shape[1], "count": 3,
        "dtype": "uint8", "crs": "EPSG:32633", "transform": t, "tiled": True,
        "blockxsize": 64, "blockysize": 64,
    }  # fmt: skip
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(np.moveaxis(arr, 2, 0))
        ds.build_overviews([4, 16], Resampling.average)
    return t.to_gdal()


@pytest.mark.parametrize(("gsd", "level", "factor"), [(40.0, 1, 1.0), (20.0, 0, 2.0)])
def test_infer_at_gsd(tmp_path: Path, gsd: float, level: int, factor: float) -> None:
    import rasterio

    src = tmp_path / "scene.tif"
    x0, _, _, y0, _, _ = _geotiff(src, _disk())
    ckpt = _bright_model(tmp_path / "m.pt")
    out = tmp_path / "out"
    s = infer_image(src, ckpt, out, resolution=ResolutionConfig(gsd=gsd), **OPTS)
    res = s["resolution"]
    assert res["source_level"] == level and res["factor"] == [factor, factor]
    assert res["gsd"] == [gsd, gsd] and res["pixel_size"] is None
    assert s["transform"] == [x0, gsd, 0.0, y0, 0.0, -gsd]
    assert s["class_area_um2"] is None  # a ground sample distance is not a microscope pixel
    with rasterio.open(out / "classes.tif") as ds:
        assert ds.transform.to_gdal() == (x0, gsd, 0.0, y0, 0.0, -gsd)
        assert ds.crs.to_epsg() == 32633
        assert (ds.height, ds.width) == (round(H * 10 / gsd), round(W * 10 / gsd))
    # polygons in map coordinates: the disk where it was drawn
    bx0, by0, bx1, by1 = _geojson_bounds(out / "instances.geojson")
    tol = gsd + 10
    assert abs(bx0 - (x0 + 10 * (CX - R))) <= tol and abs(bx1 - (x0 + 10 * (CX + R + 1))) <= tol
    assert abs(by1 - (y0 - 10 * (CY - R))) <= tol and abs(by0 - (y0 - 10 * (CY + R + 1))) <= tol


# -- errors and defaults ------------------------------------------------------------------------
def test_errors(
    slide: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = _slide(tmp_path / "bare.ome.tif", _disk(64, 64), mpp=None)
    base = ["--model", str(model), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(["infer", str(bare), *base, "--mpp", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "has no pixel size" in err and "--level" in err and "--assume-mpp" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["infer", str(bare), *base, "--gsd", "10"]) == 2
    assert "no georeferencing" in capsys.readouterr().err
    assert main(["infer", str(slide), *base, "--mpp", "1.0", "--gsd", "10"]) == 2
    assert "give one target pixel size" in capsys.readouterr().err
    assert main(["infer", str(slide), *base, "--mpp", "1.0", "--level", "1"]) == 2
    assert "cannot be combined with level 1" in capsys.readouterr().err
    assert main(["infer", str(bare), *base, "--magnification", "10"]) == 2
    assert "objective power" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="positive"):
        infer_image(slide, model, tmp_path / "o", resolution=ResolutionConfig(mpp=-1.0))
    with open_image(bare) as img, pytest.raises(InputError, match="no pixel size"):
        at_resolution(img, ResolutionConfig(mpp=1.0))
    # --assume-mpp: the pixel size is used, but areas are not reported in µm²
    s = infer_image(bare, model, tmp_path / "a", resolution=ResolutionConfig(mpp=1.0, assume_mpp=0.5),
                    **OPTS)  # fmt: skip
    assert s["resolution"]["pixel_size_assumed"] and s["shape"] == [32, 32]
    assert s["class_area_um2"] is None


def test_checkpoint_pixel_size_is_the_default(
    slide: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = _bright_model(tmp_path / "m.pt", {"mpp": 2.0})
    s = infer_image(slide, ckpt, tmp_path / "a", **OPTS)
    assert s["resolution"]["chosen_by"] == "checkpoint" and s["resolution"]["source_level"] == 1
    assert s["shape"] == [H // 4, W // 4]
    # an explicit level wins over it (the CLI's --level)
    s = infer_image(slide, ckpt, tmp_path / "b", level=2, **OPTS)
    assert s["resolution"]["chosen_by"] == "level" and s["shape"] == [H // 16, W // 16]
    # a slide without a pixel size: a warning, and level 0 as it is
    bare = _slide(tmp_path / "bare.ome.tif", _disk(64, 64), mpp=None)
    s = infer_image(bare, ckpt, tmp_path / "c", **OPTS)
    assert s["resolution"]["chosen_by"] == "level" and s["shape"] == [64, 64]
    assert "trained at 2.0 µm/px" in caplog.text and "has no pixel size" in caplog.text


# -- tiling and training ------------------------------------------------------------------------
def test_tile_and_train_at_mpp_record_the_pixel_size(slide: Path, tmp_path: Path) -> None:
    """Patches and label patches on the 1.0 µm/px grid; the checkpoint records 1.0 µm/px and
    inference on the 0.5 µm/px slide then runs at it by default."""
    from tilenet.config import load_config
    from tilenet.engine.checkpoint import load_checkpoint
    from tilenet.patches.data import PatchStoreDataset, RandomCropDataset
    from tilenet.patches.tiler import tile_images
    from tilenet.train import train

    lab = tmp_path / "lab.tif"
    tifffile.imwrite(lab, (_disk()[..., 0] > 100).astype(np.uint8), tile=(64, 64))
    store = tmp_path / "p.zarr"
    rc = ResolutionConfig(mpp=1.0)
    tile_images([slide], labels=[lab], out=store, patch=64, overlap=0, resolution=rc,
                progress=False)  # fmt: skip
    g = zarr.open_group(store, mode="r")
    src = dict(g.attrs)["sources"][0]
    assert src["mpp"] == [1.0, 1.0] and src["resolution"]["factor"] == [2.0, 2.0]
    assert src["shape"][:2] == [H // 2, W // 2]
    coords = np.asarray(g["coords"][:])
    with open_image(slide) as img:
        view, _ = at_resolution(img, rc)
        for i in (0, len(coords) // 2, len(coords) - 1):
            _, lv, y, x = coords[i].tolist()
            assert lv == 0
            np.testing.assert_array_equal(g["images"][i], view.read(Window(y, x, 64, 64)))
    # the label patch under the disk's centre (view pixel (CY/2, CX/2)) is 1, a corner 0
    cy, cx = CY // 2, CX // 2
    k = next(
        i
        for i, c in enumerate(coords.tolist())
        if c[2] <= cy < c[2] + 64 and c[3] <= cx < c[3] + 64
    )
    labels = np.asarray(g["labels"][k])
    assert labels[cy - coords[k][2], cx - coords[k][3]] == 1 and labels.sum() > 0
    assert int(np.asarray(g["labels"][0])[0, 0]) == 0
    # an existing store is only extended at the same pixel size
    with pytest.raises(InputError, match="resolution"):
        tile_images([slide], out=store, patch=64, overlap=0, labels=[lab], progress=False)
    assert PatchStoreDataset(store).resolution == {"mpp": 1.0}
    crops = RandomCropDataset([slide], [lab], patch=32, samples_per_epoch=2, resolution=rc)
    assert crops.resolution == {"mpp": 1.0} and crops.shapes == [(H // 2, W // 2)]
    over = {
        "data.stores": f"[{store}]", "data.patch": 64, "data.batch_size": 2,
        "model.name": "tiny", "model.num_classes": 2, "train.device": "cpu",
        "train.progress": False, "train.steps": 1, "train.warmup_steps": 0,
        "train.val_every": 100, "train.out_dir": tmp_path / "run", "data.class_names": "[a,b]",
    }  # fmt: skip
    run = train(load_config(None, [f"{k}={v}" for k, v in over.items()]))
    ckpt = run / "last.pt"
    assert load_checkpoint(ckpt)["spec"]["resolution"] == {"mpp": 1.0}
    s = infer_image(slide, ckpt, tmp_path / "o", **{**OPTS, "outputs": ["classes"]})
    assert s["resolution"]["chosen_by"] == "checkpoint" and s["resolution"]["factor"] == [2.0, 2.0]
    assert s["shape"] == [H // 2, W // 2]


def test_upsampling_beyond_max_upsample_is_refused_before_anything_is_written(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenSlide's boxes.tiff says 352.78 µm/px on 300x250 pixels: with a checkpoint trained
    at 0.5 µm/px that was planned as a 706x upsample (a 176388x211666 output). It is one
    line now, naming the file, both pixel sizes, the factor and the setting."""
    boxes = _slide(tmp_path / "boxes.ome.tif", _disk(250, 300), mpp=352.78)
    ckpt = _bright_model(tmp_path / "m05.pt", {"mpp": 0.5})
    out = tmp_path / "o"
    assert main(["infer", str(boxes), "--model", str(ckpt), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for part in ("boxes.ome.tif", "0.5 µm/px", "352.8 µm/px", "706x", "--max-upsample"):
        assert part in err[0], (part, err[0])
    assert not out.exists() or not any(out.iterdir())
    assert (
        main(
            [
                "infer",
                str(boxes),
                "--model",
                str(model),
                "--out",
                str(out),
                "--quiet",
                "--mpp",
                "200",
            ]
        )
        == 0
    )  # fmt: skip  (1.76x: within the default 2x)
    with open_image(boxes) as img:
        view, _ = at_resolution(img, ResolutionConfig(mpp=0.5, max_upsample=1000))
        assert view.levels[0].shape == (176390, 211668)  # planned, never read
