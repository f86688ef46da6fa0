"""Convolutional stem and dense feature fusion for the 3D ViT (hybrid CNN-transformer).

A plain ViT embeds each ``8 x 16 x 16`` patch with one linear map, which on CPU-sized models
misses small and diffuse findings (a nodule of a dozen voxels is a small fraction of one
patch's linear response). Xiao et al. ("Early convolutions help transformers see better",
NeurIPS 2021) replace the patch embedding with a few strided 3x3 convolutions; the transformer
then runs on the same token grid. :class:`ConvStem` is that stem in 3D (three stride-2 stages,
then a patch convolution for the rest of the patch).

:class:`DenseFusion` gives the model spatial features finer than its tokens, as a U-Net / FPN
decoder does: the transformer tokens are upsampled to the grid of one stem stage and added to a
projection of that stage's features. The anatomy pooling, the prompt heatmaps and the MOSMOS
tag decoder then run on these dense features, so pooling follows organ masks at 4-voxel
resolution and heatmaps are 8x finer than the ViT grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvStem", "DenseFusion", "STEM_STAGES", "stem_widths"]

#: stride-2 stages of :class:`ConvStem` (the patch must be divisible by ``2 ** STEM_STAGES``).
STEM_STAGES = 3


def stem_widths(hidden_size: int) -> tuple[int, ...]:
    """Channel widths of the stem stages for a ViT of width ``hidden_size`` (``C/12, C/6, C/3``,
    at least 8 channels, multiples of 8)."""
    return tuple(max(8, (hidden_size // d) // 8 * 8) for d in (12, 6, 3))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each voxel of ``[B, C, D, H, W]`` (ConvNeXt style).

    Unlike group or instance norm it does not normalise over space, so a finding that shifts the
    intensity of a whole organ (emphysema, mosaic attenuation, effusion) is not normalised away.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def _norm(channels: int) -> nn.Module:
    return ChannelNorm(channels)


class ConvStem(nn.Module):
    """Three stride-2 ``3x3x3`` convolutions (each with a per-voxel channel LayerNorm and GELU), then a ``k = s`` patch
    convolution over the rest of the ViT patch.

    Args:
        in_channels: image channels.
        hidden_size: ViT token width.
        patch_size: the ViT patch; every entry must be divisible by 8.
        windows: ``(lo, hi)`` intensity windows (input units) stacked as extra input channels,
            each ``clip((x - lo) / (hi - lo), 0, 1) * 2 - 1``; empty for the raw input only.

    Forward: ``[B, in, D, H, W]`` -> ``(tokens [B, C, D/pd, H/ph, W/pw], stages)`` where ``stages``
    are the outputs of the stride-2 stages (strides 2, 4, 8).
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: Sequence[int], *,
                 windows: Sequence[Sequence[float]] = ()) -> None:
        super().__init__()
        self.windows = tuple((float(lo), float(hi)) for lo, hi in windows)
        if any(not hi > lo for lo, hi in self.windows):
            raise ValueError(f"every window needs hi > lo, got {self.windows}")
        patch = tuple(int(p) for p in patch_size)
        step = 2 ** STEM_STAGES
        if any(p % step for p in patch):
            raise ValueError(f"a convolutional stem needs a patch divisible by {step} in every axis, got {patch}")
        self.widths = stem_widths(hidden_size)
        layers = []
        prev = in_channels * (1 + len(self.windows))
        for width in self.widths:
            layers.append(nn.Sequential(
                nn.Conv3d(prev, width, kernel_size=3, stride=2, padding=1, bias=False), _norm(width), nn.GELU(),
            ))
            prev = width
        self.stages = nn.ModuleList(layers)
        rest = tuple(p // step for p in patch)
        self.patch = nn.Conv3d(prev, hidden_size, kernel_size=rest, stride=rest)

    def expand_windows(self, x: Tensor) -> Tensor:
        """``[B, in, ...]`` -> ``[B, in * (1 + windows), ...]``: the input, then each window of it."""
        if not self.windows:
            return x
        parts = [x] + [((x - lo) / (hi - lo)).clamp(0.0, 1.0) * 2.0 - 1.0 for lo, hi in self.windows]
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.expand_windows(x)
        stages = []
        for stage in self.stages:
            x = stage(x)
            stages.append(x)
        return self.patch(x), stages


class DenseFusion(nn.Module):
    """Upsampled transformer tokens + projected stem features -> dense features ``[B, M, C]``.

    Args:
        hidden_size: token width ``C``.
        skip_channels: channels of the stem stage that is fused.
        token_grid: ViT token grid.
        dense_grid: grid of that stem stage (the output grid).
    """

    def __init__(self, hidden_size: int, skip_channels: int, token_grid: Sequence[int],
                 dense_grid: Sequence[int]) -> None:
        super().__init__()
        self.token_grid = tuple(int(g) for g in token_grid)
        self.dense_grid = tuple(int(g) for g in dense_grid)
        self.skip = nn.Conv3d(skip_channels, hidden_size, kernel_size=1)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, tokens: Tensor, skip: Tensor, *, extra: Tensor | None = None) -> Tensor:
        """``tokens`` ``[B, N, C]`` on the token grid + ``skip`` ``[B, S, *dense_grid]`` (+ ``extra``
        ``[B, M, C]`` already on the dense grid, e.g. voxel statistics per cell) -> ``[B, M, C]``."""
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, *self.token_grid)
        up = F.interpolate(grid, size=self.dense_grid, mode="trilinear", align_corners=False)
        dense = (up + self.skip(skip)).flatten(2).transpose(1, 2)
        if extra is not None:
            dense = dense + extra
        return self.norm(dense)
