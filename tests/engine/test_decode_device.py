"""The device decoder (``cuda-jpeg``), ``--decode auto|cpu|gpu``, precision ``auto``.

On the CPU the device decoder is the same batched call on libjpeg-turbo: every run here is
bit-identical to the reader's path. Its contract over every stored layout (decoded ==
read()) is tests/io/test_source.py's, which runs every registered decoder. The ``gpu``
tests (skipped without CUDA) hold nvJPEG to torchvision's own bound, mean |diff| < 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch

from tilenet.config import InferConfig
from tilenet.engine.decode import DECODERS, DeviceJpegDecoder, choose_decoder, decoder_for
from tilenet.engine.predictor import Predictor
from tilenet.errors import InputError
from tilenet.geometry import Window
from tilenet.io import open_image
from tilenet.io.source import EncodedTile, EncodedWindow, decode_window
from tilenet.runtime import resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    smooth = np.stack([yy * 2, xx * 3, 128 + 60 * np.sin(yy / 9.0) * np.cos(xx / 7.0)], -1)
    return (smooth + noise).clip(0, 255).astype(np.uint8)


def _aperio_tile(t: np.ndarray) -> bytes:
    """``t`` as Aperio stores RGB JPEG: 4:4:4 RGB samples, component ids 0, 1, 2, neither a
    JFIF nor an Adobe marker (libjpeg and nvJPEG alone would take it for YCbCr)."""
    stream = imagecodecs.jpeg8_encode(t, level=90, outcolorspace="RGB", subsampling="444")
    out, pos = bytearray(b"\xff\xd8"), 2
    while True:
        marker, n = stream[pos + 1], int.from_bytes(stream[pos + 2 : pos + 4], "big")
        seg = bytearray(stream[pos : pos + 2 + n])
        if marker == 0xC0:  # SOF0: (id, sampling, table) per component from byte 10
            for i in range(seg[9]):
                seg[10 + 3 * i] = i
        if marker == 0xDA:  # SOS: (id, tables) per component from byte 5, then the data
            for i in range(seg[4]):
                seg[5 + 2 * i] = i
            return bytes(out + seg + stream[pos + 2 + n :])
        if not 0xE0 <= marker <= 0xEF:  # APPn (JFIF, Adobe) dropped
            out += seg
        pos += 2 + n


def _write_aperio(path: Path, img: np.ndarray, tile: int) -> None:
    h, w, _ = img.shape
    tiles = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = np.zeros((tile, tile, 3), np.uint8)
            part = img[y : y + tile, x : x + tile]
            t[: part.shape[0], : part.shape[1]] = part
            tiles.append(_aperio_tile(t))
    tifffile.imwrite(path, iter(tiles), shape=img.shape, dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="jpeg", subsampling=(1, 1), metadata=None,
                     compressionargs={"outcolorspace": "RGB"})  # fmt: skip


def _sample(codec: str = "jpeg", photometric: str = "ycbcr", bits: int = 8) -> EncodedWindow:
    return EncodedWindow(Window(0, 0, 1, 1), 0, codec, photometric, None, (16, 16),
                         np.dtype(np.uint8), 3, bits, ())  # fmt: skip


def _model() -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1)
    )
    spec = {"name": "m", "in_channels": 3, "num_classes": 3, "stride": 1,
            "receptive_field": 4, "mean": [120.0, 80.0, 60.0], "std": [50.0, 40.0, 30.0]}  # fmt: skip
    return model, spec


class _Collect:
    def __init__(self) -> None:
        self.probs: dict[tuple[int, int], np.ndarray] = {}

    def add(self, tile: Any, probs: np.ndarray) -> None:
        self.probs[tile.index] = probs

    def close(self) -> None:
        pass


def _checkpoint(path: Path) -> Path:
    from tilenet.engine.checkpoint import save_checkpoint
    from tilenet.models import create_model
    from tilenet.models.spec import ModelSpec

    torch.manual_seed(0)
    model = create_model("tiny", in_channels=3, num_classes=3)
    spec = ModelSpec.from_model(model, mean=[120.0] * 3, std=[60.0] * 3)
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


def _run(predictor: Predictor, path: Path) -> tuple[dict[tuple[int, int], np.ndarray], Any]:
    with open_image(path) as image:
        grid, _ = predictor.plan(image.levels[0].shape)
        out = _Collect()
        stats = predictor.run(image, list(grid), out, grid=grid)
    return out.probs, stats


# -- the rule --------------------------------------------------------------------------------
def test_the_device_decoder_is_registered_for_jpeg_only() -> None:
    assert DECODERS["cuda-jpeg"] is DeviceJpegDecoder
    assert DeviceJpegDecoder.codecs == frozenset({"jpeg"})


@pytest.mark.parametrize(
    ("mode", "device", "sample", "expected"),
    [
        ("cpu", CUDA, _sample(), None),
        ("auto", CPU, _sample(), None),
        ("auto", CUDA, None, None),  # no raw path: strips, predictor, resampled view
        ("auto", CUDA, _sample("deflate", "rgb"), None),
        ("auto", CUDA, _sample(bits=12), None),
        ("gpu", CUDA, _sample("zstd", "rgb"), None),  # the codec, not the run: read, warned
        ("auto", CUDA, _sample("jpeg", "separated"), None),  # CMYK
        ("auto", CUDA, _sample(), "cuda-jpeg"),
        ("auto", CUDA, _sample("jpeg", "rgb"), "cuda-jpeg"),  # Aperio
        ("gpu", torch.device("cuda", 1), _sample("jpeg", "minisblack"), "cuda-jpeg"),
    ],
)
def test_choose_decoder(mode: str, device: Any, sample: Any, expected: str | None) -> None:
    name, why = choose_decoder(mode, device, sample)
    assert name == expected and why


@pytest.mark.parametrize("compression", ["jpeg2000", "zlib"])
def test_jpeg2000_and_deflate_slides_keep_the_cpu_path(tmp_path: Path, compression: str) -> None:
    """JPEG 2000 (as Aperio's 33003/33005 slides) has no raw path; deflate has one, in a
    codec the device decoder does not take: on CUDA both are read by the reader."""
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _rgb(64, 64), tile=(32, 32), compression=compression, metadata=None)
    with open_image(path) as image:
        sample = image.encoded(Window(0, 0, 1, 1))
        assert (sample is None) == (compression == "jpeg2000")
        assert image.read(Window(0, 0, 8, 8)).shape == (8, 8, 3)
    for mode in ("auto", "gpu"):
        name, why = choose_decoder(mode, CUDA, sample)
        assert name is None and ("JPEG 2000" in why or "deflate" in why)


def test_decoder_for_probes_the_image_only_where_the_device_decoder_could_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tifffile.imwrite(tmp_path / "j.tif", _rgb(64, 64), tile=(32, 32), photometric="rgb",
                     compression="jpeg", metadata=None)  # fmt: skip
    tifffile.imwrite(tmp_path / "z.tif", _rgb(64, 64), tile=(32, 32), compression="zlib",
                     metadata=None)  # fmt: skip
    with open_image(tmp_path / "j.tif") as jpeg, open_image(tmp_path / "z.tif") as deflate:
        decoder, info = decoder_for(jpeg, 0, "auto", CUDA)
        assert isinstance(decoder, DeviceJpegDecoder) and info["decoder"] == "cuda-jpeg"
        assert decoder_for(jpeg, 0, "auto", CPU) == (None, {"decoder": "read",
                           "reason": "the model runs on cpu: no device decoder"})  # fmt: skip
        assert decoder_for(jpeg, 0, "cpu", CUDA)[0] is None
        with caplog.at_level("WARNING"):
            decoder, info = decoder_for(deflate, 0, "gpu", CUDA)
        assert decoder is None and info == {"decoder": "read",
                                            "reason": "deflate tiles decode on the CPU"}  # fmt: skip
        assert "--decode gpu: deflate tiles decode on the CPU; read on the CPU" in caplog.text


def test_decode_gpu_without_cuda_is_a_one_line_error() -> None:
    with pytest.raises(InputError, match=r"^--decode gpu needs the model on a CUDA device") as e:
        choose_decoder("gpu", CPU, _sample())
    assert "\n" not in str(e.value) and "--decode auto or cpu" in str(e.value)
    if not torch.cuda.is_available():  # the predictor says so before anything runs
        with pytest.raises(InputError, match="--decode gpu"):
            Predictor(_model(), InferConfig(device="auto", decode="gpu"))
    with pytest.raises(InputError, match="unknown decoder 'nvdec'"):
        Predictor(_model(), InferConfig(device="cpu"), decoder="nvdec")


def test_precision_auto_is_fp32_on_the_cpu_and_keeps_crop_mode_exact() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    p = Predictor(_model(), InferConfig(device="cpu"))
    assert InferConfig().precision == "auto" and p.precision == "fp32" and p.run_is_exact
    assert not p.with_config(InferConfig(device="cpu", precision="bf16")).run_is_exact


# -- on the CPU: bit-identical ------------------------------------------------------------------
@pytest.mark.parametrize("subsampling", [(2, 2), (1, 1)])
def test_predictor_with_the_device_decoder_on_the_cpu_is_bit_identical(
    tmp_path: Path, subsampling: tuple[int, int]
) -> None:
    """The device decoder's path through the engine (readers fetch bytes, one batched decode
    per batch, windows assembled by the decoder) gives the default run's probabilities."""
    path = tmp_path / "j.tif"
    tifffile.imwrite(path, _rgb(90, 110), tile=(32, 32), photometric="rgb", compression="jpeg",
                     subsampling=subsampling, metadata=None)  # fmt: skip
    cfg = InferConfig(device="cpu", tile=48, batch=3)
    default, stats0 = _run(Predictor(_model(), cfg), path)
    forced, stats1 = _run(Predictor(_model(), cfg, decoder="cuda-jpeg"), path)
    assert stats0.decode["decoder"] == "read" and "cpu" in stats0.decode["reason"]
    assert stats1.decode["decoder"] == "cuda-jpeg" and stats1.decode["tiles"]["torchvision"] > 0
    assert default.keys() == forced.keys()
    for index, probs in default.items():
        assert np.array_equal(probs, forced[index])


