"""benchmarks/statistics_contrast_probe.py on a tiny phantom cache: statistics, training, zero-shot table."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from phantom_cache import load_benchmark, train_valid_cache


def _load():
    return load_benchmark("statistics_contrast_probe")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_valid_cache(tmp_path_factory.mktemp("statprobe"), n_valid=6)


def test_statistics_are_the_anatomy_histograms(cache: Path) -> None:
    from napari_ctvlp.engine.networks.config import HISTOGRAM_EDGES
    from napari_ctvlp.engine.networks.voxel_statistics import LOG_CENTRE, LOG_SCALE
    from training.data import CachedCTDataset

    probe = _load()
    feats, sentences, labels = probe.extract(str(cache), "train", texture=False)
    assert feats.shape == (8, 7, len(HISTOGRAM_EDGES) + 2) and labels.shape == (8, 18) and len(sentences) == 8
    item = CachedCTDataset(cache, split="train", augment_text=False)[0]
    lung = item["image"][0][item["anatomy_masks"][0]].numpy()
    share = np.mean(np.digitize(lung, HISTOGRAM_EDGES) == 0)  # below -950 HU
    assert feats[0, 0, 0] == pytest.approx((np.log(share + 1e-4) - LOG_CENTRE) / LOG_SCALE, abs=1e-4)
    assert probe.extract(str(cache), "train", texture=True)[0].shape[-1] > feats.shape[-1]


@pytest.mark.parametrize("heads,text_head", [("anatomy", "mlp"), ("shared", "linear")])
def test_probe_trains_and_prints_the_zero_shot_table(cache: Path, heads: str, text_head: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    probe = _load()
    assert probe.main(["--cache", str(cache), "--valid-cache", str(cache), "--steps", "3", "--batch-size", "4",
                       "--heads", heads, "--text-head", text_head, "--sentence-weight", "1", "--no-texture",
                       "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^step 2 loss \d", out, flags=re.M), out
    rows = re.findall(r"^(Cardiomegaly|Emphysema) +([\d.na]+) +([\d.na]+)$", out, flags=re.M)
    assert len(rows) == 2, out
    mean = re.search(r"^mean zero-shot AUC ([\d.na]+) \(template std ([\d.na]+)\); LR ceiling", out, flags=re.M)
    assert mean is not None and f"heads={heads} text_head={text_head}" in out


def test_probe_ablation_flags_geometry_and_statistics_cache(cache: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--global-weight / --no-text-aug train; the geometry line is printed; --stats-cache is reused."""
    probe = _load()
    stats = tmp_path / "stats.npz"
    base = ["--cache", str(cache), "--valid-cache", str(cache), "--steps", "3", "--batch-size", "4", "--no-texture",
            "--threads", "1", "--stats-cache", str(stats)]
    assert probe.main(base + ["--global-weight", "0.1"]) == 0
    first = capsys.readouterr().out
    assert stats.is_file() and stats.with_suffix(".json").is_file()
    geometry = re.search(r"^per-template mean AUC std ([\d.na]+); mean inter-anatomy text cosine (-?[\d.]+) "
                         r"\(std [\d.]+\)  \[global_weight=0.1 text_aug=True\]$", first, flags=re.M)
    assert geometry is not None, first
    assert -1.0 <= float(geometry.group(2)) <= 1.0
    assert probe.main(base + ["--no-text-aug", "--cache", str(tmp_path / "missing")]) == 0  # statistics from the file
    second = capsys.readouterr().out
    assert "text_aug=False" in second and "global_weight=0.0" in second
    assert re.findall(r"LR ceiling \S+", first) == re.findall(r"LR ceiling \S+", second)  # same statistics
