"""Self-describing checkpoints that stay data.

A checkpoint is a plain dict saved with ``torch.save`` and loaded only with
``torch.load(weights_only=True)``, so a malicious ``.pt`` cannot run code. Its ``spec`` is a
:class:`~tilenet.models.ModelSpec` as plain data (:meth:`~tilenet.models.ModelSpec.to_dict`),
everything inference needs (registry name and kwargs, stride, receptive field, channels,
normalisation, class names): a checkpoint alone is enough for ``tilenet infer``.

Layout::

    {
      "format": "tilenet-checkpoint", "version": 1,
      "spec": {"name", "in_channels", "num_classes", "kwargs", "stride", "receptive_field",
               "mean", "std", "class_names", "tilenet_version", "exact", "exact_reason"},
      "model": state_dict,
      # training state, optional: "optimizer", "scheduler", "scaler", "step", "epoch",
      # "rng", "config", "metrics", "encoder_pretrained" (published encoder weights
      # fetched: {"weights", "mean", "std"}, the statistics in [0, 1] that came with them)
    }

Checkpoints written before ``exact`` and ``exact_reason`` existed load too (they read as
``None``: not recorded). This module also loads bare weight files into a model
(:func:`load_weights`): the models package reads no files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilenet.errors import CheckpointError, ModelError, one_line

if TYPE_CHECKING:
    import torch

    from tilenet.models import ModelSpec, TileModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "HUB_PREFIX",
    "RANGE_STDS",
    "check_input_range",
    "file_checksum",
    "is_pretrained_name",
    "load_checkpoint",
    "load_encoder_weights",
    "load_model",
    "load_pretrained_encoder",
    "load_spec",
    "load_weights",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "tilenet-checkpoint"


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file in the same directory, then rename).

    ``payload["spec"]`` is a :class:`~tilenet.models.ModelSpec`, stored as plain data, or
    that plain data itself (checked, then stored as given).
    """
    import torch

    from tilenet.models import ModelSpec

    if "spec" not in payload or "model" not in payload:
        raise ValueError("a checkpoint payload needs 'spec' and 'model'")
    from tilenet.fsutil import atomic_output

    spec = payload["spec"]
    if isinstance(spec, ModelSpec):
        spec = spec.to_dict()
    else:
        ModelSpec.coerce(spec)  # refuse to write a checkpoint that would not load
    out = Path(path)
    body = {"format": CHECKPOINT_FORMAT, "version": 1, **payload, "spec": spec}
    with atomic_output(out) as tmp:
        torch.save(body, tmp)
    return out


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data only (``weights_only=True``); clear errors for bad files.

    Returns the raw payload; its ``spec`` is plain data that
    :meth:`ModelSpec.from_dict <tilenet.models.ModelSpec.from_dict>` accepts (checked here).
    """
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
        first = one_line(exc, typed=False) if str(exc) else "unpickling refused"
        raise CheckpointError(
            f"{p}: refused to load: the file holds more than plain data ({first[:160]})"
        ) from None
    except Exception as exc:
        first = one_line(exc, typed=False)
        raise CheckpointError(f"{p}: not a readable checkpoint: {first[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a tilenet checkpoint (no tilenet model spec inside)")
    _read_spec(p, ckpt.get("spec"))
    return ckpt


def _read_spec(path: Path, raw: Any) -> ModelSpec:
    from tilenet.models import ModelSpec

    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: checkpoint has no model spec (got {type(raw).__name__})")
    try:
        return ModelSpec.from_dict(raw)
    except ModelError as exc:
        raise CheckpointError(f"{path}: checkpoint {exc}") from None


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the model from a checkpoint's spec, load its weights, return (eval model, spec).

    A checkpoint that did not record ``exact`` gets it from the rebuilt model. A ``.onnx``
    file written by ``tilenet export`` loads as a module running it through onnxruntime
    (:class:`~tilenet.engine.backends.OnnxModel`), with the spec it carries.
    """
    import dataclasses

    from tilenet.models import create_model, exactness

    if _is_onnx(path):
        from tilenet.engine.backends import load_onnx

        return load_onnx(path, device=device)
    ckpt = load_checkpoint(path)
    spec = _read_spec(Path(path), ckpt["spec"])
    try:
        model = create_model(
            spec.name, in_channels=spec.in_channels, num_classes=spec.num_classes, **spec.kwargs
        )
        model.load_state_dict(ckpt["model"])
    except CheckpointError:
        raise
    except Exception as exc:
        first = one_line(exc, typed=False)
        raise CheckpointError(f"{path}: weights do not fit the model spec: {first[:200]}") from None
    model.eval().to(device)
    if spec.exact is None:
        exact, reason = exactness(model)
        spec = dataclasses.replace(spec, exact=exact, exact_reason=reason)
    return model, spec


