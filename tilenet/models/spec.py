"""The model spec: what rebuilds a model and what inference needs to run it, as one value.

A :class:`ModelSpec` is frozen and checks itself once, in ``__post_init__``; everything after
that reads typed fields. It is stored in checkpoints as plain data (:meth:`ModelSpec.to_dict`)
and read back with :meth:`ModelSpec.from_dict`, which also accepts the dict layout written
before the spec was a class (no ``exact`` keys).

>>> spec = ModelSpec("tiny", in_channels=3, num_classes=2, stride=2, receptive_field=4)
>>> spec.mean, spec.std, spec.class_names
((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), ('class_0', 'class_1'))
>>> ModelSpec.from_dict(spec.to_dict()) == spec
True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

from tilenet.errors import ModelError

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """A registry model (``name``, ``kwargs``), its geometry, normalisation and classes.

    ``stride`` is the model's total downsampling and ``receptive_field`` its radius in input
    pixels (see :func:`tilenet.models.create_model`). ``mean``/``std`` normalise each input
    channel (default: zeros and ones), ``class_names`` name the output classes (default:
    ``class_0`` ...). ``exact`` says whether crop-mode tiling reproduces a whole-image pass
    (``None``: not recorded), ``exact_reason`` why not.
    """

    name: str
    in_channels: int
    num_classes: int
    stride: int
    receptive_field: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    class_names: tuple[str, ...] = ()
    tilenet_version: str = ""
    exact: bool | None = None
    exact_reason: str | None = None
    #: The pixel size the model was trained at, where known: {"mpp": µm} or
    #: {"gsd": size, "crs_units": name}; inference defaults to it (tilenet.engine.infer).
    resolution: Mapping[str, Any] | None = None
    #: The input bands the model was trained on (1-based, in the model's order), where a
    #: subset was picked; inference picks them by default (tilenet.engine.infer).
    bands: tuple[int, ...] | None = None
    #: The stain normaliser the training data was normalised with (``data.stain``): its
    #: fitted state as plain data (tilenet.stain ``state_dict``, tensors as lists); inference
    #: applies it by default (tilenet.engine.perimage).
    stain: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ModelError(f"model spec: name must be a non-empty str, got {self.name!r}")
        for key in ("in_channels", "num_classes", "stride"):
            self._set(key, _int(getattr(self, key), key, minimum=1))
        self._set("receptive_field", _int(self.receptive_field, "receptive_field", minimum=0))
        if not isinstance(self.kwargs, Mapping):
            raise ModelError(f"model spec: kwargs must be a mapping, got {self.kwargs!r}")
        self._set("kwargs", _plain(self.kwargs))
        n, k = self.in_channels, self.num_classes
        mean = _floats(self.mean, "mean") or (0.0,) * n
        std = _floats(self.std, "std") or (1.0,) * n
        for key, values in (("mean", mean), ("std", std)):
            if len(values) != n:
                raise ModelError(
                    f"model spec: {key} has {len(values)} values for {n} input channels"
                )
        if any(s <= 0 for s in std):
            raise ModelError(f"model spec: std must be positive, got {list(std)}")
        self._set("mean", mean)
        self._set("std", std)
        names = _strs(self.class_names, "class_names") or tuple(f"class_{i}" for i in range(k))
        if len(names) != k:
            raise ModelError(f"model spec: {len(names)} class_names for {k} classes: {names}")
        self._set("class_names", names)
        if not isinstance(self.tilenet_version, str):
            raise ModelError(
                f"model spec: tilenet_version must be a str, got {self.tilenet_version!r}"
            )
        if self.exact is not None and not isinstance(self.exact, bool):
            raise ModelError(f"model spec: exact must be true, false or null, got {self.exact!r}")
        if self.exact_reason is not None and not isinstance(self.exact_reason, str):
            raise ModelError(
                f"model spec: exact_reason must be a str or null, got {self.exact_reason!r}"
            )
        if self.resolution is not None:
            if not isinstance(self.resolution, Mapping):
                raise ModelError(
                    f"model spec: resolution must be a mapping, got {self.resolution!r}"
                )
            self._set("resolution", _plain(self.resolution))
        if self.bands is not None:
            bands = _bands(self.bands)
            if len(bands) != n:
                raise ModelError(
                    f"model spec: bands {list(bands)} are {len(bands)} for {n} input channels"
                )
            self._set("bands", bands)
        if self.stain is not None:
            if not isinstance(self.stain, Mapping) or not isinstance(self.stain.get("method"), str):
                raise ModelError(
                    f"model spec: stain must be a mapping naming its method, got {self.stain!r}"
                )
            self._set("stain", _plain(self.stain))

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, str, numbers) for ``torch.save(weights_only)`` or JSON."""
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "kwargs": _plain(self.kwargs),
            "stride": self.stride,
            "receptive_field": self.receptive_field,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
            "tilenet_version": self.tilenet_version,
            "exact": self.exact,
            "exact_reason": self.exact_reason,
            "resolution": _plain(self.resolution) if self.resolution is not None else None,
            "bands": list(self.bands) if self.bands is not None else None,
            # only where set: specs (and exported files) without a stain stay as they were
            **({"stain": _plain(self.stain)} if self.stain is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """The spec from :meth:`to_dict`'s layout; unknown keys are ignored.

        Raises :class:`~tilenet.errors.ModelError` (one line) when a required key is missing
        or a value has the wrong type. A ``None`` optional value means its default.
        """
        if not isinstance(d, Mapping):
            raise ModelError(f"model spec must be a mapping, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        required = [name for name, f in known.items() if _required(f)]
        missing = [k for k in required if k not in d]
        if missing:
            raise ModelError(
                f"model spec is missing {', '.join(map(repr, missing))}; "
                f"it needs {', '.join(required)}"
            )
        values = {k: v for k, v in d.items() if k in known and (v is not None or k in required)}
        return cls(**values)

    @classmethod
    def coerce(cls, spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
        """``spec`` as a :class:`ModelSpec`: itself, or read from a dict (:meth:`from_dict`)."""
        if isinstance(spec, ModelSpec):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        raise ModelError(
            f"a model spec must be a ModelSpec or a mapping, got {type(spec).__name__}"
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        mean: Iterable[float] | None = None,
        std: Iterable[float] | None = None,
        class_names: Iterable[str] | None = None,
    ) -> ModelSpec:
        """The spec of a registry model, with normalisation and class names for inference.

        ``stride``, ``receptive_field`` and ``exact`` come from ``model`` itself
        (:func:`tilenet.models.exactness`); ``None`` keeps the defaults of :class:`ModelSpec`.
        """
        from tilenet._version import __version__
        from tilenet.models.receptive import exactness

        base = getattr(model, "spec", None)
        if not isinstance(base, ModelSpec):
            raise ModelError(
                f"{type(model).__name__} is not a registry model (no ModelSpec in .spec); "
                "build it with tilenet.models.create_model"
            )
        if isinstance(class_names, str):
            raise ModelError(f"model spec: class_names must be a list of str, got {class_names!r}")
        exact, reason = exactness(model)
        return replace(
            base,
            stride=model.stride,
            receptive_field=model.receptive_field,
            mean=() if mean is None else tuple(mean),
            std=() if std is None else tuple(std),
            class_names=() if class_names is None else tuple(class_names),
            tilenet_version=__version__,
            exact=exact,
            exact_reason=reason,
        )


def _required(f: Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _int(value: Any, key: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ModelError(f"model spec: {key} must be {kind}, got {value!r}")
    return int(value)


def _floats(values: Any, key: str) -> tuple[float, ...]:
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__iter__"):
        raise ModelError(f"model spec: {key} must be a list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ModelError(f"model spec: {key} must be finite numbers, got {v!r}")
        out.append(float(v))
    return tuple(out)


def _bands(values: Any) -> tuple[int, ...]:
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__iter__"):
        raise ModelError(f"model spec: bands must be a list of band numbers, got {values!r}")
    out = tuple(values)
    bad = [b for b in out if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1]
    if not out or bad:
        raise ModelError(f"model spec: bands must be band numbers >= 1, got {list(out)!r}")
    return tuple(int(b) for b in out)


def _strs(values: Any, key: str) -> tuple[str, ...]:
    if isinstance(values, str | bytes | Mapping) or not hasattr(values, "__iter__"):
        raise ModelError(f"model spec: {key} must be a list of str, got {values!r}")
    out = tuple(values)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise ModelError(f"model spec: {key} must be str, got {bad[0]!r}")
    return out


def _plain(value: Any) -> Any:
    """``value`` as plain data: dicts with str keys, lists, str, numbers, bools, None."""
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ModelError(f"model option names must be str, got {bad[0]!r}")
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ModelError(f"model option value {value!r} is not plain data")
