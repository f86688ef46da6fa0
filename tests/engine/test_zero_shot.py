"""Zero-shot scoring checked by hand against a tiny real CTVLP; absent anatomies; heatmaps."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_ctvlp.engine.anatomy import ANATOMY_BY_NAME, PROMPT_TEMPLATES  # noqa: E402
from napari_ctvlp.engine.attention import (  # noqa: E402
    abnormality_heatmap,
    anatomy_heatmaps,
    interp_matrix,
    prompt_heatmap,
    token_map_to_model,
    token_map_to_source,
)
from napari_ctvlp.engine.preprocess import PreprocessConfig, preprocess, to_source_grid  # noqa: E402
from napari_ctvlp.engine.volume import CTVolume  # noqa: E402
from napari_ctvlp.engine.prompt_scoring import negate, robustness, score_prompt  # noqa: E402
from napari_ctvlp.engine.zero_shot import (  # noqa: E402
    _mask_factors,
    encode_volume,
    score_abnormalities,
    text_cache,
)


def synthetic_ct(*, esophagus: bool = True) -> tuple[CTVolume, np.ndarray]:
    """A 40x48x48 'chest' with organ labels (lungs, heart, esophagus, aorta, trachea, body)."""
    a = np.full((40, 48, 48), -1000, np.int16)
    org = np.zeros(a.shape, np.uint8)
    org[4:36, 6:42, 4:44] = 15
    org[8:30, 10:35, 6:20] = 3
    org[8:30, 10:35, 28:42] = 5
    org[12:26, 20:30, 20:28] = 10
    org[6:34, 14:18, 22:26] = 8
    org[6:34, 24:28, 22:26] = 11
    if esophagus:
        org[6:34, 30:34, 22:26] = 9
    a[org == 15] = 30
    a[(org == 3) | (org == 5)] = -850
    a[org == 8] = -950
    a[(org == 10) | (org == 11)] = 60
    vol = CTVolume(a, (2.5, 2.0, 2.0), np.diag([-2.0, -2.0, 2.5, 1.0]))
    return vol, org


@pytest.fixture(scope="module")
def model():
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    torch.manual_seed(0)
    return CTVLP(CTVLPConfig.tiny()).eval()


def _features(model, *, esophagus: bool = True):
    vol, org = synthetic_ct(esophagus=esophagus)
    cfg = PreprocessConfig(image_size=model.config.image_size, spacing_mm=(4.0, 4.0, 4.0))
    return encode_volume(model, preprocess(vol, config=cfg, organs=org))


@pytest.fixture(scope="module")
def features(model):
    return _features(model)


def _hand_probability(model, v: np.ndarray, pos: str, neg: str) -> tuple[float, float, float]:
    with torch.no_grad():
        t = model.encode_text([pos, neg]).numpy().astype(np.float64)  # straight from the model, no cache
    v = v.astype(np.float64)
    cos = t @ v / (np.linalg.norm(t, axis=1) * np.linalg.norm(v))
    scale = min(float(np.exp(model.logit_scale.item())), 100.0)
    z = cos * scale
    p = np.exp(z[0]) / (np.exp(z[0]) + np.exp(z[1]))
    return float(p), float(cos[0]), float(cos[1])


def test_abnormality_probability_matches_hand_computation(model, features) -> None:
    templates = PROMPT_TEMPLATES[:4]
    scores = score_abnormalities(model, features, templates=templates, abnormalities=("Pleural effusion", "Cardiomegaly"))
    assert scores.probability.shape == (2, len(features.anatomies))
    assert scores.per_template.shape == (2, len(features.anatomies), 4)
    for k, (ab, term) in enumerate([("Pleural effusion", "pleural effusion"), ("Cardiomegaly", "cardiomegaly")]):
        for anatomy in ("lung", "heart"):
            j = features.anatomies.index(anatomy)
            v = features.anatomy_embeddings[j].numpy()
            phrase = ANATOMY_BY_NAME[anatomy].phrase
            ps = []
            for tp, tn in templates:
                fill = {"x": term, "X": term[0].upper() + term[1:], "organ": phrase}
                ps.append(_hand_probability(model, v, tp.format(**fill), tn.format(**fill))[0])
            assert scores.probability[k, j] == pytest.approx(np.mean(ps), abs=1e-5)
            assert scores.std[k, j] == pytest.approx(np.std(ps), abs=1e-5)
            np.testing.assert_allclose(scores.per_template[k, j], ps, atol=1e-5)
    assert scores.primary == ("lung", "heart")
    assert scores.primary_probability("Cardiomegaly") == scores.probability[1, features.anatomies.index("heart")]
    rows = scores.rows()
    assert len(rows) == 2 * len(features.anatomies) and sum(r["primary"] for r in rows) == 2


def test_absent_anatomy_is_nan_and_not_assessable(model) -> None:
    feats = _features(model, esophagus=False)
    e = feats.anatomies.index("esophagus")
    assert not feats.present[e] and feats.present.sum() == len(feats.anatomies) - 1
    scores = score_abnormalities(model, feats)
    k = scores.abnormalities.index("Hiatal hernia")
    assert np.isnan(scores.primary_probability("Hiatal hernia"))
    assert not scores.assessable[k, e]
    assert np.isnan(scores.probability[:, e]).all() and np.isnan(scores.std[:, e]).all()
    others = np.delete(scores.probability, e, axis=1)
    assert np.isfinite(others).all() and ((others > 0) & (others < 1)).all()
    ps = score_prompt(model, feats, "hiatal hernia")
    assert np.isnan(ps.probability[e]) and np.isnan(ps.cosine[e]) and not ps.assessable[e]


def test_free_text_prompt_single_and_pair(model, features) -> None:
    single = score_prompt(model, features, "There is a small nodule in the {organ}.")
    assert single.auto_negative and single.negative == "There is no small nodule in the {organ}."
    j = features.anatomies.index("lung")
    p, c_pos, c_neg = _hand_probability(
        model, features.anatomy_embeddings[j].numpy(),
        "There is a small nodule in the lungs.", "There is no small nodule in the lungs.",
    )
    assert single.probability[j] == pytest.approx(p, abs=1e-5)
    assert single.cosine[j] == pytest.approx(c_pos, abs=1e-5)
    assert single.cosine_negative[j] == pytest.approx(c_neg, abs=1e-5)
    pair = score_prompt(model, features, ("Fluid.", "Dry."), anatomies=["heart"])
    assert pair.anatomies == ("heart",) and not pair.auto_negative and pair.negative == "Dry."
    h = features.anatomies.index("heart")
    assert pair.probability[0] == pytest.approx(
        _hand_probability(model, features.anatomy_embeddings[h].numpy(), "Fluid.", "Dry.")[0], abs=1e-5
    )
    with pytest.raises(ValueError, match="not pooled"):
        score_prompt(model, features, "x", anatomies=["liver"])
    with pytest.raises(ValueError, match="empty"):
        score_prompt(model, features, "   ")


def test_text_cache_only_encodes_new_text(model, features) -> None:
    cache = text_cache(model)
    score_prompt(model, features, "Pericardial thickening.")
    before = cache.encoded
    score_prompt(model, features, "Pericardial thickening.")
    assert cache.encoded == before
    score_prompt(model, features, "A brand new finding.")
    assert cache.encoded == before + 2  # positive + derived negative


@pytest.mark.parametrize(
    ("sentence", "negative"),
    [
        ("Pleural effusion.", "No pleural effusion."),
        ("a lung nodule", "No lung nodule."),
        ("There is a mass in the lungs.", "There is no mass in the lungs."),
        ("Emphysema is present.", "Emphysema is not present."),
        ("The heart shows calcification.", "The heart shows no calcification."),
        ("The lungs show a nodule.", "The lungs show no nodule."),
        ("Findings are consistent with atelectasis.", "There is no evidence of atelectasis."),
        ("No consolidation.", "Consolidation is present."),
    ],
)
def test_negate(sentence: str, negative: str) -> None:
    assert negate(sentence) == negative


def test_robustness_over_templates_and_paraphrases(model, features) -> None:
    res = robustness(model, features, "Pleural effusion", paraphrases=["Fluid in the pleural space.", ("Wet.", "Dry.")])
    assert len(res.wordings) == len(PROMPT_TEMPLATES) + 2
    assert res.wordings[0] == ("Pleural effusion.", "No pleural effusion.")
    assert res.wordings[-2] == ("Fluid in the pleural space.", "No fluid in the pleural space.")
    assert res.probabilities.shape == (len(PROMPT_TEMPLATES) + 2, len(features.anatomies))
    np.testing.assert_allclose(res.mean, res.probabilities.mean(axis=0))
    np.testing.assert_allclose(res.std, res.probabilities.std(axis=0))
    expected = (res.probabilities.max(axis=0) > 0.5) & (res.probabilities.min(axis=0) < 0.5)
    np.testing.assert_array_equal(res.flips_per_anatomy, expected)
    assert res.flips == bool(expected.any())
    # the first template row equals the abnormality scorer's first template
    scores = score_abnormalities(model, features, abnormalities=("Pleural effusion",))
    np.testing.assert_allclose(res.probabilities[: len(PROMPT_TEMPLATES)].T, scores.per_template[0], atol=1e-6)


def test_mask_factors_divide_the_patch() -> None:
    assert _mask_factors((3.0, 1.5, 1.0), (16, 16, 32), 4.0) == (1, 2, 4)
    assert _mask_factors((5.0, 5.0, 5.0), (8, 8, 8), 4.0) == (1, 1, 1)


def test_heatmaps_on_the_input_grid(model, features) -> None:
    vol, _ = synthetic_ct()
    grid = features.token_grid
    heat = prompt_heatmap(model, features, "pleural effusion")
    assert heat.shape == vol.shape and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0.5
    tokens = prompt_heatmap(model, features, "pleural effusion", grid="tokens")
    assert tokens.shape == grid
    # the separable path equals trilinear upsampling followed by to_source_grid
    model_grid = token_map_to_model(tokens, token_grid=grid, image_size=features.prepared.config.image_size)
    np.testing.assert_allclose(heat, to_source_grid(model_grid, features.prepared), atol=1e-5)
    maps = anatomy_heatmaps(model, features, anatomies=["lung", "heart"])
    assert set(maps) == {"lung", "heart"} and all(m.shape == vol.shape for m in maps.values())
    pooled = anatomy_heatmaps(model, features, anatomies=["heart"], kind="pooling", grid="tokens")["heart"]
    h = features.anatomies.index("heart")
    outside = (features.token_masks[h].numpy() <= 0).reshape(grid)  # no voxel of the heart in the token
    assert np.all(pooled[outside] == 0.0)  # pooling attention is zero outside the anatomy
    ab = abnormality_heatmap(model, features, "Cardiomegaly")
    assert ab.shape == vol.shape
    custom = abnormality_heatmap(model, features, "a tag that is not in the vocabulary", grid="tokens")
    assert custom.shape == grid
    multi = token_map_to_source(np.stack([tokens, tokens]), features.prepared, token_grid=grid)
    assert multi.shape == (2, *vol.shape)


def test_heatmaps_scoped_to_an_anatomy(model, features) -> None:
    grid = features.token_grid
    h = features.anatomies.index("heart")
    touching = (features.token_masks[h].numpy() > 0).reshape(grid)
    for heat in (prompt_heatmap(model, features, "enlarged heart", grid="tokens", anatomy="heart"),
                 abnormality_heatmap(model, features, "Cardiomegaly", grid="tokens", anatomy="heart")):
        assert np.all(heat[~touching] == 0.0)  # nothing outside the heart's tokens
        assert heat[touching].max() == pytest.approx(1.0) and heat[touching].min() == pytest.approx(0.0)
    whole = prompt_heatmap(model, features, "enlarged heart", grid="tokens")
    assert np.any(whole[~touching] > 0)  # the unscoped map covers the body
    with pytest.raises(ValueError, match="not pooled"):
        prompt_heatmap(model, features, "enlarged heart", anatomy="liver")


def test_interp_matrix_matches_torch() -> None:
    x = torch.rand(1, 1, 3, 5, 4)
    up = torch.nn.functional.interpolate(x, size=(7, 12, 9), mode="trilinear", align_corners=False)[0, 0].numpy()
    mine = np.einsum("ai,bj,ck,ijk->abc", interp_matrix(7, 3), interp_matrix(12, 5), interp_matrix(9, 4), x[0, 0].numpy())
    np.testing.assert_allclose(mine, up, atol=1e-5)


def test_encode_volume_checks_its_input(model) -> None:
    vol, org = synthetic_ct()
    cfg = PreprocessConfig(image_size=model.config.image_size, spacing_mm=(4.0, 4.0, 4.0))
    with pytest.raises(ValueError, match="organ labels"):
        encode_volume(model, preprocess(vol, config=cfg))
    wrong = PreprocessConfig(image_size=(16, 16, 16), spacing_mm=(4.0, 4.0, 4.0))
    with pytest.raises(ValueError, match="model input grid"):
        encode_volume(model, preprocess(vol, config=wrong, organs=org))
