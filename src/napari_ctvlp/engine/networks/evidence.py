"""Finding evidence maps: where in its anatomy each finding's tag is recognised.

MOSMOS aligns pixels with tags: its recognition loss reads the tag through pixel-tag maps, so the
maps show where a tag is seen. Our tag decoder reads 32-42 mm tokens, and its last layer attends
almost alike for every tag, so its maps cannot point at a nodule. This module makes the pixel-tag
map the recognition itself, in the multiple-instance form of weakly supervised localisation
(class activation maps with log-sum-exp pooling, Pinheiro & Collobert 2015):

* every voxel is described by its fixed bins, the HU histogram bin and the bin of each texture
  filter (:class:`~napari_ctvlp.engine.networks.voxel_statistics.VoxelStatistics`);
* with ``compartments``, the HU bin is read together with the voxel's compartment, the first of
  the given anatomies (in order) that holds it: soft tissue in the mediastinal fat is then another
  bin than soft tissue in the heart or the aorta, as a radiologist reads a lymph node;
* a finding ``t`` gives each bin a learned weight ``w[t, k]``; a voxel's score is the sum of the
  weights of its bins, and the map of ``t`` is the mean voxel score of the finding's anatomy in
  each cell of ``cell`` voxels (stride 2 of the model grid here: 10 x 8 x 7 mm), smoothed over
  ``smooth`` cells;
* the finding's logit is a log-sum-exp over the anatomy's cells (voxel-count weighted) with a
  learned sharpness per finding, plus a bias: a small dense cluster (a nodule) can carry it, and
  a diffuse change (emphysema) can too, through a low sharpness that makes it a mean.

It is trained with the multi-label recognition loss on tags read from the report text
(:mod:`training.evidence`), never on the CT-RATE labels. Because the logit is computed from the
map, the loss trains the map: the voxels that raise it are the ones the map shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EvidenceOutput", "TagEvidence", "cell_histograms", "cell_index", "split_compartment_bins"]


def cell_index(image_size: Sequence[int], cell: int) -> Tensor:
    """``[V]`` long: the index of each model-grid voxel's cell of ``cell`` voxels (C order)."""
    grid = [int(s) // int(cell) for s in image_size]
    axes = [torch.arange(int(s)) // int(cell) for s in image_size]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return ((zz * grid[1] + yy) * grid[2] + xx).flatten()


def split_compartment_bins(bins: Tensor, masks: Tensor, compartments: Sequence[int], compartment_bins: int) -> Tensor:
    """Input bins ``[B, F, V]`` -> the first feature's bin plus ``compartment_bins`` times the voxel's
    compartment (the first of ``compartments`` whose mask in ``masks [B, A, ...]`` holds it, else a
    last one), the other features shifted past them. No ``compartments``: ``bins`` unchanged."""
    if not compartments:
        return bins
    flat = masks.flatten(2)
    compartment = torch.full_like(flat[:, 0], len(compartments), dtype=torch.long)
    for c in reversed(range(len(compartments))):  # the first anatomy that holds the voxel wins
        compartment = compartment.masked_fill(flat[:, compartments[c]].bool(), c)
    first = bins[:, :1].long() + compartment_bins * compartment[:, None]
    rest = bins[:, 1:].long() + compartment_bins * len(compartments)
    return torch.cat([first, rest], 1)


@torch.no_grad()
def compartment_layout(num_bins: int, compartments: Sequence[int], compartment_bins: int) -> tuple[
        tuple[int, ...], int, int]:
    """``(compartments, compartment_bins, head_bins)`` of a head over ``num_bins`` input bins whose
    first ``compartment_bins`` (the HU bin) are copied once per compartment (none: no split).

    Raises:
        ValueError: compartments without a valid ``compartment_bins``.
    """
    comps = tuple(int(a) for a in compartments)
    split = int(compartment_bins) if comps else 0
    if comps and not 1 <= split <= num_bins:
        raise ValueError("compartments need compartment_bins, the first feature's bins, in [1, num_bins]")
    return comps, split, int(num_bins) + split * len(comps)


def cell_histograms(bins: Tensor, masks: Tensor, *, groups: Sequence[int], voxel_cell: Tensor,
                    num_bins: int, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Voxel bins ``[B, F, V]`` in ``[0, num_bins)`` and anatomy masks ``[B, A, D, H, W]`` -> cell
    histograms ``[B, G, C, num_bins]`` (voxel counts of each bin inside each of the ``groups``
    anatomies) and voxel counts ``[B, G, C]`` (``voxel_cell``: each voxel's cell, :func:`cell_index`).
    ``out``: buffers ``[B, G, C * num_bins]`` and ``[B, G, C]`` to fill (a training loop reuses them:
    touching fresh memory for the ~2 GB of a batch costs more than the counting)."""
    b, f, v = bins.shape
    if v != voxel_cell.numel():
        raise ValueError(f"bins cover {v} voxels, the model grid has {voxel_cell.numel()}")
    k, c = int(num_bins), int(voxel_cell.max()) + 1
    index = (voxel_cell.view(1, 1, -1) * k + bins.long()).flatten(1)  # [B, F V]
    if out is not None and tuple(out[0].shape) == (b, len(groups), c * k) and tuple(out[1].shape) == (b, len(groups), c):
        counts, voxels = out[0].zero_(), out[1].zero_()
    else:
        counts = torch.zeros(b, len(groups), c * k, device=bins.device)
        voxels = torch.zeros(b, len(groups), c, device=bins.device)
    for i, g in enumerate(groups):
        inside = masks[:, g].flatten(1).float()  # [B, V]
        counts[:, i].scatter_add_(1, index, inside.repeat(1, f))
        voxels[:, i].scatter_add_(1, voxel_cell.expand(b, -1), inside)
    return counts.view(b, len(groups), c, k), voxels

#: sharpness = MIN_SHARPNESS + SHARPNESS_SCALE * softplus(raw): from a near-mean to a near-max pooling
MIN_SHARPNESS, SHARPNESS_SCALE = 0.5, 4.0


@dataclass(frozen=True)
class EvidenceOutput:
    """Output of :class:`TagEvidence`.

    Attributes:
        maps: ``[B, T, d, h, w]`` mean voxel score of each cell of the finding's anatomy (0 where
            the cell holds none of it; see ``inside``), on the cell grid.
        inside: ``[B, T, d, h, w]`` bool, the cell holds voxels of the finding's anatomy.
        logits: ``[B, T]`` recognition logits.
    """

    maps: Tensor
    inside: Tensor
    logits: Tensor


class TagEvidence(nn.Module):
    """Per-finding voxel-bin weights, pooled to cell maps and to logits (see the module docstring).

    Args:
        num_bins: number of distinct input voxel bins (HU bins + texture bins, offset so they do not overlap).
        tag_anatomy: for each finding tag, the index of its anatomy among the model's anatomies.
        image_size: model grid ``(D, H, W)``.
        cell: cell size in voxels along each axis (must divide ``image_size``).
        smooth: cells of the box smoothing (odd; 1 for none).
        compartments: anatomy indices, in priority order, whose masks split the first bin feature
            (the HU bin) by compartment; a voxel in none of them is in a last compartment. Empty:
            no split.
        compartment_bins: number of bins of the first feature (needed with ``compartments``).
    """

    def __init__(self, *, num_bins: int, tag_anatomy: Sequence[int], image_size: Sequence[int], cell: int = 2,
                 smooth: int = 1, compartments: Sequence[int] = (), compartment_bins: int = 0) -> None:
        super().__init__()
        self.compartments, self.compartment_bins, self.num_bins = compartment_layout(
            num_bins, compartments, compartment_bins)
        #: bins of the input features; the head's own bins add the compartments' copies of the first feature
        self.input_bins = int(num_bins)
        self.tag_anatomy = tuple(int(a) for a in tag_anatomy)
        self.image_size = tuple(int(s) for s in image_size)
        self.cell = int(cell)
        self.smooth = int(smooth)
        if self.num_bins < 2 or not self.tag_anatomy or min(self.tag_anatomy) < 0:
            raise ValueError("TagEvidence needs >= 2 bins and a non-negative anatomy index per tag")
        if self.cell < 1 or any(s % self.cell for s in self.image_size):
            raise ValueError(f"cell {self.cell} must divide the model grid {self.image_size}")
        if self.smooth < 1 or self.smooth % 2 == 0:
            raise ValueError(f"smooth must be a positive odd number of cells, got {self.smooth}")
        self.groups = tuple(sorted(set(self.tag_anatomy)))
        self.grid = tuple(s // self.cell for s in self.image_size)
        tags = len(self.tag_anatomy)
        self.weight = nn.Parameter(torch.zeros(tags, self.num_bins))
        self.sharpness = nn.Parameter(torch.zeros(tags))
        self.bias = nn.Parameter(torch.zeros(tags))
        self.register_buffer("voxel_cell", cell_index(self.image_size, self.cell), persistent=False)
        #: the tags of each group, and each tag's group; forward scores tags in group order, then
        #: puts them back in tag order (``_inverse``)
        self.group_tags = tuple(tuple(t for t in range(tags) if self.tag_anatomy[t] == g) for g in self.groups)
        self.register_buffer("_tag_group", torch.tensor([self.groups.index(a) for a in self.tag_anatomy]),
                             persistent=False)
        order = torch.tensor([t for group in self.group_tags for t in group])
        self.register_buffer("_inverse", torch.argsort(order), persistent=False)

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def split_bins(self, bins: Tensor, masks: Tensor) -> Tensor:
        """Input bins ``[B, F, V]`` -> the head's bins (:func:`split_compartment_bins`)."""
        return split_compartment_bins(bins, masks, self.compartments, self.compartment_bins)

    @torch.no_grad()
    def cell_counts(self, bins: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Voxel bins ``[B, F, V]`` (offset, in ``[0, input_bins)``) and anatomy masks ``[B, A, D, H, W]``
        -> per-group cell histograms ``[B, G, C, num_bins]`` (voxel counts of each bin inside the
        group's anatomy) and voxel counts ``[B, G, C]`` (G: the anatomies that have tags)."""
        return cell_histograms(self.split_bins(bins, masks), masks, groups=self.groups, voxel_cell=self.voxel_cell,
                               num_bins=self.num_bins)

    def forward(self, counts: Tensor, voxels: Tensor) -> EvidenceOutput:
        """:meth:`cell_counts` output -> maps, where they are defined, and logits."""
        b = counts.shape[0]
        parts = [counts[:, i] @ self.weight[list(tags)].T.to(counts.dtype)  # [B, C, T_g] score sums
                 for i, tags in enumerate(self.group_tags)]
        total = torch.cat(parts, -1).transpose(1, 2)[:, self._inverse]  # [B, T, C]
        n = voxels[:, self._tag_group]  # each tag's anatomy voxels per cell
        if self.smooth > 1:
            shape = (b, total.shape[1], *self.grid)
            pad = self.smooth // 2
            total = F.avg_pool3d(total.reshape(shape), self.smooth, 1, pad).flatten(2)
            n = F.avg_pool3d(n.reshape(shape), self.smooth, 1, pad).flatten(2)
        inside = n > 1e-6
        score = torch.where(inside, total / n.clamp_min(1e-6), torch.zeros_like(total))
        sharp = (MIN_SHARPNESS + SHARPNESS_SCALE * F.softplus(self.sharpness)).view(1, -1, 1)
        log_w = torch.log(n.clamp_min(1e-6)).masked_fill(~inside, -1e4)
        pooled = torch.logsumexp(score * sharp + log_w, -1) - torch.logsumexp(log_w, -1)
        logits = pooled / sharp[..., 0] + self.bias
        # a scan without the anatomy has nothing to recognise the tag from: its logit is the bias
        logits = torch.where(inside.any(-1), logits, self.bias.expand_as(logits))
        return EvidenceOutput(score.view(b, -1, *self.grid), inside.view(b, -1, *self.grid), logits)
