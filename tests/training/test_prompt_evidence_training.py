"""training.prompt_evidence: the prompt evidence head trained on a real tiny cache's report sentences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_train_prompt_evidence_cli_adds_a_head_that_scores_prompts(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from napari_ctvlp.engine.checkpoint import load_checkpoint, save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
    from napari_ctvlp.engine.networks.config import EVIDENCE_COMPARTMENTS

    from phantom_cache import tiny_cache, write_phantoms
    from test_evidence_training import _stats_checkpoint
    from training.evaluate import evaluate
    from training.localisation import evaluate_localisation
    from training.prompt_evidence import main

    cache = tiny_cache(tmp_path, n=6, seed=5)
    source = _stats_checkpoint(tmp_path / "src")
    out = tmp_path / "with_prompt_evidence"
    # the tiny random text encoder puts every sentence above cosine 0.9, so paraphrase merging would
    # make every scan hold every sentence (no contrast left): exact membership here
    assert main(["--checkpoint", str(source), "--cache", str(cache), "--out", str(out), "--steps", "4",
                 "--batch-size", "3", "--dtype", "float32", "--paraphrase-cosine", "1"]) == 0
    loaded = load_checkpoint(out)
    head = loaded.model.prompt_evidence
    assert loaded.config.prompt_evidence and head is not None
    assert loaded.config.evidence_compartments == EVIDENCE_COMPARTMENTS
    assert head.groups == tuple(range(len(loaded.config.anatomies)))
    assert float(head.weight.detach().abs().sum()) > 0  # trained away from its zero start
    record = loaded.meta["training"]["prompt_evidence"]
    assert record["steps"] == 4 and record["sentences"] > 0 and "report text only" in record["loss"]
    assert record["paraphrase_cosine"] == 1.0 and record["paraphrase_pairs"] == 0
    merged = tmp_path / "merged"  # the default threshold merges (and records) the near-identical sentences
    assert main(["--checkpoint", str(source), "--cache", str(cache), "--out", str(merged), "--steps", "1",
                 "--batch-size", "3"]) == 0
    wide = load_checkpoint(merged).meta["training"]["prompt_evidence"]
    assert wide["paraphrase_cosine"] == 0.9 and 0 < wide["paraphrase_pairs"] <= wide["sentences"] ** 2 // 2
    # the zero-shot operating points belonged to the embedding scores: they are not carried over
    assert not loaded.meta.get("operating_points")
    before = load_checkpoint(source).model.state_dict()
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing else moved
    metrics = evaluate(out, cache, split="train", out=tmp_path / "ev").metrics
    assert metrics["scoring"].startswith("prompt evidence")
    emb = metrics["embedding_zero_shot"]  # the CA-GCL embedding scores, beside the head's
    assert np.isfinite(emb["template_auc_std"]) and "anatomy-embedding scores" in (tmp_path / "ev" / "metrics.md").read_text()
    root = write_phantoms(tmp_path / "ph", n=1, seed=3, split="valid", size=(40, 48, 48))
    res = evaluate_localisation(out, root, split="valid")
    assert 0.0 <= res.pointing["prompt"] <= 1.0 and 0.0 <= res.voxel_auroc["prompt"] <= 1.0
    # a checkpoint without voxel statistics: one line, exit code 2, nothing written
    plain = save_checkpoint(CTVLP(CTVLPConfig.tiny()).eval(), tmp_path / "plain",
                            preprocessing=json.loads((source / "config.json").read_text())["preprocessing"])
    capsys.readouterr()
    assert main(["--checkpoint", str(plain), "--cache", str(cache), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "voxel statistics" in err[0] and not (tmp_path / "x").exists()
    # compartments that differ from the finding evidence head's: one line, exit code 2, nothing written
    from training.evidence import main as evidence_main

    with_tags = tmp_path / "tags"
    assert evidence_main(["--checkpoint", str(source), "--cache", str(cache), "--out", str(with_tags), "--steps", "1",
                          "--batch-size", "2", "--compartments", "heart"]) == 0
    capsys.readouterr()
    assert main(["--checkpoint", str(with_tags), "--cache", str(cache), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must match" in err[0] and not (tmp_path / "y").exists()
