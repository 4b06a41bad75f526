"""Encoders: each preset family's pooling, registers and normalisation on tiny random models;
the full-size presets' architectures on the meta device; weights files; errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tilenet.engine.embed import encoder_input
from tilenet.engine.weights import load_encoder
from tilenet.errors import CheckpointError, ConfigError
from tilenet.models.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    Encoder,
    build_encoder,
    encoder_spec,
    list_encoders,
)

X = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
#: Tiny ViTs at a 112 px input (8 x 8 patches of 14 px).
SMALL = {"img_size": 112}


def _tokens(enc: Encoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return enc.model.forward_features(x)


def test_virchow2_is_cls_plus_mean_of_patch_tokens_without_registers() -> None:
    torch.manual_seed(0)
    enc = build_encoder("virchow2", tiny=True, **SMALL).eval()
    assert enc.prefix == 5  # CLS + 4 registers
    with torch.no_grad():
        out = enc(X)
    tokens = _tokens(enc, X)
    assert tokens.shape[1] == 5 + 8 * 8  # 112 / 14 = 8 patches a side
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(out, want)
    assert out.shape == (2, 2 * 32) and enc.spec.dim == 64
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    assert not torch.allclose(out, with_registers, atol=1e-4)  # the registers matter


@pytest.mark.parametrize(("name", "prefix"), [("uni2-h", 9), ("h-optimus-0", 5), ("uni", 1)])
def test_token_presets_return_the_cls_token_as_timm_pools_it(name: str, prefix: int) -> None:
    torch.manual_seed(0)
    enc = build_encoder(name, tiny=True, **SMALL).eval()
    assert enc.prefix == prefix
    with torch.no_grad():
        out = enc(X[:1])
        timm_pooled = enc.model.forward_head(enc.model.forward_features(X[:1]), pre_logits=True)
    torch.testing.assert_close(out, _tokens(enc, X[:1])[:, 0])
    torch.testing.assert_close(out, timm_pooled)
    assert out.shape == (1, enc.spec.dim)


#: (embedding dim, prefix tokens, parameters in millions) of the published models.
FULL_SIZE = {
    "uni": (1024, 1, 303),
    "uni2-h": (1536, 9, 681),
    "virchow2": (2560, 5, 631),
    "gigapath": (1536, 1, 1134),
    "h-optimus-0": (1536, 5, 1134),
    "phikon": (768, 1, 86),
    "phikon-v2": (1024, 1, 303),
    "conch": (512, 1, 87.6),  # image tower to ln_contrast (checked against conch's CoCa too)
}


def test_uni2h_full_size_matches_its_published_architecture() -> None:
    _check_full_size({"uni2-h": FULL_SIZE["uni2-h"]})


@pytest.mark.slow  # ~10 s on a shared 2-core machine: builds five giant ViTs on meta
def test_full_size_presets_match_their_published_architectures() -> None:
    _check_full_size(FULL_SIZE)


def _check_full_size(expected: dict[str, tuple[int, int, float]]) -> None:
    """Widths, registers and parameter counts of the real models, built without memory."""
    for name, (dim, prefix, mparams) in expected.items():
        with torch.device("meta"):
            enc = build_encoder(name)
        n = sum(p.numel() for p in enc.parameters()) / 1e6
        assert (enc.spec.dim, enc.prefix) == (dim, prefix), name
        assert abs(n - mparams) / mparams < 0.01, (name, n)


def test_resnet50_trunc_is_the_mean_of_the_third_stage() -> None:
    torch.manual_seed(0)
    enc = build_encoder("resnet50-trunc", layers=[1, 1, 1, 1]).eval()
    x = X[:1, :, :64, :64]
    with torch.no_grad():
        out = enc(x)
        m = enc.model
        h = m.layer3(m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x)))))))
    torch.testing.assert_close(out, h.mean(dim=(2, 3)))
    assert out.shape == (1, 1024) == (1, enc.spec.dim)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("timm:test_resnet", {}),
        ("timm:swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": (1, 1, 1, 1),
                                               "num_heads": (1, 1, 1, 1)}),
    ],
)  # fmt: skip
def test_timm_models_give_pooled_pre_logits_and_their_data_config(name: str, kwargs: dict) -> None:
    import timm

    enc = build_encoder(name, **kwargs).eval()
    cfg = timm.data.resolve_data_config({}, model=enc.model)
    spec = enc.spec
    assert spec.pooling == "pre-logits" and spec.input_size == cfg["input_size"][-1]
    assert (spec.mean, spec.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    x = torch.randn(1, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        out = enc(x)
        want = enc.model.forward_head(enc.model.forward_features(x), pre_logits=True)
    assert out.shape == (1, spec.dim)
    torch.testing.assert_close(out.flatten(1), want.flatten(1))


def test_encoder_input_resizes_crops_and_normalises() -> None:
    spec = replace(PRESETS["gigapath"], resize=256, input_size=224)
    x = torch.full((2, 3, 256, 256), 200, dtype=torch.uint8)
    x[:, :, :16] = 0  # cropped away: outside the centre 224
    y = encoder_input(spec, "cpu")(x)
    assert y.shape == (2, 3, 224, 224) and y.dtype == torch.float32
    want = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(y[0, :, 112, 112], want)
    for c in range(3):  # the zeroed rows are cropped away: the rest stays uniform
        assert float(y[:, c, 20:].max() - y[:, c, 20:].min()) < 1e-4
    # a 256 patch for a model without resize: resized to its input as a whole
    small = encoder_input(replace(spec, resize=None), "cpu")(x)
    assert small.shape == (2, 3, 224, 224)


def test_encoder_input_resizes_as_pillow_does() -> None:
    """The models' own eval transforms resize with Pillow; on the CPU the uint8 resize is
    within 1 grey level of it (the float bicubic was up to ~19 levels off on noisy tiles)."""
    import numpy as np
    from PIL import Image

    spec = replace(PRESETS["gigapath"], resize=256, input_size=256)  # no crop: compare all
    tile = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(tile).resize((256, 256), Image.BICUBIC), np.float32)
    x = torch.from_numpy(tile).permute(2, 0, 1)[None]
    y = encoder_input(spec, "cpu")(x)[0].permute(1, 2, 0)
    mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
    pixels = (y * std + mean).numpy()  # back to grey levels
    assert np.abs(pixels - pil).max() <= 1.01


def test_weights_round_trip_through_safetensors_and_torch_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = build_encoder("uni2-h", tiny=True, **SMALL).eval()
    save_file(src.model.state_dict(), tmp_path / "model.safetensors")
    torch.save({"state_dict": src.model.state_dict()}, tmp_path / "w.pt")
    with torch.no_grad():
        want = src(X[:1])
    for w in (tmp_path, tmp_path / "w.pt"):
        loaded = load_encoder("uni2-h", w, tiny=True, **SMALL)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encoder.eval()(X[:1]), want)
        assert len(loaded.sha256) == 64
    with pytest.raises(CheckpointError, match="does not fit encoder 'virchow2'"):
        load_encoder("virchow2", tmp_path / "w.pt", tiny=True, **SMALL)


def test_pickled_objects_are_refused_not_run(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("x")}, bad)
    with pytest.raises(CheckpointError, match=r"evil\.pt: cannot read weights"):
        load_encoder("uni", bad, tiny=True)


def test_names_and_errors() -> None:
    assert {"uni", "uni2-h", "virchow2", "gigapath", "h-optimus-1"} <= set(list_encoders())
    with pytest.raises(ConfigError, match=r"unknown encoder 'nope'.*timm:"):
        encoder_spec("nope")
    with pytest.raises(ConfigError, match=r"CONCH v1\.5 .* is not supported: .*TRIDENT"):
        encoder_spec("conch_v15")
    with pytest.raises(ConfigError, match="CTransPath is not supported: it needs timm-ctp"):
        encoder_spec("ctranspath")
    with pytest.raises(ConfigError, match="timm:not_a_model"):
        build_encoder("timm:not_a_model")
    assert "huggingface.co/MahmoodLab/UNI2-h" in PRESETS["uni2-h"].access
    assert PRESETS["uni2-h"].precision == "bf16" and PRESETS["virchow2"].pooling == "cls+mean"
    assert PRESETS["h-optimus-0"].mean[0] == pytest.approx(0.707223)
    conch = PRESETS["conch"]  # CONCH's own transform: 448 bicubic, OpenAI CLIP mean/std
    assert (conch.input_size, conch.resize, conch.interpolation, conch.patch) == (
        448,
        448,
        "bicubic",
        512,
    )
    assert conch.mean[0] == pytest.approx(0.48145466) and conch.std[2] == pytest.approx(0.27577711)


@pytest.mark.parametrize("name", ["timm:mobilenetv3_small_050", "timm:test_resnet"])
def test_prepared_encoders_fold_every_batch_norm_and_keep_their_features(name: str) -> None:
    """What embed runs (engine.predictor.prepare_model): BatchNorm2d and timm's BatchNormAct2d
    folded into the convolutions before them (mobilenetv3_small_100: 34 folds, 2.4x the
    eager forward on 2 CPU cores with channels_last), the same features to float rounding."""
    import copy

    from tilenet.engine.predictor import prepare_model

    torch.manual_seed(0)
    enc = build_encoder(name).eval()
    for m in enc.modules():  # statistics other than the initial 0/1, or folding is a no-op
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = enc(x)
        prepared = prepare_model(copy.deepcopy(enc))
        got = prepared(x.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
