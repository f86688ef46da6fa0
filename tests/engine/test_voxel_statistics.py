"""Voxel-exact intensity statistics (engine/networks/voxel_statistics.py) and their wiring in CTVLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
from napari_ctvlp.engine.networks.voxel_statistics import HIST_FLOOR, VoxelStatistics

SIZE = (16, 16, 16)
EDGES = np.array([-1.0, -0.9, -0.5, -0.2, 0.0, 0.1, 0.3, 0.6, 1.0])  # 8 bins, uneven


def _stats() -> VoxelStatistics:
    torch.manual_seed(0)
    return VoxelStatistics(edges=EDGES[1:-1].tolist(), feature_channels=3, hidden_size=12, embed_dim=6, image_size=SIZE, cell=(8, 8, 8))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 1, *SIZE, generator=g) * 2 - 1
    features = torch.randn(2, 3, *(s // 4 for s in SIZE), generator=g)
    masks = torch.zeros(2, 2, *SIZE, dtype=torch.bool)
    masks[:, 0, 2:11, 3:9, 1:15] = True
    masks[0, 1, 8:16, 8:16, 8:16] = True  # anatomy 1 is absent in sample 1
    return image, features, masks


def test_anatomy_histogram_and_volume_are_voxel_exact():
    vs = _stats()
    image, features, masks = _inputs()
    stats, present = vs.anatomy_inputs(image, features, masks)
    assert present.tolist() == [[True, True], [True, False]]
    edges = EDGES
    for b in range(2):
        for a in range(2):
            if not present[b, a]:
                assert torch.all(stats[b, a] == 0)
                continue
            values = image[b, 0][masks[b, a]].numpy()
            want = np.log(np.histogram(values, bins=edges)[0] / values.size + HIST_FLOOR)
            np.testing.assert_allclose(stats[b, a, :8].numpy(), want, rtol=1e-5, atol=1e-5)
            share = masks[b, a].float().mean().item()
            assert stats[b, a, 8].item() == pytest.approx(np.log(share + 1e-4), rel=1e-5)


def test_a_single_bright_voxel_counts_inside_its_anatomy_only():
    vs = _stats()
    image, features, masks = _inputs()
    image[:] = -0.9
    before, _ = vs.anatomy_inputs(image, features, masks)
    inside = image.clone()
    inside[0, 0, 5, 5, 5] = 1.0  # in anatomy 0 of sample 0
    after, _ = vs.anatomy_inputs(inside, features, masks)
    assert after[0, 0, 7] > before[0, 0, 7]  # the top bin gained one voxel
    assert torch.equal(after[0, 1], before[0, 1]) and torch.equal(after[1], before[1])
    outside = image.clone()
    outside[0, 0, 0, 0, 0] = 1.0  # in no anatomy
    assert torch.equal(vs.anatomy_inputs(outside, features, masks)[0], before)


def test_masked_mean_and_max_follow_the_stride4_cells():
    vs = _stats()
    image, features, masks = _inputs()
    stats, _ = vs.anatomy_inputs(image, features, masks)
    w = torch.nn.functional.avg_pool3d(masks.float(), 4).flatten(2)  # [B, A, M]
    f = features.flatten(2)
    mean = (w[0, 0] * f[0]).sum(-1) / w[0, 0].sum()
    torch.testing.assert_close(stats[0, 0, 9:12], mean)
    peak = f[0][:, w[0, 0] >= 0.5].amax(-1)
    torch.testing.assert_close(stats[0, 0, 12:15], peak)


def test_cell_histograms_match_numpy():
    vs = _stats()
    image, features, _ = _inputs()
    cells = vs.cell_inputs(image, features)
    assert cells.shape == (2, 8, 8 + 6)
    block = image[1, 0, 8:16, 0:8, 8:16].numpy()  # cell (1, 0, 1) -> index 5
    want = np.log(np.histogram(block, bins=EDGES)[0] / block.size + HIST_FLOOR)
    np.testing.assert_allclose(cells[1, 5, :8].numpy(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cells[1, 5, 8:11], features[1, :, 2:4, 0:2, 2:4].mean(dim=(1, 2, 3)))


def test_ctvlp_with_statistics_trains_the_stem_through_them():
    cfg = CTVLPConfig.tiny(image_size=(16, 32, 32), patch_size=(8, 16, 16), stem="conv", feature_stride=8,
                           statistics_edges=(-0.5, 0.0, 0.5), anatomies=("lung", "heart"))
    model = CTVLP(cfg)
    assert model.statistics is not None
    image, masks = torch.rand(2, 1, 16, 32, 32) * 2 - 1, torch.zeros(2, 2, 16, 32, 32, dtype=torch.bool)
    masks[:, 0, :8] = True
    masks[:, 1, 8:, :16] = True
    embedded = model.embed_image(image, masks)
    tokens, pooled = embedded.tokens, embedded.anatomies
    assert tokens.shape == (2, 2 * 4 * 4, cfg.hidden_size) and pooled.embeddings.shape == (2, 2, cfg.embed_dim)
    torch.testing.assert_close(model(image, masks).embeddings, pooled.embeddings)
    pooled.embeddings.sum().backward()
    assert model.statistics.anatomy_mlp[1].weight.grad.abs().sum() > 0
    assert model.statistics.anatomy_direct.weight.grad.abs().sum() > 0
    assert model.vit.patch_embed.stages[1][0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embed_image"):
        model.pool_anatomies(tokens, model.masks_to_tokens(masks))
    # a change inside the heart's voxels moves the heart embedding, even with identical masks
    bright = image.clone()
    bright[:, :, 12, 4, 4] = 1.0
    with torch.no_grad():
        a = model(image, masks).embeddings
        b = model(bright, masks).embeddings
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_config_validates_statistics_edges_and_old_checkpoints_have_none():
    for bad in ((0.5, 0.2), (-1.0, 0.0), (0.0, float("nan"))):
        with pytest.raises(ValueError, match="statistics_edges"):
            CTVLPConfig.tiny(stem="conv", patch_size=(8, 16, 16), statistics_edges=bad)
    with pytest.raises(ValueError, match="stem='conv'"):
        CTVLPConfig.tiny(statistics_edges=(0.0,))
    cfg = CTVLPConfig.phantom_cpu()
    assert len(cfg.statistics_edges) == 16 and cfg.statistics_edges[0] == pytest.approx(-0.95)
    assert CTVLPConfig.from_dict(cfg.to_dict(), strict=True) == cfg
    d = cfg.to_dict()
    d.pop("statistics_edges")
    d.pop("texture_statistics")  # an old checkpoint has neither
    old = CTVLPConfig.from_dict(d, strict=True)
    assert old.statistics_edges == () and old.texture_statistics is False


def test_a_token_embedding_is_the_embedding_of_a_one_cell_anatomy():
    cfg = CTVLPConfig.tiny(image_size=(16, 32, 32), patch_size=(8, 16, 16), stem="conv", feature_stride=8,
                           statistics_edges=(-0.5, 0.0, 0.5), anatomies=("lung", "heart"),
                           token_weighting="fraction")
    torch.manual_seed(1)
    model = CTVLP(cfg).eval()
    image = torch.rand(1, 1, 16, 32, 32) * 2 - 1
    masks = torch.zeros(1, 2, 16, 32, 32, dtype=torch.bool)
    masks[0, 0, 8:16, 8:16, 16:24] = True  # exactly dense cell (1, 1, 2) -> token 1*16 + 1*4 + 2 = 22
    masks[0, 1, :8] = True
    with torch.no_grad():
        embedded = model.embed_image(image, masks)
        cells = model.token_embeddings(embedded.tokens, cells=embedded.cells)
        plain = model.token_embeddings(embedded.tokens)
    torch.testing.assert_close(cells[0, 22], embedded.anatomies.embeddings[0, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[0, 22], cells[0, 22])


def test_per_anatomy_heads_read_each_anatomy_and_each_token_by_its_own_head():
    cfg = CTVLPConfig.tiny(image_size=(16, 32, 32), patch_size=(8, 16, 16), stem="conv", feature_stride=8,
                           statistics_edges=(-0.5, 0.0, 0.5), anatomies=("lung", "heart", "body"),
                           token_weighting="fraction", statistics_heads="anatomy")
    with pytest.raises(ValueError, match="statistics_heads"):
        CTVLPConfig.tiny(statistics_heads="organ")
    d = cfg.to_dict()
    d.pop("statistics_heads")  # an old checkpoint: one shared head
    assert CTVLPConfig.from_dict(d, strict=True).statistics_heads == "shared"
    torch.manual_seed(2)
    model = CTVLP(cfg).eval()
    assert model.statistics.per_anatomy and model.statistics.anatomy_direct.weight.shape[0] == 3
    image = torch.rand(1, 1, 16, 32, 32) * 2 - 1
    masks = torch.zeros(1, 3, 16, 32, 32, dtype=torch.bool)
    masks[0, 0, 8:16, 8:16, 16:24] = True  # lung: exactly dense cell 22
    masks[0, 1, :8, :8, :8] = True  # heart: exactly dense cell 0
    masks[0, 2] = True  # body: everything
    with torch.no_grad():
        embedded = model.embed_image(image, masks)
        token_masks = model.masks_to_tokens(masks)
        where = model.token_anatomy(token_masks)
        cells = model.token_embeddings(embedded.tokens, cells=embedded.cells, token_masks=token_masks)
        as_body = model.token_embeddings(embedded.tokens, cells=embedded.cells)
    assert where[0, 22] == 0 and where[0, 0] == 1 and where[0, 5] == 2  # the smallest anatomy holding it
    outside = torch.zeros(1, 3, 4)
    outside[0, 0, 1] = 0.2
    assert model.token_anatomy(outside).tolist() == [[2, 0, 2, 2]]  # mostly-in, else the last (body)
    emb = embedded.anatomies.embeddings[0]
    torch.testing.assert_close(cells[0, 22], emb[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cells[0, 0], emb[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(as_body[0, 22], cells[0, 22])  # read by the body's head instead
    torch.testing.assert_close(as_body[0, 5], cells[0, 5])
    # the heads differ: the same statistics through the lung and the heart head
    stats = torch.randn(2, model.statistics.anatomy_direct.weight.shape[1])
    present = torch.ones(2, dtype=torch.bool)
    lung, heart = (model.statistics.heads(stats, present, anatomy=j)[1] for j in (0, 1))
    assert not torch.allclose(lung, heart)
    with pytest.raises(ValueError, match="one row per anatomy"):
        model.statistics.heads(stats, present)
