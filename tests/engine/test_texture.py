"""Texture filters of the voxel statistics (engine/networks/texture.py): what the HU histogram cannot see."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig  # noqa: E402
from napari_ctvlp.engine.networks.texture import DOG_EDGES, STD_EDGES, TextureFilters  # noqa: E402


def _lung(shape=(32, 48, 48)) -> np.ndarray:
    return np.full(shape, -0.85, dtype=np.float32)  # -850 HU


def test_a_nodule_and_a_vessel_of_equal_volume_and_hu_differ_only_in_texture() -> None:
    """Same voxels of 40 HU in the same lung: a compact blob (nodule) and a thin straight tube
    (vessel). Their HU histograms are equal; the coarse band-pass histogram is not."""
    z, y, x = np.ogrid[:32, :48, :48]
    nodule, vessel = _lung(), _lung()
    ball = (z - 16) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 <= 9  # radius 3 voxels
    nodule[ball] = 0.04
    n = int(ball.sum())
    tube = np.zeros_like(ball)
    rows = [(yy, xx) for yy in (23, 24) for xx in (23, 24)]  # a 2 x 2-voxel line along z
    for k in range(n):
        yy, xx = rows[k % 4]
        tube[k // 4, yy, xx] = True
    vessel[tube] = 0.04
    assert int(tube.sum()) == n and np.array_equal(np.sort(nodule.ravel()), np.sort(vessel.ravel()))
    tf = TextureFilters()
    assert tf.bins == 2 * (len(DOG_EDGES) + 1) + len(STD_EDGES) + 1
    bins = tf.bin_index(torch.from_numpy(np.stack([nodule, vessel]))[:, None])
    assert bins.shape == (2, 3, nodule.size) and int(bins.min()) >= 0 and int(bins.max()) < tf.bins
    coarse = [np.bincount(bins[i, 1].numpy(), minlength=tf.bins) for i in range(2)]
    high = tf.offsets[1] + int(np.searchsorted(DOG_EDGES, 0.2))  # band-pass response above +200 HU
    assert coarse[0][high:tf.offsets[2]].sum() > 3 * max(1, coarse[1][high:tf.offsets[2]].sum())


def test_flat_regions_fall_in_the_flat_bins() -> None:
    tf = TextureFilters()
    bins = tf.bin_index(torch.from_numpy(_lung())[None, None])[0]
    flat = tf.offsets[0] + int(np.searchsorted(DOG_EDGES, 0.0))  # the -50..50 HU band
    assert torch.all(bins[0] == flat) and torch.all(bins[1] == tf.offsets[1] + (flat - tf.offsets[0]))
    assert torch.all(bins[2] == tf.offsets[2])  # local spread below the first edge


def test_texture_statistics_extend_the_statistics_and_need_them() -> None:
    with pytest.raises(ValueError, match="needs statistics_edges"):
        CTVLPConfig.tiny(texture_statistics=True)
    with pytest.raises(ValueError, match="true or false"):
        CTVLPConfig.tiny(stem="conv", statistics_edges=(0.0,), texture_statistics=1)
    assert CTVLPConfig.phantom_cpu().texture_statistics is True  # the shipped recipe
    assert CTVLPConfig.phantom_cpu(texture_statistics=False).texture_statistics is False
    torch.manual_seed(0)
    kw = dict(stem="conv", feature_stride=8, statistics_edges=(-0.5, 0.0, 0.5), anatomies=("lung", "heart"))
    plain, tex = CTVLP(CTVLPConfig.tiny(**kw)).eval(), CTVLP(CTVLPConfig.tiny(**kw, texture_statistics=True)).eval()
    image = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    masks = torch.zeros(2, 2, 32, 32, 32, dtype=torch.bool)
    masks[:, 0, 4:20], masks[:, 1, 20:28] = True, True
    with torch.no_grad():
        out = tex.embed_image(image, masks)
        stats, _ = tex.statistics.anatomy_inputs(image, out.stage4, masks)
        plain_stats, _ = plain.statistics.anatomy_inputs(image, plain.embed_image(image, masks).stage4, masks)
    t = tex.statistics.texture_bins
    assert out.cells.shape[-1] == plain.statistics.cell_proj[0].normalized_shape[0] + t
    assert stats.shape[-1] == plain_stats.shape[-1] + t
    k = tex.statistics.bins + 1
    shares = stats[..., k:k + t].exp() - 1e-4  # log shares back to shares: each filter sums to 1
    for off, end in zip(tex.statistics.texture.offsets, [*tex.statistics.texture.offsets[1:], t]):
        np.testing.assert_allclose(shares[..., off:end].sum(-1).numpy(), 1.0, atol=1e-3)


def test_attribution_reads_the_texture_bins_too() -> None:
    """With texture statistics, a voxel's attribution adds its texture bins' share: the map of a
    texture model is not the HU-bin map alone, and stays inside the anatomy."""
    from napari_ctvlp.engine.attribution import _contributions, _direction, attribution_heatmap

    from test_attribution import _encode

    torch.manual_seed(0)
    model = CTVLP(CTVLPConfig.tiny(stem="conv", feature_stride=8, statistics_edges=(-0.9, -0.5, 0.0, 0.05, 0.5),
                                   texture_statistics=True)).eval()
    _, features = _encode(model)
    j = features.anatomies.index("lung")
    inside = features.voxel["masks"][j].numpy()
    heat = attribution_heatmap(model, features, "a nodule in the lung", anatomy="lung", grid="model")
    assert np.all(heat[~inside] == 0.0) and heat.max() == pytest.approx(1.0)
    hist = _contributions(model, features, _direction(model, "a nodule in the lung"), j)["histogram"]
    image = torch.from_numpy(features.prepared.image.astype(np.float32))
    hu_bins = torch.bucketize(image, model.statistics.edges).numpy()
    # voxels of one HU bin no longer share one value: their texture bins differ
    values = hist[inside & (hu_bins == np.bincount(hu_bins[inside]).argmax())]
    assert np.unique(np.round(values, 9)).size > 1
