"""Finding evidence maps of a scan (models with ``CTVLPConfig.tag_evidence``).

:class:`~napari_ctvlp.engine.networks.evidence.TagEvidence` scores each cell of a finding's
anatomy from its voxels' HU bins (read by compartment, when configured) and texture bins, and
recognises the finding from those scores; the map here is that score, shown over the finding's
anatomy. It answers "which part of the lung made the model call a nodule", at 2-voxel cells of
the model grid (10 x 8 x 7 mm for ``phantom_cpu``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITIES, ABNORMALITY_BY_NAME, ABNORMALITY_NAMES
from napari_ctvlp.engine.preprocess import to_source_grid

if TYPE_CHECKING:
    from napari_ctvlp.engine.networks import CTVLP
    from napari_ctvlp.engine.zero_shot import ImageFeatures

__all__ = ["EvidenceMaps", "compute_evidence", "evidence_heatmap", "supports_evidence"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class EvidenceMaps:
    """All findings' evidence of one scan, on the model grid.

    Attributes:
        maps: ``float32 [18, D, H, W]`` cell scores, upsampled to the model grid (0 outside the
            finding's anatomy).
        inside: ``bool [18, D, H, W]`` the voxel lies in the finding's anatomy.
        probabilities: ``float32 [18]`` the recognition head's probability of each finding (a
            supervised reading of the report tags, not the zero-shot probability the results use).
    """

    maps: np.ndarray
    inside: np.ndarray
    probabilities: np.ndarray


def supports_evidence(model: CTVLP, features: ImageFeatures) -> bool:
    """True when ``model`` has an evidence head and ``features`` keep the voxel masks it reads."""
    return model.evidence is not None and features.voxel is not None


def compute_evidence(model: CTVLP, features: ImageFeatures) -> EvidenceMaps:
    """Evidence maps of every finding (one pass; :class:`EvidenceMaps`).

    Raises:
        ValueError: the model has no evidence head (``CTVLPConfig.tag_evidence``).
    """
    import torch
    import torch.nn.functional as F

    if not supports_evidence(model, features):
        raise ValueError("evidence maps need a checkpoint with an evidence head (config.tag_evidence); "
                         "use the attribution or pixel-tag map instead")
    head = model.evidence
    assert head is not None and features.voxel is not None
    dev = model.device
    with torch.inference_mode():
        image = torch.from_numpy(np.ascontiguousarray(features.prepared.image))[None, None].to(dev)
        masks = features.voxel["masks"][None].to(dev)  # [1, A, D, H, W]
        counts, voxels = head.cell_counts(model.evidence_bins(image), masks)
        out = head(counts, voxels)
        maps = F.interpolate(out.maps.float(), scale_factor=head.cell, mode="trilinear", align_corners=False)[0]
        tag_masks = masks[0, list(head.tag_anatomy)].bool()  # [T, D, H, W]
        maps = torch.where(tag_masks, maps, torch.zeros_like(maps))
        probs = torch.sigmoid(out.logits[0].float())
    return EvidenceMaps(maps.cpu().numpy().astype(np.float32), tag_masks.cpu().numpy(),
                        probs.cpu().numpy().astype(np.float32))


def evidence_heatmap(evidence: EvidenceMaps, features: ImageFeatures, abnormality: str, *,
                     grid: Literal["source", "model"] = "source") -> np.ndarray:
    """One finding's evidence map in ``[0, 1]`` over its anatomy (min to max there), 0 elsewhere.

    Args:
        evidence: :func:`compute_evidence` of the scan.
        features: the scan's :func:`~napari_ctvlp.engine.zero_shot.encode_volume` output.
        abnormality: a CT-RATE finding name (e.g. ``"Lung nodule"``).
        grid: ``"source"`` (input CT grid, linear) or ``"model"``.

    Raises:
        ValueError: an unknown finding, its anatomy not in the scan, or an unknown ``grid``.
    """
    if abnormality not in ABNORMALITY_BY_NAME:
        raise ValueError(f"unknown finding {abnormality!r}; evidence maps exist for the 18 CT-RATE findings")
    if grid not in ("source", "model"):
        raise ValueError(f"grid must be 'source' or 'model', got {grid!r}")
    k = ABNORMALITY_NAMES.index(abnormality)
    anatomy = ABNORMALITIES[k].anatomy
    inside = evidence.inside[k]
    if anatomy not in features.anatomies or not inside.any():
        raise ValueError(f"the {anatomy} is not in this scan's organ mask")
    values = evidence.maps[k][inside]
    lo, hi = float(values.min()), float(values.max())
    heat = np.where(inside, (evidence.maps[k] - lo) / (hi - lo if hi > lo else 1.0), 0.0).astype(np.float32)
    if grid == "model":
        return heat
    return np.clip(to_source_grid(heat, features.prepared, order=1), 0.0, 1.0)
