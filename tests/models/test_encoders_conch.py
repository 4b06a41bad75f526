"""The CONCH preset against the conch package itself: a tiny random CoCa of conch's own code
and layout, saved as the hub's ``pytorch_model.bin`` and read back through tilenet's weights
path, gives conch's ``encode_image(x, proj_contrast=False, normalize=False)`` (TRIDENT's
embedding). conch is not on PyPI (``pip install git+https://github.com/mahmoodlab/CONCH``):
that test is skipped where it is not installed; tilenet itself never imports it.

So that CI checks the preset too, ``tests/data/conch_tiny/`` holds such a model's vision
tower (random weights, 240 KB) and what conch's ``encode_image`` gave for ``X``; rewrite
them, where conch is installed, with ``python tests/models/test_encoders_conch.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tilenet.engine.weights import load_encoder

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
DATA = Path(__file__).resolve().parents[1] / "data" / "conch_tiny"


def _conch_tiny() -> Any:
    """A tiny random CoCa of CONCH's own code and layout (conch_ViT-B-16.json scaled down:
    ViT 32-wide at 64 px, pooler 16-wide; its heads are always 8: CONCH's _build_vision_tower
    does not pass attn_pooler_heads on)."""
    # imported here, not at collection (~3 s of CPU in every pytest-xdist worker)
    coca_model = pytest.importorskip("conch.open_clip_custom.coca_model")
    torch.manual_seed(2)
    text = {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1,
            "embed_cls": True, "output_tokens": True}  # fmt: skip
    model = coca_model.CoCa(
        embed_dim=16,
        embed_dim_caption=32,
        vision_cfg={"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "num_heads": 2,
                    "attentional_pool_caption": True, "attentional_pool_contrast": True,
                    "attn_pooler_heads": 2, "n_queries_contrast": 1, "n_queries_caption": 4,
                    "output_tokens": True},
        text_cfg=text,
        multimodal_cfg={k: text[k] for k in ("context_length", "vocab_size", "width", "heads",
                                              "layers")},
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_conch_reproduces_encode_image_without_projection(tmp_path: Path) -> None:
    ref = _conch_tiny()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # the hub's file name
    loaded = load_encoder("conch", tmp_path, tiny=True, img_size=64)
    x = X
    with torch.no_grad():
        want = ref.encode_image(x, proj_contrast=False, normalize=False)
        got = loaded.encoder.eval()(x)
    assert got.shape == want.shape == (2, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conch_reproduces_encode_image_recorded_from_conch() -> None:
    """The same check without conch installed: its vision tower's weights and the
    ``encode_image`` output it gave, recorded by conch's own code (the module's docstring)."""
    rec = json.loads((DATA / "expected.json").read_text())
    assert float(X.double().sum()) == pytest.approx(rec["x_sum"], abs=1e-6)  # the same input
    loaded = load_encoder("conch", DATA, tiny=True, img_size=64)
    with torch.no_grad():
        got = loaded.encoder.eval()(X)
    want = torch.tensor(rec["encode_image"], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _record() -> None:
    """Write tests/data/conch_tiny/ from conch's own code (needs conch installed)."""
    ref = _conch_tiny()
    DATA.mkdir(parents=True, exist_ok=True)
    visual = {k: v for k, v in ref.state_dict().items() if k.startswith("visual.")}
    torch.save(visual, DATA / "pytorch_model.bin")
    with torch.no_grad():
        out = ref.encode_image(X, proj_contrast=False, normalize=False)
    rec = {"x_sum": float(X.double().sum()), "encode_image": out.tolist()}
    (DATA / "expected.json").write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    _record()