def test_aperio_tiles_without_a_colour_marker_decode_right_on_the_device_path(
    tmp_path: Path,
) -> None:
    """The layout the gpu test sends to nvJPEG: read() has the source's colours, and the
    device decoder (on the CPU) equals read() only thanks to the Adobe marker it adds."""
    img = _rgb(100, 130)
    _write_aperio(tmp_path / "a.tif", img, 64)
    win = Window(-5, 10, 96, 96)
    with open_image(tmp_path / "a.tif") as image:
        expected, ew = image.read(win), image.encoded(win)
        assert np.abs(image.read(Window(0, 0, 100, 130)).astype(int) - img).mean() < 4
    assert ew is not None and ew.photometric == "rgb" and ew.tables is None
    assert all(b"Adobe" not in t.data and b"JFIF" not in t.data for t in ew.tiles)
    decoder = DeviceJpegDecoder()
    got = decoder.decode([ew]).permute(0, 2, 3, 1).numpy()[0]
    assert decoder.tiles == {"torchvision": len(ew.tiles)} and np.array_equal(got, expected)


def test_windows_in_other_codecs_are_read(tmp_path: Path) -> None:
    """A decoder that takes no deflate: its reader threads read those windows instead."""
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, _rgb(60, 70), tile=(32, 32), compression="zlib", metadata=None)
    cfg = InferConfig(device="cpu", tile=48, batch=2)
    default, _ = _run(Predictor(_model(), cfg), path)
    forced, stats = _run(Predictor(_model(), cfg, decoder="cuda-jpeg"), path)
    assert stats.decode["tiles"] == {}  # nothing went through the decoder
    assert all(np.array_equal(p, forced[i]) for i, p in default.items())


