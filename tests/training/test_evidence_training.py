"""training.evidence: the evidence head trained on a real tiny cache, the rest of the checkpoint untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES

torch = pytest.importorskip("torch")


def _stats_checkpoint(out: Path) -> Path:
    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    from phantom_cache import tiny_preprocess_config

    torch.manual_seed(0)
    cfg = CTVLPConfig.tiny(stem="conv", feature_stride=8, statistics_edges=(-0.9, -0.5, 0.0, 0.05, 0.5),
                           texture_statistics=True)
    path = save_checkpoint(CTVLP(cfg).eval(), out, preprocessing=tiny_preprocess_config().to_dict(),
                           training={"steps": 0}, model_card="# tiny\n")
    doc = json.loads((path / "config.json").read_text())
    doc["operating_points"] = {"thresholds": {"Emphysema": 0.4}, "rule": "test", "chosen_on": {"split": "x"}}
    (path / "config.json").write_text(json.dumps(doc))
    return path


def test_train_evidence_cli_adds_a_trained_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from napari_ctvlp.engine.checkpoint import load_checkpoint

    from phantom_cache import tiny_cache, write_phantoms
    from training.evidence import main
    from training.localisation import evaluate_localisation

    cache = tiny_cache(tmp_path, n=6, seed=5)
    source = _stats_checkpoint(tmp_path / "src")
    out = tmp_path / "with_evidence"
    assert main(["--checkpoint", str(source), "--cache", str(cache), "--out", str(out), "--steps", "6",
                 "--batch-size", "3", "--dtype", "float32"]) == 0
    loaded = load_checkpoint(out)
    assert loaded.config.tag_evidence and loaded.model.evidence is not None
    from napari_ctvlp.engine.networks.config import EVIDENCE_COMPARTMENTS

    head = loaded.model.evidence
    assert loaded.config.evidence_compartments == EVIDENCE_COMPARTMENTS  # HU bins read by compartment
    assert head.num_bins == head.input_bins + loaded.model.statistics.bins * len(EVIDENCE_COMPARTMENTS)
    assert loaded.meta["training"]["evidence"]["compartments"] == list(EVIDENCE_COMPARTMENTS)
    assert float(loaded.model.evidence.weight.detach().abs().sum()) > 0  # trained away from its zero start
    assert loaded.meta["operating_points"]["thresholds"] == {"Emphysema": 0.4}
    assert loaded.meta["training"]["evidence"]["steps"] == 6 and loaded.meta["training"]["steps"] == 0
    before = load_checkpoint(source).model.state_dict()
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing else moved
    from training.evaluate import evaluate

    rec = evaluate(out, cache, split="train", out=tmp_path / "ev").metrics["evidence_recognition"]
    assert set(rec["per_abnormality"]) == set(ABNORMALITY_NAMES)  # the head's own recognition, beside zero-shot
    assert "Evidence head recognition" in (tmp_path / "ev" / "metrics.md").read_text()
    root = write_phantoms(tmp_path / "ph", n=1, seed=3, split="valid", size=(40, 48, 48))
    res = evaluate_localisation(out, root, split="valid")
    assert 0.0 <= res.pointing["evidence"] <= 1.0 and 0.0 <= res.voxel_auroc["evidence"] <= 1.0
    # a checkpoint without voxel statistics: one line, exit code 2, nothing written
    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    plain = save_checkpoint(CTVLP(CTVLPConfig.tiny()).eval(), tmp_path / "plain",
                            preprocessing=json.loads((source / "config.json").read_text())["preprocessing"])
    capsys.readouterr()
    assert main(["--checkpoint", str(plain), "--cache", str(cache), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "voxel statistics" in err[0] and not (tmp_path / "x").exists()
    # an anatomy the model does not have: one line, exit code 2, nothing written
    assert main(["--checkpoint", str(source), "--cache", str(cache), "--out", str(tmp_path / "y"),
                 "--compartments", "heart,liver"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evidence_compartments" in err[0] and not (tmp_path / "y").exists()
