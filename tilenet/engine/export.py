"""Export a checkpoint's model to ONNX or TorchScript with dynamic batch, height and width.

``tilenet export CHECKPOINT --format onnx --out model.onnx`` (:func:`export_model`):

1. The model is captured by ``torch.export`` with the batch, height and width marked
   ``Dim.DYNAMIC`` on an example input (2 x C x 5·stride x 7·stride), and the captured
   program is run once at another batch and size (3 x C x 9·stride x 4·stride). A model
   whose code bakes a size into the graph (a fixed-size parameter added to the input, a
   ``view`` or a branch on sizes read from ``x.shape`` as Python ints, ...) fails one of
   the two (or specialises a dimension), and is refused: one line naming the checkpoint
   and the layer (the innermost module whose ``forward`` is on the failing stack, else
   the child that fails the same test alone on the inputs it got in an eager run).
2. ONNX: the exported program goes through torch's dynamo ONNX exporter (onnxscript); an
   op without an ONNX translation is refused naming the op and its layer. The model spec
   goes into ``metadata_props`` as JSON (:data:`~tilenet.engine.backends.SPEC_KEY`), so
   ``tilenet infer --model model.onnx`` runs it through onnxruntime with nothing else.
   TorchScript: ``torch.jit.trace`` of the same model, the spec as the extra file
   ``tilenet_spec.json``.
3. The file written under a temporary name is run on two input sizes (onnxruntime, CPU
   provider; or the traced module) against the torch model; a difference above ``tol``
   refuses the export, else the file is renamed into place.

Why these exporters (torch 2.14): the TorchScript-based ONNX exporter (``dynamo=False``)
is deprecated and, being a trace, bakes any size a model computes in Python without a
word; ``torch.export`` refuses it. ``torch.jit`` is deprecated too (FutureWarning), but a
TorchScript file is still what libtorch, Triton and DJL load; it is traced from a model
that ``torch.export`` has just shown to be size-generic, and checked at a second size.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tilenet.engine.backends import (
    FORMAT_KEY,
    ONNX_FORMAT,
    SPEC_KEY,
    import_optional,
    load_onnx,
)
from tilenet.engine.checkpoint import load_model
from tilenet.errors import InputError, ModelError, one_line
from tilenet.fsutil import atomic_output
from tilenet.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = ["FORMATS", "SPEC_FILE", "ExportResult", "export_model", "export_module"]

ExportFormat = Literal["onnx", "torchscript"]
FORMATS: tuple[ExportFormat, ...] = ("onnx", "torchscript")
#: The extra file of a TorchScript export holding the model spec (JSON).
SPEC_FILE = "tilenet_spec.json"
#: Names of the exported graph's input and output, and the input's axes.
INPUT, OUTPUT, AXES = "image", "logits", ("batch", "channels", "height", "width")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how close it is to the torch model."""

    path: Path
    format: ExportFormat
    #: max |exported - torch| of the logits over the check inputs (two sizes).
    max_abs_diff: float
    #: The check inputs' shapes.
    checked: tuple[tuple[int, ...], ...]
    seconds: float


def export_model(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: ExportFormat = "onnx",
    tol: float = 1e-4,
) -> ExportResult:
    """Export ``checkpoint``'s model to ``out`` (dynamic batch, height, width); see module doc.

    Raises :class:`~tilenet.errors.ModelError` (one line naming the checkpoint and the
    layer) for a model that cannot export with dynamic sizes or that differs by more than
    ``tol`` from the torch model on the check inputs.
    """
    if Path(checkpoint).suffix.lower() == ".onnx":
        raise InputError(f"{checkpoint}: already an ONNX file; export a .pt checkpoint")
    t0 = time.perf_counter()
    module, spec = load_model(checkpoint)
    result = export_module(module, spec, out, format=format, tol=tol, name=str(checkpoint))
    return dataclasses.replace(result, seconds=time.perf_counter() - t0)


