"""segmentation_models_pytorch architectures as ``smp.<Arch>`` (``smp.Unet``, ``smp.FPN``, ...).

Keyword arguments go to the smp class (``encoder_name``, ``encoder_depth``, ...), except
``encoder_weights``, which is always ``None`` here: models read no files and never download;
encoder weights come from a local file (:func:`tilenet.engine.checkpoint.load_encoder_weights`) or,
as an explicit opt-in, through smp's and timm's own downloads
(:func:`tilenet.engine.checkpoint.load_pretrained_encoder`). smp and timm are
imported when a model is built, not when the registry is (importing them takes seconds).

The stride is the encoder's output stride; the receptive field and exactness come from
tracing the encoder, decoder and head (:mod:`tilenet.models.receptive`), so encoders with
squeeze-and-excitation, attention or pyramid pooling are reported as not exact.

Offered: Unet, UnetPlusPlus, FPN, Linknet, MAnet, PSPNet, DeepLabV3, DeepLabV3Plus, PAN and
UPerNet. Linknet's decoder tests a skip's channel count, which torch.fx cannot trace: it runs
here with that test decided from the encoder's declared channels (same output). MAnet's
attention over all positions (a reshape merging H and W) and squeeze-and-excitation make it
not exact. Not offered, because their receptive field cannot be traced: Segformer (a list of
maps built in a Python loop over shapes) and DPT (a ViT encoder).

:func:`encoder_normalization` gives the mean/std a pretrained encoder was trained with, from
tables installed with timm and here (never the network; smp 0.6 keeps its own on the hub).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch import nn

from tilenet.models.registry import TileModel, register_model

__all__ = ["ARCHITECTURES", "SmpModel", "encoder_normalization", "timm_pretrained_cfg"]

#: smp classes offered (those missing from the installed smp raise a ModelError when built).
ARCHITECTURES = (
    "DeepLabV3",
    "DeepLabV3Plus",
    "FPN",
    "Linknet",
    "MAnet",
    "PAN",
    "PSPNet",
    "UPerNet",
    "Unet",
    "UnetPlusPlus",
)
#: Extra downsampling of a decoder past the encoder: PAN's feature pyramid attention
#: pools its input three more times (x8).
_DECODER_STRIDE = {"PAN": 8}
#: ImageNet statistics in [0, 1] (timm.data.IMAGENET_DEFAULT_MEAN/STD), which smp's own
#: encoders were trained with, except those listed in _ENCODER_STATS (pretrainedmodels').
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_DPN = ((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3)
_ENCODER_STATS = {
    "inceptionresnetv2": _HALF,
    "inceptionv4": _HALF,
    "xception": _HALF,
    **{f"dpn{n}": _DPN for n in ("68", "68b", "92", "98", "107", "131")},
}


class SmpModel(TileModel):
    """An smp segmentation model (no classification head) returning per-pixel logits."""

    def __init__(
        self, net: nn.Module, *, in_channels: int, num_classes: int, decoder_stride: int = 1
    ) -> None:
        super().__init__(in_channels, num_classes)
        encoder: Any = net.encoder
        self._stride_hint = int(encoder.output_stride) * decoder_stride
        self.stride = self._stride_hint
        self.net = net

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        # smp's forward minus its input-shape check (TileModel.forward does that).
        net: Any = self.net
        features = net.encoder(x)
        if type(net).__name__ == "Linknet":
            return net.segmentation_head(self._linknet_decoder(features))
        return net.segmentation_head(net.decoder(features))

    def _linknet_decoder(self, features: list[torch.Tensor]) -> torch.Tensor:
        """smp's ``LinknetDecoder.forward``, its test of a skip's channel count (which
        torch.fx cannot trace) decided from the encoder's declared channels instead."""
        net: Any = self.net
        channels = list(net.encoder.out_channels)[1:][::-1]
        features = features[1:][::-1]
        x = features[0]
        for i, block in enumerate(net.decoder.blocks):
            x = block.block(x)
            if i + 1 < len(features) and channels[i + 1] != 0:
                x = x + features[i + 1]
        return x

    @property
    def encoder_name(self) -> str:
        """The smp encoder name (``resnet34``, ``tu-convnext_atto``, ...)."""
        return str(self.spec.kwargs.get("encoder_name", "resnet34"))

    @property
    def encoder(self) -> nn.Module:
        """The smp encoder (what encoder weight files fill)."""
        return self.net.encoder  # type: ignore[return-value]


