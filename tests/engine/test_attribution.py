"""Voxel attribution maps (engine/attribution.py) on a tiny real CTVLP with voxel statistics."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_ctvlp.engine.attribution import (  # noqa: E402
    _contributions, _direction, attribution_heatmap, supports_attribution,
)
from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig  # noqa: E402
from napari_ctvlp.engine.preprocess import PreprocessConfig, preprocess  # noqa: E402
from napari_ctvlp.engine.zero_shot import encode_volume  # noqa: E402

from test_zero_shot import synthetic_ct  # noqa: E402


def _encode(model):
    vol, org = synthetic_ct()
    cfg = PreprocessConfig(image_size=model.config.image_size, spacing_mm=(4.0, 4.0, 4.0))
    return vol, encode_volume(model, preprocess(vol, config=cfg, organs=org))


@pytest.fixture(scope="module")
def stats_model():
    torch.manual_seed(0)
    cfg = CTVLPConfig.tiny(stem="conv", feature_stride=8, statistics_edges=(-0.9, -0.5, 0.0, 0.05, 0.5))
    return CTVLP(cfg).eval()


def test_attribution_map_is_voxel_resolved_inside_its_anatomy(stats_model) -> None:
    vol, features = _encode(stats_model)
    assert supports_attribution(features)
    j = features.anatomies.index("lung")
    inside = features.voxel["masks"][j].numpy()
    heat = attribution_heatmap(stats_model, features, "emphysema in the lungs", anatomy="lung", grid="model")
    assert heat.shape == tuple(stats_model.config.image_size) and heat.dtype == np.float32
    assert np.all(heat[~inside] == 0.0) and heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    on_ct = attribution_heatmap(stats_model, features, "emphysema in the lungs", anatomy="lung")
    assert on_ct.shape == vol.shape and 0.0 <= on_ct.min() and on_ct.max() <= 1.0
    other = attribution_heatmap(stats_model, features, "a calcified nodule", anatomy="lung", grid="model")
    assert not np.allclose(heat, other)  # the map explains the prompt, not only the anatomy
    assert all(p.grad is None for p in stats_model.parameters())  # no side effect on the model
    from napari_ctvlp.engine.anatomy import prompt_pairs

    margin = attribution_heatmap(stats_model, features, prompt_pairs("Emphysema"), anatomy="lung", grid="model")
    assert margin.shape == heat.shape and not np.allclose(margin, heat)
    with pytest.raises(ValueError, match="pairs"):
        attribution_heatmap(stats_model, features, [("emphysema", "")], anatomy="lung")


def _cosine(model, features, image: np.ndarray, j: int, text: str) -> float:
    """The attribution path's cosine for anatomy ``j`` with the model-grid ``image`` (stem features held)."""
    from napari_ctvlp.engine.zero_shot import text_embeddings

    vs = model.statistics
    with torch.no_grad():
        stats, present = vs.anatomy_inputs(torch.from_numpy(image)[None, None], features.voxel["stage4"][None],
                                           features.voxel["masks"][j][None, None])
        hidden, direct = vs.heads(stats, present)
        emb = model.anatomy_pooling.embed(features.voxel["pooled"][j][None, None], statistics=hidden, direct=direct)
        return float((emb[0, 0] * text_embeddings(model, [text])[0]).sum())


def test_histogram_contributions_predict_the_change_of_the_score(stats_model) -> None:
    """First order: moving voxels of the anatomy from bin a to bin b changes the cosine by about
    their count times the difference of the two bins' per-voxel histogram contributions."""
    _, features = _encode(stats_model)
    j = features.anatomies.index("body")
    text = "a device in the chest wall"
    image = features.prepared.image.astype(np.float32)
    inside = features.voxel["masks"][j].numpy()
    vs = stats_model.statistics
    bins = np.searchsorted(vs.edges.numpy(), image, side="left")  # torch.bucketize(right=False)
    hist = _contributions(stats_model, features, _direction(stats_model, text), j)["histogram"]
    counts = np.bincount(bins[inside], minlength=vs.bins)
    a, b = np.argsort(counts)[-2:]  # the two most common bins inside the anatomy
    per_voxel = {}
    for k in (a, b):
        values = hist[(bins == k) & inside]
        assert np.allclose(values, values[0])  # one contribution per bin
        per_voxel[k] = float(values[0])
    moved = np.flatnonzero(((bins == a) & inside).ravel())[:max(1, int(counts[a]) // 100)]  # 1% of bin a
    changed = image.copy()
    changed.flat[moved] = float(image[(bins == b) & inside][0])
    before = _cosine(stats_model, features, image, j, text)
    after = _cosine(stats_model, features, changed, j, text)
    predicted = len(moved) * (per_voxel[b] - per_voxel[a])
    assert after != before
    assert predicted == pytest.approx(after - before, rel=0.25, abs=1e-6)


def test_attribution_refuses_what_it_cannot_explain(stats_model) -> None:
    _, features = _encode(stats_model)
    with pytest.raises(ValueError, match="not pooled"):
        attribution_heatmap(stats_model, features, "x", anatomy="liver")
    with pytest.raises(ValueError, match="empty"):
        attribution_heatmap(stats_model, features, "  ", anatomy="lung")
    torch.manual_seed(0)
    plain = CTVLP(CTVLPConfig.tiny()).eval()
    _, plain_features = _encode(plain)
    assert not supports_attribution(plain_features)
    with pytest.raises(ValueError, match="voxel statistics"):
        attribution_heatmap(plain, plain_features, "emphysema", anatomy="lung")
