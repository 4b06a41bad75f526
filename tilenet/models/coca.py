"""CONCH's image tower (a CoCa ViT-B/16), as its authors define it, for patch embeddings.

CONCH (``mahmoodlab/CONCH``, ``conch/open_clip_custom``) builds a timm ``VisionTransformer``
trunk (``forward_features``: final-normed tokens) and pools it for its contrastive embedding
with an attentional pooler: one learned query, LayerNormed, attends (``nn.MultiheadAttention``
with ``kdim = vdim =`` the trunk's width) to the LayerNormed tokens; the one output token is
LayerNormed (``ln_contrast``). TRIDENT's embedding is ``encode_image(x, proj_contrast=False,
normalize=False)``: exactly that, without the ``proj_contrast`` projection and without L2
normalisation. Parameter names are the checkpoint's (``visual.`` dropped), so its tensors load
as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["AttentionalPooler", "CoCaVision"]


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries attending to a token sequence (CoCa's pooler)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, context_dim) tokens -> (B, n_queries, d_model)."""
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class CoCaVision(nn.Module):
    """A ViT trunk and CoCa's contrastive attentional pooling: (B, 3, S, S) -> (B, embed_dim),
    before the contrastive projection (CONCH's ``proj_contrast=False``)."""

    def __init__(self, trunk: Any, embed_dim: int, heads: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(embed_dim, int(trunk.num_features), heads, 1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.num_features = embed_dim
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