def load_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """The model spec of a checkpoint or of an exported ``.onnx`` file, checked."""
    if _is_onnx(path):
        from tilenet.engine.backends import load_onnx

        return load_onnx(path)[1]
    return _read_spec(Path(path), load_checkpoint(path)["spec"])


def _is_onnx(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def _read_weights(path: Path, *, what: str) -> Any:
    """``torch.load`` a local weights file as data only, with one-line errors naming it."""
    import torch

    if not path.is_file():
        raise ModelError(f"{path}: {what} not found; give an existing local path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = one_line(exc, typed=False)
        raise ModelError(f"{path}: not a loadable weights file: {first[:200]}") from None


def load_weights(model: TileModel, path: str | os.PathLike[str]) -> TileModel:
    """Load a local weights file into a registry ``model`` in place, and return the model.

    The file is a state dict (``torch.save(model.state_dict())``, or a layout the model's
    ``load_pretrained`` accepts, e.g. torchvision ResNet weights for ``unet_resnet*``) or a
    tilenet checkpoint; it is read as data only (``weights_only=True``), never downloaded.
    Errors are one-line :class:`~tilenet.errors.ModelError` naming the file.
    """
    p = Path(path)
    state = _read_weights(p, what="weights file")
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state.get("model")
    if not isinstance(state, dict):
        raise ModelError(f"{p}: weights file does not hold a state dict")
    try:
        model.load_pretrained(state)
    except ModelError as exc:
        raise ModelError(f"{p}: {exc}") from None
    return model


#: Prefixes a saved encoder's keys may carry: DDP's, a whole model's, a timm wrapper's.
_ENCODER_PREFIXES = ("", "module.", "encoder.", "net.encoder.", "model.")
#: Classifier heads found in ImageNet checkpoints (torchvision, timm): no encoder has them.
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.", "_fc.")


def load_encoder_weights(model: TileModel, path: str | os.PathLike[str]) -> TileModel:
    """Load a local encoder state dict into ``model.encoder`` (``smp.*`` models), in place.

    The file is read as data only (``weights_only=True``), never downloaded. Its keys are
    matched to the encoder's as they are, or with one prefix removed or added (``module.``,
    ``encoder.``, ``model.`` for timm encoders); the mapping that matches most keys wins.
    An ImageNet classifier head (``fc.``, ``classifier.``, ``head.``) is ignored. Every
    encoder parameter and buffer must be filled with the right shape; otherwise a one-line
    :class:`~tilenet.errors.ModelError` says how many keys matched and which are missing.
    """
    import torch

    encoder = getattr(model, "encoder", None)
    name = model.spec.name if hasattr(model, "spec") else type(model).__name__
    if not isinstance(encoder, torch.nn.Module):
        raise ModelError(
            f"model {name!r} has no encoder to load encoder weights into; "
            "use an smp.* model, or model.weights for whole-model weights"
        )
    p = Path(path)
    state = _read_weights(p, what="encoder weights file")
    for key in ("state_dict", "model"):  # common wrappers (training checkpoints)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelError(f"{p}: encoder weights file does not hold a state dict")
    target = encoder.state_dict()
    best: dict[str, Any] = {}
    for strip in _ENCODER_PREFIXES:
        for add in _ENCODER_PREFIXES:
            mapped = {
                add + k.removeprefix(strip): v
                for k, v in state.items()
                if k.startswith(strip) and not k.removeprefix(strip).startswith(_HEAD_PREFIXES)
            }
            if sum(k in target for k in mapped) > sum(k in target for k in best):
                best = mapped
    matched = [k for k in target if k in best]
    missing = [k for k in target if k not in best]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise ModelError(
            f"{p}: encoder weights do not fit model {name!r}: {len(matched)} of {len(target)} "
            f"encoder keys matched; missing: {shown}"
        )
    for k in matched:
        v = best[k]
        if not isinstance(v, torch.Tensor) or v.shape != target[k].shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ModelError(
                f"{p}: encoder weights do not fit model {name!r}: {k} has shape {got}, "
                f"the encoder's {tuple(target[k].shape)} (in_channels differ?)"
            )
    encoder.load_state_dict({k: best[k] for k in matched})
    return model


#: ``model.encoder_weights`` values naming the hub rather than a file start with this.
HUB_PREFIX = "hf-hub:"


def is_pretrained_name(value: str | os.PathLike[str]) -> bool:
    """Whether ``model.encoder_weights`` names published weights rather than a local file.

    Published: ``hf-hub:ORG/REPO``, or a bare word that is not an existing file (``imagenet``,
    ``ssl``, ...: no path separator, no file extension).

    >>> is_pretrained_name("imagenet"), is_pretrained_name("weights/enc.pt")
    (True, False)
    """
    s = str(value)
    if s.startswith(HUB_PREFIX):
        return True
    return not ("/" in s or os.sep in s or "." in s or Path(s).is_file())


def load_pretrained_encoder(
    model: TileModel, weights: str, *, allow_download: bool = False
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fill ``model.encoder`` (``smp.*`` models) with the libraries' own pretrained weights.

    ``weights`` is what smp calls ``encoder_weights``: a name it publishes for the encoder
    (``imagenet``, ``ssl``, ...; fetched by smp from its Hugging Face hub repositories), or
    for timm encoders (``tu-NAME[.TAG]``) ``imagenet`` (timm's pretrained weights of that
    model and tag) or ``hf-hub:ORG/REPO`` (timm weights in any hub repository). Fetching
    uses the network only with ``allow_download``; files already in the Hugging Face cache
    (``HF_HOME``, with ``HF_HUB_OFFLINE=1``) are used as they are. The whole smp model is
    built once with the weights (smp's own ``encoder_weights=`` / timm's ``pretrained=True``
    path) and its encoder copied into ``model``; returns the (mean, std) per channel in
    [0, 1] that came with the weights. One-line :class:`~tilenet.errors.ModelError` on
    failure.
    """
    encoder = getattr(model, "encoder", None)
    name = model.spec.name if hasattr(model, "spec") else type(model).__name__
    if encoder is None or not name.startswith("smp."):
        raise ModelError(
            f"model.encoder_weights={weights!r} names published encoder weights: model "
            f"{name!r} has none; use an smp.* model, or model.weights for a local file"
        )
    spec = model.spec
    enc = str(spec.kwargs.get("encoder_name", "resnet34"))
    import segmentation_models_pytorch as smp

    kwargs = dict(spec.kwargs)
    value: Any = weights
    if enc.startswith("tu-"):
        from tilenet.models.smp_models import timm_pretrained_cfg

        if weights.startswith(HUB_PREFIX):
            repo = weights[len(HUB_PREFIX) :]
            kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": repo, "source": "hf-hub"}
        elif weights != "imagenet":
            raise ModelError(
                f"model.encoder_weights={weights!r}: timm encoder {enc!r} takes imagenet "
                "(choose the weights by tag in its name: tu-NAME.TAG) or hf-hub:ORG/REPO"
            )
        elif timm_pretrained_cfg(enc[3:]) is None:
            raise ModelError(f"timm has no pretrained weights for {enc[3:]!r}")
        value = True
    else:
        offered = sorted(smp.encoders.encoders.get(enc, {}).get("pretrained_settings", {}))
        if weights not in offered:
            raise ModelError(
                f"model.encoder_weights={weights!r}: smp publishes for encoder {enc!r}: "
                f"{', '.join(offered) or 'nothing'}"
            )
    if not allow_download:
        raise ModelError(
            f"model.encoder_weights={weights!r} fetches published weights for encoder "
            f"{enc!r} over the network: set model.allow_download=true to allow it, or give "
            "a local weights file (model.encoder_weights=PATH)"
        )
    try:
        net = getattr(smp, name[4:])(
            in_channels=spec.in_channels, classes=spec.num_classes, encoder_weights=value, **kwargs
        )
        if enc.startswith("tu-"):
            cfg = getattr(net.encoder.model, "pretrained_cfg", None) or {}
            mean, std = cfg.get("mean"), cfg.get("std")
        else:
            params = smp.encoders.get_preprocessing_params(enc, pretrained=weights)
            mean, std = params.get("mean"), params.get("std")
        encoder.load_state_dict(net.encoder.state_dict())
    except Exception as exc:
        first = one_line(exc, typed=False)
        raise ModelError(
            f"cannot fetch encoder weights {weights!r} for {enc!r}: {first[:200]}"
        ) from None
    if mean is None or std is None:
        raise ModelError(f"encoder weights {weights!r} for {enc!r} came without mean/std")
    return tuple(map(float, mean)), tuple(map(float, std))


def file_checksum(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """sha256 of a file (model checksums in manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: How many standard deviations above the mean the training data's values reached, as far
#: as a checkpoint's statistics tell (its normalisation mean and std, raw pixel units).
RANGE_STDS = 4.0
#: Pixels of the coarsest level read whole to see an image's values (else a window of it).
_SAMPLE_PX = 1024 * 1024


def _sample_top(image: Any) -> float:
    """The 99.9th percentile of ``image``'s values on its coarsest level (all of it, or its
    middle 1024² where larger): the top of its range, with hot pixels left out."""
    import numpy as np

    from tilenet.geometry import Window

    level = len(image.levels) - 1
    h, w = image.levels[level].shape
    sh, sw = (h, w) if h * w <= _SAMPLE_PX else (min(h, 1024), min(w, 1024))
    pixels = image.read(Window((h - sh) // 2, (w - sw) // 2, sh, sw), level)
    return float(np.percentile(pixels, 99.9))


def check_input_range(image: Any, spec: ModelSpec) -> str | None:
    """Warn in one line (and return it) where ``image``'s values lie on another scale than
    the model's training data, as its checkpoint's normalisation statistics tell; None when
    they agree or cannot tell (the default statistics: mean 0, std 1).

    The training data reached about ``mean + RANGE_STDS * std`` per channel: an image whose
    values (:func:`_sample_top`, its coarsest level) go over 4x that (a 16-bit image to a
    model trained on 8-bit data) or stay under a quarter of the training mean (8-bit or
    0..1 to a model trained on 16-bit or 0..255 data) is on another scale.
    """
    import numpy as np

    if not any(spec.mean) and all(s == 1 for s in spec.std):
        return None
    trained = max(m + RANGE_STDS * s for m, s in zip(spec.mean, spec.std, strict=True))
    mean = max(spec.mean)
    try:
        top = _sample_top(image)
    except Exception:  # a check only: an unreadable sample fails where the run reads it
        return None
    if top <= 4 * trained and 4 * top >= mean:
        return None
    line = (
        f"{image.path}: the image is {np.dtype(image.dtype).name} with values up to about "
        f"{top:g} but model {spec.name} was trained on values of about "
        f"{min(spec.mean):g}..{trained:g} (its checkpoint's mean + {RANGE_STDS:g} std): its "
        "results may be meaningless; rescale the image or use a model trained on such data"
    )
    logging.getLogger(__name__).warning("%s", line)
    return line
