"""The model registry and the contract every registered model keeps.

``@register_model("name")`` registers a builder ``fn(*, in_channels, num_classes, **kwargs)``
returning a :class:`TileModel`. :func:`create_model` builds it, then analyses its layers
(:mod:`tilenet.models.receptive`) to set the attributes the tiler relies on:

``stride``
    Total downsampling; inputs must have H and W multiples of it.
``receptive_field``
    Radius in input pixels, analytic, zero padding included: crop-mode tiling with
    ``halo = ceil_to(receptive_field, stride)`` reproduces a whole-image pass exactly. A
    model the analysis cannot follow (smp's ``dpn68``: layers outside the module tree) is
    not refused: its field is measured from gradients
    (:func:`tilenet.models.receptive.measure`) and it is reported not exact, with the
    reason, so it runs in the blend modes.
``spec``
    A :class:`~tilenet.models.ModelSpec` that rebuilds the model (name, channels, classes,
    kwargs as plain data), with its stride, receptive field and exactness.
``analysis``
    The :class:`~tilenet.models.Analysis` those come from (dependency interval, activation
    sizes for :func:`~tilenet.models.model_memory`).
``per_pixel_norm``
    False when a layer's output at a pixel depends on statistics over the whole input
    (GroupNorm, InstanceNorm, ...): crop-mode tiling is then not exact
    (:func:`~tilenet.models.exactness`).

Models read no files: weights are loaded by :func:`tilenet.engine.checkpoint.load_weights`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tilenet.errors import ModelError
from tilenet.models.spec import ModelSpec

if TYPE_CHECKING:
    from tilenet.models.receptive import Analysis

__all__ = [
    "TileModel",
    "create_model",
    "create_model_from_config",
    "list_models",
    "register_model",
]

Builder = Callable[..., "TileModel"]
_REGISTRY: dict[str, Builder] = {}


class TileModel(nn.Module):
    """Base of registered models: checks input sizes, then runs ``_forward_impl``.

    Subclasses set ``_stride_hint`` (their expected total stride) and implement
    ``_forward_impl(x) -> logits`` at the input's resolution.
    """

    _stride_hint: int = 1
    stride: int
    receptive_field: int
    spec: ModelSpec
    per_pixel_norm: bool
    analysis: Analysis
    #: Set by create_model: equal keys mean the same layers and the same ``forward`` (name,
    #: channels, classes and builder arguments as JSON); None where those are not plain data.
    architecture: str | None = None

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stride = self._stride_hint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ModelError(
                f"{self.spec.name if hasattr(self, 'spec') else type(self).__name__}: "
                f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ModelError(
                f"input size {h}x{w} is not a multiple of the model stride {self.stride}; "
                f"pad or crop to a multiple of {self.stride}"
            )
        return self._forward_impl(x)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def load_pretrained(self, state: dict[str, Any]) -> None:
        """Load pretrained weights from a state dict; subclasses may accept other layouts too.

        Weights that do not fit raise :class:`~tilenet.errors.ModelError`.
        """
        try:
            self.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else str(exc)
            raise ModelError(
                f"weights do not fit model {self.spec.name!r}: {first.strip()[:200]}"
            ) from None


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a model builder under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{what} must be a positive int, got {value!r}")
    return value


#: Each architecture's traced analysis and exactness, per process: tracing (torch.fx) and
#: the exactness search are most of the cost of building a small model, and the layers they
#: look at depend on the builder's arguments alone (weights are loaded later).
_ANALYSES: dict[str, tuple[Any, bool, str | None]] = {}


def _analysis_key(
    name: str, in_channels: int, num_classes: int, kwargs: dict[str, Any]
) -> str | None:
    """The cache key of an architecture; None where its arguments are not plain JSON data."""
    try:
        return json.dumps([name, in_channels, num_classes, kwargs], sort_keys=True)
    except (TypeError, ValueError):
        return None


def _traced(name: str, model: TileModel) -> tuple[Any, bool, str | None]:
    """``model``'s receptive-field analysis (traced; measured where it cannot be traced) and
    its exactness."""
    from tilenet.models.receptive import analyze, exactness, measure

    try:
        an = analyze(model)
    except ModelError as exc:  # not traceable: measured, and reported not exact
        try:
            an = measure(model, reason=str(exc).removeprefix("receptive field: "))
        except Exception:
            raise exc from None
    if an.stride != model._stride_hint:
        raise ModelError(
            f"model {name!r}: layers give stride {an.stride}, builder declared {model._stride_hint}"
        )
    model.analysis = an  # exactness reads the traced calls
    return an, *exactness(model)


def create_model(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 2,
    **kwargs: Any,
) -> TileModel:
    """Build a registered model with freshly initialised weights.

    Weights come from :func:`tilenet.engine.checkpoint.load_weights` (models read no files). Unknown
    names and unknown or bad keyword arguments raise
    :class:`~tilenet.errors.ModelError`.
    """
    from tilenet._version import __version__

    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    in_channels = _check_int(in_channels, "in_channels")
    num_classes = _check_int(num_classes, "num_classes")
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    if "weights" in kwargs and "weights" not in params:
        raise ModelError(
            f"model {name!r}: create_model reads no weight files; "
            "load them with tilenet.engine.checkpoint.load_weights(model, path)"
        )
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key in ("in_channels", "num_classes") or (key not in params and not open_kwargs):
            valid = sorted(k for k in params if k not in ("in_channels", "num_classes"))
            raise ModelError(
                f"model {name!r} has no option {key!r}; valid options: {', '.join(valid) or 'none'}"
            )
    try:
        model = builder(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"model {name!r}: bad option: {exc}") from None
    arch = _analysis_key(name, in_channels, num_classes, kwargs)
    found = _ANALYSES.get(arch) if arch is not None else None
    if found is None:
        found = _traced(name, model)
        if arch is not None:
            _ANALYSES[arch] = found
    an, exact, reason = found
    model.architecture = arch
    model.stride = an.stride
    model.receptive_field = an.receptive_field
    model.analysis = an
    model.per_pixel_norm = exact
    model.spec = ModelSpec(
        name=name,
        in_channels=in_channels,
        num_classes=num_classes,
        stride=an.stride,
        receptive_field=an.receptive_field,
        kwargs=kwargs,
        tilenet_version=__version__,
        exact=exact,
        exact_reason=reason,
    )
    return model


def create_model_from_config(model_cfg: Any) -> TileModel:
    """Build from a :class:`~tilenet.config.ModelConfig` (or anything with its fields).

    Its ``weights`` file is not read here (models read no files): pass the model to
    :func:`tilenet.engine.checkpoint.load_weights`.
    """
    from omegaconf import DictConfig, OmegaConf

    kwargs: Any = getattr(model_cfg, "kwargs", None) or {}
    if isinstance(kwargs, DictConfig):
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    return create_model(
        str(model_cfg.name),
        in_channels=int(model_cfg.in_channels),
        num_classes=int(model_cfg.num_classes),
        **kwargs,
    )
