"""benchmarks/image_encoder_probe.py on a tiny phantom cache: both probe modes run and report AUCs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from phantom_cache import load_benchmark, tiny_preprocess_config, train_valid_cache


def _load_probe():
    return load_benchmark("image_encoder_probe")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_valid_cache(tmp_path_factory.mktemp("probe"), n_valid=8)


def _table(out: str) -> dict[str, float]:
    rows = dict(re.findall(r"^\| ([A-Z][^|]+?) \| [a-z]+ \| ([\d.na]+) \|$", out, flags=re.M))
    mean = re.search(r"^\| \*\*mean\*\* \| \| \*\*([\d.]+)\*\* \|$", out, flags=re.M)
    assert mean is not None, out
    return {**{k: float(v) for k, v in rows.items()}, "mean": float(mean.group(1))}


def test_auc_ignores_unknown_labels_and_single_class_columns() -> None:
    from sklearn.metrics import roc_auc_score

    probe = _load_probe()
    labels = np.array([[1, 0], [0, 0], [-1, 0], [1, 0], [0, -1]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.0, 0.5], [0.4, 0.2], [0.6, 0.9]])
    aucs = probe._aucs(labels, scores)
    assert aucs[0] == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.9, 0.2, 0.4, 0.6]))
    assert math.isnan(aucs[1])


def test_finetune_and_linear_probes_report_every_abnormality(cache: Path, tmp_path: Path, capsys) -> None:
    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    probe = _load_probe()
    common = ["--cache", str(cache), "--threads", "1"]
    assert probe.main([*common, "--preset", "tiny", "--steps", "3", "--eval-every", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "finetune probe of fresh CTVLPConfig.tiny()" in out and "step 3/3" in out
    table = _table(out)
    assert len(table) == 19 and 0.0 <= table["mean"] <= 1.0

    ckpt = save_checkpoint(CTVLP(CTVLPConfig.tiny()).eval(), tmp_path / "tiny",
                           preprocessing=tiny_preprocess_config().to_dict())
    assert probe.main([*common, "--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "linear probe of checkpoint" in out and "8 train / 8 valid volumes" in out
    assert len(_table(out)) == 19
