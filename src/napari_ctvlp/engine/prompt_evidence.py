"""Prompt scores and prompt maps from the prompt evidence head (``CTVLPConfig.prompt_evidence``).

:func:`prompt_cells` runs once per scan (inside
:func:`~napari_ctvlp.engine.zero_shot.encode_volume`) and keeps, for every anatomy, the bin
histograms of only the cells that hold it (about 40 MB on the ``phantom_cpu`` grid); a prompt then
costs one text-backbone call (cached) and a small matrix product: :func:`prompt_scores` gives its
score per anatomy, :func:`prompt_map` the cell scores over the anatomy it was computed from, and
:func:`prompt_anatomy` the anatomy a free-text prompt is about (read from its wording, for the map).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from napari_ctvlp.engine.networks import CTVLP

__all__ = ["ROUTE_MIN_COSINE", "PromptCells", "prompt_anatomy", "prompt_cells", "prompt_map", "prompt_scores"]

logger = logging.getLogger(__name__)

#: below this sentence-feature cosine to every finding wording, :func:`prompt_anatomy` names no anatomy
ROUTE_MIN_COSINE = 0.5


@dataclass(frozen=True, eq=False)
class PromptCells:
    """A scan's cell histograms for :class:`~napari_ctvlp.engine.networks.prompt_evidence.PromptEvidence`.

    Attributes:
        cells: per head group, ``long [C_g]`` indices of the cells that hold the anatomy.
        counts: per group, ``float32 [C_g, K]`` voxel counts of each bin in those cells.
        voxels: per group, ``float32 [C_g]`` anatomy voxels per cell.
    """

    cells: tuple[torch.Tensor, ...]
    counts: tuple[torch.Tensor, ...]
    voxels: tuple[torch.Tensor, ...]


def prompt_cells(model: CTVLP, image: torch.Tensor, masks: torch.Tensor) -> PromptCells:
    """Cell histograms of one scan: ``image [1, 1, D, H, W]`` and anatomy masks ``[1, A, D, H, W]``
    on the model grid (one anatomy at a time, so the peak stays at one anatomy's histogram)."""
    import torch

    from napari_ctvlp.engine.networks.evidence import cell_histograms, split_compartment_bins

    head = model.prompt_evidence
    if head is None:
        raise ValueError("this checkpoint has no prompt evidence head (config.prompt_evidence)")
    cells, counts, voxels = [], [], []
    with torch.inference_mode():
        bins = split_compartment_bins(model.evidence_bins(image), masks, head.compartments, head.compartment_bins)
        for g in head.groups:
            c, n = cell_histograms(bins, masks, groups=[g], voxel_cell=head.voxel_cell, num_bins=head.num_bins)
            keep = torch.nonzero(n[0, 0] > 0, as_tuple=False).flatten()
            cells.append(keep)
            counts.append(c[0, 0, keep].float().clone())
            voxels.append(n[0, 0, keep].float().clone())
    return PromptCells(tuple(cells), tuple(counts), tuple(voxels))


def prompt_scores(model: CTVLP, cells: PromptCells, texts: Sequence[str], anatomy_idx: Sequence[int]) -> np.ndarray:
    """Score ``texts[i]`` in anatomy ``anatomy_idx[i]`` -> ``float64 [T]`` (NaN where the scan lacks it)."""
    import torch

    head = model.prompt_evidence
    if head is None:
        raise ValueError("this checkpoint has no prompt evidence head (config.prompt_evidence)")
    texts = [str(t) for t in texts]
    anatomy_idx = np.asarray(anatomy_idx, dtype=int)
    if len(texts) != len(anatomy_idx):
        raise ValueError(f"{len(texts)} texts for {len(anatomy_idx)} anatomies")
    out = np.full(len(texts), np.nan)
    if not texts:
        return out
    distinct = list(dict.fromkeys(texts))
    row = {t: i for i, t in enumerate(distinct)}
    with torch.inference_mode():
        feats = model.text.sentence_features(distinct).to(head.weight.device)
        for a in np.unique(anatomy_idx):
            g = head.group_of(int(a))
            if cells.cells[g].numel() == 0:
                continue
            sel = np.nonzero(anatomy_idx == a)[0]
            u = feats[[row[texts[i]] for i in sel]]
            s = head(cells.counts[g][None], cells.voxels[g][None], u, g)[0]
            out[sel] = s.float().cpu().numpy().astype(np.float64)
    return out


def prompt_map(model: CTVLP, cells: PromptCells, text: str, anatomy_idx: int) -> np.ndarray:
    """The cell scores of ``text`` in anatomy ``anatomy_idx`` on the model grid ``float32 [D, H, W]``
    (nearest upsampling of the cells; NaN outside the cells that hold the anatomy).

    Raises:
        ValueError: no prompt evidence head, or the anatomy is not in the scan.
    """
    import torch

    head = model.prompt_evidence
    if head is None:
        raise ValueError("this checkpoint has no prompt evidence head (config.prompt_evidence)")
    g = head.group_of(int(anatomy_idx))
    if cells.cells[g].numel() == 0:
        raise ValueError("the anatomy is not in this scan's organ mask")
    with torch.inference_mode():
        u = model.text.sentence_features([str(text)]).to(head.weight.device)
        s = head.cell_scores(cells.counts[g][None], cells.voxels[g][None], u, g)[0, :, 0].float()
        grid = torch.full((head.num_cells,), float("nan"), device=s.device)
        grid[cells.cells[g]] = s
        grid = grid.view(1, 1, *head.grid)
        full = torch.nn.functional.interpolate(grid, scale_factor=head.cell, mode="nearest")[0, 0]
    return full.cpu().numpy().astype(np.float32)


def prompt_anatomy(model: CTVLP, text: str, anatomies: Sequence[str], *,
                   min_cosine: float = ROUTE_MIN_COSINE) -> str | None:
    """The anatomy ``text`` is about, read from its wording alone: the anatomy of the CT-RATE finding
    wording (term or synonym, e.g. "an enlarged heart" -> heart) or anatomy phrase ("the aorta")
    nearest to it in the frozen sentence features, among ``anatomies``; None when nothing is within
    ``min_cosine``.

    Prompt scores of different anatomies come from different heads and are not calibrated against
    each other (a lung head can score "pericardial effusion" high), so the map of a free-text
    prompt is drawn in the anatomy its words name, not in the one with the highest probability.
    """
    import torch

    from napari_ctvlp.engine.anatomy import ABNORMALITIES, ANATOMY_BY_NAME

    wanted = set(anatomies)
    phrases: list[str] = []
    owners: list[str] = []
    for ab in ABNORMALITIES:
        if ab.anatomy in wanted:
            for term in (ab.term, *ab.synonyms):
                phrases.append(f"{term[0].upper()}{term[1:]}.")
                owners.append(ab.anatomy)
    for name in anatomies:
        if name in ANATOMY_BY_NAME:
            phrases.append(f"The {ANATOMY_BY_NAME[name].phrase}.")
            owners.append(name)
    text = str(text).strip()
    if not phrases or not text:
        return None
    with torch.inference_mode():
        feats = model.text.sentence_features([text, *phrases]).float()
    cos = (feats[1:] @ feats[0]).cpu().numpy()
    best = int(np.argmax(cos))
    return owners[best] if float(cos[best]) >= min_cosine else None