def encoder_normalization(encoder_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) per RGB channel, in [0, 1], of the pretrained ``encoder_name``.

    ``tu-<name>`` reads timm's offline ``pretrained_cfg`` of ``<name>``; smp's own encoders
    use ImageNet's statistics except the few trained otherwise (inception, xception, dpn).
    Raises ``ValueError`` for a timm encoder that timm knows no pretrained weights for.

    >>> encoder_normalization("resnet34")
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    >>> encoder_normalization("inceptionv4")[0]
    (0.5, 0.5, 0.5)
    """
    if not encoder_name.startswith("tu-"):
        return _ENCODER_STATS.get(encoder_name, _IMAGENET)
    name = encoder_name[3:]
    cfg = timm_pretrained_cfg(name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        raise ValueError(
            f"timm has no pretrained statistics for {name!r}; use model.normalization=data"
        )
    return tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))


def timm_pretrained_cfg(name: str) -> Any:
    """timm's offline ``pretrained_cfg`` of ``name`` (``NAME`` or ``NAME.TAG``) when timm
    publishes weights for it, else None.

    >>> timm_pretrained_cfg("regnetx_002").hf_hub_id
    'timm/regnetx_002.pycls_in1k'
    """
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):  # an unknown tag
        return None
    return cfg if cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file) else None


def _encoder_names(smp: Any) -> list[str]:
    return sorted(smp.encoders.get_encoder_names())


def _builder(arch: str) -> Any:
    def build(*, in_channels: int, num_classes: int, **kwargs: Any) -> SmpModel:
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            raise ValueError(
                "segmentation-models-pytorch is not installed; "
                "pip install segmentation-models-pytorch timm"
            ) from None
        cls = getattr(smp, arch, None)
        if cls is None:
            raise ValueError(f"the installed smp {smp.__version__} has no {arch}")
        if kwargs.get("encoder_weights") is not None:
            raise ValueError(
                "model.kwargs.encoder_weights: tilenet loads encoder weights from a local file "
                "or, with model.allow_download=true, by name (imagenet): set "
                "model.encoder_weights instead"
            )
        kwargs["encoder_weights"] = None
        name = kwargs.get("encoder_name", "resnet34")
        names = _encoder_names(smp)
        if not isinstance(name, str) or (name not in names and not name.startswith("tu-")):
            close = difflib.get_close_matches(str(name), names, n=5)
            raise ValueError(
                f"unknown encoder {name!r}; close matches: {', '.join(close) or 'none'}"
            )
        if name.startswith("tu-"):  # timm's names, with an optional pretrained tag
            import timm

            base = name[3:].split(".")[0]
            if not timm.is_model(base):
                close = difflib.get_close_matches(base, timm.list_models(), n=5)
                raise ValueError(
                    f"unknown timm encoder {name!r}; close matches: "
                    f"{', '.join('tu-' + c for c in close) or 'none'}"
                )
        for key in ("in_channels", "classes", "aux_params"):
            if key in kwargs:
                raise ValueError(f"{key!r} is set by tilenet, not in kwargs")
        # smp passes unknown keys on to the encoder, and its own encoders ignore them: a
        # misspelt option would be silently dropped. Only timm encoders ("tu-") take more.
        params = inspect.signature(cls.__init__).parameters
        valid = sorted(k for k in params if k not in ("self", "kwargs", "in_channels", "classes"))
        unknown = sorted(set(kwargs) - set(valid))
        if unknown and not name.startswith("tu-"):
            raise ValueError(
                f"smp.{arch} has no option {unknown[0]!r}; valid options: {', '.join(valid)}"
            )
        try:
            net = cls(in_channels=in_channels, classes=num_classes, **kwargs)
        except (KeyError, RuntimeError, AttributeError) as exc:
            raise ValueError(f"smp.{arch}: {exc}") from None
        return SmpModel(
            net,
            in_channels=in_channels,
            num_classes=num_classes,
            decoder_stride=_DECODER_STRIDE.get(arch, 1),
        )

    build.__doc__ = f"segmentation_models_pytorch.{arch}; kwargs go to smp (encoder_weights=None)."
    return build


for _arch in ARCHITECTURES:
    register_model(f"smp.{_arch}")(_builder(_arch))
