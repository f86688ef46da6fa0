"""Tag decoder: pixel-tag attention maps and multi-label tag recognition.

MOSMOS (Tian et al., "MOSMOS: Multi-organ segmentation facilitated by medical report
supervision") decodes a vocabulary of report tags (organ and finding words) against the visual
tokens: each tag's text embedding, with a shared learnable prompt context, becomes a query of a
transformer decoder over the ViT tokens. The decoded queries give (a) multi-label recognition
logits and (b) pixel-tag attention maps, which are the decoder's own cross-attention weights
(MOSMOS eqs. 8 and 12: the last decoder layer's query-to-token attention, averaged over heads).
Because the logits are computed *through* those weights, the recognition loss trains the maps;
there is no separate, untrained map projection. The earlier layers run through
``nn.MultiheadAttention``'s fused path (:func:`torch.nn.functional.scaled_dot_product_attention`);
the last layer's cross-attention asks for its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["TagDecoder", "TagOutput"]


@dataclass(frozen=True)
class TagOutput:
    """Output of :class:`TagDecoder` / ``CTVLP.decode_tags``.

    Attributes:
        maps: ``[B, T, N]`` pixel-tag attention: the last decoder layer's cross-attention of each
            tag query over the N tokens (mean over heads; every row sums to 1).
        logits: ``[B, T]`` multi-label recognition logits (sigmoid -> probability).
    """

    maps: Tensor
    logits: Tensor


class TagDecoder(nn.Module):
    """Transformer decoder with tag-text queries and a shared learnable context.

    Args:
        hidden_size: visual token width ``C`` (also the decoder width).
        embed_dim: width ``E`` of the tag text embeddings.
        num_layers: ``nn.TransformerDecoder`` layers.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_dim: decoder feed-forward width.
        context_length: learnable context vectors prepended to the tag queries (shared by all
            tags, like a learnable prompt context); they join the decoder's self-attention.
        dropout: decoder dropout rate.
    """

    def __init__(
        self,
        hidden_size: int,
        embed_dim: int,
        *,
        num_layers: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        context_length: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if context_length < 0:
            raise ValueError(f"context_length must be >= 0, got {context_length}")
        self.hidden_size = hidden_size
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.tag_proj = nn.Linear(embed_dim, hidden_size)
        self.context = nn.Parameter(torch.randn(context_length, hidden_size) * 0.02)
        self.memory_norm = nn.LayerNorm(hidden_size)
        layer = nn.TransformerDecoderLayer(
            hidden_size, num_heads, dim_feedforward=mlp_dim, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(hidden_size))
        self.cls_head = nn.Linear(hidden_size, 1)

    @staticmethod
    def _last_layer(layer: nn.TransformerDecoderLayer, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """One pre-norm decoder layer (as ``nn.TransformerDecoderLayer`` with ``norm_first=True``)
        that also returns its cross-attention weights ``[B, Q, N]`` (mean over heads)."""
        h = layer.norm1(x)
        x = x + layer.dropout1(layer.self_attn(h, h, h, need_weights=False)[0])
        h = layer.norm2(x)
        out, weights = layer.multihead_attn(h, memory, memory, need_weights=True, average_attn_weights=True)
        x = x + layer.dropout2(out)
        h = layer.norm3(x)
        x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(h)))))
        return x, weights

    def forward(self, tokens: Tensor, tag_embeddings: Tensor) -> TagOutput:
        """Visual tokens ``[B, N, C]`` and tag embeddings ``[T, E]`` -> :class:`TagOutput`."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.hidden_size:
            raise ValueError(f"tokens must be [B, N, {self.hidden_size}], got {tuple(tokens.shape)}")
        if tag_embeddings.ndim != 2 or tag_embeddings.shape[-1] != self.embed_dim or tag_embeddings.shape[0] < 1:
            raise ValueError(f"tag_embeddings must be [T, {self.embed_dim}] with T >= 1, got {tuple(tag_embeddings.shape)}")
        b = tokens.shape[0]
        t = tag_embeddings.shape[0]
        queries = self.tag_proj(tag_embeddings.to(tokens.dtype)).unsqueeze(0).expand(b, t, -1)
        context = self.context.unsqueeze(0).expand(b, -1, -1)
        memory = self.memory_norm(tokens)
        x = torch.cat([context, queries], dim=1)
        *first, last = self.decoder.layers
        for layer in first:
            x = layer(x, memory)
        x, weights = self._last_layer(last, x, memory)
        decoded = self.decoder.norm(x)[:, self.context_length:]
        logits = self.cls_head(decoded).squeeze(-1)
        return TagOutput(maps=weights[:, self.context_length:], logits=logits)
