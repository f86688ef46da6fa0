"""Voxel attribution maps: which voxels of an anatomy raise a sentence's score.

For a model with voxel statistics (``CTVLPConfig.statistics_edges``) an anatomy's embedding
depends on its voxels through the HU histogram of its mask and through the masked mean and
maximum of the stride-4 stem features
(:class:`~napari_ctvlp.engine.networks.voxel_statistics.VoxelStatistics`). The map here is the
first-order contribution of each voxel to ``cos(anatomy embedding, sentence embedding)`` (or,
for (positive, negative) prompt pairs, to the mean margin ``cos(+) - cos(-)`` that sets the
finding's probability):

* histogram: a voxel in bin ``k`` adds ``1 / N`` to that bin's share, so it contributes
  ``g_k / (N * (share_k + floor))`` where ``g_k`` is the gradient of the cosine with respect to the
  bin's log share and ``N`` the anatomy's voxel count; with texture statistics, the same for the
  voxel's bin of each texture filter (a nodule's voxels share a band-pass bin its vessels lack);
* learned features: gradient x input of the stride-4 features, summed over channels, spread over
  the anatomy's voxels of each stride-4 cell.

The attention-pooled part of the embedding is held fixed, so the map explains the statistics'
share of the score at voxel resolution (4 mm here, against 32-42 mm for a token map). Only the
positive part is shown, smoothed (a lesion is a cluster of contributing voxels), normalised to
[0, 1] over the anatomy, 0 outside.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_ctvlp.engine.preprocess import to_source_grid
from napari_ctvlp.engine.zero_shot import ImageFeatures, text_embeddings

if TYPE_CHECKING:
    import torch

    from napari_ctvlp.engine.networks import CTVLP

__all__ = ["attribution_heatmap", "supports_attribution"]

logger = logging.getLogger(__name__)


def supports_attribution(features: ImageFeatures) -> bool:
    """True when ``features`` come from a model with voxel statistics (attribution maps exist)."""
    return features.voxel is not None


def _direction(model: CTVLP, prompt: str | tuple[str, str] | list[tuple[str, str]]) -> torch.Tensor:
    """What is explained, as a joint-space vector: a sentence's embedding, or for (positive,
    negative) pairs the mean of ``t_pos - t_neg`` (the margin that sets the probability)."""
    if isinstance(prompt, str):
        text = prompt.strip()
        if not text:
            raise ValueError("prompt must not be empty")
        return text_embeddings(model, [text])[0]
    pairs = [prompt] if isinstance(prompt, tuple) else list(prompt)
    if not pairs or any(len(p) != 2 or not str(p[0]).strip() or not str(p[1]).strip() for p in pairs):
        raise ValueError("prompt pairs must be non-empty (positive, negative) sentences")
    emb = text_embeddings(model, [str(t).strip() for p in pairs for t in p])
    return (emb[0::2] - emb[1::2]).mean(0)


def _contributions(model: CTVLP, features: ImageFeatures, direction: torch.Tensor, j: int) -> dict[str, np.ndarray]:
    """Signed first-order contributions of every model-grid voxel of anatomy ``j`` (0 elsewhere) to
    ``embedding . direction`` (:func:`_direction`): ``{"histogram": ..., "features": ...}`` (the
    two paths of the module docstring)."""
    import torch

    from napari_ctvlp.engine.networks.voxel_statistics import STATISTICS_STRIDE

    stats_module = model.statistics
    assert stats_module is not None and features.voxel is not None
    dev = model.device
    with torch.inference_mode(False), torch.enable_grad():
        emb_t = direction.detach().clone().to(dev)
        image = torch.from_numpy(np.ascontiguousarray(features.prepared.image))[None, None].to(dev)
        mask = features.voxel["masks"][j].clone()[None, None].to(dev)  # [1, 1, D, H, W]
        stage4 = features.voxel["stage4"].clone()[None].to(dev).requires_grad_(True)
        pooled = features.voxel["pooled"][j].clone().to(dev)
        voxel_bins = stats_module.voxel_bins(image)  # the fixed bins: once, for the statistics and the map
        stats, present = stats_module.anatomy_inputs(image, stage4, mask, bins=voxel_bins)
        hidden, direct = stats_module.heads(stats, present, anatomy=j)
        emb = model.anatomy_pooling.embed(pooled[None, None], statistics=hidden, direct=direct)[0, 0]
        cos = (emb * emb_t).sum()
        # gradients of the two inputs only: the model's parameters get no .grad
        g_stats, g_stage4 = torch.autograd.grad(cos, [stats, stage4])
    k = stats_module.bins
    g_hist = g_stats[0, 0, :k]
    share = stats[0, 0, :k].detach().exp()  # share + floor
    count = float(mask.sum())
    hu_bins, tex_bins = voxel_bins
    hist_part = (g_hist / (count * share))[hu_bins.view(image.shape[2:])]  # [D, H, W]
    if tex_bins is not None:  # the same per-voxel reading of each texture filter's histogram
        t0, t1 = k + 1, k + 1 + stats_module.texture_bins
        weight = g_stats[0, 0, t0:t1] / (count * stats[0, 0, t0:t1].detach().exp())
        hist_part = hist_part + weight[tex_bins[0]].sum(0).view(image.shape[2:])  # tex_bins [1, F, V]
    cell = (g_stage4[0] * stage4[0].detach()).sum(0)  # [D/4, H/4, W/4] gradient x input
    inside = mask[0, 0].float()
    per_cell = torch.nn.functional.avg_pool3d(inside[None, None], STATISTICS_STRIDE)[0, 0] * STATISTICS_STRIDE ** 3
    spread = torch.where(per_cell > 0, cell / per_cell.clamp_min(1.0), torch.zeros_like(cell))
    learned_part = torch.nn.functional.interpolate(spread[None, None], scale_factor=STATISTICS_STRIDE,
                                                   mode="nearest")[0, 0]
    return {"histogram": (hist_part * inside).detach().float().cpu().numpy(),
            "features": (learned_part * inside).detach().float().cpu().numpy()}


def attribution_heatmap(
    model: CTVLP,
    features: ImageFeatures,
    prompt: str | tuple[str, str] | list[tuple[str, str]],
    *,
    anatomy: str,
    grid: Literal["source", "model"] = "source",
    smooth_voxels: float = 1.0,
) -> np.ndarray:
    """Which voxels of ``anatomy`` raise the score of ``prompt`` (see the module docstring).

    Args:
        model: the model that computed ``features``.
        features: :func:`~napari_ctvlp.engine.zero_shot.encode_volume` output.
        prompt: a sentence (its cosine is explained), or one or more (positive, negative) pairs
            (the mean margin ``cos(+) - cos(-)`` is explained: what moves the probability, e.g.
            :func:`~napari_ctvlp.engine.anatomy.prompt_pairs` of a finding).
        anatomy: the anatomy whose embedding is explained (e.g. ``"lung"`` for a nodule).
        grid: ``"source"`` (input CT grid, linear) or ``"model"``.
        smooth_voxels: Gaussian sigma (model-grid voxels) applied to the contributions inside the
            anatomy before normalising: a lesion is many neighbouring voxels, noise a scattered
            few; 0 keeps single voxels.

    Raises:
        ValueError: the model has no voxel statistics, the anatomy is not pooled or not in the
            scan, the prompt is empty, or ``grid`` is unknown.
    """
    if not supports_attribution(features):
        raise ValueError("attribution maps need a checkpoint with voxel statistics (config.statistics_edges); "
                         "use the prompt heatmap or the pixel-tag map instead")
    direction = _direction(model, prompt)
    if anatomy not in features.anatomies:
        raise ValueError(f"anatomy {anatomy!r} is not pooled by this model ({', '.join(features.anatomies)})")
    j = features.anatomies.index(anatomy)
    if not features.present[j]:
        raise ValueError(f"the {anatomy} is not in this scan's organ mask")
    if grid not in ("source", "model"):
        raise ValueError(f"grid must be 'source' or 'model', got {grid!r}")
    parts = _contributions(model, features, direction, j)
    heat = np.clip(parts["histogram"] + parts["features"], 0.0, None)
    if smooth_voxels > 0:
        from scipy import ndimage

        inside = features.voxel["masks"][j].cpu().numpy().astype(np.float32)  # type: ignore[index]
        heat = ndimage.gaussian_filter(heat, smooth_voxels) * inside
    top = float(heat.max())
    heat = (heat / top if top > 0 else heat).astype(np.float32)
    if grid == "model":
        return heat
    return np.clip(to_source_grid(heat, features.prepared, order=1), 0.0, 1.0)
