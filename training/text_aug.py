"""Clinically aware text augmentation of anatomy-wise report texts (CA-GCL).

A report sentence describes one finding; dropping or reordering whole sentences of one
anatomy's text keeps every remaining statement true (unlike word dropout or synonym swaps,
which can flip a negation), so the augmented text still describes the same scan.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["augment_anatomy_texts", "augment_sentences"]


def _randint(generator: random.Random | np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (both ends included)."""
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(low, high + 1))
    return generator.randint(low, high)


def _permutation(generator: random.Random | np.random.Generator, n: int) -> list[int]:
    if isinstance(generator, np.random.Generator):
        return [int(i) for i in generator.permutation(n)]
    order = list(range(n))
    generator.shuffle(order)
    return order


def augment_sentences(
    sentences: Sequence[str],
    *,
    generator: random.Random | np.random.Generator,
    min_keep: int = 1,
) -> str:
    """Shuffle one anatomy's report sentences and keep a random non-empty subset.

    The number kept is uniform in ``[min(min_keep, n), n]`` and the kept sentences appear in a
    uniformly random order, so every ordered non-empty subset is reachable; a single sentence is
    returned unchanged.

    Args:
        sentences: the anatomy's sentences (blank ones are ignored).
        generator: ``random.Random`` or ``numpy.random.Generator`` (seed it for reproducibility).
        min_keep: the fewest sentences to keep (>= 1).

    Returns:
        The kept sentences joined by single spaces.
    """
    if isinstance(sentences, str):
        raise ValueError("augment_sentences expects a sequence of sentences, not one string (split it first)")
    if not isinstance(generator, (random.Random, np.random.Generator)):
        raise ValueError(f"generator must be random.Random or numpy.random.Generator, got {type(generator).__name__}")
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep}")
    clean = [s.strip() for s in sentences if s and s.strip()]
    if not clean:
        raise ValueError("augment_sentences got no non-empty sentence")
    if len(clean) == 1:
        return clean[0]
    keep = _randint(generator, min(min_keep, len(clean)), len(clean))
    order = _permutation(generator, len(clean))[:keep]
    return " ".join(clean[i] for i in order)


def augment_anatomy_texts(
    sentences: Mapping[str, Sequence[str]],
    *,
    generator: random.Random | np.random.Generator,
    empty_text: str | None = None,
) -> dict[str, str]:
    """Augment every anatomy's sentences independently (e.g. ``AnatomyReport.sentences``).

    Args:
        sentences: ``{anatomy: sentences}``.
        generator: random source shared by all anatomies.
        empty_text: text for an anatomy without sentences; None leaves such anatomies out.
    """
    out: dict[str, str] = {}
    for name, sents in sentences.items():
        if any(s and s.strip() for s in sents):
            out[name] = augment_sentences(sents, generator=generator)
        elif empty_text is not None:
            out[name] = empty_text
    return out
