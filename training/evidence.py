"""Train the finding evidence head of a pretrained checkpoint (MOSMOS-style tag recognition).

Usage::

    python -m training.evidence --checkpoint CKPT --cache CACHE --out OUT [--steps 300] [--limit 800]

The head (:class:`napari_ctvlp.engine.networks.evidence.TagEvidence`) reads only the fixed voxel
bins and the anatomy masks, so it is trained alone, after pretraining, with the rest of the
checkpoint unchanged: the multi-label recognition loss (binary cross-entropy, positives weighted
by ``sqrt(negatives / positives)``) on the 18 finding tags read from each report's text
(:func:`training.data.tag_targets`; the CT-RATE labels are never used). The volumes' bins are
computed once and kept in memory (about 6 MB per volume on the ``phantom_cpu`` grid). A run takes
minutes on 2 CPU cores and is deterministic in ``--seed``; it is short enough not to need a resume.
The output is a checkpoint like the input (``--dtype`` float16 by default) with
``tag_evidence=true`` and the head's weights, and an ``evidence`` entry in its training record.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_ctvlp.engine.networks.config import EVIDENCE_COMPARTMENTS
from napari_ctvlp.engine.volume import ProgressCallback, report

logger = logging.getLogger(__name__)

__all__ = ["EvidenceTrainingResult", "train_evidence"]


@dataclass(frozen=True)
class EvidenceTrainingResult:
    """What :func:`train_evidence` wrote and how the loss went."""

    out: Path
    steps: int
    volumes: int
    first_loss: float
    last_loss: float
    seconds: float


def _load_volumes(model: Any, cache: Path, *, split: str, limit: int | None,
                  progress: ProgressCallback | None) -> tuple[Any, Any, Any]:
    """Bins ``uint8 [N, F, V]``, anatomy masks ``bool [N, A, D, H, W]`` and tag targets ``[N, 18]``."""
    import torch

    from napari_ctvlp.engine.anatomy import ABNORMALITIES

    from training.data import CachedCTDataset

    ds = CachedCTDataset(cache, split=split, augment_text=False, anatomies=model.config.anatomies,
                         tags=[a.term for a in ABNORMALITIES])
    if tuple(ds.image_size) != tuple(model.config.image_size):
        raise ValueError(f"cache grid {ds.image_size} differs from the model's {model.config.image_size}")
    n = len(ds) if limit is None else min(limit, len(ds))
    if model.statistics.bins + model.statistics.texture_bins > 256:
        raise ValueError("more than 256 voxel bins do not fit the uint8 store")
    bins, masks, targets = [], [], []
    for i in range(n):
        item = ds[i]
        with torch.no_grad():
            bins.append(model.evidence_bins(item["image"][None].float())[0].to(torch.uint8))
        masks.append(item["anatomy_masks"].clone())
        targets.append(item["tag_targets"])
        report(progress, i + 1, n, "voxel bins")
    return torch.stack(bins), torch.stack(masks), torch.stack(targets)


def _load_base(checkpoint: str | Path, out: str | Path, *, what: str) -> Any:
    """The checkpoint a head is trained on, checked: ``out`` differs from it and it has voxel statistics.

    Raises:
        ValueError: either check fails (the message names ``what``, the head).
    """
    from napari_ctvlp.engine.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    if Path(out).resolve() == loaded.path.resolve():
        raise ValueError("--out must differ from --checkpoint")
    if loaded.model.statistics is None:
        raise ValueError(f"the {what} reads the voxel statistics' bins: this checkpoint has none")
    return loaded


def _fresh_head_model(base: Any, *, head: str, seed: int, **changes: Any) -> Any:
    """A model of ``base``'s config with ``changes``: ``base``'s weights, ``head`` freshly initialised."""
    import torch

    from napari_ctvlp.engine.networks import CTVLP

    torch.manual_seed(seed)
    model = CTVLP(base.config.replace(**changes))
    prefix = f"{head}."
    state = {k: v for k, v in base.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise ValueError(f"checkpoint does not match its own config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def train_evidence(
    checkpoint: str | Path,
    cache: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 0.03,
    smooth: int = 1,
    compartments: Sequence[str] = (),
    limit: int | None = None,
    seed: int = 0,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> EvidenceTrainingResult:
    """Add a trained evidence head to ``checkpoint`` and write the result to ``out``.

    Args:
        checkpoint: a checkpoint directory whose model has voxel statistics.
        cache: a cache written by :mod:`training.prepare` on the model's grid.
        out: the new checkpoint directory (must differ from ``checkpoint``).
        split: cache split to train on.
        steps: optimisation steps.
        batch_size: volumes per step.
        lr: Adam learning rate (the head is a table of bin weights, started at zero).
        smooth: box smoothing of the maps, in cells (``CTVLPConfig.evidence_smooth``).
        compartments: anatomies that split the HU bins by compartment, in priority order
            (``CTVLPConfig.evidence_compartments``; empty for plain HU bins).
        limit: use only the first ``limit`` volumes of the split.
        seed: seed of the batch order.
        dtype: stored weight type.
        overwrite: replace an existing checkpoint at ``out``.
        progress: ``progress(done, total, message)``.

    Raises:
        ValueError: a checkpoint without voxel statistics, a cache on another grid, bad options.
    """
    import torch
    import torch.nn.functional as F

    from napari_ctvlp.engine.checkpoint import save_checkpoint

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("steps and batch_size must be >= 1 and lr > 0")
    t0 = time.perf_counter()
    loaded = _load_base(checkpoint, out, what="evidence head")
    model = _fresh_head_model(loaded.model, head="evidence", seed=seed, tag_evidence=True,
                              evidence_smooth=int(smooth), evidence_compartments=tuple(compartments))
    config = model.config
    head = model.evidence
    assert head is not None
    bins, masks, targets = _load_volumes(model, Path(cache), split=split, limit=limit, progress=progress)
    share = targets.mean(0).clamp(0.02, 0.98)
    pos_weight = ((1 - share) / share).sqrt()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    first = last = float("nan")
    head.train()
    for step in range(steps):
        idx = torch.randint(0, bins.shape[0], (min(batch_size, bins.shape[0]),), generator=generator)
        counts, voxels = head.cell_counts(bins[idx], masks[idx])
        logits = head(counts, voxels).logits
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx], pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = float(loss.detach())
        first = last if step == 0 else first
        if (step + 1) % 25 == 0 or step + 1 == steps:
            logger.info("step %d/%d loss %.4f", step + 1, steps, last)
        report(progress, step + 1, steps, f"loss {last:.4f}")
    model.eval()
    training = dict(loaded.meta.get("training") or {})
    training["evidence"] = {
        "cache": str(cache), "split": split, "volumes": int(bins.shape[0]), "steps": steps, "batch_size": batch_size,
        "lr": lr, "smooth": int(smooth),
        "compartments": list(compartments), "seed": seed, "loss": "bce on report-text finding tags",
        "first_loss": round(first, 4), "last_loss": round(last, 4), "source_checkpoint": str(loaded.path),
    }
    path = save_checkpoint(model, out, preprocessing=loaded.preprocessing, training=training,
                           model_card=loaded.model_card, overwrite=overwrite, weights_dtype=dtype)
    points = loaded.meta.get("operating_points")
    if points:  # the zero-shot path is unchanged: its operating points still hold
        from training.evaluate import store_operating_points

        store_operating_points(path, points.get("thresholds") or {}, chosen_on=points.get("chosen_on") or {})
    return EvidenceTrainingResult(path, steps, int(bins.shape[0]), first, last, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--smooth", type=int, default=1)
    p.add_argument("--compartments", default=",".join(EVIDENCE_COMPARTMENTS),
                   help="comma-separated anatomies that split the HU bins, in priority order ('' for none; "
                        "default: %(default)s)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        result = train_evidence(args.checkpoint, args.cache, args.out, split=args.split, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, smooth=args.smooth, limit=args.limit,
                                compartments=[a.strip() for a in args.compartments.split(",") if a.strip()],
                                seed=args.seed, dtype=args.dtype, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("wrote %s (%d steps on %d volumes, loss %.4f -> %.4f, %.0f s)", result.out, result.steps,
                result.volumes, result.first_loss, result.last_loss, result.seconds)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
