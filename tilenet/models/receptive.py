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

:func:`analyze` traces (``_trace``), walks the graph node by node (``_Walk``) and sums up
(``_result``); the per-layer rules it applies live in :mod:`tilenet.models.intervals`.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import io
import math
import operator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from tilenet.errors import InputError, ModelError
from tilenet.models.intervals import (
    BATCH_NORMS,
    CONSTANT_METHODS,
    GLOBAL_LAYERS,
    INSTANCE_NORMS,
    NORMALISING,
    Axis,
    State,
    aligned_corners,
    channel_op,
    global_op,
    is_elementwise,
    is_pointwise,
    map_node,
    node_arg,
    node_ndim,
    node_numel,
    permuted_layout,
    relayout,
    spatial_dims,
    union_of,
    where_traced,
)

__all__ = [
    "BYTES_PER_ELEMENT",
    "MEASURE_MAX",
    "Analysis",
    "TraceRoot",
    "analyze",
    "exactness",
    "measure",
    "model_memory",
]

#: Activation bytes per element under each precision (autocast keeps activations in 16 bits).
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}


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


def _global_at_inference(m: nn.Module, traced: bool) -> bool:
    """Whether ``m`` in eval mode mixes values across spatial positions of one input."""
    if isinstance(m, (*GLOBAL_LAYERS, nn.GroupNorm)):
        return True
    if isinstance(m, nn.LayerNorm):
        # Its normalized_shape may cover spatial dimensions (NCHW); without a trace we cannot
        # tell a channels-last one apart, so it counts as global. With one, analyze() decides.
        return not traced
    if isinstance(m, INSTANCE_NORMS + BATCH_NORMS):
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
        if an.global_ops[0].startswith("not traced"):  # measured (see measure)
            return False, an.global_ops[0]
        return False, f"{an.global_ops[0]}{more}: global over the input"
    if found:
        path, m = found[0]
        more = f" (and {len(found) - 1} more such layers)" if len(found) > 1 else ""
        stats = " without running statistics" if isinstance(m, BATCH_NORMS) else ""
        return False, f"{type(m).__name__}{stats} at {path or 'the top level'}{more}"
    if getattr(module, "per_pixel_norm", None) is False:
        return False, f"{type(module).__name__} declares per_pixel_norm=False"
    return True, None


_SPLITS = ("split", "chunk", "unbind", "tensor_split")


def _parts(node: fx.Node) -> bool:
    """Whether ``node`` splits a map into a tuple of maps."""
    meta = node.meta.get("tensor_meta")
    if not (isinstance(meta, tuple | list) and meta):
        return False
    if node.op == "call_method":
        return node.target in _SPLITS
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _SPLITS


def _part_of(node: fx.Node) -> bool:
    """Whether ``node`` takes one part of a split (``parts[i]``)."""
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and bool(node.all_input_nodes)
        and _parts(node.all_input_nodes[0])
    )


