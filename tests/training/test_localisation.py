"""training.localisation: metric definitions by hand, and a real run on tiny phantoms with lesion maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.localisation import cross_map_correlation, evaluate_localisation, pointing_hit, voxel_auroc


def test_pointing_hit_by_hand() -> None:
    lesion = np.zeros((10, 10, 10), bool)
    lesion[5, 5, 5] = True
    heat = np.zeros((10, 10, 10), np.float32)
    heat[5, 5, 8] = 1.0  # 3 voxels away
    assert pointing_hit(heat, lesion, spacing=(1.0, 1.0, 1.0), tolerance_mm=5.0)
    assert not pointing_hit(heat, lesion, spacing=(1.0, 1.0, 2.0), tolerance_mm=5.0)  # 6 mm
    within = np.ones_like(lesion)
    within[5, 5, 8] = False  # the hottest voxel outside the body does not count
    heat[0, 0, 0] = 0.5
    assert not pointing_hit(heat, lesion, spacing=(1.0, 1.0, 1.0), within=within)
    with pytest.raises(ValueError):
        pointing_hit(heat, np.zeros_like(lesion), spacing=(1.0, 1.0, 1.0))


def test_voxel_auroc_and_correlation_by_hand() -> None:
    lesion = np.zeros((4, 4, 4), bool)
    lesion[0] = True
    perfect = lesion.astype(np.float32)
    assert voxel_auroc(perfect, lesion) == 1.0 and voxel_auroc(1 - perfect, lesion) == 0.0
    assert np.isnan(voxel_auroc(perfect, np.zeros_like(lesion)))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 6))
    assert cross_map_correlation(np.stack([a, a, 2 * a + 1])) == pytest.approx(1.0)
    assert cross_map_correlation(np.stack([a, -a])) == pytest.approx(-1.0)


@pytest.mark.slow
def test_evaluate_localisation_on_tiny_phantoms(tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    from phantom_cache import write_phantoms

    root = write_phantoms(tmp_path / "ph", n=2, seed=3, split="valid", size=(40, 48, 48))
    res = evaluate_localisation(tiny_checkpoint_dir, root, split="valid")
    assert res.n_scans == 2 and res.n_pairs > 0
    for kind in ("prompt", "tags"):
        assert 0.0 <= res.pointing[kind] <= 1.0
        assert 0.0 <= res.voxel_auroc[kind] <= 1.0
        assert -1.0 <= res.cross_correlation[kind] <= 1.0
    for kind in ("prompt_in_anatomy", "tags_in_anatomy"):
        assert 0.0 <= res.pointing[kind] <= 1.0 and kind not in res.cross_correlation
    assert sum(res.metrics["pairs_per_finding"].values()) == res.n_pairs
    with pytest.raises(ValueError, match="train_predicted_labels"):
        evaluate_localisation(tiny_checkpoint_dir, tmp_path / "ph", split="train")
    import shutil

    shutil.rmtree(root / "lesions")
    with pytest.raises(ValueError, match="lesions"):
        evaluate_localisation(tiny_checkpoint_dir, root, split="valid")


@pytest.mark.slow
def test_shipped_evidence_maps_point_at_lesions_of_fresh_phantoms(tmp_path: Path) -> None:
    """The demo checkpoint's evidence maps on phantoms of a seed used nowhere in training."""
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path

    from phantom_cache import write_phantoms

    shipped = default_checkpoint_path()
    if shipped is None:
        pytest.skip("no demo checkpoint installed")
    root = write_phantoms(tmp_path / "ph", n=6, seed=90210, split="valid", size=(128, 128, 128))
    res = evaluate_localisation(shipped, root, split="valid")
    assert res.n_pairs >= 8  # 10 lesion/finding pairs; the 208 pairs of 60 phantoms are in the model card
    assert res.pointing["evidence"] >= 0.4 and res.voxel_auroc["evidence"] >= 0.9
    assert res.pointing["evidence"] > res.pointing["attribution"] > res.pointing["tags"]
    assert res.cross_correlation["evidence"] < 0.5 < res.cross_correlation["tags"]
