"""Phikon and Phikon-v2 presets against transformers itself: a tiny random ``ViTModel`` /
``Dinov2Model`` written by ``save_pretrained`` and read back through tilenet's weights path
(``--weights FOLDER``) gives HF's ``last_hidden_state[:, 0]``. transformers is a dev
dependency only: tilenet runs these checkpoints as timm ViTs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tilenet.engine.weights import load_encoder
from tilenet.errors import CheckpointError
from tilenet.models.encoders import IMAGENET_MEAN, IMAGENET_STD, PRESETS, timm_keys_from_hf

#: The tiny widths ``tiny=True`` gives every ViT preset, at a 112 px input (7 x 7 patches of 16).
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 112,
        "patch_size": 16}  # fmt: skip
X = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def _hf_model(kind: str, **config: Any) -> Any:
    """A random transformers model of the preset's family, perturbed so LayerNorm affine
    parameters and LayerScale are not their identity inits (a swapped name would show)."""
    # imported here, not at collection: transformers costs ~2.5 s of CPU to import, paid only
    # by the pytest-xdist worker that runs these tests
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(1)
    if kind == "vit":
        cfg = ViTConfig(intermediate_size=128, **{**TINY, **config})
        model = ViTModel(cfg, add_pooling_layer=False)
    else:
        model = Dinov2Model(Dinov2Config(mlp_ratio=4, **{**TINY, **config}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.slow  # imports transformers (~4 s); .ci/run runs it
@pytest.mark.parametrize(("name", "kind"), [("phikon", "vit"), ("phikon-v2", "dinov2")])
def test_phikon_presets_reproduce_transformers_cls_token(
    tmp_path: Path, name: str, kind: str
) -> None:
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    loaded = load_encoder(name, tmp_path, tiny=True, img_size=112)
    enc = loaded.encoder.eval()
    with torch.no_grad():
        want = hf(pixel_values=X).last_hidden_state[:, 0]
        got = enc(X)
    assert got.shape == want.shape == (2, 32) and enc.spec.dim == 32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert loaded.source.endswith("model.safetensors") and len(loaded.sha256) == 64


def test_phikon_presets_are_their_authors_definitions() -> None:
    v1, v2 = PRESETS["phikon"], PRESETS["phikon-v2"]
    for spec in (v1, v2):
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert (spec.input_size, spec.pooling, spec.precision, spec.interpolation) == (
            224, "token", "fp32", "bilinear")  # fmt: skip
        assert (spec.patch, spec.mpp) == (224, 0.5)
    assert (v1.dim, v1.hf, v1.resize, v1.kwargs["layer_norm_eps"]) == (768, "vit", None, 1e-12)
    assert (v2.dim, v2.hf, v2.resize) == (1024, "dinov2", 224)
    assert v2.to_dict()["hf"] == "dinov2" and "hf" not in PRESETS["uni"].to_dict()


def test_tilenet_never_imports_transformers() -> None:
    """transformers is a dev dependency: no tilenet module imports it, even lazily."""
    import re

    import tilenet

    files = list(Path(tilenet.__file__).parent.rglob("*.py"))
    pattern = re.compile(r"^\s*(from|import)\s+transformers\b", re.M)
    found = [p.name for p in files if pattern.search(p.read_text())]
    assert len(files) > 50 and not found


@pytest.mark.slow  # imports transformers (~4 s); .ci/run runs it
def test_a_config_of_another_model_is_refused(tmp_path: Path) -> None:
    hf = _hf_model("vit", layer_norm_eps=1e-6)
    hf.save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"config\.json: not a 'phikon' checkpoint: layer_norm_eps"
    ):
        load_encoder("phikon", tmp_path, tiny=True, img_size=112)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "layer_norm_eps": 1e-12}))
    with pytest.raises(CheckpointError, match=r"model_type='vit' \(expected 'dinov2'\)"):
        load_encoder("phikon-v2", tmp_path, tiny=True, img_size=112)


@pytest.mark.slow  # imports transformers (~4 s); .ci/run runs it
def test_key_mapping_fuses_qkv_and_drops_what_a_feature_extractor_does_not_use() -> None:
    hf = _hf_model("dinov2")
    sd = {f"dinov2.{k}": v for k, v in hf.state_dict().items()}
    sd["pooler.dense.weight"] = torch.zeros(1)
    out = timm_keys_from_hf(sd)
    # transformers 5 names tensors in memory as q_proj/k_proj/v_proj (files keep query/key/value)
    q = sd["dinov2.encoder.layer.1.attention.q_proj.weight"]
    v = sd["dinov2.encoder.layer.1.attention.v_proj.weight"]
    torch.testing.assert_close(out["blocks.1.attn.qkv.weight"][:32], q)
    torch.testing.assert_close(out["blocks.1.attn.qkv.weight"][64:], v)
    assert "blocks.0.ls2.gamma" in out and "cls_token" in out
    assert not any("mask_token" in k or "pooler" in k or k.startswith("dinov2.") for k in out)


@pytest.mark.slow  # imports transformers (~4 s); .ci/run runs it
def test_a_checkpoint_for_another_input_size_is_resampled_as_transformers_does(
    tmp_path: Path,
) -> None:
    """Position embeddings saved for 160 px (10 x 10 patches) and run at 112 (7 x 7):
    transformers resamples them at every forward; tilenet once, on load, to the same values."""
    hf = _hf_model("dinov2", image_size=160)
    hf.save_pretrained(tmp_path)
    enc = load_encoder("phikon-v2", tmp_path, tiny=True, img_size=112).encoder.eval()
    with torch.no_grad():
        want = hf(pixel_values=X).last_hidden_state[:, 0]
        torch.testing.assert_close(enc(X), want, rtol=1e-5, atol=1e-5)
