"""The hybrid image encoder: convolutional stem, dense fused features, legacy configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_ctvlp.engine.anatomy import ANATOMY_NAMES
from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
from napari_ctvlp.engine.networks.conv_stem import ConvStem, stem_widths
from napari_ctvlp.engine.networks.vit3d import ViT3D

A = len(ANATOMY_NAMES)


def _conv_tiny(**kw) -> CTVLPConfig:
    return CTVLPConfig.tiny(stem="conv", **kw)


def test_conv_stem_keeps_the_token_grid_and_returns_its_stages() -> None:
    stem = ConvStem(1, 32, (8, 8, 16))
    tokens, stages = stem(torch.randn(2, 1, 16, 32, 64))
    assert tokens.shape == (2, 32, 2, 4, 4)
    assert [tuple(s.shape[2:]) for s in stages] == [(8, 16, 32), (4, 8, 16), (2, 4, 8)]
    assert [s.shape[1] for s in stages] == list(stem_widths(32))
    with pytest.raises(ValueError, match="divisible by 8"):
        ConvStem(1, 32, (4, 8, 8))


def test_vit_with_conv_stem_matches_token_count_and_rejects_unknown_stems() -> None:
    vit = ViT3D((32, 32, 32), (8, 8, 8), hidden_size=32, depth=1, num_heads=2, mlp_dim=64, stem="conv")
    tokens, stages = vit.forward_features(torch.randn(1, 1, 32, 32, 32))
    assert tokens.shape == (1, 64, 32) and len(stages) == 3
    torch.testing.assert_close(vit(torch.zeros(1, 1, 32, 32, 32)), vit.forward_features(torch.zeros(1, 1, 32, 32, 32))[0])
    with pytest.raises(ValueError, match="stem"):
        ViT3D((32, 32, 32), (8, 8, 8), hidden_size=32, depth=1, num_heads=2, mlp_dim=64, stem="resnet")


@pytest.mark.parametrize(("changes", "message"), [
    ({"stem": "resnet"}, "stem"),
    ({"stem": "conv", "patch_size": (4, 8, 8)}, "divisible by 8"),
    ({"feature_stride": 4}, "needs stem='conv'"),
    ({"stem": "conv", "feature_stride": 2}, "feature_stride"),
])
def test_config_checks_stem_options(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CTVLPConfig.tiny(**changes)


def test_dense_features_are_on_the_finer_grid_and_pool_with_voxel_masks() -> None:
    torch.manual_seed(0)
    cfg = _conv_tiny(feature_stride=4)
    assert cfg.vit_grid == (4, 4, 4) and cfg.token_grid == (8, 8, 8) and cfg.feature_patch == (4, 4, 4)
    m = CTVLP(cfg).eval()
    image = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        feats = m.encode_image(image)
    assert feats.shape == (2, 512, 32)
    masks = torch.zeros(2, A, 32, 32, 32, dtype=torch.bool)
    masks[:, 0, :4, :4, :4] = True  # exactly the first dense cell
    masks[:, 1, 16:, :, :] = True
    tm = m.masks_to_tokens(masks)
    assert tm.shape == (2, A, 512) and float(tm[0, 0, 0]) == 1.0 and int((tm[0, 0] > 0).sum()) == 1
    # the dataset's numpy token masks agree with the model's on the dense grid
    from training.data import token_masks

    np.testing.assert_allclose(token_masks(masks[0].numpy(), cfg.feature_patch, weighting="fraction"), tm[0].numpy())
    with torch.no_grad():
        pooled = m.pool_anatomies(feats, tm)
        tags = m.decode_tags(feats)
        heat = m.token_embeddings(feats)
    assert pooled.embeddings.shape == (2, A, cfg.embed_dim) and bool(pooled.present[:, :2].all())
    assert tags.maps.shape == (2, len(cfg.tags), 512) and heat.shape == (2, 512, cfg.embed_dim)


def test_dense_features_see_a_small_lesion_that_moves() -> None:
    """A 2-voxel bright spot changes the dense features near it more than far from it."""
    torch.manual_seed(1)
    m = CTVLP(_conv_tiny(feature_stride=4)).eval()
    base = torch.full((1, 1, 32, 32, 32), -0.8)
    spot = base.clone()
    spot[0, 0, 4:6, 4:6, 4:6] = 0.6
    with torch.no_grad():
        diff = (m.encode_image(spot) - m.encode_image(base)).norm(dim=-1).reshape(8, 8, 8)
    assert float(diff[1, 1, 1]) > 2.0 * float(diff[6, 6, 6])


def test_gradients_reach_the_stem_and_the_fusion() -> None:
    torch.manual_seed(0)
    m = CTVLP(_conv_tiny(feature_stride=8)).train()
    masks = torch.zeros(2, A, 32, 32, 32, dtype=torch.bool)
    masks[:, 0, :16] = True
    feats = m.encode_image(torch.randn(2, 1, 32, 32, 32))
    loss = m.pool_anatomies(feats, m.masks_to_tokens(masks)).embeddings.sum() + m.decode_tags(feats).logits.sum()
    loss.backward()
    for name in ("vit.patch_embed.stages.0.0.weight", "vit.patch_embed.patch.weight", "dense.skip.weight"):
        grad = m.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_configs_written_before_the_stem_existed_load_as_plain_vits() -> None:
    d = CTVLPConfig.tiny().to_dict()
    for key in ("stem", "feature_stride"):
        del d[key]
    old = CTVLPConfig.from_dict(json.loads(json.dumps(d)), strict=True)
    assert old.stem == "patch" and old.feature_stride == 0 and old.token_grid == old.vit_grid
    assert CTVLPConfig.phantom_cpu().stem == "conv" and CTVLPConfig.vit_b().stem == "patch"
