"""Per-axis dependency intervals, and how each traced operation maps them.

The rules :func:`tilenet.models.receptive.analyze` applies node by node: an :class:`Axis`
(jump and interval) per spatial axis; convolutions, pooling, transposed convolutions and
resizes map it exactly; pointwise operations and skips take the union; the sets below say
which layers and functions act per pixel, reduce over H and W (global) or merely alias.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from tilenet.errors import ModelError

__all__ = [
    "BATCH_NORMS",
    "CONSTANT_METHODS",
    "GLOBAL_LAYERS",
    "INSTANCE_NORMS",
    "NORMALISING",
    "Axis",
    "State",
    "aligned_corners",
    "channel_op",
    "global_op",
    "is_elementwise",
    "is_pointwise",
    "map_node",
    "node_arg",
    "node_ndim",
    "node_numel",
    "permuted_layout",
    "relayout",
    "spatial_dims",
    "union_of",
    "where_traced",
]

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
CONSTANT_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}
NORMALISING = ("LayerNorm over H, W", "layer_norm over H, W")
_REDUCE_METHODS = {"mean", "sum", "amax", "max", "std", "var"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
# Reshapes: one that merges H and W (MAnet's attention over all positions) is global.
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}

# A (y, x) pair of intervals, or None for a map whose values depend on the whole input.
State = tuple["Axis", "Axis"] | None


@dataclass(frozen=True)
class Axis:
    """Jump and dependency interval of a feature map along one axis."""

    jump: Fraction
    lo: Fraction
    hi: Fraction

    def cell(self) -> Axis:
        """Widen to the position's own cell ``[0, J-1]`` (see module docstring)."""
        return Axis(self.jump, min(self.lo, Fraction(0)), max(self.hi, self.jump - 1))


# Layers that pool over the whole input, or attend across positions.
GLOBAL_LAYERS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.MultiheadAttention,
)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


#: Padding layers: zeros, a constant, or edge pixels mirrored or repeated. The mirrored and
#: repeated values lie within the padding of the edge, inside the halo crop mode drops.
_PADS = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)


def _pad4(padding: Any) -> tuple[int, int, int, int]:
    """A 2-d padding as (left, right, top, bottom) (``F.pad`` order, last dim first)."""
    if isinstance(padding, int):
        return (padding,) * 4
    pad = tuple(int(v) for v in padding)
    if len(pad) == 2:
        return (pad[0], pad[1], 0, 0)
    if len(pad) < 4:
        raise ModelError(f"receptive field: padding {padding!r} is not a 2-d padding")
    return (pad[0], pad[1], pad[2], pad[3])


def _functional_window(node: fx.Node, ins: tuple[Axis, Axis]) -> tuple[Axis, Axis]:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (the kernel from the traced
    weight's shape: efficientnet's static-same-padding convs) and ``F.max_pool2d`` /
    ``F.avg_pool2d(x, kernel, stride, padding[, dilation])``."""
    if node.target in (F.conv2d, torch.conv2d):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        meta = getattr(weight, "meta", {}).get("tensor_meta")
        if meta is None:
            raise ModelError(f"receptive field: conv2d at {node.name!r} without a traced weight")
        k = (int(meta.shape[-2]), int(meta.shape[-1]))
        if isinstance(node_arg(node, 4, "padding", 0), str):
            raise ModelError("receptive field: string padding ('same') is not supported")
        s, p, d = (_pair(node_arg(node, i, n, v)) for i, n, v in
                   ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))  # fmt: skip
    else:
        k = _pair(node_arg(node, 1, "kernel_size", 1))
        s = _pair(node_arg(node, 2, "stride", None) or k)
        p = _pair(node_arg(node, 3, "padding", 0))
        d = _pair(node_arg(node, 4, "dilation", 1)) if node.target is F.max_pool2d else (1, 1)
    y, x = ins
    return _conv(y, k[0], s[0], p[0], d[0]), _conv(x, k[1], s[1], p[1], d[1])


def _conv(ax: Axis, k: int, s: int, p: int, d: int) -> Axis:
    j = ax.jump
    return Axis(j * s, ax.lo - p * j, ax.hi + (d * (k - 1) - p) * j).cell()


def _transposed(ax: Axis, k: int, s: int, p: int, d: int) -> Axis:
    # Output i reads input m with i = s*m - p + d*t: m in [(i+p-d(k-1))/s, (i+p)/s].
    j = ax.jump / s
    return Axis(j, ax.lo + (p - d * (k - 1)) * j, ax.hi + p * j).cell()


def _upsample(ax: Axis, s: int, mode: str, align_corners: bool | None) -> Axis:
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
    return Axis(j, ax.lo + lo, ax.hi + hi).cell()


def union_of(axes: list[tuple[Axis, Axis]], what: str) -> tuple[Axis, Axis]:
    out = []
    for i in range(2):
        js = {a[i].jump for a in axes}
        if len(js) != 1:
            raise ModelError(f"receptive field: {what} joins maps of different strides {js}")
        out.append(Axis(axes[0][i].jump, min(a[i].lo for a in axes), max(a[i].hi for a in axes)))
    return (out[0], out[1])


def spatial_dims(node: fx.Node, layout: tuple[int, int] = (2, 3)) -> tuple[int, int] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) <= max(3, *layout):
        return None
    return (int(meta.shape[layout[0]]), int(meta.shape[layout[1]]))


def where_traced(node: fx.Node) -> str:
    """The module path a graph node was traced in (``m.`` of TraceRoot dropped)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.keys()), "") if stack else ""
    path = str(path).removeprefix("m.")
    return path or "the top level"


