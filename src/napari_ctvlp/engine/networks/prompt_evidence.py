"""Prompt evidence: any sentence's own score and map over the cells of an anatomy.

CA-GCL scores a prompt by the cosine between the prompt's embedding and one pooled embedding of
the whole anatomy. At CPU scale that pooled vector cannot hold every finding of a lung, and its
prompt heatmaps do not point at lesions (issue 11). This head grounds the sentence in the cells
instead, as fine-grained vision-language models align words with regions (FILIP, SPARC), in the
multiple-instance form of :mod:`~napari_ctvlp.engine.networks.evidence`:

* every cell of 2 x 2 x 2 model-grid voxels is described by the histogram of its voxels' fixed
  bins inside the anatomy (HU bin by compartment, texture bins; the same bins as the finding
  evidence head);
* a sentence's frozen text feature ``u`` (the text backbone's mean-pooled sentence feature,
  L2-normalised) gives each bin a weight ``U_a u + c_a`` for anatomy ``a``, so a cell's score is the
  mean weight of its voxels' bins, and the sentence's map is that score over the anatomy;
* the sentence's score for the scan is a log-sum-exp of the cell scores over the anatomy
  (voxel-count weighted) with a sharpness ``s_a . u + s0_a``: a nodule can carry it, and so can a
  diffuse change, through a low sharpness that makes it a mean.

It is trained (:mod:`training.prompt_evidence`) with the sentence contrast of
:mod:`training.sentence_loss`: for each report sentence, a softmax over the batch's scans of
their scores, the scans whose report holds the sentence as targets. No tag and no label is read,
so scoring a finding with prompt wordings is zero-shot in CLIP's sense, and the map of a prompt
is the evidence its score was computed from. A zero-shot probability is
``sigmoid(score(positive) - score(negative))``; each score is defined up to a constant per
sentence (the softmax over scans does not see it), so the probability is a ranking, not a
calibrated risk, as with the cosine scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_ctvlp.engine.networks.evidence import MIN_SHARPNESS, SHARPNESS_SCALE, cell_histograms, cell_index, \
    compartment_layout, split_compartment_bins

__all__ = ["PromptEvidence"]


class PromptEvidence(nn.Module):
    """Text-conditioned bin weights, pooled to cell maps and scan scores (module docstring).

    Args:
        num_bins: number of distinct input voxel bins (HU + texture bins, offset so they do not overlap).
        text_dim: width of the text features (the text backbone's hidden size).
        groups: anatomy indices the head scores sentences in.
        image_size: model grid ``(D, H, W)``.
        cell: cell size in voxels (must divide ``image_size``).
        compartments: anatomy indices, in priority order, that split the HU bin (as in
            :class:`~napari_ctvlp.engine.networks.evidence.TagEvidence`).
        compartment_bins: number of HU bins (needed with ``compartments``).
    """

    def __init__(self, *, num_bins: int, text_dim: int, groups: Sequence[int], image_size: Sequence[int],
                 cell: int = 2, compartments: Sequence[int] = (), compartment_bins: int = 0) -> None:
        super().__init__()
        self.compartments, self.compartment_bins, self.num_bins = compartment_layout(
            num_bins, compartments, compartment_bins)
        self.input_bins = int(num_bins)
        self.groups = tuple(int(g) for g in groups)
        self.image_size = tuple(int(s) for s in image_size)
        self.cell = int(cell)
        if not self.groups or len(set(self.groups)) != len(self.groups) or min(self.groups) < 0:
            raise ValueError(f"groups must be distinct non-negative anatomy indices, got {groups!r}")
        if self.cell < 1 or any(s % self.cell for s in self.image_size):
            raise ValueError(f"cell {self.cell} must divide the model grid {self.image_size}")
        if text_dim < 1 or self.num_bins < 2:
            raise ValueError("PromptEvidence needs text_dim >= 1 and >= 2 bins")
        self.grid = tuple(s // self.cell for s in self.image_size)
        g = len(self.groups)
        self.weight = nn.Parameter(torch.zeros(g, int(text_dim), self.num_bins))
        self.bias = nn.Parameter(torch.zeros(g, self.num_bins))
        self.sharp_weight = nn.Parameter(torch.zeros(g, int(text_dim)))
        self.sharp_bias = nn.Parameter(torch.zeros(g))
        self.register_buffer("voxel_cell", cell_index(self.image_size, self.cell), persistent=False)

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def group_of(self, anatomy: int) -> int:
        """Position of anatomy index ``anatomy`` among :attr:`groups` (ValueError if absent)."""
        if int(anatomy) not in self.groups:
            raise ValueError(f"anatomy {anatomy} is not scored by this prompt evidence head (groups {self.groups})")
        return self.groups.index(int(anatomy))

    @torch.no_grad()
    def cell_counts(self, bins: Tensor, masks: Tensor, *,
                    out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Voxel bins ``[B, F, V]`` and anatomy masks ``[B, A, D, H, W]`` -> cell histograms
        ``[B, G, C, num_bins]`` and voxel counts ``[B, G, C]`` of each group's anatomy (``out``:
        reused buffers, see :func:`~napari_ctvlp.engine.networks.evidence.cell_histograms`)."""
        split = split_compartment_bins(bins, masks, self.compartments, self.compartment_bins)
        return cell_histograms(split, masks, groups=self.groups, voxel_cell=self.voxel_cell, num_bins=self.num_bins,
                               out=out)

    def bin_weights(self, text: Tensor, group: int) -> Tensor:
        """Text features ``[S, D]`` -> bin weights ``[S, num_bins]`` in group ``group`` (a position)."""
        return text.to(self.weight.dtype) @ self.weight[group] + self.bias[group]

    def cell_scores(self, counts: Tensor, voxels: Tensor, text: Tensor, group: int) -> Tensor:
        """Cells of one group ``counts [B, C, K]``, ``voxels [B, C]`` -> mean bin weight ``[B, C, S]``
        (0 in a cell without the anatomy)."""
        total = counts.to(self.weight.dtype) @ self.bin_weights(text, group).T
        return total / voxels.clamp_min(1e-6).unsqueeze(-1).to(total.dtype)

    def forward(self, counts: Tensor, voxels: Tensor, text: Tensor, group: int) -> Tensor:
        """Scan scores ``[B, S]`` of ``S`` sentences over the cells of one group (see the module
        docstring); a scan without the anatomy scores 0. ``counts``/``voxels`` may be any subset of
        the cells (e.g. only those that hold the anatomy)."""
        score = self.cell_scores(counts, voxels, text, group)
        inside = voxels > 1e-6
        sharp = MIN_SHARPNESS + SHARPNESS_SCALE * F.softplus(text.to(self.sharp_weight.dtype)
                                                            @ self.sharp_weight[group] + self.sharp_bias[group])
        log_w = torch.log(voxels.clamp_min(1e-6)).masked_fill(~inside, -1e4).to(score.dtype)
        pooled = torch.logsumexp(score * sharp + log_w.unsqueeze(-1), 1) - torch.logsumexp(log_w, 1).unsqueeze(-1)
        out = pooled / sharp
        return torch.where(inside.any(1, keepdim=True), out, torch.zeros_like(out))
