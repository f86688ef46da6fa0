"""Finding evidence head (engine/networks/evidence.py) and its maps (engine/evidence_maps.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES  # noqa: E402
from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig  # noqa: E402
from napari_ctvlp.engine.networks.evidence import TagEvidence  # noqa: E402

GRID = (8, 12, 12)


def _scan(lesion: bool, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bins ``[1, 1, V]`` (background bins 0-2 at random; a 2-voxel cube of bin 3 at a random
    place when ``lesion``) and a one-anatomy mask covering the grid but its border."""
    bins = rng.integers(0, 3, size=GRID)
    if lesion:
        z, y, x = rng.integers(1, 5), rng.integers(1, 9), rng.integers(1, 9)
        bins[z:z + 2, y:y + 2, x:x + 2] = 3
    mask = np.zeros(GRID, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    return torch.from_numpy(bins.reshape(1, 1, -1)), torch.from_numpy(mask[None, None])


def _fit(head: TagEvidence, scans: list, *, steps: int = 60) -> None:
    """Full-batch Adam on the recognition loss of ``[((bins, masks), label), ...]``."""
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(steps):
        loss = 0.0
        for (bins, masks), y in scans:
            out = head(*head.cell_counts(bins, masks))
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(out.logits[0], torch.tensor([y]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_recognition_trains_a_map_that_points_at_the_lesion() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = TagEvidence(num_bins=4, tag_anatomy=[0], image_size=GRID, smooth=1)
    scans = [(_scan(i % 2 == 0, rng), float(i % 2 == 0)) for i in range(16)]
    _fit(head, scans)
    w = head.weight.detach()
    assert float(w[0, 3]) > float(w[0, :3].max())  # the lesion bin carries the tag
    probs, hits = [], []
    for i in range(6):
        bins, mask = _scan(i % 2 == 0, rng)
        out = head(*head.cell_counts(bins, mask))
        probs.append(float(torch.sigmoid(out.logits[0, 0])))
        if i % 2 == 0:
            cell = np.unravel_index(int(out.maps[0, 0].argmax()), head.grid)
            lesion_cells = (bins.view(GRID) == 3).view(4, 2, 6, 2, 6, 2).any(5).any(3).any(1)
            hits.append(bool(lesion_cells[cell]))
    assert all(hits)
    assert min(probs[0::2]) > max(probs[1::2])


def _two_compartment_scan(lesion: bool, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bins ``[1, 1, V]`` with a decoy cube of bin 3 in the left half (anatomy 0, a "heart"), and
    when ``lesion`` a cube of the same bin in the right half; anatomy 1 covers both halves."""
    bins = rng.integers(0, 3, size=GRID)
    z, y = rng.integers(1, 5), rng.integers(1, 9)
    bins[z:z + 2, y:y + 2, 2:4] = 3
    if lesion:
        z, y = rng.integers(1, 5), rng.integers(1, 9)
        bins[z:z + 2, y:y + 2, 8:10] = 3
    masks = np.zeros((1, 2, *GRID), bool)
    masks[0, 1, 1:-1, 1:-1, 1:-1] = True
    masks[0, 0, 1:-1, 1:-1, 1:6] = True
    return torch.from_numpy(bins.reshape(1, 1, -1)), torch.from_numpy(masks)


def test_compartments_tell_a_lesion_from_the_same_density_in_another_organ() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = TagEvidence(num_bins=4, tag_anatomy=[1], image_size=GRID, compartments=[0], compartment_bins=4)
    assert head.num_bins == 8 and head.input_bins == 4
    bins, masks = _two_compartment_scan(True, rng)
    split = head.split_bins(bins, masks).view(GRID)
    assert int(split[masks[0, 0]].min()) >= 0 and int(split[masks[0, 0]].max()) <= 3  # compartment 0 keeps 0-3
    assert int(split[masks[0, 1] & ~masks[0, 0]].min()) >= 4  # the rest of the anatomy is the second copy
    scans = [(_two_compartment_scan(i % 2 == 0, rng), float(i % 2 == 0)) for i in range(16)]
    _fit(head, scans)
    w = head.weight.detach()[0]
    assert float(w[4 + 3]) > float(w[3]) + 1.0  # the dense bin counts outside the "heart", not in it
    for i in range(6):
        bins, masks = _two_compartment_scan(True, rng)
        out = head(*head.cell_counts(bins, masks))
        cell = np.unravel_index(int(out.maps[0, 0].argmax()), head.grid)
        assert cell[2] >= 4  # the right half, where the lesion is, never the decoy
    with pytest.raises(ValueError, match="compartment_bins"):
        TagEvidence(num_bins=4, tag_anatomy=[1], image_size=GRID, compartments=[0])


def test_maps_are_zero_outside_the_anatomy_and_logits_fall_back_to_the_bias() -> None:
    head = TagEvidence(num_bins=4, tag_anatomy=[0, 1], image_size=GRID, smooth=3)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.copy_(torch.tensor([0.5, -1.5]))
    bins, mask = _scan(True, np.random.default_rng(1))
    masks = torch.cat([mask, torch.zeros_like(mask)], 1)  # anatomy 1 absent
    out = head(*head.cell_counts(bins, masks))
    assert out.maps.shape == (1, 2, 4, 6, 6) and out.inside[0, 1].sum() == 0
    assert torch.all(out.maps[~out.inside] == 0)
    assert float(out.logits[0, 1]) == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="divide"):
        TagEvidence(num_bins=4, tag_anatomy=[0], image_size=(7, 12, 12))
    with pytest.raises(ValueError, match="odd"):
        TagEvidence(num_bins=4, tag_anatomy=[0], image_size=GRID, smooth=2)


def test_config_needs_statistics_for_evidence() -> None:
    with pytest.raises(ValueError, match="statistics_edges"):
        CTVLPConfig.tiny(tag_evidence=True)
    legacy = CTVLPConfig.tiny().to_dict()
    legacy.pop("tag_evidence")
    legacy.pop("evidence_smooth")
    legacy.pop("evidence_compartments")
    loaded = CTVLPConfig.from_dict(legacy, strict=True)
    assert loaded.tag_evidence is False and loaded.evidence_compartments == ()  # older checkpoints load
    stats = dict(stem="conv", feature_stride=8, statistics_edges=(-0.9, -0.5, 0.0, 0.05, 0.5))
    with pytest.raises(ValueError, match="needs tag_evidence"):
        CTVLPConfig.tiny(**stats, evidence_compartments=("heart",))
    for bad in (("heart", "heart"), ("liver",)):
        with pytest.raises(ValueError, match="distinct anatomies"):
            CTVLPConfig.tiny(**stats, tag_evidence=True, evidence_compartments=bad)


def test_session_evidence_maps_on_a_tiny_model() -> None:
    from napari_ctvlp.engine.evidence_maps import compute_evidence, evidence_heatmap, supports_evidence
    from napari_ctvlp.engine.preprocess import PreprocessConfig, preprocess
    from napari_ctvlp.engine.zero_shot import encode_volume

    from test_zero_shot import synthetic_ct

    torch.manual_seed(0)
    cfg = CTVLPConfig.tiny(stem="conv", feature_stride=8, statistics_edges=(-0.9, -0.5, 0.0, 0.05, 0.5),
                           texture_statistics=True, tag_evidence=True, evidence_compartments=("heart", "lung"))
    model = CTVLP(cfg).eval()
    assert model.evidence.num_bins == model.evidence.input_bins + 2 * model.statistics.bins
    with torch.no_grad():
        model.evidence.weight.normal_()
    vol, org = synthetic_ct()
    features = encode_volume(model, preprocess(vol, config=PreprocessConfig(image_size=cfg.image_size,
                                                                            spacing_mm=(4.0, 4.0, 4.0)), organs=org))
    assert supports_evidence(model, features)
    ev = compute_evidence(model, features)
    assert ev.maps.shape == (18, *cfg.image_size) and ev.probabilities.shape == (18,)
    k = ABNORMALITY_NAMES.index("Lung nodule")
    heat = evidence_heatmap(ev, features, "Lung nodule", grid="model")
    assert heat.max() == pytest.approx(1.0) and np.all(heat[~ev.inside[k]] == 0)
    other = evidence_heatmap(ev, features, "Emphysema", grid="model")
    assert not np.allclose(heat, other)  # findings have their own maps
    on_ct = evidence_heatmap(ev, features, "Lung nodule")
    assert on_ct.shape == vol.shape and 0.0 <= on_ct.min() and on_ct.max() <= 1.0
    with pytest.raises(ValueError, match="unknown finding"):
        evidence_heatmap(ev, features, "a nodule")
    plain = CTVLP(CTVLPConfig.tiny(stem="conv", feature_stride=8, statistics_edges=(-0.5, 0.0))).eval()
    with pytest.raises(ValueError, match="evidence head"):
        compute_evidence(plain, encode_volume(plain, features.prepared))