class TraceRoot(nn.Module):
    """What :mod:`torch.fx` traces: ``model._forward_impl`` (the forward pass without input
    checks; ``model`` itself where it has none, as patch encoders), with the model's layers
    under ``m.`` (setting a layer here sets it in ``model``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> Any:
        impl = getattr(self.m, "_forward_impl", None)
        return impl(x) if impl is not None else self.m(x)


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
    gm = _trace(model, in_ch, size)
    walk = _Walk(gm, size)
    for node in gm.graph.nodes:
        walk.visit(node)
    return _result(walk, gm, size, in_ch)


#: Largest input side :func:`measure` tries; a support reaching its border is taken as global.
MEASURE_MAX = 512


def measure(model: nn.Module, *, reason: str, max_size: int = MEASURE_MAX) -> Analysis:
    """The receptive field of a model :func:`analyze` cannot follow, measured, not traced.

    The centre output pixel's gradient with respect to a random input (a float64 copy of the
    model in eval mode, float32 where a layer stays float32) is nonzero on the input pixels
    it depends on, except where a ReLU happens to be off: the union over three random inputs
    is taken, plus one stride of margin. The input side doubles from ``max(64, 4 * stride)``
    until the support stays a stride off the border (up to ``max_size``: a support still at
    the border is the whole input, global). The result is reported not exact, with
    ``reason`` (why it was not traced) in :attr:`Analysis.global_ops`, so crop mode is not
    promised to be exact and blend modes use the measured field. Activation sizes are not
    known.
    """
    stride = int(getattr(model, "_stride_hint", 32))
    size = -(-max(64, 4 * stride) // stride) * stride
    probe = copy.deepcopy(model).eval()
    dtype = torch.float64
    while True:
        try:
            lo, hi = _support(probe.to(dtype), int(model.in_channels), size, dtype)  # type: ignore[arg-type]
        except RuntimeError:  # a layer outside the module tree keeps float32
            if dtype == torch.float32:
                raise
            dtype = torch.float32
            continue
        radius = max(-lo[0], hi[0], -lo[1], hi[1])
        if radius < size // 2 - stride or 2 * size > max_size:
            break
        size *= 2
    del probe
    lo = (lo[0] - stride, lo[1] - stride)
    hi = (hi[0] + stride, hi[1] + stride)
    radius += stride
    why = f"not traced ({reason}); receptive field {radius} px measured from gradients"
    return Analysis(
        stride=stride,
        receptive_field=radius,
        interval=((lo[0], hi[0]), (lo[1], hi[1])),
        activations=(),
        output_per_pixel=float(getattr(model, "num_classes", 1)),
        input_per_pixel=float(model.in_channels),  # type: ignore[arg-type]
        global_ops=(why,),
    )


def _support(
    model: nn.Module, in_ch: int, size: int, dtype: torch.dtype
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Offsets (y, x) of the first and last input pixels the centre output pixel of a
    ``size``² input depends on (its gradient is nonzero there), over three random inputs."""
    gen = torch.Generator().manual_seed(0)
    c = size // 2
    total = torch.zeros(size, size, dtype=dtype)
    for _ in range(3):
        x = torch.randn(1, in_ch, size, size, generator=gen, dtype=dtype, requires_grad=True)
        (grad,) = torch.autograd.grad(model(x)[0, :, c, c].sum(), x)
        total += grad.abs().sum((0, 1))
    ys, xs = torch.nonzero(total, as_tuple=True)
    if not len(ys):
        return (0, 0), (0, 0)
    return (int(ys.min()) - c, int(xs.min()) - c), (int(ys.max()) - c, int(xs.max()) - c)


def _trace(model: nn.Module, in_ch: int, size: int) -> fx.GraphModule:
    """``model``'s graph (:class:`TraceRoot`), its tensor shapes propagated at ``size``."""
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
    return gm