def node_arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    """Argument ``i`` (or keyword ``key``) of a graph node, as traced."""
    return node.kwargs.get(key, node.args[i] if len(node.args) > i else default)


def node_ndim(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else 0


def _dims(node: fx.Node, ndim: int) -> set[int] | None:
    """The dims a reduction reduces over (None: all)."""
    dim = node_arg(node, 1, "dim")
    if dim is None:
        return None
    dims = dim if isinstance(dim, list | tuple) else [dim]
    return {int(d) % ndim for d in dims}


def global_op(node: fx.Node, modules: dict[str, nn.Module], layout: tuple[int, int]) -> str:
    """A description when ``node`` reduces over the spatial axes, else ``""``."""
    what = ""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, GLOBAL_LAYERS):
            what = type(mod).__name__
        elif isinstance(mod, nn.LayerNorm):
            if set(layout) & set(range(4 - len(mod.normalized_shape), 4)):
                what = "LayerNorm over H, W"
    elif node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        what = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_function" and node.target is F.layer_norm:
        shape = node_arg(node, 1, "normalized_shape", ())
        n = len(shape) if isinstance(shape, list | tuple) else 1
        if set(layout) & set(range(4 - n, 4)):
            what = "layer_norm over H, W"
    elif (node.op == "call_method" and node.target in _REDUCE_METHODS) or (
        node.op == "call_function" and node.target in _REDUCE_FUNCTIONS
    ):
        dims = _dims(node, node_ndim(node.all_input_nodes[0]))
        if dims is None or dims & set(layout):
            what = f"{getattr(node.target, '__name__', node.target)} over H, W"
    elif (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    ):
        if spatial_dims(node, layout) != spatial_dims(node.all_input_nodes[0], layout):
            what = "a reshape merging H, W (attention over all positions)"
    return f"{what} at {where_traced(node)}" if what else ""


def permuted_layout(node: fx.Node, layout: tuple[int, int]) -> tuple[int, int]:
    args: Any = node.args[1:] if len(node.args) > 2 else node.args[1]
    dims = [int(d) for d in args]
    dims = [d % len(dims) for d in dims]
    return (dims.index(layout[0]), dims.index(layout[1]))


def relayout(node: fx.Node, layout: tuple[int, int]) -> tuple[int, int] | None:
    """The spatial dims after a stack or a reduction over other dims; None if neither."""
    if node.op == "call_function" and node.target is torch.stack:
        dim = int(node_arg(node, 1, "dim", 0)) % (node_ndim(node.all_input_nodes[0]) + 1)
        return (layout[0] + (dim <= layout[0]), layout[1] + (dim <= layout[1]))
    if (node.op == "call_method" and node.target in _REDUCE_METHODS) or (
        node.op == "call_function" and node.target in _REDUCE_FUNCTIONS
    ):
        dims = _dims(node, node_ndim(node.all_input_nodes[0])) or set()
        if node_arg(node, 2, "keepdim", False):
            return layout
        return (
            layout[0] - sum(d < layout[0] for d in dims),
            layout[1] - sum(d < layout[1] for d in dims),
        )
    return None


