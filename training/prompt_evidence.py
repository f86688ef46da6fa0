"""Train the prompt evidence head of a pretrained checkpoint on report sentences (zero-shot).

Usage::

    python -m training.prompt_evidence --checkpoint CKPT --cache CACHE --out OUT [--steps 400] [--limit 800]

The head (:class:`napari_ctvlp.engine.networks.prompt_evidence.PromptEvidence`) reads the fixed
voxel bins, the anatomy masks and the frozen text backbone's sentence features, so it is trained
alone, after pretraining, with the rest of the checkpoint unchanged. The loss is the sentence
contrast of :mod:`training.sentence_loss` with the head's scan scores as logits: for every
distinct sentence of an anatomy in a batch, a softmax over the scans that have the anatomy, the
scans whose report text for it holds the sentence, or a paraphrase of it, as targets. A paraphrase
is a sentence of the same anatomy whose frozen sentence feature has a cosine of at least
``--paraphrase-cosine`` (0.9) with it: the phantom reports name each finding with its lobes, and a
head that cannot see lobes should not learn "nodule in the left upper lobe" against scans with a
nodule in the right one (``--paraphrase-cosine 1`` gives exact membership). Only the report text is
read: no finding tag, no label, no prompt template, so prompt scoring with this head is zero-shot.

The volumes' bins are computed once and kept in memory (about 2.4 MB per volume on the
``phantom_cpu`` grid). A run is deterministic in ``--seed`` and takes tens of minutes on 2 CPU
cores (1-2 s per step of 8 volumes); it writes nothing until it ends, so it has no resume.
The output is a checkpoint like the input (``--dtype`` float16 by default) with
``prompt_evidence=true`` and the head's weights, and a ``prompt_evidence`` entry in its training
record.
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

__all__ = ["PromptEvidenceTrainingResult", "prompt_evidence_loss", "train_prompt_evidence"]


@dataclass(frozen=True)
class PromptEvidenceTrainingResult:
    """What :func:`train_prompt_evidence` wrote and how the loss went."""

    out: Path
    steps: int
    volumes: int
    sentences: int
    first_loss: float
    last_loss: float
    seconds: float


def prompt_evidence_loss(head: Any, counts: Any, voxels: Any, batch: Any, present: Any, text: Any) -> Any:
    """Sum over the head's anatomies of the mean per-sentence multi-positive InfoNCE over scans.

    Args:
        head: a :class:`~napari_ctvlp.engine.networks.prompt_evidence.PromptEvidence`.
        counts: ``[B, G, C, K]`` cell histograms (:meth:`PromptEvidence.cell_counts`).
        voxels: ``[B, G, C]`` voxel counts.
        batch: a :class:`training.sentence_loss.SentenceBatch` of the ``B`` scans.
        present: ``[B, A]`` bool, the anatomy is in the scan.
        text: ``[S, D]`` text features of ``batch.sentences``.
    """
    import torch

    total = head.weight.sum() * 0.0  # keeps the graph connected when nothing is informative
    for gi, a in enumerate(head.groups):
        scans = torch.nonzero(present[:, a], as_tuple=False).flatten()
        cols = torch.nonzero(batch.anatomy == a, as_tuple=False).flatten()
        if scans.numel() < 2 or cols.numel() == 0:
            continue
        target = batch.members[scans][:, cols].float()
        held = target.sum(0)
        keep = (held > 0) & (held < scans.numel())  # a sentence every scan (or none) holds says nothing
        if not bool(keep.any()):
            continue
        target, cols = target[:, keep], cols[keep]
        cg, ng = counts[scans, gi], voxels[scans, gi]
        cells = torch.nonzero((ng > 0).any(0), as_tuple=False).flatten()  # only cells that hold the anatomy
        logits = head(cg[:, cells], ng[:, cells], text[cols], gi)  # [N, S_a]
        log_p = torch.log_softmax(logits, dim=0)
        total = total + (-(target * log_p).sum(0) / target.sum(0)).mean()
    return total


def train_prompt_evidence(
    checkpoint: str | Path,
    cache: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    steps: int = 400,
    batch_size: int = 8,
    lr: float = 0.03,
    compartments: Sequence[str] = EVIDENCE_COMPARTMENTS,
    limit: int | None = None,
    seed: int = 0,
    paraphrase_cosine: float = 0.9,
    dtype: str = "float16",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> PromptEvidenceTrainingResult:
    """Add a trained prompt evidence head to ``checkpoint`` and write the result to ``out``.

    Args:
        checkpoint: a checkpoint directory whose model has voxel statistics.
        cache: a cache written by :mod:`training.prepare` on the model's grid.
        out: the new checkpoint directory (must differ from ``checkpoint``).
        split: cache split to train on.
        steps: optimisation steps.
        batch_size: volumes per step (>= 2: the contrast is over scans).
        lr: Adam learning rate (the head starts at zero: every scan scores alike).
        compartments: anatomies that split the HU bins, in priority order
            (``CTVLPConfig.evidence_compartments``; shared with a finding evidence head, so a
            checkpoint that has one keeps its compartments and this option must match them).
        limit: use only the first ``limit`` volumes of the split.
        seed: seed of the batch order.
        paraphrase_cosine: sentences of one anatomy whose sentence features have at least this
            cosine count as one (module docstring); 1 or more: exact sentences only.
        dtype: stored weight type.
        overwrite: replace an existing checkpoint at ``out``.
        progress: ``progress(done, total, message)``.

    Raises:
        ValueError: a checkpoint without voxel statistics, a cache on another grid, bad options.
    """
    import torch

    from napari_ctvlp.engine.checkpoint import save_checkpoint

    from training.data import CachedCTDataset
    from training.evidence import _fresh_head_model, _load_base, _load_volumes
    from training.sentence_loss import sentence_batch, with_paraphrases

    if steps < 1 or batch_size < 2 or not lr > 0:
        raise ValueError("steps must be >= 1, batch_size >= 2 and lr > 0")
    t0 = time.perf_counter()
    loaded = _load_base(checkpoint, out, what="prompt evidence head")
    base = loaded.model
    compartments = tuple(compartments)
    if base.config.tag_evidence and tuple(base.config.evidence_compartments) != compartments:
        raise ValueError(f"the checkpoint's finding evidence head reads compartments "
                         f"{','.join(base.config.evidence_compartments) or '(none)'}; --compartments must match")
    model = _fresh_head_model(base, head="prompt_evidence", seed=seed, prompt_evidence=True,
                              evidence_compartments=compartments)
    config = model.config
    head = model.prompt_evidence
    assert head is not None
    bins, masks, _ = _load_volumes(model, Path(cache), split=split, limit=limit, progress=progress)
    entries = CachedCTDataset(Path(cache), split=split, augment_text=False, anatomies=config.anatomies).entries
    sentences = [[[str(s) for s in entries[i]["sentences"].get(a, ())] for a in config.anatomies]
                 for i in range(bins.shape[0])]
    distinct = sorted({s for row in sentences for group in row for s in group if s.strip()})
    if not distinct:
        raise ValueError(f"the cache's {split} reports have no sentences to train on")
    features = torch.cat([model.text.sentence_features(distinct[i:i + 512]) for i in range(0, len(distinct), 512)])
    row = {s: i for i, s in enumerate(distinct)}
    close_all = (features @ features.T) >= paraphrase_cosine  # [S, S]; features are unit vectors
    close_all.fill_diagonal_(True)
    paraphrases = int(close_all.sum()) - len(distinct)
    if paraphrases > len(distinct) * (len(distinct) - 1) // 2:
        logger.warning("--paraphrase-cosine %s merges %d of %d sentence pairs: little contrast is left",
                       paraphrase_cosine, paraphrases // 2, len(distinct) * (len(distinct) - 1) // 2)
    present_all = masks.flatten(2).any(-1)  # [N, A]
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    b = min(batch_size, bins.shape[0])
    if b < 2:
        raise ValueError("the sentence contrast needs at least 2 volumes")
    buffers = (torch.zeros(b, len(head.groups), head.num_cells * head.num_bins), torch.zeros(b, len(head.groups),
                                                                                                head.num_cells))
    first = last = float("nan")
    head.train()
    for step in range(steps):
        idx = torch.randperm(bins.shape[0], generator=generator)[:b]
        counts, voxels = head.cell_counts(bins[idx], masks[idx], out=buffers)
        present = present_all[idx]
        batch = sentence_batch([sentences[int(i)] for i in idx], present)
        if paraphrases:
            rows = torch.tensor([row[s] for s in batch.sentences], dtype=torch.long)
            batch = with_paraphrases(batch, close_all[rows][:, rows])
        text = features[[row[s] for s in batch.sentences]] if batch.sentences else features[:0]
        loss = prompt_evidence_loss(head, counts, voxels, batch, present, text)
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
    training["prompt_evidence"] = {
        "cache": str(cache), "split": split, "volumes": int(bins.shape[0]), "sentences": len(distinct),
        "steps": steps, "batch_size": b, "lr": lr, "compartments": list(compartments), "seed": seed,
        "paraphrase_cosine": paraphrase_cosine, "paraphrase_pairs": paraphrases // 2,
        "loss": "sentence contrast over scans (report text only)", "first_loss": round(first, 4),
        "last_loss": round(last, 4), "source_checkpoint": str(loaded.path),
    }
    path = save_checkpoint(model, out, preprocessing=loaded.preprocessing, training=training,
                           model_card=loaded.model_card, overwrite=overwrite, weights_dtype=dtype)
    return PromptEvidenceTrainingResult(path, steps, int(bins.shape[0]), len(distinct), first, last,
                                        time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.prompt_evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--compartments", default=",".join(EVIDENCE_COMPARTMENTS),
                   help="comma-separated anatomies that split the HU bins, in priority order ('' for none; "
                        "default: %(default)s)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paraphrase-cosine", type=float, default=0.9,
                   help="sentences of one anatomy with at least this sentence-feature cosine count as one "
                        "(1: exact sentences; default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        result = train_prompt_evidence(
            args.checkpoint, args.cache, args.out, split=args.split, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, compartments=[a.strip() for a in args.compartments.split(",") if a.strip()],
            limit=args.limit, seed=args.seed,
            paraphrase_cosine=args.paraphrase_cosine, dtype=args.dtype, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("wrote %s (%d steps on %d volumes, %d sentences, loss %.4f -> %.4f, %.0f s)", result.out,
                result.steps, result.volumes, result.sentences, result.first_loss, result.last_loss, result.seconds)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
