"""Intensity statistics inside each anatomy mask and each feature cell, at voxel resolution.

Attention pooling over coarse tokens sees an organ through ``8 x 8 x 8``-voxel cells, most of
which straddle the organ border; a small calcification is a few voxels of one cell's response,
and a 100 HU shift of the whole lung is a small change of every token. A radiologist (and a
logistic regression on the same grid, mean AUC 0.84 on the phantoms) reads these findings from
the HU histogram of the organ. :class:`VoxelStatistics` gives the model that reading, computed
exactly on the voxel mask:

* a fixed HU histogram of the anatomy's voxels (bins with radiological edges: the -950 HU
  emphysema threshold, lung, ground glass, fat, fluid, soft tissue, contrast, calcium; as log
  shares) and the anatomy's volume share (log);
* the masked mean and the masked maximum of a learned stride-4 feature map (the second stage
  of the convolutional stem), so blob-like findings (nodules, calcified plaques) are not averaged
  away;

* with ``texture=True``, the histograms of three fixed texture filters (two band-pass images
  and the local spread, :mod:`.texture`), which tell nodules, strands, septa and bronchial walls
  from ground glass and vessels of the same HU;

all mapped by a small MLP to the pooling width and added to the anatomy's attention-pooled
feature (:class:`~.anatomy_pooling.AnatomyPooling`). The same statistics per feature cell (the
histogram of the cell's voxels, the mean and maximum of the stride-4 features inside it) are
added to the dense spatial features, so prompt heatmaps and pixel-tag maps see local HU content
at the resolution of their grid.

The histogram has no gradient (the bin of a voxel is a step function of its value); the learned
statistics train the stem directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_ctvlp.engine.networks.texture import TextureFilters

__all__ = ["AnatomyLinear", "VoxelStatistics", "STATISTICS_STRIDE"]

#: stride of the learned feature map the statistics read (the second convolutional stem stage).
STATISTICS_STRIDE = 4
#: histogram shares enter as ``log(share + HIST_FLOOR)``: a calcified plaque is 0.1% of the aorta's
#: voxels, a share that a linear reading of the histogram would not tell from none.
HIST_FLOOR = 1e-4
#: the direct path reads log shares as ``(log - LOG_CENTRE) / LOG_SCALE`` (``log(1e-4)`` -> -2, ``log(1)`` -> 2).
LOG_CENTRE, LOG_SCALE = -4.6, 2.3


class AnatomyLinear(nn.Module):
    """One linear map per anatomy: ``[..., A, F] -> [..., A, E]``, or every row through the map of
    one anatomy (``anatomy=j``), or each row through the map of its own anatomy (``anatomy`` a
    long tensor of the leading shape). Initialised as :class:`torch.nn.Linear` is."""

    def __init__(self, num_anatomies: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = in_features ** -0.5
        self.weight = nn.Parameter(torch.empty(num_anatomies, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_anatomies, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor, *, anatomy: int | Tensor | None = None) -> Tensor:
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if anatomy is None:
            if x.shape[-2] != w.shape[0]:
                raise ValueError(f"expected [..., {w.shape[0]}, F] inputs (one row per anatomy), got {tuple(x.shape)}")
            return torch.einsum("...af,afe->...ae", x, w) + b
        if isinstance(anatomy, int):
            return x @ w[anatomy] + b[anatomy]
        return torch.einsum("...f,...fe->...e", x, w[anatomy]) + b[anatomy]


class VoxelStatistics(nn.Module):
    """Per-anatomy and per-cell intensity statistics (see the module docstring).

    Args:
        edges: inner histogram edges in input units (``len(edges) + 1`` bins; the outer bins are open).
        feature_channels: channels of the stride-4 feature map.
        hidden_size: pooling / token width ``C``.
        embed_dim: joint-space width ``E`` (the direct linear path).
        image_size: model input grid ``(D, H, W)``.
        cell: feature cell size in voxels (``CTVLPConfig.feature_patch``); every entry a multiple of 4.
        texture: add the texture-filter histograms (:class:`.texture.TextureFilters`).
        num_anatomies: ``0``: one direct linear map for every anatomy; ``A``: one per anatomy
            (:class:`AnatomyLinear`; :meth:`heads` then needs to know the anatomy of each row).
    """

    def __init__(self, *, edges: Sequence[float], feature_channels: int, hidden_size: int, embed_dim: int,
                 image_size: Sequence[int], cell: Sequence[int], texture: bool = False,
                 num_anatomies: int = 0) -> None:
        super().__init__()
        inner = [float(e) for e in edges]
        if not inner or any(b <= a for a, b in zip(inner, inner[1:])):
            raise ValueError(f"edges must be a non-empty increasing sequence, got {edges!r}")
        self.bins = len(inner) + 1
        self.image_size = tuple(int(s) for s in image_size)
        self.cell = tuple(int(c) for c in cell)
        if any(c % STATISTICS_STRIDE for c in self.cell) or any(s % c for s, c in zip(self.image_size, self.cell)):
            raise ValueError(f"cell {self.cell} must be a multiple of {STATISTICS_STRIDE} dividing {self.image_size}")
        self.register_buffer("edges", torch.tensor(inner, dtype=torch.float32), persistent=False)
        grid = [s // c for s, c in zip(self.image_size, self.cell)]
        # cell index of every voxel (row-major over the cell grid, as the token order)
        axes = [torch.arange(s) // c for s, c in zip(self.image_size, self.cell)]
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        self.register_buffer("voxel_cell", ((zz * grid[1] + yy) * grid[2] + xx).flatten(), persistent=False)
        self.num_cells = grid[0] * grid[1] * grid[2]
        self.texture = TextureFilters() if texture else None
        self.texture_bins = self.texture.bins if self.texture is not None else 0
        anatomy_in = self.bins + 1 + self.texture_bins + 2 * feature_channels
        self.anatomy_mlp = nn.Sequential(
            nn.LayerNorm(anatomy_in), nn.Linear(anatomy_in, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size),
        )
        self.anatomy_direct: nn.Module = (
            AnatomyLinear(num_anatomies, anatomy_in, embed_dim) if num_anatomies else nn.Linear(anatomy_in, embed_dim)
        )
        cell_in = self.bins + self.texture_bins + 2 * feature_channels
        self.cell_proj = nn.Sequential(nn.LayerNorm(cell_in), nn.Linear(cell_in, hidden_size))

    def bin_index(self, image: Tensor) -> Tensor:
        """``[B, 1, D, H, W]`` -> histogram bin of every voxel ``[B, V]`` (long)."""
        return torch.bucketize(image.detach().flatten(1).float().contiguous(), self.edges)

    def voxel_bins(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """Every voxel's HU bin ``[B, V]`` and texture bins ``[B, F, V]`` (None without texture): the
        fixed part of the statistics, computed once per image and passed to :meth:`cell_inputs` and
        :meth:`anatomy_inputs` (``bins=``)."""
        with torch.no_grad():
            return self.bin_index(image), (self.texture.bin_index(image) if self.texture is not None else None)

    def cell_features(self, image: Tensor, features: Tensor) -> Tensor:
        """Per-cell statistics ``[B, N, C]`` (N cells in token order) from the image and the stride-4 features."""
        return self.cell_proj(self.cell_inputs(image, features))

    def cell_inputs(self, image: Tensor, features: Tensor, *, bins: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """The raw per-cell statistics ``[B, N, bins + T + 2 S]``: each cell's voxel histogram (log
        shares), its texture histograms (``T`` bins, log shares; none without ``texture``), then the
        mean and the maximum of the stride-4 features ``[B, S, ...]`` inside it."""
        hu_bins, tex_bins = self.voxel_bins(image) if bins is None else bins
        with torch.no_grad():
            hist = self._cell_histogram(hu_bins.unsqueeze(1), self.bins)
            if tex_bins is not None:
                hist = torch.cat([hist, self._cell_histogram(tex_bins, self.texture_bins)], -1)
        kernel = tuple(c // STATISTICS_STRIDE for c in self.cell)
        mean = F.avg_pool3d(features, kernel).flatten(2).transpose(1, 2)
        peak = F.max_pool3d(features, kernel).flatten(2).transpose(1, 2)
        return torch.cat([hist.to(features.dtype), mean, peak], dim=-1)

    def _cell_histogram(self, bins: Tensor, k: int) -> Tensor:
        """Voxel bins ``[B, F, V]`` (``F`` maps sharing ``k`` bins) -> per-cell log shares ``[B, N, k]``
        (each map's voxels counted once per cell: shares of one map sum to 1)."""
        b = bins.shape[0]
        hist = torch.zeros(b, self.num_cells * k, device=bins.device)
        for f in range(bins.shape[1]):
            index = self.voxel_cell.unsqueeze(0) * k + bins[:, f]
            hist.scatter_add_(1, index, torch.ones_like(index, dtype=hist.dtype))
        hist = hist.view(b, self.num_cells, k) / float(self.cell[0] * self.cell[1] * self.cell[2])
        return torch.log(hist + HIST_FLOOR)

    @staticmethod
    def _anatomy_histogram(bins: Tensor, k: int, flat: Tensor) -> Tensor:
        """Voxel bins ``[B, F, V]`` (``F`` maps sharing ``k`` bins) and masks ``[B, A, V]`` -> voxel
        counts ``[B, A, k]`` per anatomy (each map's voxels counted once)."""
        b, a = flat.shape[:2]
        hist = torch.zeros(b, a, k, device=bins.device)
        for i in range(a):  # one anatomy at a time: bounded memory
            weight = flat[:, i].float()
            for f in range(bins.shape[1]):
                hist[:, i].scatter_add_(1, bins[:, f], weight)
        return hist

    def anatomy_features(self, image: Tensor, features: Tensor, masks: Tensor, *,
                         bins: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
        """Per-anatomy statistics from the image, the stride-4 features ``[B, S, ...]`` and the
        anatomy masks ``[B, A, D, H, W]`` on the model grid (zeros for empty masks):
        ``(hidden [B, A, C], direct [B, A, E])``. ``hidden`` (an MLP of the statistics) joins the
        attention-pooled feature; ``direct`` (a linear map of them, histogram rescaled to about
        [-2, 2]) is added to the joint-space embedding before its normalisation, a path along which
        the contrastive loss learns a histogram reading in a few hundred steps."""
        return self.heads(*self.anatomy_inputs(image, features, masks, bins=bins))

    def cell_anatomy_features(self, cells: Tensor, *, anatomy: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each feature cell read as a one-cell anatomy: :meth:`cell_inputs` output ``[B, N, F]``
        -> ``(hidden [B, N, C], direct [B, N, E])`` through the same heads as the anatomies (the
        volume share is the cell's). Prompt heatmaps use it, so a cell scores a finding by the same
        histogram reading that scores the organ. With per-anatomy heads, ``anatomy`` (an index, or
        ``[B, N]`` indices: the anatomy of each cell) picks the head."""
        k = self.bins
        share = self.cell[0] * self.cell[1] * self.cell[2] / float(self.voxel_cell.numel())
        volume = cells.new_full((*cells.shape[:-1], 1), math.log(share + 1e-4))
        stats = torch.cat([cells[..., :k], volume, cells[..., k:]], dim=-1)
        return self.heads(stats, torch.ones(cells.shape[:-1], dtype=torch.bool, device=cells.device), anatomy=anatomy)

    @property
    def per_anatomy(self) -> bool:
        """True when every anatomy has its own direct head."""
        return isinstance(self.anatomy_direct, AnatomyLinear)

    def heads(self, stats: Tensor, present: Tensor, *, anatomy: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Raw statistics ``[..., bins + 1 + T + 2 S]`` (:meth:`anatomy_inputs` layout) and ``present``
        -> ``(hidden [..., C], direct [..., E])``, zero where not present. Per-anatomy heads read
        rows ``[..., A, F]`` (one per anatomy) or, with ``anatomy``, the given anatomy's rows (a
        shared head ignores ``anatomy``)."""
        keep = present.unsqueeze(-1).to(stats.dtype)
        k = self.bins + 1 + self.texture_bins
        scaled = torch.cat([(stats[..., :k] - LOG_CENTRE) / LOG_SCALE * keep, stats[..., k:]], dim=-1)
        direct = self.anatomy_direct(scaled, anatomy=anatomy) if self.per_anatomy else self.anatomy_direct(scaled)
        return self.anatomy_mlp(stats) * keep, direct * keep

    def anatomy_inputs(self, image: Tensor, features: Tensor, masks: Tensor, *,
                       bins: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, Tensor]:
        """The raw per-anatomy statistics ``[B, A, bins + 1 + T + 2 S]`` and ``present`` ``[B, A]``: the
        histogram of the anatomy's voxels (``log(share + HIST_FLOOR)``), ``log(volume share + 1e-4)``,
        the texture histograms (``T`` bins, log shares; none without ``texture``), then the mean of
        the stride-4 features weighted by the share of each cell inside the anatomy and their
        maximum over the cells at least half inside (any cell touching it for thin anatomies)."""
        k = self.bins
        flat = masks.flatten(2)
        hu_bins, tex_bins = self.voxel_bins(image) if bins is None else bins
        with torch.no_grad():
            hist = self._anatomy_histogram(hu_bins.unsqueeze(1), k, flat)
            count = hist.sum(-1, keepdim=True)
            present = count.squeeze(-1) > 0
            hist = torch.log(hist / count.clamp_min(1.0) + HIST_FLOOR) * present.unsqueeze(-1)
            volume = torch.log(count / flat.shape[-1] + 1e-4) * present.unsqueeze(-1)
            if tex_bins is not None:  # [B, F, V]
                tex = self._anatomy_histogram(tex_bins, self.texture_bins, flat)
                tex = torch.log(tex / count.clamp_min(1.0) + HIST_FLOOR) * present.unsqueeze(-1)
                volume = torch.cat([volume, tex], dim=-1)
        w = F.avg_pool3d(masks.float(), STATISTICS_STRIDE).flatten(2).to(features.dtype)  # [B, A, M] fractions
        f = features.flatten(2)  # [B, S, M]
        mean = (w @ f.transpose(1, 2)) / w.sum(-1, keepdim=True).clamp_min(1e-6)
        inside = w >= 0.5
        inside = torch.where(inside.any(-1, keepdim=True), inside, w > 0)
        neg = torch.zeros_like(w).masked_fill(~inside, float("-inf"))
        peak = (f.unsqueeze(1) + neg.unsqueeze(2)).amax(-1)  # [B, A, S]
        peak = torch.where(present.unsqueeze(-1), peak, torch.zeros_like(peak))
        mean = torch.where(present.unsqueeze(-1), mean, torch.zeros_like(mean))
        return torch.cat([hist.to(f.dtype), volume.to(f.dtype), mean, peak], dim=-1), present
