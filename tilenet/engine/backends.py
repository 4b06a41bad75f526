"""Ways to run a model other than eager torch: an ONNX file, ``torch.compile``.

:class:`OnnxModel` runs an ONNX file written by ``tilenet export`` through onnxruntime and
looks like the torch model to the :class:`~tilenet.engine.predictor.Predictor`: a
``torch.nn.Module`` taking a (B, C, H, W) float tensor and returning (B, K, H, W) logits on
the input's device. The file carries the model spec as JSON in its metadata
(:data:`SPEC_KEY`), so ``tilenet infer --model model.onnx`` needs nothing else.
:func:`compile_model` wraps a module in ``torch.compile`` with one-line errors.

onnxruntime is imported only when an ONNX file is opened; without it the error says
``pip install "tilenet[export]"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tilenet.errors import CheckpointError, ModelError, one_line
from tilenet.models.spec import ModelSpec

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "EXPORT_EXTRA",
    "FORMAT_KEY",
    "ONNX_FORMAT",
    "SPEC_KEY",
    "OnnxModel",
    "compile_model",
    "import_optional",
    "load_onnx",
]

#: ONNX ``metadata_props`` keys: the file's layout tag and the model spec (JSON).
FORMAT_KEY = "tilenet.format"
SPEC_KEY = "tilenet.spec"
ONNX_FORMAT = "tilenet-onnx/1"
#: What to install for export and ONNX inference.
EXPORT_EXTRA = 'pip install "tilenet[export]"'


def import_optional(name: str, *, why: str) -> Any:
    """Import ``name`` (onnx, onnxruntime, onnxscript), or one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ModelError(f"{why} needs the {name} package: {EXPORT_EXTRA}") from None


def _providers(ort: Any, device: torch.device) -> list[str]:
    """CUDA first where the model's device is a GPU and onnxruntime has it; CPU always."""
    available = set(ort.get_available_providers())
    chosen = []
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    return [*chosen, "CPUExecutionProvider"]


def _session(path: Path, device: torch.device) -> onnxruntime.InferenceSession:
    ort = import_optional("onnxruntime", why=f"{path}: running an ONNX model")
    opts = ort.SessionOptions()
    # The torch thread count is the process's (`--threads`, cores/N per dask worker).
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: its warnings are not one line
    try:
        return ort.InferenceSession(str(path), opts, providers=_providers(ort, device))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable ONNX model: {one_line(exc)[:200]}") from None


class OnnxModel(torch.nn.Module):
    """An ONNX file as a module: float (B, C, H, W) in, (B, K, H, W) logits out.

    The tensor goes to the host as float32 numpy (contiguous NCHW), through the session, and
    back to the input's device. ``providers`` are what onnxruntime runs it with.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device = "cpu"):
        super().__init__()
        self.path = Path(path)
        self.target = torch.device(device)
        self.session = _session(self.path, self.target)
        self.input_name = self.session.get_inputs()[0].name
        self.providers: list[str] = list(self.session.get_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.spec = _spec_of(self.path, meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out, *_) = self.session.run(None, {self.input_name: arr})
        return torch.from_numpy(out).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModel:
        # A session cannot be copied; a new one on the same file is the same model.
        return OnnxModel(self.path, device=self.target)

    def to(self, *args: Any, **kwargs: Any) -> OnnxModel:
        """Devices move the session's provider choice; memory formats mean nothing here."""
        device = args[0] if args and isinstance(args[0], str | torch.device) else None
        device = kwargs.get("device", device)
        if device is not None and torch.device(device).type != self.target.type:
            return OnnxModel(self.path, device=device)
        return self


def _spec_of(path: Path, meta: dict[str, str]) -> ModelSpec:
    if meta.get(FORMAT_KEY) != ONNX_FORMAT or SPEC_KEY not in meta:
        raise CheckpointError(
            f"{path}: ONNX file without a tilenet model spec; write it with `tilenet export`"
        )
    try:
        return ModelSpec.from_dict(json.loads(meta[SPEC_KEY]))
    except (ValueError, ModelError) as exc:
        raise CheckpointError(f"{path}: bad tilenet model spec: {one_line(exc)[:200]}") from None


def load_onnx(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[OnnxModel, ModelSpec]:
    """An ONNX file written by ``tilenet export``: (model, the spec it carries)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: ONNX model not found")
    model = OnnxModel(p, device=device)
    return model, model.spec


class _Compiled(torch.nn.Module):
    """``torch.compile`` of a module; a compiler failure is one line naming the model."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.inner = module
        self.name = name
        self.compiled = torch.compile(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._dynamo.exc import TorchDynamoException

        try:
            return self.compiled(x)
        except TorchDynamoException as exc:
            first = one_line(exc, typed=False).strip()
            raise ModelError(
                f"model {self.name!r}: torch.compile failed ({first[:200]}); run without --compile"
            ) from None


def compile_model(module: torch.nn.Module, *, name: str = "model") -> torch.nn.Module:
    """``module`` through ``torch.compile`` (compiled at its first call); idempotent.

    An ONNX model is returned as it is: onnxruntime optimises its own graph.
    """
    if isinstance(module, _Compiled | OnnxModel):
        return module
    return _Compiled(module, name)
