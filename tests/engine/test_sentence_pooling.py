"""Sentence pooling of the text encoder, and the exact cache of a frozen backbone's sentence features."""

from __future__ import annotations

import pytest
import torch

from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
from napari_ctvlp.engine.networks.text_encoder import TextEncoder, split_sentences


def test_split_sentences() -> None:
    assert split_sentences("No effusion.  Heart is normal! Any nodule? Yes; small.") == [
        "No effusion.", "Heart is normal!", "Any nodule?", "Yes;", "small."]
    assert split_sentences("Nodule of 3.5 mm") == ["Nodule of 3.5 mm"]
    assert split_sentences("   ") == []


def test_a_text_is_the_mean_of_its_sentences_projected() -> None:
    torch.manual_seed(0)
    m = CTVLP(CTVLPConfig.tiny(text_pooling="sentences")).eval()
    enc = m.text
    with torch.no_grad():
        got = m.encode_text(["There is consolidation. No effusion.", "No effusion. There is consolidation.",
                             "There is consolidation."])
        batch = enc.tokenize(["There is consolidation.", "No effusion."])
        feats = enc._pooled(batch["input_ids"], batch["attention_mask"])
        expected = torch.nn.functional.normalize(enc.projection(feats.mean(0)), dim=-1)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-6)  # order does not matter
    assert (got[0] - got[2]).abs().max() > 1e-3  # a subset is a different text
    with pytest.raises(ValueError, match="text_pooling='text'"):
        m.encode_text_tokens(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="single string"):
        m.encode_text("No effusion.")


def test_trainable_backbone_is_not_cached_and_gets_gradients() -> None:
    torch.manual_seed(0)
    m = CTVLP(CTVLPConfig.tiny(text_pooling="sentences")).train()
    assert not m.text.backbone_frozen()
    e = m.encode_text(["Lungs are clear. No nodule.", "Heart is enlarged."])
    e.sum().backward()
    assert m.text._sentence_cache == {}
    grad = m.text.backbone.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_frozen_minilm_caches_sentences_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    enc = TextEncoder("minilm", embed_dim=32, trainable_layers=0, max_length=256, pooling="sentences").train()
    assert enc.backbone_frozen() and enc.frozen_backbone_names()
    calls = []
    enc.backbone.register_forward_hook(lambda *a: calls.append(1))
    texts = ["There is a pleural effusion. The heart is normal in size.", "The heart is normal in size."]
    first = enc.encode(texts)
    n = len(calls)
    assert n >= 1 and len(enc._sentence_cache) == 2
    second = enc.encode(list(reversed(texts)))
    assert len(calls) == n  # nothing re-encoded
    torch.testing.assert_close(first, second.flip(0))  # train mode, yet no dropout: exact
    assert enc.backbone.training  # the backbone's mode is restored
    first.sum().backward()
    assert enc.projection.weight.grad is not None and enc.projection.weight.grad.abs().sum() > 0
    # the cached features are what an uncached eval-mode encoder computes
    enc.clear_sentence_cache()
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(texts), first.detach(), rtol=1e-5, atol=1e-6)


def test_an_mlp_head_maps_every_sentence_before_the_mean() -> None:
    torch.manual_seed(0)
    m = CTVLP(CTVLPConfig.tiny(text_pooling="sentences", text_head="mlp")).eval()
    enc = m.text
    assert isinstance(enc.projection, torch.nn.Sequential)
    with pytest.raises(ValueError, match="text_head"):
        CTVLPConfig.tiny(text_head="deep")
    d = CTVLPConfig.tiny().to_dict()
    d.pop("text_head")  # an old checkpoint: a linear head
    assert CTVLPConfig.from_dict(d, strict=True).text_head == "linear"
    sentences = ["There is consolidation.", "No effusion."]
    with torch.no_grad():
        got = m.encode_text([" ".join(sentences)])[0]
        batch = enc.tokenize(sentences)
        feats = enc._pooled(batch["input_ids"], batch["attention_mask"])
        per_sentence = torch.nn.functional.normalize(enc.projection(feats).mean(0), dim=-1)
        of_the_mean = torch.nn.functional.normalize(enc.projection(feats.mean(0)), dim=-1)
    torch.testing.assert_close(got, per_sentence, rtol=1e-5, atol=1e-6)
    assert (got - of_the_mean).abs().max() > 1e-4  # nonlinear: not the head of the mean
    m.train()  # and the head trains
    m.encode_text([" ".join(sentences)]).sum().backward()
    assert enc.projection[0].weight.grad is not None and enc.projection[0].weight.grad.abs().sum() > 0
