"""training.sentence_loss: who holds which sentence, and a loss that ranks the holders first."""

from __future__ import annotations

import math

import pytest
import torch

from training.sentence_loss import sentence_batch, sentence_contrastive_loss, with_paraphrases


def _batch():
    # 4 scans x 2 anatomies; anatomy 1 of scan 3 is absent (its sentence must be ignored)
    sentences = [
        [["A nodule is seen.", "No emphysema."], ["Heart size is normal."]],
        [["No nodule.", "No emphysema."], ["Heart size is normal."]],
        [["A nodule is seen.", "Emphysema."], ["Cardiomegaly."]],
        [["No nodule.", "Emphysema.", "No nodule."], ["Ignored sentence."]],
    ]
    present = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    return sentence_batch(sentences, present), present


def test_sentence_batch_collects_distinct_sentences_per_anatomy() -> None:
    held, _ = _batch()
    assert "Ignored sentence." not in held.sentences
    assert len(held.sentences) == 6  # 4 lung + 2 heart, duplicates within and across scans merged
    k = held.sentences.index("A nodule is seen.")
    assert held.anatomy[k] == 0 and held.members[:, k].tolist() == [True, False, True, False]
    k = held.sentences.index("Heart size is normal.")
    assert held.anatomy[k] == 1 and held.members[:, k].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="scans x"):
        sentence_batch([[["x"]]], torch.ones(1, 2, dtype=torch.bool))


def test_loss_is_lower_when_holders_match_their_sentences_and_has_gradients() -> None:
    held, present = _batch()
    torch.manual_seed(0)
    s = len(held.sentences)
    text = torch.randn(s, 8)
    # image embeddings that point at the sum of the sentences each scan holds
    good = torch.zeros(4, 2, 8)
    for b in range(4):
        for j in range(2):
            cols = (held.members[b] & (held.anatomy == j)).nonzero().flatten()
            good[b, j] = torch.nn.functional.normalize(text[cols], dim=-1).sum(0) if cols.numel() else torch.randn(8)
    bad = good[[1, 0, 3, 2]]
    lo = sentence_contrastive_loss(good, text, held, present, 10.0)
    hi = sentence_contrastive_loss(bad, text, held, present, 10.0)
    assert float(lo) < float(hi)
    v = torch.randn(4, 2, 8, requires_grad=True)
    t = text.clone().requires_grad_(True)
    loss = sentence_contrastive_loss(v, t, held, present, 10.0)
    loss.backward()
    assert v.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_uninformative_sentences_are_skipped_and_chance_level_is_log_n() -> None:
    # every scan holds the same sentence: no information, zero loss (graph still connected)
    held = sentence_batch([[["No nodule."]], [["No nodule."]], [["No nodule."]]], torch.ones(3, 1, dtype=torch.bool))
    v = torch.randn(3, 1, 4, requires_grad=True)
    loss = sentence_contrastive_loss(v, torch.randn(1, 4), held, torch.ones(3, 1, dtype=torch.bool), 10.0)
    assert float(loss) == 0.0
    loss.backward()
    # one holder among n scans, all similarities equal: the loss is ln n
    held = sentence_batch([[["A."]], [["B."]], [["B."]], [["B."]]], torch.ones(4, 1, dtype=torch.bool))
    v = torch.ones(4, 1, 4)
    out = sentence_contrastive_loss(v, torch.ones(2, 4), held, torch.ones(4, 1, dtype=torch.bool), 10.0)
    # sentence "A." -> ln 4; sentence "B." (3 holders of 4) -> ln 4 as well (uniform softmax)
    assert math.isclose(float(out), math.log(4), rel_tol=1e-5)
    with pytest.raises(ValueError, match="sentence embeddings"):
        sentence_contrastive_loss(v, torch.ones(3, 4), held, torch.ones(4, 1, dtype=torch.bool), 10.0)


def test_with_paraphrases_lets_a_scan_hold_close_sentences_of_the_same_anatomy_only() -> None:
    held, _ = _batch()
    k = {s: i for i, s in enumerate(held.sentences)}
    close = torch.zeros(len(k), len(k), dtype=torch.bool)
    close[k["A nodule is seen."], k["Emphysema."]] = True  # same anatomy: merged
    close[k["Emphysema."], k["Cardiomegaly."]] = True  # other anatomy: ignored
    wide = with_paraphrases(held, close)
    assert wide.sentences == held.sentences and torch.equal(wide.anatomy, held.anatomy)
    # scan 0 holds "A nodule is seen." so now also "Emphysema."; scans that held it keep it
    assert wide.members[:, k["Emphysema."]].tolist() == [True, False, True, True]
    assert torch.equal(wide.members[:, k["Cardiomegaly."]], held.members[:, k["Cardiomegaly."]])
    assert torch.equal(wide.members[:, k["A nodule is seen."]], held.members[:, k["A nodule is seen."]])  # one way
    assert torch.equal(with_paraphrases(held, torch.zeros_like(close)).members, held.members)
    with pytest.raises(ValueError, match="close must be"):
        with_paraphrases(held, close[:2])
