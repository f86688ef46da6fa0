"""Training losses: CA-GCL local/global anatomy contrast, MOSMOS IRC + tag recognition, seg + PTA.

Conventions shared by the contrastive losses:

* ``logit_scale`` is the multiplier applied to cosine similarities, i.e. ``1 / temperature``
  (CLIP's ``logit_scale.exp()``), a positive float or 0-d tensor (a learnable one keeps its
  gradient).
* Embeddings are L2-normalised inside the loss (``normalize=True``) so callers may pass raw
  projections.
* "Bidirectional InfoNCE" over ``N`` pairs ``(a_i, b_i)`` is
  ``CE(s * A B^T, I) + CE(s * B A^T, I)`` with ``CE`` the mean cross-entropy over rows and the
  matching pair as the target class: CA-GCL eqs. 1 and 4 *sum* the two directions. CLIP (and our
  MOSMOS image-report term) averages them: ``clip_loss(..., sum_directions=False)``.
* With ``world_size > 1`` and ``gather=True`` the per-rank batches are first all-gathered with
  gradient (:func:`training.distributed.gather_with_grad`); every rank then computes the loss of
  the whole global batch, which equals the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import gather_no_grad, gather_with_grad

__all__ = [
    "CAGCLLoss",
    "CAGCLOutput",
    "clip_loss",
    "global_contrastive_loss",
    "global_group_indices",
    "image_report_contrastive_loss",
    "local_contrastive_loss",
    "local_contrastive_terms",
    "multilabel_recognition_loss",
    "seg_pta_loss",
]


def _scale(logit_scale: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(logit_scale, dtype=ref.dtype, device=ref.device)
    if s.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(s.shape)}")
    if not bool(s.detach() > 0):
        raise ValueError(f"logit_scale must be positive (it is 1/temperature), got {float(s)}")
    return s.reshape(())


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: float | torch.Tensor, *,
              sum_directions: bool = False) -> torch.Tensor:
    """Bidirectional InfoNCE between matched rows of ``a`` and ``b`` (``[N, E]``, normalised).

    The two directions are averaged (CLIP) or, with ``sum_directions``, summed (CA-GCL eqs. 1, 4).
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"clip_loss needs two [N, E] tensors of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    logits = _scale(logit_scale, a) * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    both = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
    return both if sum_directions else 0.5 * both


def _check_anatomy_inputs(image_emb: torch.Tensor, text_emb: torch.Tensor, present: torch.Tensor) -> None:
    if image_emb.ndim != 3:
        raise ValueError(f"image_emb must be [B, A, E], got shape {tuple(image_emb.shape)}")
    if text_emb.shape != image_emb.shape:
        raise ValueError(f"text_emb shape {tuple(text_emb.shape)} != image_emb shape {tuple(image_emb.shape)}")
    if present.shape != image_emb.shape[:2]:
        raise ValueError(f"present must be [B, A] = {tuple(image_emb.shape[:2])}, got {tuple(present.shape)}")
    if present.dtype != torch.bool:
        raise ValueError(f"present must be a bool tensor, got {present.dtype}")


def _prepare(image_emb, text_emb, present, rank, world_size, gather, normalize):
    _check_anatomy_inputs(image_emb, text_emb, present)
    if gather and world_size > 1:
        image_emb = gather_with_grad(image_emb, rank=rank, world_size=world_size)
        text_emb = gather_with_grad(text_emb, rank=rank, world_size=world_size)
        present = gather_no_grad(present, rank=rank, world_size=world_size)
    if normalize:
        image_emb = F.normalize(image_emb, dim=-1)
        text_emb = F.normalize(text_emb, dim=-1)
    return image_emb, text_emb, present