def test_twelve_bit_and_cmyk_fall_back_to_imagecodecs_on_the_device_path() -> None:
    t = Window(0, 0, 16, 16)
    twelve = imagecodecs.jpeg8_encode(_rgb(16, 16).astype(np.uint16) * 16, bitspersample=12)
    four = np.dstack([_rgb(16, 16), _rgb(16, 16)[..., :1]])
    cmyk = imagecodecs.jpeg8_encode(four, colorspace="CMYK", outcolorspace="CMYK")
    for data, photometric, samples, dtype, bits in [
        (twelve, "ycbcr", 3, np.uint16, 12),
        (cmyk, "separated", 4, np.uint8, 8),
    ]:
        ew = EncodedWindow(t, 0, "jpeg", photometric, None, (16, 16), np.dtype(dtype), samples,
                           bits, (EncodedTile("k", data, t, t),))  # fmt: skip
        decoder = DeviceJpegDecoder()
        x = decoder.decode([ew, ew])
        assert decoder.tiles == {"imagecodecs": 1}
        assert x.shape == (2, samples, 16, 16)
        assert x.dtype == torch.from_numpy(np.zeros(0, dtype)).dtype
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy()[1], decode_window(ew))


def test_infer_decode_cpu_equals_the_default_and_the_summary_says_which_ran(
    tmp_path: Path,
) -> None:
    from tilenet.cli import main

    tifffile.imwrite(tmp_path / "j.tif", _rgb(64, 80), tile=(32, 32), photometric="rgb",
                     compression="jpeg", metadata=None)  # fmt: skip
    _checkpoint(tmp_path / "m.pt")
    runs = {}
    for decode in (None, "cpu"):
        out = tmp_path / f"o_{decode}"
        argv = ["infer", str(tmp_path / "j.tif"), "--model", str(tmp_path / "m.pt"), "--out",
                str(out), "--device", "cpu", "--tile", "48", "--quiet", "--outputs",
                "probabilities", "--probabilities-dtype", "float32"]  # fmt: skip
        assert main(argv + (["--decode", decode] if decode else [])) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["precision"] == "fp32" and summary["decode"]["decoder"] == "read"
        import zarr

        runs[decode] = zarr.open_group(str(out / "probabilities.ome.zarr"), mode="r")["0"][:]
    assert np.array_equal(runs[None], runs["cpu"])


