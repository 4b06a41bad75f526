"""``tilenet export``: ONNX/TorchScript with dynamic sizes, parity, refusals, ONNX in the engine.

The ONNX file of the tiny model is exported once per module through the CLI (torch.export
and the ONNX translation take seconds); its parity is checked against the torch model at two
tile sizes through onnxruntime's CPU provider, and through the tiled engine against the
checkpoint. Refusals use deliberately non-exportable models: registered ones in a real
subprocess (the registry is process-wide), in-memory ones through ``export_module``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from torch import nn

from tilenet.cli import main
from tilenet.engine.backends import SPEC_KEY, OnnxModel, load_onnx
from tilenet.engine.checkpoint import load_model, load_spec, save_checkpoint
from tilenet.engine.export import SPEC_FILE, export_module
from tilenet.errors import CheckpointError, ModelError
from tilenet.models import ModelSpec, create_model

TOL = 1e-4


def _checkpoint(path: Path, name: str = "tiny", **kwargs: Any) -> Path:
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=3, **kwargs)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    spec = ModelSpec.from_model(
        model, mean=[120.0, 110.0, 100.0], std=[60.0, 50.0, 70.0], class_names=["a", "b", "c"]
    )
    return save_checkpoint(path, {"spec": spec, "model": model.state_dict()})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its ONNX export written by `tilenet export`)."""
    d = tmp_path_factory.mktemp("export")
    ckpt = _checkpoint(d / "tiny.pt")
    onnx_path = d / "tiny.onnx"
    assert main(["export", str(ckpt), "--out", str(onnx_path)]) == 0
    return ckpt, onnx_path


@pytest.mark.slow  # the ONNX export fixture: ~8 s; .ci/run runs it
def test_onnx_equals_torch_at_two_tile_sizes(exported: tuple[Path, Path]) -> None:
    ckpt, path = exported
    torch_model, spec = load_model(ckpt)
    onnx_model, onnx_spec = load_onnx(path)
    assert onnx_spec == spec  # the whole spec travels in the file
    assert onnx_model.providers == ["CPUExecutionProvider"]
    (inp,) = onnx_model.session.get_inputs()
    assert inp.shape == ["batch", 3, "height", "width"]
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 3, 64, 64), (3, 3, 128, 96)):  # batch, height and width all change
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            want = torch_model(x)
        got = onnx_model(x)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= TOL


