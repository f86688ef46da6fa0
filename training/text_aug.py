"""Clinically aware text augmentation of anatomy-wise report texts (CA-GCL).

A report sentence describes one finding; dropping or reordering whole sentences of one
anatomy's text keeps every remaining statement true (unlike word dropout or synonym swaps,
which can flip a negation), so the augmented text still describes the same scan.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

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
    keep: Callable[[str], bool] | None = None,
) -> str:
    """Shuffle one anatomy's report sentences and keep a random non-empty subset.

    The number kept is uniform in ``[min(min_keep, n), n]`` and the kept sentences appear in a
    uniformly random order, so every ordered non-empty subset is reachable; a single sentence is
    returned unchanged.

    With ``keep`` (e.g. :func:`training.report_tags.affirms_finding`), the sentences it accepts are
    always kept and the subset is drawn among the others only (uniform in ``[0, m]`` of the ``m``
    others when at least one is kept): an augmented text never drops a finding the report states,
    only some of its negations and normal statements, and is still shuffled as a whole.

    Args:
        sentences: the anatomy's sentences (blank ones are ignored).
        generator: ``random.Random`` or ``numpy.random.Generator`` (seed it for reproducibility).
        min_keep: the fewest sentences to keep (>= 1).
        keep: sentences that must survive the subset (None: any sentence may be dropped).

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
    fixed = [i for i, s in enumerate(clean) if keep(s)] if keep is not None else []
    if not fixed:  # the plain non-empty subset (the same draws as without ``keep``)
        n_keep = _randint(generator, min(min_keep, len(clean)), len(clean))
        return " ".join(clean[i] for i in _permutation(generator, len(clean))[:n_keep])
    others = [i for i in range(len(clean)) if i not in fixed]
    n_other = _randint(generator, 0, len(others))
    chosen = fixed + [others[i] for i in _permutation(generator, len(others))[:n_other]]
    return " ".join(clean[chosen[i]] for i in _permutation(generator, len(chosen)))


def augment_anatomy_texts(
    sentences: Mapping[str, Sequence[str]],
    *,
    generator: random.Random | np.random.Generator,
    empty_text: str | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, str]:
    """Augment every anatomy's sentences independently (e.g. ``AnatomyReport.sentences``).

    Args:
        sentences: ``{anatomy: sentences}``.
        generator: random source shared by all anatomies.
        empty_text: text for an anatomy without sentences; None leaves such anatomies out.
        keep: sentences that are never dropped (see :func:`augment_sentences`).
    """
    out: dict[str, str] = {}
    for name, sents in sentences.items():
        if any(s and s.strip() for s in sents):
            out[name] = augment_sentences(sents, generator=generator, keep=keep)
        elif empty_text is not None:
            out[name] = empty_text
    return out
