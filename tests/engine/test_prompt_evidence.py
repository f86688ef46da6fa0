"""Prompt evidence head (engine/networks/prompt_evidence.py): prompt scores and maps from cells."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig  # noqa: E402
from napari_ctvlp.engine.networks.prompt_evidence import PromptEvidence  # noqa: E402

GRID = (8, 12, 12)
STATS = dict(stem="conv", feature_stride=8, statistics_edges=(-0.9, -0.5, 0.0, 0.05, 0.5), texture_statistics=True)


def _scan(lesion: bool, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int] | None]:
    """Bins ``[1, 1, V]`` (background bins 0-2; a 2-voxel cube of bin 3 when ``lesion``), a
    one-anatomy mask without the border, and the cube's corner."""
    bins = rng.integers(0, 3, size=GRID)
    corner = None
    if lesion:
        corner = (int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        z, y, x = corner
        bins[z:z + 2, y:y + 2, x:x + 2] = 3
    mask = np.zeros(GRID, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    return torch.from_numpy(bins.reshape(1, 1, -1)), torch.from_numpy(mask[None, None]), corner


def test_sentence_contrast_trains_scores_and_a_map_that_points_at_the_lesion() -> None:
    from training.prompt_evidence import prompt_evidence_loss
    from training.sentence_loss import sentence_batch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = PromptEvidence(num_bins=4, text_dim=16, groups=[0], image_size=GRID)
    text = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)  # "a nodule." / "no nodule."
    scans = [_scan(i % 2 == 0, rng) for i in range(12)]
    bins = torch.cat([s[0] for s in scans])
    masks = torch.cat([s[1] for s in scans])
    sentences = [[["There is a nodule."] if s[2] is not None else ["No nodule."]] for s in scans]
    present = masks.flatten(2).any(-1)
    batch = sentence_batch(sentences, present)
    order = [["There is a nodule.", "No nodule."].index(s) for s in batch.sentences]
    counts, voxels = head.cell_counts(bins, masks)
    with torch.no_grad():
        assert float(head(counts[:, 0], voxels[:, 0], text, 0).abs().max()) == 0  # zero start: every scan alike
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(60):
        loss = prompt_evidence_loss(head, counts, voxels, batch, present, text[order])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # held-out scans: the positive sentence ranks lesion scans first, and so do the pair's margin
    # (the zero-shot probability) and a nearby wording (the same feature plus noise)
    test = [_scan(i % 2 == 0, rng) for i in range(8)]
    c, n = head.cell_counts(torch.cat([s[0] for s in test]), torch.cat([s[1] for s in test]))
    paraphrase = torch.nn.functional.normalize(text[0] + 0.05 * torch.randn(16), dim=-1)
    with torch.no_grad():
        s = head(c[:, 0], n[:, 0], torch.stack([text[0], text[1], paraphrase]), 0)
        maps = head.cell_scores(c[:, 0], n[:, 0], text[:1], 0)[..., 0]
    pos = torch.tensor([t[2] is not None for t in test])
    assert float(s[pos, 0].min()) > float(s[~pos, 0].max())
    margin = s[:, 0] - s[:, 1]
    assert float(margin[pos].min()) > float(margin[~pos].max())
    assert float(s[pos, 2].min()) > float(s[~pos, 2].max())
    for i, (b, _, corner) in enumerate(test):
        if corner is None:
            continue
        cell = np.unravel_index(int(maps[i].argmax()), head.grid)
        lesion_cells = (b.view(GRID) == 3).view(4, 2, 6, 2, 6, 2).any(5).any(3).any(1)
        assert bool(lesion_cells[cell])


def test_reused_buffers_count_the_same_and_groups_are_checked() -> None:
    rng = np.random.default_rng(1)
    head = PromptEvidence(num_bins=4, text_dim=8, groups=[0], image_size=GRID)
    b, m, _ = _scan(True, rng)
    fresh = head.cell_counts(b, m)
    buf = (torch.full((1, 1, head.num_cells * head.num_bins), 7.0), torch.full((1, 1, head.num_cells), 7.0))
    reused = head.cell_counts(b, m, out=buf)
    assert torch.equal(fresh[0], reused[0]) and torch.equal(fresh[1], reused[1])
    with pytest.raises(ValueError, match="not scored"):
        head.group_of(3)
    with pytest.raises(ValueError, match="distinct"):
        PromptEvidence(num_bins=4, text_dim=8, groups=[0, 0], image_size=GRID)


def test_config_prompt_evidence_needs_statistics_and_old_configs_load() -> None:
    with pytest.raises(ValueError, match="statistics_edges"):
        CTVLPConfig.tiny(prompt_evidence=True)
    with pytest.raises(ValueError, match="true or false"):
        CTVLPConfig.tiny(**STATS, prompt_evidence="yes")
    legacy = CTVLPConfig.tiny().to_dict()
    legacy.pop("prompt_evidence")
    assert CTVLPConfig.from_dict(legacy, strict=True).prompt_evidence is False
    assert CTVLPConfig.tiny(**STATS, prompt_evidence=True, evidence_compartments=("heart",)).prompt_evidence


def test_prompts_are_scored_and_mapped_by_the_head_on_a_tiny_model() -> None:
    from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES
    from napari_ctvlp.engine.attention import prompt_heatmap
    from napari_ctvlp.engine.preprocess import PreprocessConfig, preprocess
    from napari_ctvlp.engine.prompt_evidence import prompt_scores
    from napari_ctvlp.engine.prompt_scoring import score_prompt
    from napari_ctvlp.engine.zero_shot import encode_volume, score_abnormalities

    from test_zero_shot import synthetic_ct

    torch.manual_seed(0)
    model = CTVLP(CTVLPConfig.tiny(**STATS, prompt_evidence=True, evidence_compartments=("heart", "lung"))).eval()
    head = model.prompt_evidence
    assert head.num_bins == head.input_bins + 2 * model.statistics.bins
    with torch.no_grad():
        head.weight.normal_()
        head.sharp_weight.normal_()
    vol, org = synthetic_ct()
    config = PreprocessConfig(image_size=model.config.image_size, spacing_mm=(4.0, 4.0, 4.0))
    features = encode_volume(model, preprocess(vol, config=config, organs=org))
    assert features.prompt_cells is not None and "prompt_cells" in features.timings
    lung = features.anatomies.index("lung")
    scores = score_abnormalities(model, features)
    k = ABNORMALITY_NAMES.index("Lung nodule")
    pos, neg = scores.templates[0]
    sp, sn = prompt_scores(model, features.prompt_cells, [pos.format(x="lung nodule", X="Lung nodule"),
                                                          neg.format(x="lung nodule", X="Lung nodule")], [lung, lung])
    assert scores.per_template[k, lung, 0] == pytest.approx(1 / (1 + np.exp(-(sp - sn))))
    plain = score_abnormalities(model, dataclasses.replace(features, prompt_cells=None))
    assert not np.allclose(plain.probability[:, lung], scores.probability[:, lung])  # another scorer
    free = score_prompt(model, features, "There is a nodule in the {organ}.")
    assert np.isfinite(free.probability[lung]) and 0 < free.probability[lung] < 1
    heat = prompt_heatmap(model, features, "There is a nodule.", grid="model", anatomy="lung")
    inside = features.voxel["masks"][lung].numpy()
    assert heat.max() == pytest.approx(1.0) and np.all(heat[~inside] == 0)
    other = prompt_heatmap(model, features, "Emphysema is present.", grid="model", anatomy="lung")
    assert not np.allclose(heat, other)  # each sentence has its own map
    on_ct = prompt_heatmap(model, features, "There is a nodule.")  # the prompt's most probable anatomy
    assert on_ct.shape == vol.shape and 0.0 <= on_ct.min() and on_ct.max() <= 1.0
    tokens = prompt_heatmap(model, features, "There is a nodule.", grid="tokens")  # token maps stay available
    assert tokens.shape == tuple(model.config.token_grid)
    vol2, org2 = synthetic_ct(esophagus=False)
    no_eso = encode_volume(model, preprocess(vol2, config=config, organs=org2))
    with pytest.raises(ValueError, match="not in this scan"):
        prompt_heatmap(model, no_eso, "Hiatal hernia.", anatomy="esophagus")
    assert np.isnan(score_prompt(model, no_eso, "Hiatal hernia.").probability[features.anatomies.index("esophagus")])


def test_free_text_prompts_are_mapped_in_the_anatomy_their_words_name() -> None:
    """With the shipped model's real MiniLM features: the prompt map is drawn in the anatomy the
    wording names (not in whichever head scores highest); unrelated text names none."""
    from napari_ctvlp.engine.attention import prompt_heatmap
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path, load_checkpoint
    from napari_ctvlp.engine.preprocess import PreprocessConfig, preprocess
    from napari_ctvlp.engine.prompt_evidence import prompt_anatomy
    from napari_ctvlp.engine.zero_shot import encode_volume

    from test_zero_shot import synthetic_ct

    path = default_checkpoint_path()
    if path is None:
        pytest.skip("no shipped demo checkpoint in this install")
    model = load_checkpoint(path).model
    assert model.prompt_evidence is not None
    everything = list(model.config.anatomies)
    cases = {"small left pleural effusion": "lung", "an enlarged heart": "heart", "aortic aneurysm": "aorta",
             "enlarged mediastinal lymph nodes": "mediastinum", "There is a port catheter.": "body",
             "dilated esophagus": "esophagus", "tracheal stenosis": "trachea"}
    for text, anatomy in cases.items():
        assert prompt_anatomy(model, text, everything) == anatomy, text
    assert prompt_anatomy(model, "the weather is nice today", everything) is None
    assert prompt_anatomy(model, "an enlarged heart", ["lung", "aorta"], min_cosine=-1.0) != "heart"
    vol, org = synthetic_ct()
    config = PreprocessConfig(image_size=model.config.image_size, spacing_mm=(5.0, 4.0, 4.0))
    features = encode_volume(model, preprocess(vol, config=config, organs=org))
    routed = prompt_heatmap(model, features, "Pericardial effusion.", grid="model")
    heart = prompt_heatmap(model, features, "Pericardial effusion.", grid="model", anatomy="heart")
    np.testing.assert_array_equal(routed, heart)
    assert routed.max() == pytest.approx(1.0)
    # a prompt about an anatomy the scan's organ mask lacks: an empty map, never another organ's
    no_heart = dataclasses.replace(features, present=np.where(
        np.asarray(features.anatomies) == "heart", False, features.present))
    empty = prompt_heatmap(model, no_heart, "An enlarged heart.")
    assert empty.shape == vol.shape and not empty.any()
