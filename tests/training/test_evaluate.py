"""training.evaluate: metric definitions by hand, and the full report on a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES, PROMPT_TEMPLATES
from phantom_cache import tiny_argv, tiny_cache
from training import evaluate as ev
from training import pretrain


def test_binary_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    m = ev.binary_metrics(y, s)
    # AUC: 8 of the 9 (positive, negative) pairs are ordered correctly
    assert m["auc"] == pytest.approx(8 / 9)
    # ROC points: (0, 1/3) at 0.9, (0, 2/3) at 0.7, (1/3, 2/3) at 0.6, (1/3, 1) at 0.4 ...;
    # closest to (0, 1): (1/3, 1) at 0.4 (distance 1/3) and (0, 2/3) at 0.7 (1/3) -> first in order
    assert m["threshold"] in (pytest.approx(0.7), pytest.approx(0.4))
    pred = (s >= m["threshold"]).astype(int)
    tp, tn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())
    fp, fn = int(((pred == 1) & (y == 0)).sum()), int(((pred == 0) & (y == 1)).sum())
    assert m["accuracy"] == pytest.approx((tp + tn) / 6)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)
    perfect = ev.binary_metrics(y, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]))
    assert perfect["auc"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["weighted_f1"] == 1.0
    one_class = ev.binary_metrics(np.zeros(4), np.linspace(0, 1, 4))
    assert np.isnan(one_class["auc"]) and one_class["n_positive"] == 0
    unknown = ev.binary_metrics(np.array([-1, 0, 1, 1, 0]), np.array([0.9, 0.1, 0.8, np.nan, 0.2]))
    assert unknown["n"] == 3 and unknown["auc"] == 1.0  # label -1 and NaN scores are left out


def test_inter_anatomy_similarity_ignores_same_anatomy_pairs() -> None:
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    sims = ev.inter_anatomy_similarities(e, np.array([0, 0, 1]))
    np.testing.assert_allclose(sorted(sims), [0.0, 0.0])
    collapsed = ev.inter_anatomy_similarities(np.ones((3, 4)), np.array([0, 1, 2]))
    np.testing.assert_allclose(collapsed, 1.0)


def test_same_scan_similarity_pairs_only_different_anatomies_of_one_scan() -> None:
    from training.geometry import same_scan_similarities

    e = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    owner = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]])  # scan 2 has one anatomy: no pair
    np.testing.assert_allclose(sorted(same_scan_similarities(e, owner)), [0.0, 1.0])
    assert same_scan_similarities(e[:1], owner[:1]).size == 0


def test_evaluate_writes_all_reports(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path / "data", n=5, seed=21, split="valid")
    argv = tiny_argv(cache, tmp_path / "runs", "ev", "--set", "data.split=valid", "--max-steps", "1")
    assert pretrain.main(argv) == 0
    ckpt = tmp_path / "runs" / "ev" / "final"
    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", str(ckpt), "--data", str(cache), "--split", "valid", "--out", str(out)]) == 0
    for name in ("metrics.json", "metrics.md", "text_similarity_hist.png", "tsne_anatomy.png", "scores.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "tsne_anatomy.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_volumes"] == 5
    assert "evidence_recognition" not in metrics  # no evidence head, no recognition table
    assert set(metrics["ensemble"]["per_abnormality"]) == set(ABNORMALITY_NAMES)
    for m in metrics["ensemble"]["per_abnormality"].values():
        assert set(ev.METRIC_KEYS) <= set(m)
    assert set(ev.METRIC_KEYS) <= set(metrics["ensemble"]["mean"])
    assert len(metrics["per_template"]) == len(PROMPT_TEMPLATES)
    for k in ev.METRIC_KEYS:
        assert set(metrics["over_templates"][k]) == {"mean", "std"}
    geo = metrics["geometry"]
    assert -1.0 <= geo["inter_anatomy_text_cosine_mean"] <= 1.0 and geo["n_pairs"] > 0
    assert -1.0 <= geo["inter_anatomy_image_cosine_mean"] <= 1.0 and -1.0 <= geo["same_scan_image_cosine_mean"] <= 1.0
    assert "within one scan" in (out / "metrics.md").read_text()
    assert "| **mean** |" in (out / "metrics.md").read_text()
    assert len((out / "scores.csv").read_text().splitlines()) == 6
    sup = metrics["supervision"]  # what the model saw in training, from its checkpoint
    assert sup["label_file_used"] is False and sup["tag_targets"] == "report_text"
    assert "pleural effusion" in sup["finding_tags_from_report_text"]
    assert "Supervision in training: label file used: **False**" in (out / "metrics.md").read_text()
    # a dataset root instead of a cache: prepared on the fly with the checkpoint's grid
    result = ev.evaluate(ckpt, tmp_path / "data" / "phantoms", split="valid", out=tmp_path / "eval2")
    assert (tmp_path / "eval2" / "cache" / "valid" / "manifest.json").is_file()
    assert result.metrics["n_volumes"] == 5
    assert result.mean_auc == pytest.approx(metrics["ensemble"]["mean"]["auc"], nan_ok=True, abs=1e-6)
    with pytest.raises(ValueError, match="neither"):
        ev.evaluate(ckpt, tmp_path / "nope", out=tmp_path / "eval3")


def test_supervision_of_older_and_unknown_checkpoints() -> None:
    from napari_ctvlp.engine.checkpoint import load_checkpoint

    # a training record written before tag targets came from the report text (no "supervision" key)
    old = {"training": {"params": {"loss": {"mosmos": True}, "model": {"preset": "phantom_cpu"}}}}
    sup = ev.supervision_of(old)
    assert sup["label_file_used"] is True and len(sup["labels_seen"]) == 18
    assert ev.supervision_of({})["label_file_used"] is None
    # the shipped demo was trained on report-derived tags only
    shipped = load_checkpoint(Path(__file__).resolve().parents[2] / "src/napari_ctvlp/models/ctvlp_phantom_demo")
    now = ev.supervision_of(shipped.meta)
    assert now["label_file_used"] is False and now["tag_targets"] == "report_text"


def test_binary_metrics_agree_with_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 40)
        s = np.clip(y * 0.3 + rng.normal(0.4, 0.25, 40), 0, 1)
        m = ev.binary_metrics(y, s)
        pred = (s >= m["threshold"]).astype(int)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
        assert m["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))


def test_operating_points_are_chosen_on_another_split_and_stored(tmp_path: Path) -> None:
    from phantom_cache import tiny_preprocess_config, write_phantoms

    from napari_ctvlp.engine.checkpoint import load_checkpoint
    from training.prepare import prepare_cache

    cache = tiny_cache(tmp_path / "data", n=5, seed=23, split="valid")
    root = write_phantoms(tmp_path / "data" / "phantoms", n=6, seed=24, split="train")
    assert prepare_cache(root, cache, preprocess_config=tiny_preprocess_config(), split="train", workers=1).n_failed == 0
    argv = tiny_argv(cache, tmp_path / "runs", "op", "--max-steps", "1")
    assert pretrain.main(argv) == 0
    ckpt = tmp_path / "runs" / "op" / "final"
    with pytest.raises(ValueError, match="other than the one reported"):
        ev.evaluate(ckpt, cache, split="valid", operating_split="valid", out=tmp_path / "e0")
    res = ev.evaluate(ckpt, cache, split="valid", operating_split="train", write_operating_points=True,
                      out=tmp_path / "e1")
    op = res.metrics["operating_points"]
    assert op["chosen_on"]["split"] == "train" and op["chosen_on"]["n_volumes"] == 6
    at = res.metrics["at_operating_points"]["per_abnormality"]
    for name, t in op["thresholds"].items():  # the reported split is scored at the other split's points
        assert at[name]["threshold"] == pytest.approx(t, nan_ok=True) or np.isnan(t)
    stored = load_checkpoint(ckpt).meta["operating_points"]
    assert stored["chosen_on"]["split"] == "train" and set(stored["thresholds"]) == set(ABNORMALITY_NAMES)
    again = ev.evaluate(ckpt, cache, split="valid", out=tmp_path / "e2")  # stored points are used by default
    assert again.metrics["operating_points"]["chosen_on"]["split"] == "train"
    assert "At the operating points chosen on split `train`" in (tmp_path / "e2" / "metrics.md").read_text()
