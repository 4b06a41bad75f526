"""Patch encoders: any timm model by name, and presets that rebuild pathology foundation
models as their authors define them (architecture, input, mean/std, pooling, precision).

``build_encoder("timm:resnet50")`` builds a plain timm model with ``num_classes=0`` (its
pooled pre-logits) and the model's own data config; ``build_encoder("uni2-h")`` builds the
UNI2-h architecture with the kwargs its model card gives. Both return an :class:`Encoder`:
a module mapping a normalised (B, 3, S, S) batch to (B, D) features, and its
:class:`EncoderSpec` (input size, mean/std, resize, pooling, precision, recommended patch).

Pooling, exactly (timm's ViTs put ``1 + reg_tokens`` prefix tokens in front of the patch
tokens, ``num_prefix_tokens``):

* ``token``: the CLS token of the final-normed tokens (UNI, UNI2-h, Prov-GigaPath,
  H-optimus, Phikon, Phikon-v2: ``last_hidden_state[:, 0]`` of transformers' ViT/DINOv2);
* ``cls+mean``: CLS concatenated with the mean of the *patch* tokens, register tokens
  skipped (Virchow, Virchow2: 2 x 1280 = 2560);
* ``pre-logits``: the model's own head without its classifier (any timm model);
* ``gap-stage3``: global average of ResNet-50's third stage (CLAM's ``resnet50_trunc``);
* ``attn-pool``: CoCa's contrastive attentional pooler before its projection (CONCH's
  ``encode_image(x, proj_contrast=False, normalize=False)``, :mod:`tilenet.models.coca`).

Phikon and Phikon-v2 are published as transformers ``ViTModel`` / ``Dinov2Model``
checkpoints; they are built as the same timm ViT, and :func:`timm_keys_from_hf` renames the
checkpoint's tensors (fusing query/key/value), so no transformers is needed to run them.

Weights are not read here (models read no files): the engine loads them
(:mod:`tilenet.engine.weights`). ``tiny=True`` builds the same family with small widths and
depths through the same code path, for tests without weights or network.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from tilenet.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "Encoder",
    "EncoderSpec",
    "Pooling",
    "build_encoder",
    "encoder_spec",
    "is_hf_vit",
    "list_encoders",
    "timm_keys_from_hf",
]

Pooling = Literal["token", "cls+mean", "pre-logits", "gap-stage3", "attn-pool"]
Precision = Literal["fp32", "fp16", "bf16"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: OpenAI CLIP's, which CONCH's factory sets on its image tower (not ImageNet's).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: Small widths for ``tiny=True`` ViTs (any family member keeps its registers and layout).
_TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
#: ...and for CoCa's pooler (``coca_*`` kwargs are the pooler's, not timm's; CONCH always
#: builds it with 8 heads: its _build_vision_tower does not pass attn_pooler_heads on).
_TINY_COCA = {"coca_embed_dim": 16, "coca_heads": 8}


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder needs of its input and what it gives back.

    The engine turns a (B, 3, P, P) uint8 patch batch into the model's input: resize to
    ``resize`` (when not None and not already that size; ``interpolation``, antialiased),
    centre-crop to ``input_size``, scale to [0, 1], subtract ``mean``, divide by ``std``.
    """

    name: str
    #: The timm architecture (or ``hub`` id) it is built from.
    arch: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: Pooling
    precision: Precision = "fp32"
    resize: int | None = None
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    #: Recommended patch side (pixels) and pixel size (µm) to read at.
    patch: int = 224
    mpp: float = 0.5
    #: ``hf-hub:owner/name`` of the published weights, where there are any.
    hub: str | None = None
    #: One line: how to get the weights (gated models).
    access: str = ""
    #: Architecture kwargs given to ``timm.create_model`` (plain data).
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: transformers ``model_type`` of the published checkpoint (``vit``, ``dinov2``) when it
    #: is not a timm one: its tensors are renamed by :func:`timm_keys_from_hf` on load.
    hf: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for output attributes."""
        return {
            "name": self.name,
            "arch": self.arch,
            "dim": self.dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "pooling": self.pooling,
            "precision": self.precision,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "hub": self.hub,
            # only where set: the attributes (and resume keys) of the timm presets stay as they were
            **({"hf": self.hf} if self.hf else {}),
        }


def _vit(
    name: str,
    arch: str,
    dim: int,
    *,
    hub: str,
    access: str,
    kwargs: dict[str, Any],
    pooling: Pooling = "token",
    precision: Precision = "fp16",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    patch: int = 224,
    resize: int | None = None,
    interpolation: Literal["bilinear", "bicubic"] = "bilinear",
    hf: str | None = None,
) -> EncoderSpec:
    return EncoderSpec(
        name, arch, dim, 224, mean, std, pooling, precision, resize, interpolation, patch,
        0.5, hub, access, {"img_size": 224, **kwargs}, hf,
    )  # fmt: skip


_MAHMOOD = "gated: request access at https://huggingface.co/{} (institutional e-mail), then `hf auth login` or --weights DIR"
_OWKIN = "open (Owkin non-commercial licence): https://huggingface.co/{}; offline: --weights DIR"
_GATED = "gated: accept the conditions at https://huggingface.co/{}, then `hf auth login` or --weights DIR"

#: Foundation-model presets (model cards and TRIDENT's loaders; see docs/embeddings).
PRESETS: dict[str, EncoderSpec] = {
    p.name: p
    for p in (
        _vit(
            "uni",
            "vit_large_patch16_224",
            1024,
            hub="hf-hub:MahmoodLab/uni",
            access=_MAHMOOD.format("MahmoodLab/uni"),
            kwargs={"patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            patch=256,
            resize=224,
        ),
        _vit(
            "uni2-h",
            "vit_giant_patch14_224",
            1536,
            hub="hf-hub:MahmoodLab/UNI2-h",
            access=_MAHMOOD.format("MahmoodLab/UNI2-h"),
            kwargs={
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "embed_dim": 1536,
                "init_values": 1e-5,
                "mlp_ratio": 2.66667 * 2,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 8,
                "no_embed_class": True,
                "dynamic_img_size": True,
            },
            precision="bf16",
            patch=256,
            resize=224,
        ),
        _vit(
            "virchow",
            "vit_huge_patch14_224",
            2560,
            hub="hf-hub:paige-ai/Virchow",
            access=_GATED.format("paige-ai/Virchow"),
            kwargs={
                "init_values": 1e-5,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "dynamic_img_size": True,
            },
            pooling="cls+mean",
            interpolation="bicubic",
        ),
        _vit(
            "virchow2",
            "vit_huge_patch14_224",
            2560,
            hub="hf-hub:paige-ai/Virchow2",
            access=_GATED.format("paige-ai/Virchow2"),
            kwargs={
                "init_values": 1e-5,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 4,
                "dynamic_img_size": True,
            },
            pooling="cls+mean",
            interpolation="bicubic",
        ),
        _vit(
            "gigapath",
            "vit_giant_patch14_dinov2",
            1536,
            hub="hf-hub:prov-gigapath/prov-gigapath",
            access=_GATED.format("prov-gigapath/prov-gigapath"),
            kwargs={
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
            },
            patch=256,
            resize=256,
            interpolation="bicubic",
        ),
        _vit(
            "h-optimus-0",
            "vit_giant_patch14_reg4_dinov2",
            1536,
            hub="hf-hub:bioptimus/H-optimus-0",
            access="open (Apache-2.0): downloaded from https://huggingface.co/bioptimus/H-optimus-0",
            kwargs={"init_values": 1e-5, "dynamic_img_size": False},
            mean=_HOPTIMUS_MEAN,
            std=_HOPTIMUS_STD,
        ),
        _vit(
            "h-optimus-1",
            "vit_giant_patch14_reg4_dinov2",
            1536,
            hub="hf-hub:bioptimus/H-optimus-1",
            access=_GATED.format("bioptimus/H-optimus-1"),
            kwargs={"init_values": 1e-5, "dynamic_img_size": False},
            mean=_HOPTIMUS_MEAN,
            std=_HOPTIMUS_STD,
        ),
        # transformers ViTModel (iBOT ViT-B/16): LayerNorm eps 1e-12 (ViTConfig), exact GELU;
        # TRIDENT: Resize(224, bilinear, antialias), ImageNet mean/std, fp32.
        _vit(
            "phikon",
            "vit_base_patch16_224",
            768,
            hub="hf-hub:owkin/phikon",
            access=_OWKIN.format("owkin/phikon"),
            kwargs={"layer_norm_eps": 1e-12},
            precision="fp32",
            hf="vit",
        ),
        # transformers Dinov2Model (ViT-L/16, LayerScale, eps 1e-6); TRIDENT: Resize(224) +
        # CenterCrop(224), ImageNet mean/std, fp32.
        _vit(
            "phikon-v2",
            "vit_large_patch16_224",
            1024,
            hub="hf-hub:owkin/phikon-v2",
            access=_OWKIN.format("owkin/phikon-v2"),
            kwargs={"init_values": 1.0},
            precision="fp32",
            resize=224,
            hf="dinov2",
        ),
        # CONCH (conch_ViT-B-16.json): timm ViT-B/16 trunk at 448, CoCa attentional pooler
        # (512-d, 8 heads, 1 query) + ln_contrast, no projection; CONCH's transform: Resize(448,
        # bicubic) + CenterCrop(448), OpenAI mean/std; TRIDENT: 512 px at 20x, fp32.
        EncoderSpec(
            "conch",
            "vit_base_patch16_224",
            512,
            448,
            _OPENAI_MEAN,
            _OPENAI_STD,
            "attn-pool",
            "fp32",
            448,
            "bicubic",
            512,
            0.5,
            "hf-hub:MahmoodLab/conch",
            _MAHMOOD.format("MahmoodLab/conch"),
            {
                "img_size": 448,
                "patch_size": 16,
                "dynamic_img_size": True,
                "coca_embed_dim": 512,
                "coca_heads": 8,
            },
        ),
        EncoderSpec(
            "resnet50-trunc",
            "resnet50.tv_in1k",
            1024,
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            "gap-stage3",
            "fp32",
            224,
            "bilinear",
            256,
            0.5,
            "hf-hub:timm/resnet50.tv_in1k",
            "open: torchvision ImageNet weights via timm",
            {"features_only": True, "out_indices": [3]},
        ),
    )
}

#: Presets that cannot be built from timm alone, with the one line that says why.
_NOT_BUILT = {
    name: "CONCH v1.5 (MahmoodLab/conchv1_5) is not supported: its image tower is defined only in "
    "TRIDENT's model zoo and has not been reproduced and tested against it here; use conch "
    "(v1) or run TRIDENT"
    for name in ("conch-v1.5", "conch_v15", "conchv1_5", "conch-v15")
} | {
    "ctranspath": "CTransPath is not supported: it needs timm-ctp (a fork of timm 0.5) for its "
    "Swin + ConvStem, which tilenet does not reproduce; use TRIDENT for it",
}


def list_encoders() -> list[str]:
    """Preset names (``timm:<name>`` builds any timm model besides)."""
    return sorted(PRESETS)


def encoder_spec(name: str) -> EncoderSpec:
    """The spec of a preset, or of ``timm:<name>`` (built to read its data config)."""
    if name.startswith("timm:"):
        return build_encoder(name).spec
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    if key in _NOT_BUILT:
        raise ConfigError(_NOT_BUILT[key])
    raise ConfigError(
        f"unknown encoder {name!r}: use timm:<timm model name> or one of {', '.join(list_encoders())}"
    )


def build_encoder(name: str, *, tiny: bool = False, **overrides: Any) -> Encoder:
    """The encoder ``name`` (a preset or ``timm:<name>``) with random weights.

    ``tiny``: small widths/depths of the same family (tests). ``overrides`` go to
    ``timm.create_model`` after the preset's kwargs.
    """
    import timm

    if name.startswith("timm:"):
        arch = name[5:]
        kwargs: dict[str, Any] = {"num_classes": 0, **overrides}
        try:
            model: Any = timm.create_model(arch, pretrained=False, **kwargs)
        except RuntimeError as exc:  # timm: "Unknown model (x)"
            raise ConfigError(f"encoder {name!r}: {exc}") from None
        cfg = timm.data.resolve_data_config({}, model=model)
        size = int(cfg["input_size"][-1])
        spec = EncoderSpec(
            name=name,
            arch=arch,
            dim=_output_dim(model, "pre-logits"),
            input_size=size,
            mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
            pooling="pre-logits",
            resize=math.floor(size / float(cfg.get("crop_pct") or 1.0)),
            interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
            patch=size,
            kwargs=kwargs,
        )
        return Encoder(model, spec)
    spec = encoder_spec(name)
    kwargs = {**spec.kwargs, **(_TINY_VIT if tiny and spec.pooling != "gap-stage3" else {})}
    kwargs = {**kwargs, **(_TINY_COCA if tiny and spec.pooling == "attn-pool" else {})}
    kwargs = {**kwargs, **overrides}
    timm_kwargs = {k: v for k, v in _resolve_layers(kwargs).items() if not k.startswith("coca_")}
    model = timm.create_model(spec.arch, pretrained=False, **timm_kwargs)
    if spec.pooling != "gap-stage3":
        model.reset_classifier(0)
    if spec.pooling == "attn-pool":
        from tilenet.models.coca import CoCaVision

        model = CoCaVision(model, int(kwargs["coca_embed_dim"]), int(kwargs["coca_heads"]))
    dim = _output_dim(model, spec.pooling)
    return Encoder(model, replace(spec, dim=dim, kwargs=kwargs))


def _resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer names kept as plain data in presets -> the classes timm takes."""
    import timm.layers

    out = dict(kwargs)
    if out.get("mlp_layer") == "SwiGLUPacked":
        out["mlp_layer"] = timm.layers.SwiGLUPacked
    if out.get("act_layer") == "SiLU":
        out["act_layer"] = torch.nn.SiLU
    if "layer_norm_eps" in out:  # transformers' ViT: LayerNorm eps 1e-12, not timm's 1e-6
        out["norm_layer"] = partial(nn.LayerNorm, eps=float(out.pop("layer_norm_eps")))
    return out


