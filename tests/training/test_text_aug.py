"""Sentence-level text augmentation: non-empty subsets, deterministic, every order reachable."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from training.text_aug import augment_anatomy_texts, augment_sentences

SENTS = ["Emphysema in both lungs.", "A 4 mm nodule in the right upper lobe.", "No pleural effusion."]


def _split(text: str) -> tuple[str, ...]:
    """Recover the kept sentences (each ends with '.')."""
    return tuple(s.strip() + "." for s in text.split(".") if s.strip())


@pytest.mark.parametrize("make", [random.Random, np.random.default_rng])
def test_non_empty_subset_and_all_orders_reachable(make):
    seen = set()
    for seed in range(400):
        out = augment_sentences(SENTS, generator=make(seed))
        kept = _split(out)
        assert kept, "augmentation produced an empty text"
        assert set(kept) <= set(SENTS) and len(set(kept)) == len(kept)
        seen.add(kept)
    every = {p for k in range(1, 4) for c in itertools.combinations(SENTS, k) for p in itertools.permutations(c)}
    assert seen == every  # 3 + 6 + 6 = 15 ordered non-empty subsets


def test_deterministic_with_seed_and_single_sentence_kept():
    a = [augment_sentences(SENTS, generator=random.Random(5)) for _ in range(3)]
    assert len(set(a)) == 1
    rng1, rng2 = np.random.default_rng(9), np.random.default_rng(9)
    assert [augment_sentences(SENTS, generator=rng1) for _ in range(5)] == [
        augment_sentences(SENTS, generator=rng2) for _ in range(5)]
    assert augment_sentences(["  Heart size is normal. "], generator=random.Random(0)) == "Heart size is normal."


def test_bad_inputs():
    with pytest.raises(ValueError, match="no non-empty"):
        augment_sentences(["", "  "], generator=random.Random(0))
    with pytest.raises(ValueError, match="not one string"):
        augment_sentences("One sentence. Two.", generator=random.Random(0))
    with pytest.raises(ValueError, match="generator"):
        augment_sentences(SENTS, generator=0)  # type: ignore[arg-type]


def test_augment_anatomy_texts():
    out = augment_anatomy_texts({"lung": SENTS, "heart": (), "aorta": ["Aorta is normal."]},
                                generator=random.Random(1), empty_text="Normal.")
    assert out["heart"] == "Normal." and out["aorta"] == "Aorta is normal."
    assert set(_split(out["lung"])) <= set(SENTS)
    assert "heart" not in augment_anatomy_texts({"heart": ()}, generator=random.Random(1))


@pytest.mark.parametrize("make", [random.Random, np.random.default_rng])
def test_keep_never_drops_stated_findings(make):
    """With ``keep=affirms_finding`` the two findings always survive; the negation comes and goes;
    every order of what is kept is reachable."""
    from training.report_tags import affirms_finding

    seen = set()
    for seed in range(400):
        kept = _split(augment_sentences(SENTS, generator=make(seed), keep=affirms_finding))
        assert set(SENTS[:2]) <= set(kept) and set(kept) <= set(SENTS) and len(set(kept)) == len(kept)
        seen.add(kept)
    every = {p for c in (SENTS[:2], SENTS) for p in itertools.permutations(c)}
    assert seen == every  # 2 + 6 ordered subsets that hold both findings
    negatives = ["No pleural effusion.", "Trachea and both main bronchi are patent.", "Heart size is normal."]
    drawn = {_split(augment_sentences(negatives, generator=make(s), keep=affirms_finding)) for s in range(300)}
    assert all(d for d in drawn) and len({len(d) for d in drawn}) == 3  # no finding: a plain non-empty subset


def test_affirms_finding():
    from training.report_tags import affirms_finding

    assert affirms_finding("Consolidation is seen in the right lower lobe.")
    assert affirms_finding("Calcified plaques in the aortic arch and descending aorta are observed.")
    assert affirms_finding("No pleural effusion, but a nodule in the left upper lobe.")
    assert affirms_finding("Pleural fluid reaching 23 mm is observed on the left.")
    for s in ("No consolidation is seen.", "Trachea and both main bronchi are patent.",
              "No enlarged lymph nodes are seen in the mediastinum or hila.", "Pleural effusion was not observed."):
        assert not affirms_finding(s), s