def node_numel(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 0
    return math.prod(int(v) for v in meta.shape)


def aligned_corners(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An upsampling whose sampling positions depend on the image size (not shift-equivariant)."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        return isinstance(mod, nn.Upsample) and bool(mod.align_corners)
    if node.op == "call_function" and node.target is F.interpolate:
        return bool(node_arg(node, 4, "align_corners"))
    return False


def is_pointwise(node: fx.Node) -> bool:
    """Whether ``node`` combines its tensor inputs elementwise (a gate times a map)."""
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _POINTWISE_METHODS


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Identity)


def is_elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Elementwise whatever the layout (no per-channel parameters on dim 1)."""
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], (*_ACTIVATIONS, nn.Dropout))
    return is_pointwise(node)


def channel_op(node: fx.Node, modules: dict[str, nn.Module], layout: tuple[int, int]) -> bool:
    """A Linear or LayerNorm over the last dim of a channels-last map: per pixel."""
    if layout == (2, 3) or 3 in layout:
        return False
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, nn.LayerNorm):
            return len(mod.normalized_shape) == 1
        return isinstance(mod, nn.Linear)
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = node_arg(node, 1, "normalized_shape", ())
        return not isinstance(shape, list | tuple) or len(shape) == 1
    return node.op == "call_function" and node.target is F.linear


def map_node(
    node: fx.Node, ins: list[tuple[Axis, Axis]], modules: dict[str, nn.Module]
) -> tuple[tuple[Axis, Axis], bool]:
    """Map the input intervals through one graph node; also say whether it aliases."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        (y, x) = ins[0]
        if isinstance(mod, _PADS):  # (left, right, top, bottom): a shift by (top, left)
            left, _, top, _ = _pad4(mod.padding)
            return (_conv(y, 1, 1, top, 1), _conv(x, 1, 1, left, 1)), False
        if isinstance(mod, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            # ceil_mode=True (Max or Avg): the extra window at the edge reads what the
            # interval says inside the input and nothing beyond, like padding; only tile-edge
            # positions differ from a whole pass, and crop mode drops those with the halo.
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
        if node.target in (F.conv2d, torch.conv2d, F.max_pool2d, F.avg_pool2d):
            return _functional_window(node, ins[0]), False
        if node.target is F.pad:
            pad = _pad4(tuple(node_arg(node, 1, "pad", ())))
            return (_conv(ins[0][0], 1, 1, pad[2], 1), _conv(ins[0][1], 1, 1, pad[0], 1)), False
        if node.target is F.interpolate:
            mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            ac = node.kwargs.get("align_corners", node.args[4] if len(node.args) > 4 else None)
            return _interp(node, ins[0], str(mode), None if ac is None else bool(ac)), False
        if node.target in _POINTWISE_FUNCTIONS:
            alias = node.target in (operator.iadd, operator.imul) or bool(
                node.kwargs.get("inplace", False)
            )
            return union_of(ins, str(node.target)), alias
    if node.op == "call_method" and node.target in _POINTWISE_METHODS:
        return union_of(ins, str(node.target)), node.target in _ALIAS_METHODS
    raise ModelError(f"receptive field: unsupported operation {node.format_node()}")


def _interp(
    node: fx.Node, ax: tuple[Axis, Axis], mode: str, align_corners: bool | None
) -> tuple[Axis, Axis]:
    src = spatial_dims(node.all_input_nodes[0])
    dst = spatial_dims(node)
    assert src is not None and dst is not None
    out = []
    for i in range(2):
        if dst[i] % src[i]:
            raise ModelError(
                f"receptive field: {node.name} resizes {src[i]} -> {dst[i]}, not an integer factor"
            )
        out.append(_upsample(ax[i], dst[i] // src[i], mode, align_corners))
    return (out[0], out[1])
