"""The ``napari-ctvlp`` console script, run as a user would (subprocess, real files)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

CLI = str(Path(sys.executable).with_name("napari-ctvlp"))


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for sub in ("detect", "segment", "phantom", "bench"):
        assert sub in proc.stdout


def test_phantom_writes_ct_rate_layout(tmp_path: Path) -> None:
    proc = _run("phantom", str(tmp_path / "ph"), "--n", "2", "--seed", "5", "--size", "32", "40", "40", "-q")
    assert proc.returncode == 0, proc.stderr
    vol = tmp_path / "ph" / "train" / "train_2" / "train_2_a" / "train_2_a_1.nii.gz"
    assert nib.load(vol).shape == (40, 40, 32)
    with open(next((tmp_path / "ph" / "multi_abnormality_labels").glob("*.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert [r["VolumeName"] for r in rows] == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]
    assert "Pleural effusion" in rows[0]


@pytest.mark.parametrize("make_bad", ["missing", "text", "empty_dir"])
def test_detect_bad_input_is_one_line_and_exit_2(tmp_path: Path, make_bad: str, tiny_checkpoint_dir: Path) -> None:
    bad = tmp_path / "scan.nii.gz"
    if make_bad == "text":
        bad.write_text("hello")
    elif make_bad == "empty_dir":
        bad = tmp_path / "series"
        bad.mkdir()
    proc = _run("detect", str(bad), "--out", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint_dir))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert bad.name in lines[0]
    assert "Traceback" not in proc.stderr


def test_segment_bad_backend_exit_2(tmp_path: Path) -> None:
    proc = _run("phantom", str(tmp_path / "ph"), "--n", "1", "--size", "32", "32", "32", "-q")
    assert proc.returncode == 0
    ct = next((tmp_path / "ph").rglob("train_1_a_1.nii.gz"))
    proc = _run("segment", str(ct), "--out", str(tmp_path / "o.nii.gz"), "--backend", "nonsense")
    assert proc.returncode == 2 and "nonsense" in proc.stderr


@pytest.mark.slow
@pytest.mark.realdata
def test_detect_real_ct_with_reference_mask(realdata: Path, tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    ct = realdata / "example_ct.nii.gz"
    proc = _run("detect", str(ct), "--out", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint_dir),
                "--segmentation", str(realdata / "example_seg_fast_force_split.nii.gz"),
                "--prompt", "small left pleural effusion", "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    out = next(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    src = nib.load(ct)
    for name in ("organs.nii.gz", *(p.name for p in out.glob("heatmap_*.nii.gz"))):
        img = nib.load(out / name)
        assert img.shape == src.shape, name
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    assert list(out.glob("heatmap_*.nii.gz")), "no prompt heatmap written"
    results = json.loads((out / "results.json").read_text())
    assert results and (out / "results.csv").is_file()
    organs = np.asarray(nib.load(out / "organs.nii.gz").dataobj)
    assert np.isin(organs, [3, 4, 5, 6, 7]).sum() > 1000  # lung lobes mapped from TotalSegmentator 10-14


def test_bench_times_a_phantom_and_reports_the_targets(tiny_checkpoint_dir: Path) -> None:
    proc = _run("bench", "--size", "40", "64", "64", "--spacing", "6", "6", "6", "--checkpoint", str(tiny_checkpoint_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "shape (40, 64, 64)" in out and f"given: {tiny_checkpoint_dir}" in out
    for line in ("read ", "end-to-end detect, cold", "end-to-end detect, warm", "re-prompt (new sentence), median",
                 "prompt heatmap on the input grid", "peak RSS"):
        assert line in out, line
    cold = float(out.split("end-to-end detect, cold (load model)")[1].split()[0])
    warm = float(out.split("end-to-end detect, warm")[1].split()[0])
    assert 0 < warm and 0 < cold < 30


@pytest.mark.parametrize("args", [("--ct", "missing.nii.gz"), ("--size", "4", "64", "64")])
def test_bench_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], tiny_checkpoint_dir: Path, tmp_path: Path) -> None:
    argv = [a if a != "missing.nii.gz" else str(tmp_path / a) for a in args]
    proc = _run("bench", *argv, "--checkpoint", str(tiny_checkpoint_dir), "-q")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("napari-ctvlp bench: error:")