class _Walk:
    """The intervals, layouts and activations of a traced graph's nodes, visited in order."""

    def __init__(self, gm: fx.GraphModule, size: int) -> None:
        self.modules = dict(gm.named_modules())
        self.state: dict[fx.Node, State] = {}
        self.layouts: dict[fx.Node, tuple[int, int]] = {}
        self.global_ops: list[tuple[fx.Node, str]] = []
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.acts: dict[fx.Node, list[Any]] = {}  # size, graph index, last user, alias
        self.px = size * size
        self.out_node: fx.Node | None = None

    def _record(self, node: fx.Node, new: State, alias: bool = False) -> None:
        self.state[node] = new
        self.acts[node] = [
            node_numel(node) / self.px,
            self.order[node],
            _last(node, self.order),
            alias,
        ]

    def visit(self, node: fx.Node) -> None:
        """Map the intervals of ``node``'s inputs through it (the checks, then the rule)."""
        state, layouts, modules = self.state, self.layouts, self.modules
        tensor_args = [a for a in node.all_input_nodes if a in state]
        if node.op == "placeholder":
            one = Axis(Fraction(1), Fraction(0), Fraction(0))
            layouts[node] = (2, 3)
            self._record(node, (one, one))
            return
        if node.op == "output":
            self.out_node = node
            return
        if not tensor_args:
            return  # shapes, constants
        if _parts(node) or _part_of(node):
            self._split(node, tensor_args)
            return
        if not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            return  # x.shape and the like: not a feature map
        ins = [state[a] for a in tensor_args]
        layout = layouts[tensor_args[0]]
        layouts[node] = layout
        local = [i for i in ins if i is not None]
        desc = global_op(node, modules, layout) if local else ""
        if desc:
            self.global_ops.append((node, desc))
        elif local and aligned_corners(node, modules):
            where = where_traced(node)
            self.global_ops.append((node, f"bilinear resize with align_corners=True at {where}"))
        if desc.startswith(NORMALISING):
            # Like GroupNorm: each pixel keeps its own value, scaled by statistics over H, W.
            self._record(node, union_of(local, str(node.target)))
            return
        if node.op == "call_method" and node.target in CONSTANT_METHODS:
            # A new tensor of zeros (smp's empty stand-in for a missing stride-2 feature):
            # it reads no input values, so it joins maps without widening their intervals.
            self._record(node, None)
            return
        if desc or not local:
            # Depends on the whole input; whatever is computed from it only (a gate, a
            # pooled branch) too. Its shape need not be a feature map's.
            self._record(node, None)
            return
        moved = relayout(node, layout)
        if moved is not None:
            # A stack (FPN's merge) or a reduction over channels: each pixel on its own.
            layouts[node] = moved
            if spatial_dims(node, moved) is None:
                raise ModelError(f"receptive field: {node.format_node()} loses the H, W axes")
            self._record(node, union_of(local, str(node.target)))
            return
        self._local(node, tensor_args, ins, local, layout)

    def _split(self, node: fx.Node, tensor_args: list[fx.Node]) -> None:
        """A split of a map into parts (``torch.split``, ``chunk``, ``unbind``: SK and
        Res2Net blocks) and a part taken from it: each part keeps its pixels' dependencies.
        They were dropped, so such a branch read as a constant (skresnet's selective-kernel
        attention, global over the input, gave a model "exact" with a too small field)."""
        layout = self.layouts[tensor_args[0]]
        if _parts(node):
            dim = node_arg(node, 2 if node.target in ("split", torch.split) else 1, "dim", 0)
            ndim = node_ndim(tensor_args[0])
            if ndim and int(dim) % ndim in layout:
                raise ModelError(f"receptive field: {node.format_node()} splits H or W")
        self.layouts[node] = layout
        local = [st for a in tensor_args if (st := self.state[a]) is not None]
        self._record(node, union_of(local, str(node.target)) if local else None)

    def _local(
        self,
        node: fx.Node,
        tensor_args: list[fx.Node],
        ins: list[State],
        local: list[tuple[Axis, Axis]],
        layout: tuple[int, int],
    ) -> None:
        """A layer on a 4-D feature map: its rule, or a per-pixel op on a channels-last one."""
        modules = self.modules
        if spatial_dims(node, layout) is None:
            raise ModelError(
                f"receptive field: {node.format_node()} does not keep a 4-D feature map"
            )
        if node.op == "call_method" and node.target == "permute":
            self.layouts[node] = permuted_layout(node, layout)
        elif layout != (2, 3) and not (
            channel_op(node, modules, layout) or is_elementwise(node, modules)
        ):
            raise ModelError(
                f"receptive field: {node.format_node()} on a permuted (channels-last) map "
                "is not supported"
            )
        elif len(local) < len(ins) and not is_pointwise(node):
            raise ModelError(
                f"receptive field: {node.format_node()} mixes a global map into a layer"
            )
        if channel_op(node, modules, layout):
            new, alias = local[0], False
        else:
            new, alias = map_node(node, local, modules)
        self._record(node, new, alias)
        acts = self.acts
        if alias:
            # An in-place result shares its input's storage: keep that alive as long.
            root = tensor_args[0]
            while acts[root][3]:
                root = next(a for a in root.all_input_nodes if a in self.state)
            acts[root][2] = max(acts[root][2], acts[node][2])


def _result(walk: _Walk, gm: fx.GraphModule, size: int, in_ch: int) -> Analysis:
    """The :class:`Analysis` of a walked graph: its output checked, the stride of the maps
    the output depends on, the receptive field and the activations."""
    state, px = walk.state, walk.px
    assert walk.out_node is not None
    outs = [a for a in walk.out_node.all_input_nodes if a in state]
    if len(outs) != 1:
        raise ModelError("receptive field: the model must return one tensor")
    final = state[outs[0]]
    if final is None:
        raise ModelError("receptive field: the output depends only on global operations")
    if final[0].jump != 1 or final[1].jump != 1 or spatial_dims(outs[0]) != (size, size):
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
        activations=_steps(list(walk.acts.values())),
        output_per_pixel=node_numel(outs[0]) / px,
        input_per_pixel=float(in_ch),
        global_ops=tuple(desc for n, desc in walk.global_ops if n in live),
        called=frozenset(
            str(n.target).removeprefix("m.") for n in gm.graph.nodes if n.op == "call_module"
        ),
    )


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
