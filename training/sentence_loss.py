"""Sentence-to-anatomy contrast: which scans of the batch does each report sentence describe?

CA-GCL contrasts an anatomy's embedding with the embedding of its *whole* anatomy text. In a lung
paragraph of ten sentences one finding is a tenth of that text, and a batch of 16 rarely holds two
different lung paragraphs that differ only in that finding, so the local loss hardly says which
sentence an image matches (on the phantoms it stays within 2-3 nats of chance for hundreds of
steps). This term gives each sentence its own contrast, still from the report text alone (no label
is read):

for every distinct sentence ``s`` of anatomy ``a`` in the batch, a softmax over the scans in which
``a`` is present of ``scale * cos(v_ba, t_s)``, with the scans whose anatomy text holds ``s`` as the
(uniformly weighted) targets: the multi-positive InfoNCE of SupCon / UniCL in the text-to-image
direction. A sentence every scan holds carries no information and is skipped, as is one no scan
holds. Paraphrases do not bias the ranking: a scan's chance of holding one wording of "no
emphysema" is its chance of having no emphysema times the (image-independent) chance of that
wording, so the ranking of scans the loss trains is the ranking zero-shot scoring needs.

Scoring a finding zero-shot ranks scans by ``cos(v, t+) - cos(v, t-)``; this loss ranks scans by
``cos(v, t_s)`` for the report's own positive and negative sentences, the same kind of ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SentenceBatch", "sentence_batch", "sentence_contrastive_loss", "with_paraphrases"]


@dataclass(frozen=True)
class SentenceBatch:
    """The distinct sentences of a batch and who holds them.

    Attributes:
        sentences: distinct (anatomy, sentence) pairs' sentence strings, ``S`` of them.
        anatomy: ``[S]`` long, the anatomy index of each.
        members: ``[B, S]`` bool, scan ``b``'s anatomy text holds sentence ``s``.
    """

    sentences: tuple[str, ...]
    anatomy: torch.Tensor
    members: torch.Tensor


def sentence_batch(anatomy_sentences: Sequence[Sequence[Sequence[str]]], present: torch.Tensor) -> SentenceBatch:
    """Collect the distinct sentences per anatomy of a batch.

    Args:
        anatomy_sentences: per scan, per anatomy, the (un-augmented) sentences of its text.
        present: ``[B, A]`` bool; sentences of absent anatomies are ignored.
    """
    b, a = present.shape
    if len(anatomy_sentences) != b or any(len(row) != a for row in anatomy_sentences):
        raise ValueError(f"anatomy_sentences must be {b} scans x {a} anatomies")
    index: dict[tuple[int, str], int] = {}
    pairs: list[tuple[int, int]] = []
    for i, row in enumerate(anatomy_sentences):
        for j, sentences in enumerate(row):
            if not bool(present[i, j]):
                continue
            for s in dict.fromkeys(str(x) for x in sentences if str(x).strip()):
                k = index.setdefault((j, s), len(index))
                pairs.append((i, k))
    members = torch.zeros(b, len(index), dtype=torch.bool)
    if pairs:
        rows, cols = zip(*pairs)
        members[list(rows), list(cols)] = True
    keys = list(index)
    anatomy = torch.tensor([j for j, _ in keys], dtype=torch.long)
    return SentenceBatch(tuple(s for _, s in keys), anatomy, members.to(present.device))


def with_paraphrases(batch: SentenceBatch, close: torch.Tensor) -> SentenceBatch:
    """Let a scan also hold the sentences its own sentences paraphrase.

    A phantom report names a finding with its lobes ("Lung nodule in the left upper lobe."), so
    with exact membership the scans of a batch that have the same finding in another lobe are
    negatives of that sentence, and a head that cannot see lobes is trained against itself. With
    ``close[i, j]`` true when sentences ``i`` and ``j`` say the same (e.g. a cosine of their frozen
    sentence features above a threshold: a text-only judgement, no label is read), scan ``b``
    holds sentence ``j`` when it holds any sentence ``i`` of the same anatomy close to ``j``.

    Args:
        batch: from :func:`sentence_batch`.
        close: ``[S, S]`` bool over ``batch.sentences`` (the diagonal is taken as true).
    """
    s = len(batch.sentences)
    if close.shape != (s, s):
        raise ValueError(f"close must be {s} x {s}, not {tuple(close.shape)}")
    same = batch.anatomy[:, None] == batch.anatomy[None, :]
    close = (close.to(torch.bool) | torch.eye(s, dtype=torch.bool)) & same
    members = (batch.members.float() @ close.float().to(batch.members.device)) > 0
    return SentenceBatch(batch.sentences, batch.anatomy, members)


def sentence_contrastive_loss(
    image_emb: torch.Tensor,
    sentence_emb: torch.Tensor,
    batch: SentenceBatch,
    present: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Sum over anatomies of the mean per-sentence multi-positive InfoNCE (module docstring).

    Args:
        image_emb: ``[B, A, E]`` anatomy embeddings (normalised here).
        sentence_emb: ``[S, E]`` embeddings of ``batch.sentences`` (normalised here).
        batch: from :func:`sentence_batch`.
        present: ``[B, A]`` bool.
        logit_scale: ``1 / temperature`` (scalar).
    """
    if sentence_emb.shape[0] != len(batch.sentences):
        raise ValueError(f"{sentence_emb.shape[0]} sentence embeddings for {len(batch.sentences)} sentences")
    v = F.normalize(image_emb, dim=-1)
    t = F.normalize(sentence_emb, dim=-1)
    total = (v.sum() + t.sum()) * 0.0  # keeps the graph connected when nothing is informative
    anatomy = batch.anatomy.to(v.device)
    members = batch.members.to(v.device)
    for j in range(v.shape[1]):
        scans = torch.nonzero(present[:, j], as_tuple=False).flatten()
        cols = torch.nonzero(anatomy == j, as_tuple=False).flatten()
        if scans.numel() < 2 or cols.numel() == 0:
            continue
        target = members[scans][:, cols].float()  # [N, S_j]
        held = target.sum(0)
        keep = (held > 0) & (held < scans.numel())
        if not bool(keep.any()):
            continue
        target = target[:, keep]
        logits = logit_scale * v[scans, j] @ t[cols[keep]].T  # [N, S_j]
        log_p = torch.log_softmax(logits, dim=0)  # over scans, per sentence
        per_sentence = -(target * log_p).sum(0) / target.sum(0)
        total = total + per_sentence.mean()
    return total