def _output_dim(model: Any, pooling: Pooling) -> int:
    if pooling == "cls+mean":
        return 2 * int(model.num_features)
    if pooling == "gap-stage3":
        return int(model.feature_info.channels()[-1])
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


#: transformers ViT / DINOv2 tensor names (as ``save_pretrained`` writes them, and as
#: transformers 5 names them in memory) -> timm's, per block and at the top.
_HF_BLOCK = {
    "layernorm_before": "norm1",  # ViT
    "layernorm_after": "norm2",
    "norm1": "norm1",  # DINOv2
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",  # ViT
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",  # DINOv2 (and transformers 5's ViT)
    "mlp.fc2": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
#: Tensors a feature extractor does not use: DINOv2's mask token, ViT's pooler.
_HF_UNUSED = ("embeddings.mask_token", "pooler.")
_HF_PREFIX = re.compile(r"^(vit|dinov2)\.")
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def is_hf_vit(sd: dict[str, Any]) -> bool:
    """Whether a state dict is a transformers ViT/DINOv2 one (``embeddings.patch_embeddings``)."""
    return any(_HF_PREFIX.sub("", k).startswith("embeddings.patch_embeddings.") for k in sd)


def timm_keys_from_hf(sd: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``ViTModel``/``Dinov2Model`` state dict renamed to timm's ViT.

    Query, key and value are concatenated into timm's fused ``qkv`` (that order); a leading
    ``vit.``/``dinov2.`` is dropped; the mask token and pooler are left out. Names that map to
    nothing are kept as they are, so the loader reports them as unexpected.
    """
    sd = {_HF_PREFIX.sub("", k): v for k, v in sd.items()}
    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in sd.items():
        if key.startswith(_HF_UNUSED):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            out[key] = value
            continue
        block, name, kind = int(m[1]), m[2], m[3]
        if name in _HF_QKV:
            qkv.setdefault((block, kind), {})[_HF_QKV[name]] = value
        elif kind == "lambda1" and f"{name}.lambda1" in _HF_BLOCK:
            out[f"blocks.{block}.{_HF_BLOCK[name + '.lambda1']}"] = value
        elif name in _HF_BLOCK:
            out[f"blocks.{block}.{_HF_BLOCK[name]}.{kind}"] = value
        else:
            out[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            out.update({f"encoder.layer.{block}.{p}.{kind}": t for p, t in parts.items()})
            continue
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


class Encoder(nn.Module):
    """A timm model and its pooling: normalised (B, 3, S, S) -> (B, D) float features."""

    def __init__(self, model: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.model: Any = model
        self.spec = spec
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooling = self.spec.pooling
        if pooling in ("pre-logits", "attn-pool"):
            return self.model(x)
        if pooling == "gap-stage3":
            return self.model(x)[-1].mean(dim=(2, 3))
        tokens = self.model.forward_features(x)  # (B, prefix + patches, D), final norm applied
        if pooling == "token":
            return tokens[:, 0]
        # cls+mean: registers (tokens 1 .. prefix-1) are neither CLS nor patches.
        return torch.cat([tokens[:, 0], tokens[:, self.prefix :].mean(dim=1)], dim=-1)