@pytest.mark.slow  # the ONNX export fixture: ~8 s; .ci/run runs it
def test_infer_onnx_through_the_tiled_engine_equals_the_checkpoint(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, path = exported
    rng = np.random.default_rng(0)
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, rng.integers(0, 256, (150, 110, 3), np.uint8), tile=(64, 64))
    common = ["--tile", "64", "--batch", "3", "--device", "cpu", "--quiet"]
    common += ["--probabilities-dtype", "float32", "--outputs", "probabilities,classes"]
    for model, out in ((ckpt, "pt"), (path, "onnx")):
        assert (
            main(["infer", str(img), "--model", str(model), "--out", str(tmp_path / out), *common])
            == 0
        )
    capsys.readouterr()

    def arrays(out: str) -> tuple[np.ndarray, np.ndarray]:
        p = zarr.open_group(tmp_path / out / "probabilities.ome.zarr", mode="r")["0"][:]
        c = zarr.open_group(tmp_path / out / "classes.ome.zarr", mode="r")["0"][:]
        return np.asarray(p), np.asarray(c)

    (p_pt, c_pt), (p_onnx, c_onnx) = arrays("pt"), arrays("onnx")
    assert p_pt.shape == p_onnx.shape == (3, 150, 110)
    assert float(np.abs(p_pt - p_onnx).max()) <= TOL
    top2 = np.sort(p_pt, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 2 * TOL  # where the margin allows, the same class
    assert clear.mean() > 0.99
    assert np.array_equal(c_pt.squeeze()[clear], c_onnx.squeeze()[clear])
    summary = json.loads((tmp_path / "onnx" / "summary.json").read_text())
    assert summary["model"] == str(path)
    assert load_spec(path) == load_spec(ckpt)  # batch jobs read the spec this way


@pytest.mark.slow  # the ONNX export fixture: ~8 s; .ci/run runs it
def test_a_batch_job_runs_the_onnx_model(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory of images is a batch job (manifest, one folder per image): its runner
    reads the spec from the .onnx file as from a checkpoint."""
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", np.full((70, 60, 3), 90, np.uint8), tile=(64, 64))
    out = tmp_path / "out"
    argv = ["infer", str(images), "--model", str(exported[1]), "--out", str(out)]
    assert main([*argv, "--tile", "64", "--device", "cpu", "--outputs", "classes"]) == 0
    capsys.readouterr()
    assert (out / "a" / "summary.json").is_file()
    assert (out / "manifest.jsonl").is_file()


@pytest.mark.slow  # torch.export capture first: ~8 s; .ci/run runs it
def test_torchscript_export_carries_the_spec_and_is_size_generic(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = exported
    out = tmp_path / "tiny.ts"
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    assert "torchscript" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.ts"]  # no temporary left
    files = {SPEC_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.14
        traced = torch.jit.load(str(out), _extra_files=files)
    model, spec = load_model(ckpt)
    assert ModelSpec.from_dict(json.loads(files[SPEC_FILE])) == spec
    x = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        assert float((traced(x) - model(x)).abs().max()) <= TOL


# -- refusals --------------------------------------------------------------------------------
class _Positional(nn.Module):
    """Adds a fixed 32 x 32 map: the size is baked into the model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.zeros(1, 4, 32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.emb


class _KthValue(nn.Module):
    """A per-pixel op without an ONNX translation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - torch.kthvalue(x, 2, dim=1, keepdim=True)[0]


class _SizeBranch(nn.Module):
    """Takes another path at height 5: torch.export specialises the height and raises
    nothing at the line itself (the refusal finds the layer by exporting the parts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[2] == 5 else x


class _Bad(nn.Module):
    def __init__(self, odd: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
        self.odd = nn.Sequential(nn.ReLU(), odd)
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Upsample(scale_factor=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.odd(self.conv(x)))


@pytest.mark.parametrize(
    ("odd", "why"),
    [
        (_Positional, "cannot export with dynamic batch/height/width: layer 'odd.1' (_Positional)"),
        # 5-10 s each (the layer search exports the parts; the ONNX translation): slow
        pytest.param(
            _SizeBranch,
            "layer 'odd.1' (_SizeBranch): its code assumes",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            _KthValue,
            "no ONNX translation of aten.kthvalue.default in layer 'odd.1' (_KthValue)",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["baked-size", "size-branch", "no-onnx-op"],
)
def test_a_model_that_cannot_export_is_refused_naming_the_layer(
    odd: type[nn.Module], why: str, tmp_path: Path
) -> None:
    spec = {"name": "bad", "in_channels": 3, "num_classes": 2, "stride": 2, "receptive_field": 4}
    with pytest.raises(ModelError) as err:
        export_module(_Bad(odd()), spec, tmp_path / "m.onnx", name="bad.pt")
    assert str(err.value).startswith("bad.pt: cannot export")
    assert why in str(err.value)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left


_REGISTERED_BAD = """
import sys
import torch
from torch import nn
from tilenet.cli import main
from tilenet.engine.checkpoint import save_checkpoint
from tilenet.models import TileModel, create_model, register_model

class Positional(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Parameter(torch.zeros(1, 4, 32, 32))
    def forward(self, x):
        return x + self.emb

class Bad(TileModel):
    _stride_hint = 2
    def __init__(self, *, in_channels, num_classes):
        super().__init__(in_channels, num_classes)
        self.conv = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.MaxPool2d(2))
        self.pos = Positional()
        self.head = nn.Sequential(nn.Conv2d(4, num_classes, 1), nn.Upsample(scale_factor=2))
    def _forward_impl(self, x):
        return self.head(self.pos(self.conv(x)))

register_model("bad")(lambda *, in_channels, num_classes: Bad(
    in_channels=in_channels, num_classes=num_classes))
ckpt, out = sys.argv[1:]
m = create_model("bad", in_channels=3, num_classes=2)
save_checkpoint(ckpt, {"spec": m.spec, "model": m.state_dict()})
sys.exit(main(["export", ckpt, "--out", out]))
"""


@pytest.mark.slow
def test_cli_refuses_a_registered_model_with_a_baked_size(tmp_path: Path) -> None:
    """The whole path: a registered model's checkpoint, `tilenet export`, exit 2, one line
    (a subprocess: the registry is process-wide)."""
    script = tmp_path / "bad.py"
    script.write_text(textwrap.dedent(_REGISTERED_BAD))
    ckpt, out = tmp_path / "bad.pt", tmp_path / "bad.onnx"
    proc = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"tilenet: error: {ckpt}: cannot export with dynamic")
    assert "layer 'pos' (Positional)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "bad.py"]


@pytest.mark.slow  # the ONNX export fixture: ~8 s; .ci/run runs it
def test_exporting_an_onnx_file_is_exit_2(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(exported[1]), "--out", str(tmp_path / "again.onnx")]) == 2
    assert "already an ONNX file" in capsys.readouterr().err


def _bare_onnx(path: Path) -> Path:
    """An identity ONNX model made with onnx's own helpers, without a tilenet spec."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_an_onnx_file_without_a_spec_is_refused(tmp_path: Path) -> None:
    bare = _bare_onnx(tmp_path / "bare.onnx")
    with pytest.raises(CheckpointError, match=r"bare\.onnx: ONNX file without a tilenet model"):
        load_model(bare)
    with pytest.raises(CheckpointError, match=r"missing\.onnx: ONNX model not found"):
        load_model(tmp_path / "missing.onnx")


def test_without_onnxruntime_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = _bare_onnx(tmp_path / "bare.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ModelError, match=r'pip install "tilenet\[export\]"'):
        OnnxModel(bare)


@pytest.mark.slow  # the ONNX export fixture: ~8 s; .ci/run runs it
def test_exported_spec_is_json_in_the_metadata(exported: tuple[Path, Path]) -> None:
    import onnx

    proto = onnx.load(str(exported[1]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[SPEC_KEY])["name"] == "tiny"


# -- the demo U-Net and torch.compile (slow: export and compilation take tens of seconds) -------
def _infer(model: Path, img: Path, out: Path, *extra: str) -> np.ndarray:
    argv = ["infer", str(img), "--model", str(model), "--out", str(out), "--tile", "256"]
    argv += ["--device", "cpu", "--quiet", "--probabilities-dtype", "float32"]
    assert main([*argv, "--outputs", "probabilities", *extra]) == 0
    return np.asarray(zarr.open_group(out / "probabilities.ome.zarr", mode="r")["0"][:])


@pytest.mark.slow
def test_demo_unet_onnx_and_compile_through_the_engine_equal_eager(tmp_path: Path) -> None:
    """The demo config's exact U-Net (depth 3, base 16): `tilenet export`, then `infer` with
    the .onnx and with --compile, each within 1e-4 of the eager checkpoint."""
    ckpt = _checkpoint(tmp_path / "unet.pt", "unet", depth=3, base=16)
    rng = np.random.default_rng(1)
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, rng.integers(0, 256, (300, 270, 3), np.uint8), tile=(64, 64))
    onnx_path = tmp_path / "unet.onnx"
    assert main(["export", str(ckpt), "--out", str(onnx_path)]) == 0
    eager = _infer(ckpt, img, tmp_path / "eager")
    assert float(np.abs(_infer(onnx_path, img, tmp_path / "onnx") - eager).max()) <= TOL
    compiled = _infer(ckpt, img, tmp_path / "compiled", "--compile")
    assert float(np.abs(compiled - eager).max()) <= TOL


@pytest.mark.gpu
def test_onnx_parity_on_cuda(exported: tuple[Path, Path]) -> None:
    """On a GPU: onnxruntime's CUDA provider (onnxruntime-gpu) against the torch model there."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (pip install onnxruntime-gpu)")
    ckpt, path = exported
    torch_model, _ = load_model(ckpt, device="cuda")
    onnx_model, _ = load_onnx(path, device="cuda")
    assert onnx_model.providers[0] == "CUDAExecutionProvider"
    for shape in ((1, 3, 64, 64), (4, 3, 256, 192)):
        x = torch.randn(*shape, device="cuda")
        with torch.no_grad():
            want = torch_model(x)
        got = onnx_model(x)
        assert got.device == x.device
        assert float((got - want).abs().max()) <= TOL
