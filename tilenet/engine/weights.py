"""Encoder weights: a local file or folder (offline sites), the hub when online, or random.

Files stay data: safetensors, or ``torch.load(weights_only=True)`` for ``.pt``/``.pth``/
``.bin``. The SHA-256 of the file read is recorded with every embedding, so a feature file
names the exact weights that made it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilenet.errors import CheckpointError, ConfigError, one_line
from tilenet.models.encoders import (
    Encoder,
    EncoderSpec,
    build_encoder,
    encoder_spec,
    is_hf_vit,
    timm_keys_from_hf,
)

__all__ = ["LoadedEncoder", "load_encoder", "read_state_dict", "sha256_file"]

#: File names tried, in order, in a weights folder (the hub's layouts).
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt")
_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass
class LoadedEncoder:
    """An encoder with its weights, and where they came from."""

    encoder: Encoder
    #: ``random``, a file path, or ``hub:<id>``.
    source: str
    sha256: str


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES)
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"{path}: expected one weights file ({', '.join(_FOLDER_FILES)} or one *"
            f"{'/*'.join(_SUFFIXES)}), found {len(found)}"
        )
    raise CheckpointError(f"{path}: weights file or folder not found")


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a weights file (safetensors or a torch pickle read as data only)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights: {one_line(exc, typed=False)}") from exc
    for key in ("state_dict", "model", "teacher"):  # training checkpoints wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _check_hf_config(spec: EncoderSpec, path: Path) -> None:
    """A transformers ``config.json`` beside the weights must describe the preset's model:
    its type, and what the tensors' shapes do not show (activation, LayerNorm eps, MLP)."""
    import json

    cfg_path = path.parent / "config.json"
    if spec.hf is None or not cfg_path.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: cannot read: {one_line(exc, typed=False)}") from None
    eps = float(spec.kwargs.get("layer_norm_eps", 1e-6))
    want = {"model_type": spec.hf, "hidden_act": "gelu", "layer_norm_eps": eps}
    if spec.hf == "dinov2":
        want |= {"use_swiglu_ffn": False, "num_register_tokens": 0}
    have = {k: cfg.get(k, v if k in ("use_swiglu_ffn", "num_register_tokens") else None)
            for k, v in want.items()}  # fmt: skip
    wrong = [f"{k}={have[k]!r} (expected {v!r})" for k, v in want.items() if have[k] != v]
    if wrong:
        raise CheckpointError(f"{cfg_path}: not a {spec.name!r} checkpoint: {', '.join(wrong)}")


#: CoCa image-tower tensors the contrastive embedding before projection does not use.
_COCA_UNUSED = ("proj_contrast", "attn_pool_caption.", "ln_caption.")


def _coca_image_tower(sd: dict[str, Any]) -> dict[str, Any]:
    """A CoCa checkpoint's ``visual.`` tensors (text towers, logit scale, the contrastive
    projection and the caption pooler left out); a bare image tower is kept as it is."""
    if any(k.startswith("visual.") for k in sd):
        sd = {k[7:]: v for k, v in sd.items() if k.startswith("visual.")}
    return {k: v for k, v in sd.items() if not k.startswith(_COCA_UNUSED)}


def _resample_pos_embed(pos: Any, shape: tuple[int, ...]) -> Any:
    """A transformers checkpoint's (1, 1 + g * g, D) position embeddings for a model built
    for another square grid, resampled as transformers' DINOv2/ViT ``interpolate_pos_encoding``
    does at every forward (float32 bicubic to the new grid size, no antialiasing; the CLS
    position kept): done once here, the timm model then gives the same tokens."""
    import torch

    if tuple(pos.shape) == shape or pos.ndim != 3 or pos.shape[-1] != shape[-1]:
        return pos  # equal, or not a case of grid size: the shape check reports it
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(shape[1] - 1)
    if old * old != pos.shape[1] - 1 or new * new != shape[1] - 1:
        return pos
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).to(torch.float32)
    grid = torch.nn.functional.interpolate(
        grid, size=(new, new), mode="bicubic", align_corners=False
    ).to(pos.dtype)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def _load_into(encoder: Encoder, sd: dict[str, Any], path: Path) -> None:
    model = encoder.model
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if encoder.spec.pooling == "attn-pool":  # CONCH: the whole CoCa; its image tower's pooled path
        sd = _coca_image_tower(sd)
    own = model.state_dict()
    if is_hf_vit(sd):  # transformers ViT/DINOv2 (Phikon): renamed to timm's ViT
        _check_hf_config(encoder.spec, path)
        sd = timm_keys_from_hf(sd)
        if "pos_embed" in sd and "pos_embed" in own:
            sd["pos_embed"] = _resample_pos_embed(sd["pos_embed"], tuple(own["pos_embed"].shape))
    if encoder.spec.pooling == "gap-stage3":  # a truncated ResNet: layer4 and fc are unused
        sd = {k: v for k, v in sd.items() if k in own}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(own) if not k.startswith(("head.", "fc.")))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit encoder {encoder.spec.name!r}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]})"
        )
    try:
        model.load_state_dict({k: sd[k] for k in own}, strict=True)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(
            f"{path}: does not fit encoder {encoder.spec.name!r}: {one_line(exc, typed=False)}"
        ) from None


def load_encoder(
    name: str | Encoder, weights: str | Path | None = None, **build: Any
) -> LoadedEncoder:
    """Encoder ``name`` with ``weights``: a file or folder, ``"random"`` (seeded, for tests
    and benchmarks), or None for the published weights from the hub (needs network; gated
    models say how to get access). An :class:`Encoder` given is used as it is (``random``)."""
    import torch

    if isinstance(name, Encoder):
        return LoadedEncoder(name, "module", "unknown")
    if weights == "random":
        torch.manual_seed(0)
        return LoadedEncoder(build_encoder(name, **build), "random", "random")
    if weights is not None:
        path = _weights_file(Path(weights))
        encoder = build_encoder(name, **build)
        _load_into(encoder, read_state_dict(path), path)
        return LoadedEncoder(encoder, str(path), sha256_file(path))
    return _from_hub(name, **build)


def _from_hub(name: str, **build: Any) -> LoadedEncoder:
    if name.startswith("timm:"):
        hub = f"timm/{name[5:]}"
        files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
        access = "open timm weights"
    else:
        spec = encoder_spec(name)
        if spec.hub is None:
            raise ConfigError(f"encoder {name!r} has no published weights; give --weights FILE")
        hub, access = spec.hub.removeprefix("hf-hub:"), spec.access
        files = ("model.safetensors", "pytorch_model.bin")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ConfigError(
            f"encoder {name!r}: huggingface_hub is not installed; give --weights FILE|DIR"
        ) from None
    last: Exception | None = None
    path: Path | None = None
    for fname in files:
        try:
            path = Path(hf_hub_download(hub, fname))
            break
        except Exception as exc:  # gated, offline, or not this file name
            last = exc
            if "EntryNotFound" not in type(exc).__name__:
                break
    if path is None or not path.is_file():
        why = one_line(last, typed=False) if last else "not found"
        raise CheckpointError(
            f"encoder {name!r}: cannot fetch weights from https://huggingface.co/{hub} "
            f"({why[:160]}); {access}"
        )
    encoder = build_encoder(name, **build)
    _load_into(encoder, read_state_dict(path), path)
    return LoadedEncoder(encoder, f"hub:{hub}", sha256_file(path))