def export_module(
    module: torch.nn.Module,
    spec: ModelSpec | dict[str, Any],
    out: str | os.PathLike[str],
    *,
    format: ExportFormat = "onnx",
    tol: float = 1e-4,
    name: str | None = None,
) -> ExportResult:
    """:func:`export_model` of a model in memory (copied, never changed) with its ``spec``;
    errors name it ``name`` (default: the spec's model name)."""
    import torch

    if format not in FORMATS:
        raise InputError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    t0 = time.perf_counter()
    spec = ModelSpec.coerce(spec)
    name = name or spec.name
    module = copy.deepcopy(module).float().eval()
    example, second = _inputs(spec)
    with torch.no_grad():
        program = _capture(module, example, second, name=name)
        expected = [module(x).numpy() for x in (example, second)]
    with atomic_output(out) as tmp:
        if format == "onnx":
            run = _write_onnx(program, spec, tmp, name=name)
        else:
            run = _write_torchscript(module, spec, tmp)
        diff = max(
            float(abs(run(x) - e).max()) for x, e in zip((example, second), expected, strict=True)
        )
        if not diff <= tol:
            raise ModelError(
                f"{name}: the {format} export differs from the torch model by {diff:.3g} "
                f"(above {tol:g}); not written"
            )
    return ExportResult(
        Path(out),
        format,
        diff,
        (tuple(example.shape), tuple(second.shape)),
        time.perf_counter() - t0,
    )


