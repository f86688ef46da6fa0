"""3D Vision Transformer image encoder.

The image encoder of CA-GCL (Zhang et al., "Anatomy-guided global contrastive learning for
fine-grained 3D CT vision-language pre-training") and CT-CLIP: a plain ViT (Dosovitskiy et al.,
"An image is worth 16x16 words", ICLR 2021) on non-overlapping 3D patches, written in MONAI style.
Attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
kernels where available).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from napari_ctvlp.engine.networks.conv_stem import ConvStem

__all__ = ["Attention", "TransformerBlock", "ViT3D"]


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Args:
        hidden_size: token width; must be divisible by ``num_heads``.
        num_heads: attention heads.
        dropout: attention and output dropout rate.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = float(dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(mlp_dim, hidden_size), nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """3D ViT: Conv3d patch embedding, learnable position embedding, pre-norm blocks, final LayerNorm.

    Args:
        image_size: input grid ``(D, H, W)``.
        patch_size: patch size; must divide ``image_size`` in every axis.
        in_channels: input channels.
        hidden_size: token width ``C``.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_dim: MLP hidden width.
        dropout: dropout rate.
        gradient_checkpointing: recompute each block in the backward pass when training.
        stem: ``"patch"`` (one linear patch embedding, the plain ViT) or ``"conv"``
            (:class:`~.conv_stem.ConvStem`: strided 3D convolutions, then the patch convolution).
        stem_windows: intensity windows the convolutional stem adds as input channels.

    Forward: ``[B, in_channels, D, H, W]`` -> tokens ``[B, N, C]`` with
    ``N = prod(image_size // patch_size)`` in C (row-major) order over the token grid.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (112, 256, 352),
        patch_size: Sequence[int] = (16, 16, 32),
        *,
        in_channels: int = 1,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        stem: str = "patch",
        stem_windows: Sequence[Sequence[float]] = (),
    ) -> None:
        super().__init__()
        image_size = tuple(int(s) for s in image_size)
        patch_size = tuple(int(p) for p in patch_size)
        if len(image_size) != 3 or len(patch_size) != 3:
            raise ValueError(f"image_size {image_size} and patch_size {patch_size} must have 3 entries each")
        if min(image_size) < 1 or min(patch_size) < 1:
            raise ValueError(f"image_size {image_size} and patch_size {patch_size} must be positive")
        if any(s % p for s, p in zip(image_size, patch_size)):
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.grid = tuple(s // p for s, p in zip(image_size, patch_size))
        self.num_tokens = math.prod(self.grid)
        self.gradient_checkpointing = gradient_checkpointing
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        self.stem = stem

        if stem == "conv":
            self.patch_embed: nn.Module = ConvStem(in_channels, hidden_size, patch_size, windows=stem_windows)
        else:
            self.patch_embed = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Image ``[B, in_channels, D, H, W]`` -> tokens ``[B, N, C]``."""
        return self.forward_features(x)[0]

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Image -> ``(tokens [B, N, C], stem stages)``; the stage list is empty for ``stem="patch"``."""
        expected = (self.in_channels, *self.image_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"ViT3D input has shape {tuple(x.shape)}, expected [B, {', '.join(map(str, expected))}]"
            )
        if self.stem == "conv":
            x, stages = self.patch_embed(x)
        else:
            x, stages = self.patch_embed(x), []
        x = x.flatten(2).transpose(1, 2)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x), stages