# -- on a GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["ycbcr420", "ycbcr444", "aperio-rgb"])
def test_nvjpeg_equals_the_cpu_decode_within_torchvisions_bound(
    tmp_path: Path, layout: str
) -> None:
    path = tmp_path / "j.tif"
    img = _rgb(200, 260)
    if layout == "aperio-rgb":  # the Adobe marker is the decoder's (jpeg_stream)
        _write_aperio(path, img, 64)
    else:
        sub = (2, 2) if layout == "ycbcr420" else (1, 1)
        tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", compression="jpeg",
                         subsampling=sub, metadata=None)  # fmt: skip
    wins = [Window(-5, -7, 96, 96), Window(40, 50, 96, 96), Window(150, 200, 96, 96)]
    with open_image(path) as image:
        batch = [image.encoded(w) for w in wins]
        expected = np.stack([image.read(w) for w in wins]).astype(int)
    decoder = DeviceJpegDecoder()
    x = decoder.decode(batch, "cuda")  # type: ignore[arg-type]
    assert x.device.type == "cuda" and decoder.tiles["nvjpeg"] > 0
    diff = np.abs(x.permute(0, 2, 3, 1).cpu().numpy().astype(int) - expected)
    print(f"nvJPEG vs libjpeg-turbo, {layout}: mean {diff.mean():.3f}, max {diff.max()}")
    assert diff.mean() < 2


#: Stated tolerance of bf16/fp16 autocast against fp32, on softmax probabilities.
REDUCED_PRECISION_MAX_ABS = 0.05


@pytest.mark.gpu
def test_reduced_precision_inference_is_within_the_stated_tolerance(tmp_path: Path) -> None:
    path = tmp_path / "j.tif"
    tifffile.imwrite(path, _rgb(300, 280), tile=(64, 64), photometric="rgb", compression="jpeg",
                     metadata=None)  # fmt: skip
    cfg = InferConfig(device="cuda", tile=128, batch=4, decode="cpu")
    fp32, _ = _run(Predictor(_model(), dataclasses.replace(cfg, precision="fp32")), path)
    auto = Predictor(_model(), cfg)
    assert auto.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    low, stats = _run(auto, path)
    assert stats.device_s > 0
    diff = np.concatenate([np.abs(low[i] - p).ravel() for i, p in fp32.items()])
    print(f"{auto.precision} vs fp32 probabilities: max {diff.max():.4g}, mean {diff.mean():.3g}")
    assert diff.max() < REDUCED_PRECISION_MAX_ABS


@pytest.mark.gpu
def test_infer_decode_gpu_end_to_end(tmp_path: Path) -> None:
    """--decode gpu through the CLI: nvJPEG decoded the tiles, the streamed CUDA path ran,
    and the probabilities are those of --decode cpu within the decode bound."""
    from tilenet.cli import main

    tifffile.imwrite(tmp_path / "j.tif", _rgb(256, 320), tile=(64, 64), photometric="rgb",
                     compression="jpeg", metadata=None)  # fmt: skip
    _checkpoint(tmp_path / "m.pt")
    import zarr

    probs = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / decode
        assert main(["infer", str(tmp_path / "j.tif"), "--model", str(tmp_path / "m.pt"),
                     "--out", str(out), "--device", "cuda", "--precision", "fp32", "--tile",
                     "128", "--quiet", "--decode", decode, "--outputs", "probabilities",
                     "--probabilities-dtype", "float32"]) == 0  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        assert summary["timings"]["device_s"] > 0
        probs[decode] = zarr.open_group(str(out / "probabilities.ome.zarr"), mode="r")["0"][:]
        if decode == "gpu":
            assert summary["decode"]["decoder"] == "cuda-jpeg"
            assert summary["decode"]["tiles"].get("nvjpeg", 0) > 0
    diff = np.abs(probs["gpu"] - probs["cpu"])
    print(f"--decode gpu vs cpu probabilities: max {diff.max():.4g}, mean {diff.mean():.3g}")
    assert diff.mean() < 0.01
