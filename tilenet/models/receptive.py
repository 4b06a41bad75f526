"""Analytic stride, receptive field and activation memory, computed from a model's layers.

The model's ``_forward_impl`` is traced with :mod:`torch.fx` and its tensor shapes recorded
once at a small stride-aligned size (:class:`~torch.fx.passes.shape_prop.ShapeProp`). Then,
per spatial axis, every feature map gets a *jump* ``J`` (input pixels per feature position)
and a dependency interval ``[a, b]``: feature position ``q`` depends only on input pixels
``q*J + a .. q*J + b``. Each layer maps ``(J, a, b)`` exactly; for a conv with kernel ``k``,
stride ``s``, padding ``p`` and dilation ``d``::

    J' = s*J,  a' = a - p*J,  b' = b + (d*(k-1) - p)*J

Skips (``cat``, ``+``) take the union. Every interval is also widened to hold the position's
own cell ``[0, J'-1]``: then, when an output pixel's interval lies inside a tile, every
feature position it reads at every level lies inside that tile's feature map, so it never
reads zero padding (or a clamped bilinear neighbour) that the whole image would not. This is
what makes crop-mode tiled inference with ``halo = ceil_to(receptive_field, stride)`` exact.

An operation the analysis does not know raises :class:`~tilenet.errors.ModelError` rather
than guess. A *global* operation (adaptive pooling, a mean over H and W, a LayerNorm over
spatial dimensions, a reshape merging H and W: squeeze-and-excitation, pyramid pooling,
ASPP's image pooling, attention over all positions) makes a map whose values depend on the
whole input; its map is left out of the intervals (the
receptive field is that of the local paths) and the operation is listed in
:attr:`Analysis.global_ops`, so :func:`exactness` reports the model as not exact. Channels-last
layouts (``permute``, as ConvNeXt's blocks do) are followed: a LayerNorm or Linear over the
channels acts on each pixel separately, so it stays exact.

A finite receptive field is not enough when a layer computes statistics over the whole input
(GroupNorm, InstanceNorm, ...): the layers are local, their statistics are not.
:func:`exactness` is the one check for that.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from tilenet.errors import InputError, ModelError

__all__ = [
    "BYTES_PER_ELEMENT",
    "Analysis",
    "TraceRoot",
    "analyze",
    "exactness",
    "model_memory",
]

#: Activation bytes per element under each precision (autocast keeps activations in 16 bits).
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}

# Layers that act on each pixel separately (or are the identity in space).
_POINTWISE_MODULES = (
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,  # spatially global statistics: flagged by exactness(), not here
    nn.InstanceNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Mish,
    nn.Hardtanh,
    nn.Softmax,
    nn.LogSoftmax,
)
_POINTWISE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.cat,
    torch.concat,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.leaky_relu,
    F.dropout,
    F.softmax,
    F.log_softmax,
    F.batch_norm,  # running statistics at inference; exactness() checks the modules
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    torch.sigmoid_,
}
_POINTWISE_METHODS = {
    "add",
    "add_",
    "mul",
    "mul_",
    "relu",
    "relu_",
    "sigmoid",
    "contiguous",
    "clone",
    "float",
    "half",
    "to",
    "type_as",
    "softmax",
    "sigmoid_",
    "permute",  # a view: the spatial axes are followed (channels-last blocks)
    "div",
    "sub",
}
# Outputs that share storage with an input (no new memory).
_ALIAS_METHODS = {"contiguous", "to", "type_as", "float", "add_", "mul_", "relu_", "sigmoid_"}
_ADAPTIVE_FUNCTIONS = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
_CONSTANT_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}
_NORMALISING = ("LayerNorm over H, W", "layer_norm over H, W")
_REDUCE_METHODS = {"mean", "sum", "amax", "max", "std", "var"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
# Reshapes: one that merges H and W (MAnet's attention over all positions) is global.
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}

# A (y, x) pair of intervals, or None for a map whose values depend on the whole input.
_State = tuple["_Axis", "_Axis"] | None


@dataclass(frozen=True)
class _Axis:
    """Jump and dependency interval of a feature map along one axis."""

    jump: Fraction
    lo: Fraction
    hi: Fraction

    def cell(self) -> _Axis:
        """Widen to the position's own cell ``[0, J-1]`` (see module docstring)."""
        return _Axis(self.jump, min(self.lo, Fraction(0)), max(self.hi, self.jump - 1))


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` finds.

    ``interval`` is ``((lo_y, hi_y), (lo_x, hi_x))``: output pixel ``p`` depends on input
    pixels ``p+lo .. p+hi``. ``receptive_field`` is the radius ``max(-lo, hi)`` over both axes.
    ``activations`` lists, in execution order, ``(elements per input pixel, index of the last
    activation computed before it is freed, alias)`` for every tensor the forward pass creates.
    """

    stride: int
    receptive_field: int
    interval: tuple[tuple[int, int], tuple[int, int]]
    activations: tuple[tuple[float, int, bool], ...]
    output_per_pixel: float
    input_per_pixel: float
    #: Global operations (``"<op> at <module path>"``), in execution order; see module doc.
    global_ops: tuple[str, ...] = ()
    #: Paths of the layers the forward pass calls (an unused classifier's pooling is not).
    called: frozenset[str] = frozenset()


# Layers that pool over the whole input, or attend across positions.
_GLOBAL_LAYERS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.MultiheadAttention,
)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _global_at_inference(m: nn.Module, traced: bool) -> bool:
    """Whether ``m`` in eval mode mixes values across spatial positions of one input."""
    if isinstance(m, (*_GLOBAL_LAYERS, nn.GroupNorm)):
        return True
    if isinstance(m, nn.LayerNorm):
        # Its normalized_shape may cover spatial dimensions (NCHW); without a trace we cannot
        # tell a channels-last one apart, so it counts as global. With one, analyze() decides.
        return not traced
    if isinstance(m, _INSTANCE_NORMS + _BATCH_NORMS):
        # Both use running statistics at inference when they track them; else the input's own.
        return not m.track_running_stats
    return False


def exactness(module: nn.Module) -> tuple[bool, str | None]:
    """Whether crop-mode tiling of ``module`` can reproduce a whole-image pass exactly.

    Returns ``(True, None)``, or ``(False, reason)`` with the reason naming the first layer
    whose output at a pixel depends on statistics over the whole input at inference (eval
    mode) and its module path: global (adaptive) pooling, attention, GroupNorm, LayerNorm,
    InstanceNorm or BatchNorm without running statistics. A tile then sees other statistics
    than the whole image. LocalResponseNorm mixes channels only, so it is exact. Functional
    calls (``F.adaptive_avg_pool2d``, ``x.mean((2, 3))``) are seen only in a registered
    model's traced :class:`Analysis` (its ``analysis`` attribute), which also tells whether
    each LayerNorm is over channels only (exact). A module with ``per_pixel_norm = False`` is
    taken at its word.

    >>> exactness(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    (True, None)
    >>> exactness(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.GroupNorm(2, 8))))
    (False, 'GroupNorm at 1.0')
    """
    traced = getattr(module, "analysis", None)
    an = traced if isinstance(traced, Analysis) else None
    found = [
        (path, m)
        for path, m in module.named_modules()
        if _global_at_inference(m, an is not None) and (an is None or path in an.called)
    ]
    if not found and an is not None and an.global_ops:
        more = f" (and {len(an.global_ops) - 1} more)" if len(an.global_ops) > 1 else ""
        return False, f"{an.global_ops[0]}{more}: global over the input"
    if found:
        path, m = found[0]
        more = f" (and {len(found) - 1} more such layers)" if len(found) > 1 else ""
        stats = " without running statistics" if isinstance(m, _BATCH_NORMS) else ""
        return False, f"{type(m).__name__}{stats} at {path or 'the top level'}{more}"
    if getattr(module, "per_pixel_norm", None) is False:
        return False, f"{type(module).__name__} declares per_pixel_norm=False"
    return True, None


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def _conv(ax: _Axis, k: int, s: int, p: int, d: int) -> _Axis:
    j = ax.jump
    return _Axis(j * s, ax.lo - p * j, ax.hi + (d * (k - 1) - p) * j).cell()


def _transposed(ax: _Axis, k: int, s: int, p: int, d: int) -> _Axis:
    # Output i reads input m with i = s*m - p + d*t: m in [(i+p-d(k-1))/s, (i+p)/s].
    j = ax.jump / s
    return _Axis(j, ax.lo + (p - d * (k - 1)) * j, ax.hi + p * j).cell()


def _upsample(ax: _Axis, s: int, mode: str, align_corners: bool | None) -> _Axis:
    j = ax.jump / s
    if mode == "nearest":
        offs = [(math.floor(r / s), math.floor(r / s)) for r in range(s)]
    elif mode == "bilinear" and align_corners:
        # Source i*(n-1)/(s*n-1) lies in [i/s - (s-1)/s, i/s]: output s*q + r reads q-1..q+1.
        # Where exactly depends on the image size: analyze() lists it as a global operation.
        offs = [(-1, 1)] * s
    elif mode == "bilinear":
        # Source coordinate (i + 0.5)/s - 0.5 reads floor(src) and floor(src) + 1; with
        # i = s*n + r that is n + floor((r + 0.5)/s - 0.5) (+1). Shift by s -> shift by 1.
        offs = []
        for r in range(s):
            f = math.floor(Fraction(2 * r + 1, 2 * s) - Fraction(1, 2))
            offs.append((f, f + 1))
    else:
        raise ModelError(
            f"receptive field: upsampling mode {mode!r} (align_corners={align_corners}) "
            "is not shift-equivariant; use nearest or bilinear with align_corners=False"
        )
    lo = min(f0 * ax.jump - r * j for r, (f0, _) in enumerate(offs))
    hi = max(f1 * ax.jump - r * j for r, (_, f1) in enumerate(offs))
    return _Axis(j, ax.lo + lo, ax.hi + hi).cell()


def _union(axes: list[tuple[_Axis, _Axis]], what: str) -> tuple[_Axis, _Axis]:
    out = []
    for i in range(2):
        js = {a[i].jump for a in axes}
        if len(js) != 1:
            raise ModelError(f"receptive field: {what} joins maps of different strides {js}")
        out.append(_Axis(axes[0][i].jump, min(a[i].lo for a in axes), max(a[i].hi for a in axes)))
    return (out[0], out[1])


class TraceRoot(nn.Module):
    """What :mod:`torch.fx` traces: ``model._forward_impl`` (the forward pass without input
    checks), with the model's layers under ``m.`` (setting a layer here sets it in ``model``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.m._forward_impl(x)  # type: ignore[operator]


def _spatial(node: fx.Node, layout: tuple[int, int] = (2, 3)) -> tuple[int, int] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) <= max(3, *layout):
        return None
    return (int(meta.shape[layout[0]]), int(meta.shape[layout[1]]))


def _where(node: fx.Node) -> str:
    """The module path a graph node was traced in (``m.`` of TraceRoot dropped)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.keys()), "") if stack else ""
    path = str(path).removeprefix("m.")
    return path or "the top level"


def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    """Argument ``i`` (or keyword ``key``) of a graph node, as traced."""
    return node.kwargs.get(key, node.args[i] if len(node.args) > i else default)


def _ndim(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else 0


def _dims(node: fx.Node, ndim: int) -> set[int] | None:
    """The dims a reduction reduces over (None: all)."""
    dim = _arg(node, 1, "dim")
    if dim is None:
        return None
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return {int(d) % ndim for d in dims}


def _global_op(node: fx.Node, modules: dict[str, nn.Module], layout: tuple[int, int]) -> str:
    """A description when ``node`` reduces over the spatial axes, else ``""``."""
    what = ""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, _GLOBAL_LAYERS):
            what = type(mod).__name__
        elif isinstance(mod, nn.LayerNorm):
            if set(layout) & set(range(4 - len(mod.normalized_shape), 4)):
                what = "LayerNorm over H, W"
    elif node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        what = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_function" and node.target is F.layer_norm:
        shape = _arg(node, 1, "normalized_shape", ())
        n = len(shape) if isinstance(shape, list | tuple) else 1
        if set(layout) & set(range(4 - n, 4)):
            what = "layer_norm over H, W"
    elif (node.op == "call_method" and node.target in _REDUCE_METHODS) or (
        node.op == "call_function" and node.target in _REDUCE_FUNCTIONS
    ):
        dims = _dims(node, _ndim(node.all_input_nodes[0]))
        if dims is None or dims & set(layout):
            what = f"{getattr(node.target, '__name__', node.target)} over H, W"
    elif (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    ):
        if _spatial(node, layout) != _spatial(node.all_input_nodes[0], layout):
            what = "a reshape merging H, W (attention over all positions)"
    return f"{what} at {_where(node)}" if what else ""


def _permuted(node: fx.Node, layout: tuple[int, int]) -> tuple[int, int]:
    args: Any = node.args[1:] if len(node.args) > 2 else node.args[1]
    dims = [int(d) for d in args]
    dims = [d % len(dims) for d in dims]
    return (dims.index(layout[0]), dims.index(layout[1]))


def _relayout(node: fx.Node, layout: tuple[int, int]) -> tuple[int, int] | None:
    """The spatial dims after a stack or a reduction over other dims; None if neither."""
    if node.op == "call_function" and node.target is torch.stack:
        dim = int(_arg(node, 1, "dim", 0)) % (_ndim(node.all_input_nodes[0]) + 1)
        return (layout[0] + (dim <= layout[0]), layout[1] + (dim <= layout[1]))
    if (node.op == "call_method" and node.target in _REDUCE_METHODS) or (
        node.op == "call_function" and node.target in _REDUCE_FUNCTIONS
    ):
        dims = _dims(node, _ndim(node.all_input_nodes[0])) or set()
        if _arg(node, 2, "keepdim", False):
            return layout
        return (
            layout[0] - sum(d < layout[0] for d in dims),
            layout[1] - sum(d < layout[1] for d in dims),
        )
    return None


def _numel(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    return math.prod(int(v) for v in meta.shape)


def analyze(model: nn.Module, *, size: int | None = None) -> Analysis:
    """Trace ``model`` and compute its stride, receptive field and activation sizes.

    ``model`` must define ``_forward_impl(x)`` (the forward pass without input checks) and
    ``in_channels``, and ``_stride_hint`` (its expected stride). ``size`` is the square trace
    size, rounded up to that stride; by default ``max(64, 2 * stride)``.
    """
    in_ch = int(model.in_channels)  # type: ignore[arg-type]
    hint = int(getattr(model, "_stride_hint", 32))
    size = size or max(64, 2 * hint)
    size = -(-size // hint) * hint
    # Traced in eval mode: training-only branches (drop path) are not what inference runs.
    was_training = model.training
    model.eval()
    try:
        gm = fx.symbolic_trace(TraceRoot(model))
    except Exception as exc:
        model.train(was_training)
        raise ModelError(f"receptive field: cannot trace {type(model).__name__}: {exc}") from None
    try:
        # ShapeProp prints a traceback before raising: the one-line error below says it all.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(torch.zeros(1, in_ch, size, size))
    except Exception as exc:
        cause = exc.__cause__ or exc
        first = (str(cause).splitlines() or [type(cause).__name__])[0][:200]
        raise ModelError(
            f"receptive field: {type(model).__name__} fails on a {size}x{size} input: {first}"
        ) from None
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    state: dict[fx.Node, _State] = {}
    layouts: dict[fx.Node, tuple[int, int]] = {}
    global_ops: list[tuple[fx.Node, str]] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    acts: dict[fx.Node, list[Any]] = {}  # size, graph index, last user, alias
    px = size * size
    out_node: fx.Node | None = None
    for node in gm.graph.nodes:
        tensor_args = [a for a in node.all_input_nodes if a in state]
        if node.op == "placeholder":
            one = _Axis(Fraction(1), Fraction(0), Fraction(0))
            state[node] = (one, one)
            layouts[node] = (2, 3)
            acts[node] = [_numel(node) / px, order[node], _last(node, order), False]
            continue
        if node.op == "output":
            out_node = node
            continue
        if not tensor_args:
            continue  # shapes, constants
        if not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            continue  # x.shape and the like: not a feature map
        ins = [state[a] for a in tensor_args]
        layout = layouts[tensor_args[0]]
        layouts[node] = layout
        local = [i for i in ins if i is not None]
        desc = _global_op(node, modules, layout) if local else ""
        if desc:
            global_ops.append((node, desc))
        elif local and _aligned_corners(node, modules):
            global_ops.append((node, f"bilinear resize with align_corners=True at {_where(node)}"))
        if desc.startswith(_NORMALISING):
            # Like GroupNorm: each pixel keeps its own value, scaled by statistics over H, W.
            new = _union(local, str(node.target))
            state[node] = new
            acts[node] = [_numel(node) / px, order[node], _last(node, order), False]
            continue
        if node.op == "call_method" and node.target in _CONSTANT_METHODS:
            # A new tensor of zeros (smp's empty stand-in for a missing stride-2 feature):
            # it reads no input values, so it joins maps without widening their intervals.
            state[node] = None
            acts[node] = [_numel(node) / px, order[node], _last(node, order), False]
            continue
        if desc or not local:
            # Depends on the whole input; whatever is computed from it only (a gate, a
            # pooled branch) too. Its shape need not be a feature map's.
            state[node] = None
            acts[node] = [_numel(node) / px, order[node], _last(node, order), False]
            continue
        moved = _relayout(node, layout)
        if moved is not None:
            # A stack (FPN's merge) or a reduction over channels: each pixel on its own.
            layouts[node] = moved
            if _spatial(node, moved) is None:
                raise ModelError(f"receptive field: {node.format_node()} loses the H, W axes")
            new = _union(local, str(node.target))
            state[node] = new
            acts[node] = [_numel(node) / px, order[node], _last(node, order), False]
            continue
        if _spatial(node, layout) is None:
            raise ModelError(
                f"receptive field: {node.format_node()} does not keep a 4-D feature map"
            )
        if node.op == "call_method" and node.target == "permute":
            layouts[node] = _permuted(node, layout)
        elif layout != (2, 3) and not (
            _channel_op(node, modules, layout) or _elementwise(node, modules)
        ):
            raise ModelError(
                f"receptive field: {node.format_node()} on a permuted (channels-last) map "
                "is not supported"
            )
        elif len(local) < len(ins) and not _pointwise(node):
            raise ModelError(
                f"receptive field: {node.format_node()} mixes a global map into a layer"
            )
        if _channel_op(node, modules, layout):
            new, alias = local[0], False
        else:
            new, alias = _step(node, local, modules)
        state[node] = new
        acts[node] = [_numel(node) / px, order[node], _last(node, order), alias]
        if alias:
            # An in-place result shares its input's storage: keep that alive as long.
            root = tensor_args[0]
            while acts[root][3]:
                root = next(a for a in root.all_input_nodes if a in state)
            acts[root][2] = max(acts[root][2], acts[node][2])
    assert out_node is not None
    outs = [a for a in out_node.all_input_nodes if a in state]
    if len(outs) != 1:
        raise ModelError("receptive field: the model must return one tensor")
    final = state[outs[0]]
    if final is None:
        raise ModelError("receptive field: the output depends only on global operations")
    if final[0].jump != 1 or final[1].jump != 1 or _spatial(outs[0]) != (size, size):
        raise ModelError("receptive field: the output is not at the input's resolution")
    stride = 1
    # The stride counts the maps the output depends on: an encoder may compute deeper stages
    # that nothing reads (their floor division at odd sizes does not matter).
    live, todo = set(), [outs[0]]
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    jumps = {ax.jump for n in live if state.get(n) is not None for ax in state[n]}  # type: ignore[union-attr]
    for j in jumps:
        if j.denominator != 1:
            raise ModelError(f"receptive field: a feature map has a fractional stride {j}")
        stride = math.lcm(stride, int(j))
    bounds = tuple((math.floor(ax.lo), math.ceil(ax.hi)) for ax in final)
    rf = max(max(-lo, hi) for lo, hi in bounds)
    return Analysis(
        stride=stride,
        receptive_field=rf,
        interval=(bounds[0], bounds[1]),
        activations=_steps(list(acts.values())),
        output_per_pixel=_numel(outs[0]) / px,
        input_per_pixel=float(in_ch),
        global_ops=tuple(desc for n, desc in global_ops if n in live),
        called=frozenset(
            str(n.target).removeprefix("m.") for n in gm.graph.nodes if n.op == "call_module"
        ),
    )


def _aligned_corners(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An upsampling whose sampling positions depend on the image size (not shift-equivariant)."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        return isinstance(mod, nn.Upsample) and bool(mod.align_corners)
    if node.op == "call_function" and node.target is F.interpolate:
        return bool(_arg(node, 4, "align_corners"))
    return False


def _pointwise(node: fx.Node) -> bool:
    """Whether ``node`` combines its tensor inputs elementwise (a gate times a map)."""
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _POINTWISE_METHODS


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Identity)


def _elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Elementwise whatever the layout (no per-channel parameters on dim 1)."""
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], (*_ACTIVATIONS, nn.Dropout))
    return _pointwise(node)


def _channel_op(node: fx.Node, modules: dict[str, nn.Module], layout: tuple[int, int]) -> bool:
    """A Linear or LayerNorm over the last dim of a channels-last map: per pixel."""
    if layout == (2, 3) or 3 in layout:
        return False
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, nn.LayerNorm):
            return len(mod.normalized_shape) == 1
        return isinstance(mod, nn.Linear)
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = _arg(node, 1, "normalized_shape", ())
        return not isinstance(shape, list | tuple) or len(shape) == 1
    return node.op == "call_function" and node.target is F.linear


def _last(node: fx.Node, order: dict[fx.Node, int]) -> int:
    return max((order[u] for u in node.users), default=order[node])


def _steps(
    acts: list[list[Any]],
) -> tuple[tuple[float, int, bool], ...]:
    """Activations with their last user as an index into this list (when it is freed)."""
    where = [g for _, g, _, _ in acts]
    out = []
    for per, _, last, alias in acts:
        # The last user is the last tensor produced at or before it (or a non-tensor node).
        out.append((per, max(0, bisect.bisect_right(where, last) - 1), alias))
    return tuple(out)


def _step(
    node: fx.Node, ins: list[tuple[_Axis, _Axis]], modules: dict[str, nn.Module]
) -> tuple[tuple[_Axis, _Axis], bool]:
    """Map the input intervals through one graph node; also say whether it aliases."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        (y, x) = ins[0]
        if isinstance(mod, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            if isinstance(mod, nn.AvgPool2d) and mod.ceil_mode:
                raise ModelError("receptive field: AvgPool2d(ceil_mode=True) is not supported")
            # MaxPool2d(ceil_mode=True): the extra window at the edge reads what the interval
            # says inside the input and -inf beyond, like its padding.
            if isinstance(mod.padding, str):
                raise ModelError("receptive field: string padding ('same') is not supported")
            k, p = _pair(mod.kernel_size), _pair(mod.padding)
            s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
            d = _pair(getattr(mod, "dilation", 1))
            return (_conv(y, k[0], s[0], p[0], d[0]), _conv(x, k[1], s[1], p[1], d[1])), False
        if isinstance(mod, nn.ConvTranspose2d):
            k, s, p, d = (
                _pair(v) for v in (mod.kernel_size, mod.stride, mod.padding, mod.dilation)
            )
            return (
                _transposed(y, k[0], s[0], p[0], d[0]),
                _transposed(x, k[1], s[1], p[1], d[1]),
            ), False
        if isinstance(mod, nn.Upsample):
            return _interp(node, ins[0], mod.mode, mod.align_corners), False
        if isinstance(mod, _POINTWISE_MODULES):
            alias = bool(getattr(mod, "inplace", False))
            return ins[0], alias
        raise ModelError(
            f"receptive field: unsupported layer {type(mod).__name__} at {node.target!r}"
        )
    if node.op == "call_function":
        if node.target is F.interpolate:
            mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            ac = node.kwargs.get("align_corners", node.args[4] if len(node.args) > 4 else None)
            return _interp(node, ins[0], str(mode), None if ac is None else bool(ac)), False
        if node.target in _POINTWISE_FUNCTIONS:
            alias = node.target in (operator.iadd, operator.imul) or bool(
                node.kwargs.get("inplace", False)
            )
            return _union(ins, str(node.target)), alias
    if node.op == "call_method" and node.target in _POINTWISE_METHODS:
        return _union(ins, str(node.target)), node.target in _ALIAS_METHODS
    raise ModelError(f"receptive field: unsupported operation {node.format_node()}")


def _interp(
    node: fx.Node, ax: tuple[_Axis, _Axis], mode: str, align_corners: bool | None
) -> tuple[_Axis, _Axis]:
    src = _spatial(node.all_input_nodes[0])
    dst = _spatial(node)
    assert src is not None and dst is not None
    out = []
    for i in range(2):
        if dst[i] % src[i]:
            raise ModelError(
                f"receptive field: {node.name} resizes {src[i]} -> {dst[i]}, not an integer factor"
            )
        out.append(_upsample(ax[i], dst[i] // src[i], mode, align_corners))
    return (out[0], out[1])


def _parse_precision(precision: str) -> int:
    try:
        return BYTES_PER_ELEMENT[precision]
    except KeyError:
        raise InputError(
            f"precision {precision!r} is not one of {sorted(BYTES_PER_ELEMENT)}"
        ) from None


def model_memory(
    model: nn.Module,
    *,
    tile: int,
    batch: int = 1,
    precision: str = "fp32",
    training: bool = False,
) -> dict[str, Any]:
    """Estimate the device memory of one batch of ``tile`` x ``tile`` inputs, in bytes.

    Activations come from the traced graph (sizes exact, linear in ``batch * tile**2``):

    * inference (``no_grad``): the peak of the tensors alive at once, freeing each as soon
      as its last consumer has run (skip connections stay alive, as they do in PyTorch);
    * training: every activation is kept for backward; during backward each gradient is
      alive from its first use until its producer's backward has run, and each saved
      activation is freed once passed. The peak of that sum, plus the loss's log-softmax
      and its gradient.

    ``workspace_bytes`` allows for backend scratch buffers (one largest activation).
    ``state_bytes`` adds the weights (fp32), and for training their gradients and two AdamW
    moments. ``seed_rule_bytes`` is the seeds' rule of thumb, ``bytes * batch * Σ maps*H*W``
    over all activations, doubled for training.
    """
    bpe = _parse_precision(precision)
    stride = int(model.stride)  # type: ignore[arg-type]
    if tile <= 0 or tile % stride:
        raise InputError(f"tile {tile} must be a positive multiple of the model stride {stride}")
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}")
    an: Analysis = model.analysis  # type: ignore[assignment]
    px = batch * tile * tile
    sizes = [0.0 if alias else per * px * bpe for per, _, alias in an.activations]
    # The input tile itself stays fp32 (autocast casts a 16-bit copy for the first conv).
    sizes[0] = an.input_per_pixel * px * 4
    n = len(sizes)
    last_use = [max(i, last) for i, (_, last, _) in enumerate(an.activations)]
    # Forward: live set as tensors are produced and released.
    live, peak_fwd = 0.0, 0.0
    releases: dict[int, float] = {}
    for i in range(n):
        live += sizes[i]
        peak_fwd = max(peak_fwd, live)
        releases[last_use[i]] = releases.get(last_use[i], 0.0) + sizes[i]
        live -= releases.pop(i, 0.0)
    saved_total = sum(sizes)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = params * 4
    out_bytes = an.output_per_pixel * px * 4
    if training:
        # Backward in reverse order; activations 0..i are still saved at step i.
        prefix = [0.0] * (n + 1)
        for i in range(n):
            prefix[i + 1] = prefix[i] + sizes[i]
        full = [per * px * bpe for per, _, _ in an.activations]
        # The gradient of tensor j is alive from its last user's backward to its own.
        born = [0.0] * n
        for j in range(n):
            born[last_use[j]] += full[j]
        peak_bwd, grads = 0.0, 0.0
        for i in range(n - 1, -1, -1):
            grads += born[i]
            peak_bwd = max(peak_bwd, prefix[i + 1] + grads)
            grads -= full[i]
        activation = max(peak_bwd, saved_total) + 2 * out_bytes
        state = param_bytes * 4  # weights, gradients, two AdamW moments
    else:
        activation = peak_fwd
        state = param_bytes
    # Backends add scratch buffers (cuDNN workspaces, oneDNN reorders) that no graph shows;
    # allow one buffer the size of the largest activation.
    workspace = max(per * px * bpe for per, _, _ in an.activations)
    seed_rule = sum(per * px * bpe for per, _, _ in an.activations[1:]) * (2 if training else 1)
    return {
        "tile": tile,
        "batch": batch,
        "precision": precision,
        "training": training,
        "parameters": params,
        "param_bytes": param_bytes,
        "activation_bytes": int(activation),
        "workspace_bytes": int(workspace),
        "state_bytes": int(state),
        "total_bytes": int(activation + workspace + state),
        "seed_rule_bytes": int(seed_rule),
    }