def _local_terms(v: torch.Tensor, t: torch.Tensor, present: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
    terms = []
    counts = present.sum(dim=0)
    zero = (v.sum() + t.sum()) * 0.0  # keeps the graph connected (backward and DDP need it)
    for j in range(v.shape[1]):
        idx = torch.nonzero(present[:, j], as_tuple=False).flatten()
        if idx.numel() < 2:
            terms.append(zero)  # < 2 samples: no negatives, no loss (and no NaN)
        else:
            terms.append(clip_loss(v[idx, j], t[idx, j], scale, sum_directions=True))
    return torch.stack(terms), counts


def local_contrastive_terms(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    present: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: bool = True,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anatomy local losses ``[A]`` and the number of samples ``[A]`` each was computed over.

    See :func:`local_contrastive_loss`; anatomies present in fewer than 2 samples get 0.
    """
    v, t, p = _prepare(image_emb, text_emb, present, rank, world_size, gather, normalize)
    return _local_terms(v, t, p, logit_scale)


def local_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    present: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """CA-GCL local anatomy-wise contrastive loss (eq. 1).

    ``L_loc = sum_j L_loc_j`` where, for anatomy ``j`` with ``S_j = {i : present[i, j]}``,
    ``L_loc_j`` is the bidirectional InfoNCE between ``image_emb[S_j, j]`` and
    ``text_emb[S_j, j]`` (image->text and text->image cross-entropies, each averaged over the
    ``|S_j|`` samples, then summed over the two directions as in the paper). Other samples of the batch and
    other anatomies are not negatives. Anatomies with ``|S_j| < 2`` contribute exactly 0.
    The sum over anatomies (not the mean) follows the paper's ``sum_j L_loc_j + 0.1 L_glo``.

    Args:
        image_emb: ``[B, A, E]`` anatomy-pooled image embeddings (this rank's batch).
        text_emb: ``[B, A, E]`` embeddings of each anatomy's report text.
        present: ``[B, A]`` bool, anatomy ``j`` is in scan ``i`` and has a report text.
        logit_scale: ``1 / temperature`` (scalar, may be a learnable tensor).
        rank: this process's rank (only checked; every rank computes the global loss).
        world_size: number of processes; ``> 1`` all-gathers the batch first.
        gather: set False when the inputs are already gathered.
        normalize: L2-normalise the embeddings first.
    """
    return local_contrastive_terms(
        image_emb, text_emb, present, logit_scale,
        rank=rank, world_size=world_size, gather=gather, normalize=normalize,
    )[0].sum()


def global_group_indices(
    present: torch.Tensor, *, num_groups: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample indices ``[K, A]`` composing ``K`` synthetic patients (CA-GCL eq. 2).

    For each anatomy ``j`` independently, the samples containing ``j`` are randomly permuted and
    synthetic patient ``k`` takes the ``k``-th of them. Every present (sample, anatomy) pair is used
    exactly once: when only ``n_j < K`` samples contain ``j``, patients ``n_j .. K-1`` have no
    anatomy ``j`` (``-1``, masked out of their means) instead of re-using a sample. ``-1`` also
    marks an anatomy absent from the whole batch. The permutations are drawn on the CPU from
    ``generator``, so ranks seeded alike draw the same groups.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if present.ndim != 2 or present.dtype != torch.bool:
        raise ValueError(f"present must be a [B, A] bool tensor, got {present.dtype} {tuple(present.shape)}")
    p = present.detach().cpu()
    out = torch.full((num_groups, p.shape[1]), -1, dtype=torch.long)
    for j in range(p.shape[1]):
        idx = torch.nonzero(p[:, j], as_tuple=False).flatten()
        if idx.numel() == 0:
            continue
        order = idx[torch.randperm(idx.numel(), generator=generator)][:num_groups]
        out[: order.numel(), j] = order
    return out.to(present.device)


def _group_embeddings(emb: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    valid = groups >= 0  # [K, A]
    anat = torch.arange(emb.shape[1], device=emb.device).expand_as(groups)
    picked = emb[groups.clamp(min=0), anat]  # [K, A, E]
    w = valid.to(emb.dtype).unsqueeze(-1)
    mean = (picked * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
    return F.normalize(mean, dim=-1)


def global_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    present: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    num_groups: int | None = None,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    gather: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """CA-GCL global group contrastive loss over synthetic patients (eq. 2-4).

    ``K`` synthetic patients are composed by :func:`global_group_indices` (each anatomy's
    matched (image, report) pair drawn from an independent permutation of the samples containing
    it). A group's image embedding is the renormalised mean of its anatomies' (normalised) image
    embeddings, likewise its text embedding, with the *same* sample per anatomy on both sides.
    The loss is the bidirectional InfoNCE (directions summed, eq. 4) over the groups that hold at
    least one anatomy; 0 when fewer than 2 such groups exist.

    Args:
        image_emb, text_emb, present, logit_scale, rank, world_size, gather, normalize: as in
            :func:`local_contrastive_loss`.
        num_groups: ``K``; default the global batch size.
        generator: CPU ``torch.Generator`` for the permutations; required when
            ``world_size > 1`` (seed it identically on every rank).
    """
    if world_size > 1 and generator is None:
        raise ValueError("global_contrastive_loss with world_size > 1 needs a generator seeded alike on all ranks")
    v, t, p = _prepare(image_emb, text_emb, present, rank, world_size, gather, normalize)
    k = v.shape[0] if num_groups is None else int(num_groups)
    if k < 2 or not bool(p.any()):
        if k < 1:
            raise ValueError(f"num_groups must be >= 1, got {k}")
        return v.sum() * 0.0
    groups = global_group_indices(p, num_groups=k, generator=generator)
    groups = groups[(groups >= 0).any(dim=1)]  # synthetic patients with no anatomy at all are dropped
    if groups.shape[0] < 2:
        return v.sum() * 0.0
    return clip_loss(_group_embeddings(v, groups), _group_embeddings(t, groups), logit_scale, sum_directions=True)


@dataclass(frozen=True)
class CAGCLOutput:
    """Result of :class:`CAGCLLoss`: the total to back-propagate and its parts for logging."""

    total: torch.Tensor
    local: torch.Tensor
    global_: torch.Tensor
    per_anatomy: torch.Tensor
    samples_per_anatomy: torch.Tensor
    logit_scale: torch.Tensor

    def log_dict(self) -> dict[str, float]:
        """Plain floats, e.g. for TensorBoard (``loss/total``, ``loss/local``, ...)."""
        out = {
            "loss/total": float(self.total.detach()),
            "loss/local": float(self.local.detach()),
            "loss/global": float(self.global_.detach()),
            "logit_scale": float(self.logit_scale.detach()),
        }
        for j, value in enumerate(self.per_anatomy.detach().tolist()):
            out[f"loss/local_{j}"] = float(value)
        return out


class CAGCLLoss(nn.Module):
    """CA-GCL objective ``sum_j L_loc_j + global_weight * L_glo`` with a learnable temperature.

    Args:
        use_global: add the global group contrastive loss (ablation switch).
        global_weight: its weight (paper: 0.1).
        num_groups: ``K`` synthetic patients; default the global batch size.
        seed: seed of the generator drawing the group permutations; use the same on all ranks.
        init_temperature: initial temperature (``logit_scale = 1 / T``); CLIP uses 0.07.
        learn_temperature: make ``log(logit_scale)`` a parameter (else a buffer).
        max_logit_scale: clamp of the logit scale (CLIP: 100).
    """

    def __init__(
        self,
        *,
        use_global: bool = True,
        global_weight: float = 0.1,
        num_groups: int | None = None,
        seed: int = 0,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if global_weight < 0:
            raise ValueError(f"global_weight must be >= 0, got {global_weight}")
        if num_groups is not None and num_groups < 2:
            raise ValueError(f"num_groups must be >= 2 (or None for the batch size), got {num_groups}")
        if not 0 < init_temperature:
            raise ValueError(f"init_temperature must be positive, got {init_temperature}")
        self.use_global = use_global
        self.global_weight = float(global_weight)
        self.num_groups = num_groups
        self.max_logit_scale = float(max_logit_scale)
        init = torch.tensor(math.log(1.0 / init_temperature))
        if learn_temperature:
            self.log_logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_logit_scale", init)
        self.generator = torch.Generator().manual_seed(int(seed))

    def logit_scale(self) -> torch.Tensor:
        """Current ``1 / temperature``, clamped to ``max_logit_scale``."""
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        present: torch.Tensor,
        *,
        logit_scale: torch.Tensor | float | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> CAGCLOutput:
        """Loss of one (per-rank) batch; see :func:`local_contrastive_loss` for the inputs.

        ``logit_scale`` overrides the module's own temperature (e.g. one owned by the model).
        """
        scale = self.logit_scale() if logit_scale is None else _scale(logit_scale, image_emb)
        v, t, p = _prepare(image_emb, text_emb, present, rank, world_size, True, True)
        per_anatomy, counts = _local_terms(v, t, p, scale)
        local = per_anatomy.sum()
        if self.use_global and self.global_weight > 0:
            glob = global_contrastive_loss(
                v, t, p, scale, num_groups=self.num_groups, generator=self.generator,
                gather=False, normalize=False,
            )
        else:
            glob = local * 0.0
        total = local + self.global_weight * glob
        return CAGCLOutput(total, local, glob, per_anatomy, counts, scale.detach())


def image_report_contrastive_loss(
    image_global: torch.Tensor,
    report_emb: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """MOSMOS image-report contrastive loss (IRC): bidirectional InfoNCE over whole scans.

    Args:
        image_global: ``[B, E]`` global image embeddings.
        report_emb: ``[B, E]`` embeddings of the whole reports.
        logit_scale, rank, world_size, gather, normalize: as in :func:`local_contrastive_loss`.
    """
    if image_global.ndim != 2 or report_emb.shape != image_global.shape:
        raise ValueError(
            f"image_global and report_emb must both be [B, E], got {tuple(image_global.shape)}, {tuple(report_emb.shape)}"
        )
    if gather and world_size > 1:
        image_global = gather_with_grad(image_global, rank=rank, world_size=world_size)
        report_emb = gather_with_grad(report_emb, rank=rank, world_size=world_size)
    if normalize:
        image_global, report_emb = F.normalize(image_global, dim=-1), F.normalize(report_emb, dim=-1)
    if image_global.shape[0] < 2:
        return image_global.sum() * 0.0
    return clip_loss(image_global, report_emb, logit_scale)


def multilabel_recognition_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, gamma: float | None = None
) -> torch.Tensor:
    """MOSMOS multi-label tag recognition with "weak assume negative" (WAN) BCE.

    Tags not mentioned in the report are assumed negative but down-weighted (Cole et al. 2021,
    "Multi-label learning from single positive labels"):

    ``L = -1/(B T) * sum_{b,t} [ y_bt log sigmoid(x_bt) + gamma (1 - y_bt) log(1 - sigmoid(x_bt)) ]``

    with ``gamma = 1 / (T - 1)`` by default (``T`` = number of tags).

    Args:
        logits: ``[B, T]`` tag logits.
        targets: ``[B, T]``, 1 = mentioned as present, 0 = not mentioned (weak negative).
        gamma: weight of the assumed negatives; default ``1 / (T - 1)``.
    """
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(f"logits and targets must both be [B, T], got {tuple(logits.shape)}, {tuple(targets.shape)}")
    n_tags = logits.shape[1]
    if gamma is None:
        if n_tags < 2:
            raise ValueError("multilabel_recognition_loss needs >= 2 tags for the default gamma = 1/(T-1)")
        gamma = 1.0 / (n_tags - 1)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    y = targets.to(logits.dtype)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("targets must contain only 0 and 1")
    weight = torch.where(y > 0.5, torch.ones_like(y), torch.full_like(y, float(gamma)))
    return F.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="mean")


def seg_pta_loss(
    seg_logits: torch.Tensor,
    pta_logits: torch.Tensor | None,
    target: torch.Tensor,
    *,
    pta_weight: float = 0.8,
) -> torch.Tensor:
    """MOSMOS fine-tuning loss ``(CE + Dice)(seg) + pta_weight * (CE + Dice)(pta)``.

    Both terms use :class:`monai.losses.DiceCELoss` (softmax, one-hot target, mean Dice + CE).

    Args:
        seg_logits: ``[B, C, *spatial]`` segmentation logits.
        pta_logits: ``[B, C, *spatial]`` pixel-tag alignment logits (similarity of pixel and tag
            embeddings, already scaled), or None for the segmentation term alone.
        target: ``[B, 1, *spatial]`` or ``[B, *spatial]`` integer class labels in ``[0, C)``.
        pta_weight: weight of the PTA term (paper: 0.8).
    """
    from monai.losses import DiceCELoss

    if seg_logits.ndim < 3:
        raise ValueError(f"seg_logits must be [B, C, *spatial], got shape {tuple(seg_logits.shape)}")
    if target.ndim == seg_logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape != (seg_logits.shape[0], 1, *seg_logits.shape[2:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match seg_logits {tuple(seg_logits.shape)}")
    if target.dtype.is_floating_point and not bool((target == target.round()).all()):
        raise ValueError("target must hold integer class labels")
    n_cls = seg_logits.shape[1]
    if int(target.min()) < 0 or int(target.max()) >= n_cls:
        raise ValueError(f"target labels must lie in [0, {n_cls}), got [{int(target.min())}, {int(target.max())}]")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    target = target.to(seg_logits.dtype)
    loss = loss_fn(seg_logits, target)
    if pta_logits is not None:
        if pta_logits.shape != seg_logits.shape:
            raise ValueError(f"pta_logits shape {tuple(pta_logits.shape)} != seg_logits shape {tuple(seg_logits.shape)}")
        loss = loss + pta_weight * loss_fn(pta_logits, target)
    return loss
