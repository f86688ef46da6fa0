"""Anatomy-guided pooling of ViT tokens into one embedding per anatomy.

CA-GCL (Zhang et al., "Anatomy-guided global contrastive learning for fine-grained 3D CT
vision-language pre-training") aligns each anatomy's visual embedding with the sentences of the
report that describe it. Here every anatomy has ONE learnable query that cross-attends only the
tokens its mask covers; all anatomies and all heads are computed in a single masked
:func:`torch.nn.functional.scaled_dot_product_attention` call (no Python loop over organs).

Token masks are either boolean (a token belongs to the anatomy when any voxel of its patch does)
or fractional (``[0, 1]``: the share of the patch inside the anatomy). Fractional masks weigh each
token's attention by that share (``log(fraction)`` added to the attention logits), so a token that
is 5% lung counts 5% as much as one fully inside the lung, in training and at inference alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AnatomyEmbeddings", "AnatomyPooling"]


@dataclass(frozen=True)
class AnatomyEmbeddings:
    """Output of :meth:`AnatomyPooling.forward` / ``CTVLP.pool_anatomies``.

    Attributes:
        embeddings: ``[B, A, E]`` L2-normalised anatomy embeddings (zeros where absent).
        present: ``[B, A]`` bool, False where the anatomy mask covers no token.
        attention: ``[B, A, N]`` softmax weights (mean over heads, 0 outside the mask and for
            absent anatomies), or None unless requested.
        pooled: ``[B, A, C]`` the attention output before the statistics and the projection
            (what :meth:`AnatomyPooling.embed` needs to re-embed an anatomy), or None unless requested.
    """

    embeddings: Tensor
    present: Tensor
    attention: Tensor | None = None
    pooled: Tensor | None = None


class AnatomyPooling(nn.Module):
    """One learnable query per anatomy, cross-attending only its anatomy's tokens.

    Args:
        num_anatomies: number of anatomy queries ``A``.
        hidden_size: token width ``C``.
        embed_dim: joint-space width ``E``.
        num_heads: attention heads; must divide ``hidden_size``.

    The value path (``norm_kv`` -> ``v`` -> ``out_proj`` -> ``norm_out`` -> ``image_proj``) is also
    applied to single tokens by :meth:`project_tokens`, so a token embedding lives in the same
    space as the pooled anatomy embedding (a convex combination of the projected values).
    """

    def __init__(self, num_anatomies: int, hidden_size: int, embed_dim: int, *, num_heads: int = 8) -> None:
        super().__init__()
        if num_anatomies < 1:
            raise ValueError(f"num_anatomies must be >= 1, got {num_anatomies}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_anatomies = num_anatomies
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.queries = nn.Parameter(torch.randn(num_anatomies, hidden_size) * 0.02)
        self.norm_kv = nn.LayerNorm(hidden_size)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.norm_out = nn.LayerNorm(hidden_size)
        self.image_proj = nn.Linear(hidden_size, embed_dim)

    def _heads(self, x: Tensor) -> Tensor:
        """``[B, L, C]`` -> ``[B, heads, L, C/heads]``."""
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _check(self, tokens: Tensor, token_masks: Tensor) -> None:
        if tokens.ndim != 3 or tokens.shape[-1] != self.hidden_size:
            raise ValueError(f"tokens must be [B, N, {self.hidden_size}], got {tuple(tokens.shape)}")
        expected = (tokens.shape[0], self.num_anatomies, tokens.shape[1])
        if tuple(token_masks.shape) != expected:
            raise ValueError(
                f"token_masks has shape {tuple(token_masks.shape)}, expected [B, A, N] = {list(expected)} "
                f"for tokens {tuple(tokens.shape)}"
            )
        if token_masks.dtype != torch.bool and not token_masks.is_floating_point():
            raise ValueError(f"token_masks must be a bool or floating (fraction) tensor, got {token_masks.dtype}")

    def _finish(self, pooled: Tensor, direct: Tensor | None = None) -> Tensor:
        """Attention output ``[..., C]`` (before ``out_proj``) (+ ``direct`` ``[..., E]`` before the
        normalisation) -> normalised joint embedding."""
        out = self.image_proj(self.norm_out(self.out_proj(pooled)))
        if direct is not None:
            out = out + direct.to(out.dtype)
        return F.normalize(out, dim=-1)

    def forward(self, tokens: Tensor, token_masks: Tensor, *, statistics: Tensor | None = None,
                direct: Tensor | None = None, return_attention: bool = False) -> AnatomyEmbeddings:
        """Pool ``tokens`` ``[B, N, C]`` per anatomy given ``token_masks`` ``[B, A, N]`` (bool, or
        fractions in ``[0, 1]`` that weigh each token by the share of it inside the anatomy).
        ``statistics`` ``[B, A, C]`` (voxel statistics of each anatomy) are added to the attention
        output before its projection; ``direct`` ``[B, A, E]`` is added to the joint-space embedding
        before its normalisation."""
        self._check(tokens, token_masks)
        if statistics is not None and tuple(statistics.shape) != (tokens.shape[0], self.num_anatomies, self.hidden_size):
            raise ValueError(f"statistics must be [B, A, C], got {tuple(statistics.shape)}")
        b, n, c = tokens.shape
        a = self.num_anatomies
        if token_masks.dtype == torch.bool:
            present = token_masks.any(-1)  # [B, A]
            # Rows of absent anatomies attend everything (avoids NaN) and are zeroed afterwards.
            attn_mask = token_masks | ~present.unsqueeze(-1)  # [B, A, N]
        else:
            w = token_masks.to(tokens.dtype).clamp(0.0, 1.0)
            present = (w > 0).any(-1)
            bias = torch.where(w > 0, w.clamp_min(1e-6).log(), torch.full_like(w, float("-inf")))
            attn_mask = torch.where(present.unsqueeze(-1), bias, torch.zeros_like(bias))
        kv = self.norm_kv(tokens)
        q = self._heads(self.q(self.queries).unsqueeze(0).expand(b, a, c))  # [B, h, A, d]
        k = self._heads(self.k(kv))  # [B, h, N, d]
        v = self._heads(self.v(kv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.unsqueeze(1))  # [B, h, A, d]
        out = out.transpose(1, 2).reshape(b, a, c)
        emb = self.embed(out, statistics=statistics, direct=direct) * present.unsqueeze(-1).to(tokens.dtype)
        attention = None
        if return_attention:
            scores = (q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5  # [B, h, A, N]
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask.unsqueeze(1), float("-inf"))
            else:
                scores = scores + attn_mask.unsqueeze(1)
            attention = scores.softmax(-1).mean(1) * present.unsqueeze(-1).to(scores.dtype)
        return AnatomyEmbeddings(embeddings=emb, present=present, attention=attention,
                                 pooled=out if return_attention else None)

    def embed(self, pooled: Tensor, *, statistics: Tensor | None = None, direct: Tensor | None = None) -> Tensor:
        """Attention output ``[..., C]`` (+ statistics ``[..., C]``, + direct ``[..., E]``) -> the
        L2-normalised joint-space embedding, as :meth:`forward` computes it."""
        if statistics is not None:
            pooled = pooled + statistics.to(pooled.dtype)
        return self._finish(pooled, direct)

    def project_tokens(self, tokens: Tensor, *, statistics: Tensor | None = None,
                       direct: Tensor | None = None) -> Tensor:
        """Per-token embeddings ``[B, N, E]`` (L2-normalised) through the pooling value path, with
        optional per-token ``statistics`` ``[B, N, C]`` and ``direct`` ``[B, N, E]`` terms added as
        :meth:`forward` adds an anatomy's (a token is then embedded as a one-token anatomy)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.hidden_size:
            raise ValueError(f"tokens must be [B, N, {self.hidden_size}], got {tuple(tokens.shape)}")
        return self.embed(self.v(self.norm_kv(tokens)), statistics=statistics, direct=direct)
