"""Self-describing checkpoints that stay data.

A checkpoint is a plain dict saved with ``torch.save`` and loaded only with
``torch.load(weights_only=True)``, so a malicious ``.pt`` cannot run code. Its ``spec`` holds
everything inference needs (registry name and kwargs, stride, receptive field, channels,
normalisation, class names): a checkpoint alone is enough for ``tilenet infer``.

Layout::

    {
      "format": "tilenet-checkpoint", "version": 1,
      "spec": {"name", "in_channels", "num_classes", "kwargs", "stride", "receptive_field",
               "mean", "std", "class_names", "tilenet_version"},
      "model": state_dict,
      # training state, optional: "optimizer", "scheduler", "scaler", "step", "epoch",
      # "rng", "config", "metrics"
    }
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilenet.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "file_checksum",
    "load_checkpoint",
    "load_model",
    "make_spec",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "tilenet-checkpoint"
_SPEC_KEYS = ("name", "in_channels", "num_classes", "kwargs", "stride", "receptive_field")


def make_spec(
    model: Any,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """The plain-data model spec stored in a checkpoint, from a registry model."""
    from tilenet import __version__

    spec = dict(model.spec)
    n = int(spec["in_channels"])
    spec.update(
        stride=int(model.stride),
        receptive_field=int(model.receptive_field),
        mean=[float(v) for v in (mean if mean is not None else [0.0] * n)],
        std=[float(v) for v in (std if std is not None else [1.0] * n)],
        class_names=list(class_names or [f"class_{i}" for i in range(int(spec["num_classes"]))]),
        tilenet_version=__version__,
    )
    return spec


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file in the same directory, then rename)."""
    import torch

    if "spec" not in payload or "model" not in payload:
        raise ValueError("a checkpoint payload needs 'spec' and 'model'")
    from tilenet.fsutil import atomic_output

    out = Path(path)
    body = {"format": CHECKPOINT_FORMAT, "version": 1, **payload}
    with atomic_output(out) as tmp:
        torch.save(body, tmp)
    return out


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data only (``weights_only=True``); clear errors for bad files."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: checkpoint file is empty")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unpickling refused"
        raise CheckpointError(
            f"{p}: refused to load: the file holds more than plain data ({first[:160]})"
        ) from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint: {first[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a tilenet checkpoint (no tilenet model spec inside)")
    spec = ckpt.get("spec")
    if not isinstance(spec, dict) or any(k not in spec for k in _SPEC_KEYS):
        raise CheckpointError(f"{p}: checkpoint model spec is incomplete; needs {_SPEC_KEYS}")
    return ckpt


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint's spec, load its weights, return (eval model, spec)."""
    from tilenet.models import create_model

    ckpt = load_checkpoint(path)
    spec = ckpt["spec"]
    kwargs = dict(spec.get("kwargs") or {})
    try:
        model = create_model(
            spec["name"],
            in_channels=int(spec["in_channels"]),
            num_classes=int(spec["num_classes"]),
            **kwargs,
        )
        model.load_state_dict(ckpt["model"])
    except CheckpointError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: weights do not fit the model spec: {first[:200]}") from None
    model.eval().to(device)
    return model, spec


def file_checksum(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """sha256 of a file (model checksums in manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