def _inputs(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The capture input and a second check input of another batch and size.

    Sizes are stride multiples far from round numbers (5 and 7 strides), so a size a model
    bakes in rarely matches them by chance and the failure shows where it happens.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    s, c = spec.stride, spec.in_channels
    return (
        torch.randn(2, c, 5 * s, 7 * s, generator=g),
        torch.randn(3, c, 9 * s, 4 * s, generator=g),
    )


def _dynamic(x: torch.Tensor) -> dict[int, Any]:
    """Batch, height and width of a (B, C, H, W) tensor as dynamic (sizes 0/1 stay static)."""
    from torch.export import Dim

    return {d: Dim.DYNAMIC for d in (0, 2, 3) if x.ndim == 4 and x.shape[d] > 1}


def _capture(
    module: torch.nn.Module, example: torch.Tensor, second: torch.Tensor, *, name: str
) -> Any:
    """``torch.export`` with dynamic batch/height/width, run once more at the ``second``
    size (a guard the capture assumed fails there), or a refusal naming the layer."""
    try:
        return _export_dynamic(module, [(example,), (second,)])
    except Exception as exc:
        layer = _layer_in_traceback(module, exc) or _layer_by_parts(module, [example, second])
        raise ModelError(
            f"{name}: cannot export with dynamic batch/height/width: layer {layer}: {_why(exc)}"
        ) from None


def _export_dynamic(module: torch.nn.Module, argsets: Sequence[Sequence[Any]]) -> Any:
    """The exported program of ``module`` on ``argsets[0]`` (B, H, W of 4-d tensors
    dynamic), checked to run on the other argument sets; raises what fails."""
    import torch

    shapes = tuple(_dynamic(a) or None for a in argsets[0])
    program = torch.export.export(module, tuple(argsets[0]), dynamic_shapes=shapes, strict=False)
    with torch.no_grad():
        for args in argsets[1:]:
            program.module()(*args)
    return program


def _why(exc: BaseException) -> str:
    """The first informative line of an export error, shortened."""
    import re

    text = str(exc)
    if m := re.search(r"specialized it to be a constant \((\d+)\)", text):
        return f"its code fixes a size to {m.group(1)} (a Python int or branch on x.shape?)"
    if m := re.search(r"Guard failed: (.+)", text):
        return f"its code assumes {m.group(1).strip()} (a Python int or branch on x.shape?)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


def _describe(name: str, module: torch.nn.Module) -> str:
    return f"{name or '<model>'!r} ({type(module).__name__})"


def _layer_in_traceback(root: torch.nn.Module, exc: BaseException) -> str | None:
    """The innermost module whose ``forward`` is on the failing stack (non-strict export
    runs the model's Python code), or None when the error came after tracing."""
    modules = {id(m): (n, m) for n, m in root.named_modules()}
    found: str | None = None
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            me = id(tb.tb_frame.f_locals.get("self"))
            if tb.tb_frame.f_code.co_name == "forward" and me in modules:
                found = _describe(*modules[me])
            tb = tb.tb_next
        if found is not None:
            return found
        err = err.__cause__ or err.__context__
    return None


def _layer_by_parts(root: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> str:
    """Export each child alone on the inputs it gets in eager runs of ``inputs``; descend
    into the first that fails; the module none of whose children fail is the layer."""
    import torch

    seen: dict[str, list[tuple[Any, ...]]] = {}
    hooks = []
    for name, m in root.named_modules():

        def keep(mod: Any, args: tuple[Any, ...], name: str = name) -> None:
            calls = seen.setdefault(name, [])
            if len(calls) < len(inputs):  # the first call per run (a reused module: once)
                calls.append(args)

        hooks.append(m.register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for x in inputs:
                root(x)
    except Exception:
        pass  # the children seen before the failure are enough
    finally:
        for h in hooks:
            h.remove()
    name, module = "", root
    while True:
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            argsets = seen.get(full)
            if argsets and not _exports(child, argsets):
                name, module = full, child
                break
        else:
            return _describe(name, module)


def _exports(module: torch.nn.Module, argsets: Sequence[Sequence[Any]]) -> bool:
    """Whether ``module`` exports with dynamic batch/height/width (tensor arguments only)."""
    import torch

    if not all(isinstance(a, torch.Tensor) for args in argsets for a in args):
        return True  # nothing to learn from it alone
    try:
        _export_dynamic(module, argsets)
    except Exception:
        return False
    return True


def _write_onnx(program: Any, spec: ModelSpec, path: Path, *, name: str) -> Callable[[Any], Any]:
    """The exported program as ONNX at ``path`` with the spec; returns a runner of the file."""
    import torch

    for pkg in ("onnx", "onnxscript", "onnxruntime"):
        import_optional(pkg, why="exporting to ONNX")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, dynamo=True, input_names=[INPUT], output_names=[OUTPUT], verbose=False
            )
    except Exception as exc:
        raise ModelError(f"{name}: {_onnx_failure(program, exc)}") from None
    assert onnx_program is not None
    proto = onnx_program.model_proto
    _name_axes(proto)
    del proto.metadata_props[:]
    for key, value in ((FORMAT_KEY, ONNX_FORMAT), (SPEC_KEY, json.dumps(spec.to_dict()))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path.write_bytes(proto.SerializeToString())
    model, _ = load_onnx(path)
    return lambda x: model(x).numpy()


def _name_axes(proto: Any) -> None:
    """Call the input's dynamic axes batch/height/width (the exporter names them s0, s1...),
    and the output's batch axis alike."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    rename = {d.dim_param: AXES[i] for i, d in enumerate(dims) if d.dim_param}
    for value in (*proto.graph.input, *proto.graph.output):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _onnx_failure(program: Any, exc: BaseException) -> str:
    """'no ONNX translation for aten.X in layer L' from a conversion error, else its line."""
    import re

    err: BaseException | None = exc
    while err is not None:
        m = re.search(r"translating node %(\w+)", str(err))
        if m:
            for node in program.graph.nodes:
                if node.name == m.group(1):
                    stack = list((node.meta.get("nn_module_stack") or {}).values())
                    path, cls = stack[-1] if stack else ("", "")
                    layer = f"{path or '<model>'!r} ({str(cls).rsplit('.', 1)[-1]})"
                    return f"cannot export to ONNX: no ONNX translation of {node.target} in layer {layer}"
        err = err.__cause__
    return f"cannot export to ONNX: {one_line(exc)[:200]}"


def _write_torchscript(
    module: torch.nn.Module, spec: ModelSpec, path: Path
) -> Callable[[Any], Any]:
    """``torch.jit.trace`` of ``module`` at ``path`` with the spec; returns the traced module."""
    import torch

    example, _ = _inputs(spec)
    with warnings.catch_warnings():
        # jit is deprecated (FutureWarning), and the trace warns about the size checks of
        # TileModel.forward, which only raise: torch.export has shown the graph generic.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={SPEC_FILE: json.dumps(spec.to_dict())})
        loaded = torch.jit.load(str(path))

    def run(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return loaded(x).numpy()

    return run
