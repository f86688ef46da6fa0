"""The command line under bad input and concurrent runs (issue 14, items 6, 7, 9, 10 and the CLI fuzz).

Most checks call :func:`napari_ctvlp.cli.main` in-process (fast: the model stays cached); the
batch of crafted bad files runs ``python -m napari_ctvlp detect`` as a user would.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "io"))
from ctio_helpers import raw_nifti, write_dicom_series, write_nifti  # noqa: E402

from napari_ctvlp import cli  # noqa: E402


def _series(folder: Path) -> Path:
    """A small DICOM chest-like block: air around a soft-tissue box."""
    stored = np.full((12, 32, 32), 24, np.uint16)  # -1000 HU with the helper's intercept
    stored[:, 6:26, 6:26] = 1064  # +40 HU
    write_dicom_series(folder, stored, pixel_spacing=(8.0, 8.0), slice_step=8.0)
    return folder


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


def _detect(capsys: pytest.CaptureFixture, ckpt: Path, *argv: str) -> tuple[int, list[str]]:
    return _main(capsys, "detect", *argv, "--checkpoint", str(ckpt), "--segmentation", "threshold",
                 "--device", "cpu", "-q")


# ------------------------------------------------------------------ 6 and 9: where and when detect writes


def test_dotdot_input_writes_inside_out_and_a_second_run_refuses(tmp_path: Path, tiny_checkpoint_dir: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _series(tmp_path / "series")
    (tmp_path / "series" / "x").mkdir()
    monkeypatch.chdir(tmp_path)
    code, lines = _detect(capsys, tiny_checkpoint_dir, "series/x/..", "--out", "out/inner")
    assert code == 0, lines
    # was: the stem became ".." and the results landed in out/ itself
    assert _tree(tmp_path / "out") == {"inner", "inner/series"} | {f"inner/series/{n}" for n in (
        "results.json", "results.csv", "organs.nii.gz", "organs.json", "organ_stats.csv")}

    # 9: a run into the same folder while another holds it refuses, even with --overwrite
    lock = tmp_path / "out" / "inner" / ".series.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, lines = _detect(capsys, tiny_checkpoint_dir, "series", "--out", "out/inner", "--overwrite")
    finally:
        os.close(fd)
        lock.unlink()
    assert code == 2 and len(lines) == 1 and "being written by another napari-ctvlp run" in lines[0], lines

    # 9: after it, a second run refuses before doing the work, unless --overwrite
    stamp = (tmp_path / "out" / "inner" / "series" / "results.json").stat().st_mtime_ns
    code, lines = _detect(capsys, tiny_checkpoint_dir, "series", "--out", "out/inner")
    assert code == 2 and len(lines) == 1 and "already exists" in lines[0], lines
    assert (tmp_path / "out" / "inner" / "series" / "results.json").stat().st_mtime_ns == stamp
    code, lines = _detect(capsys, tiny_checkpoint_dir, "series", "--out", "out/inner", "--overwrite")
    assert code == 0, lines
    assert (tmp_path / "out" / "inner" / "series" / "results.json").stat().st_mtime_ns != stamp
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no lock or partial folder left


def test_input_stem_never_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_ctvlp.cli_detect import _input_stem, _result_dir

    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert _input_stem("..") == "a"
    assert _input_stem(".") == "b"
    assert _input_stem("../b/scan.nii.gz") == "scan"
    assert _input_stem("/") == "input"
    assert _input_stem(".nii.gz") == "input"
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="symbolic link"):
        _result_dir(out, "link")
    assert _result_dir(out, "scan") == out / "scan"


# ------------------------------------------------------------------ 7: segment devices, no traceback ever


@pytest.fixture(scope="module")
def nifti_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ct")
    data = np.full((24, 24, 12), -1000, np.int16)
    data[4:20, 4:20, :] = 40
    return write_nifti(d / "ct.nii.gz", data, np.diag([8.0, 8.0, 8.0, 1.0]))


@pytest.mark.parametrize("backend", ["builtin", "threshold"])
def test_segment_refuses_an_unavailable_cuda(backend: str, nifti_ct: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o.nii.gz"
    code, lines = _main(capsys, "segment", str(nifti_ct), "--out", str(out), "--backend", backend, "--device", "cuda")
    # was: builtin raised AssertionError (a traceback), threshold ran on the CPU without a word
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("napari-ctvlp segment: error:") and "CUDA is not available" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_any_exception_is_one_line_and_exit_2(nifti_ct: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import napari_ctvlp.engine.segmentation as seg

    def broken(*args: object, **kwargs: object) -> None:
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(seg, "segment", broken)
    with caplog.at_level("DEBUG", logger="napari_ctvlp.cli"):
        code, lines = _main(capsys, "-v", "segment", str(nifti_ct), "--out", str(tmp_path / "o.nii.gz"),
                            "--backend", "threshold")
    assert code == 2 and lines == ["napari-ctvlp segment: error: AssertionError: Torch not compiled with CUDA enabled"]
    assert any(r.exc_info for r in caplog.records if r.name == "napari_ctvlp.cli")  # -v: the traceback is logged


def test_segment_dicom_seg_error_names_the_chosen_file(nifti_ct: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "e.dcm"
    code, lines = _main(capsys, "segment", str(nifti_ct), "--out", str(out), "--backend", "threshold")
    assert code == 2 and len(lines) == 1, lines
    assert f"{out}:" in lines[0] and "DICOM-SEG needs a volume read from a DICOM series" in lines[0]
    assert ".e." not in lines[0]  # was: the temporary file's name
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ crafted bad files through the real CLI


def _bad_files(root: Path) -> list[Path]:
    root.mkdir()
    huge = raw_nifti(root / "huge.nii.gz", shape=(1280, 1280, 1280), dtype=np.float32, data=b"\0" * 256)
    slope = raw_nifti(root / "slope.nii.gz", shape=(8, 8, 8), slope=1e36, data=np.full(512, 30000, np.int16).tobytes())
    zero = raw_nifti(root / "zero_pixdim.nii.gz", shape=(8, 8, 8), pixdim=(0.0, 1.0, 1.0), qform_code=1)
    nan_affine = raw_nifti(root / "nan_affine.nii", shape=(8, 8, 8), sform=np.full((4, 4), np.nan))
    short = root / "short.nii.gz"
    short.write_bytes(gzip.compress(raw_nifti(root / "tmp.nii", shape=(64, 64, 64)).read_bytes()[:5000]))
    (root / "tmp.nii").unlink()
    pixels = (np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16) % 300 + 900)
    trunc = root / "truncated_dicom"
    files = write_dicom_series(trunc, pixels)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(f)
    files[1].write_bytes(files[1].read_bytes()[:-30])
    merged = root / "merged_dicom"
    a = write_dicom_series(merged, pixels)
    b = write_dicom_series(root / "other", pixels, origin=(-10.0, 20.0, -29.0))
    for f in [*a, *b]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = "", "1.2.3", "1.2.3.4"
        ds.save_as(merged / (f.name if f in a else f"b_{f.name}"))
    shutil.rmtree(root / "other")
    return [huge, slope, zero, nan_affine, short, trunc, merged]


def test_crafted_bad_files_through_the_cli(tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    bad = _bad_files(tmp_path / "bad")
    before = _tree(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="default")  # a stray warning would show as an extra line
    proc = subprocess.run(
        [sys.executable, "-m", "napari_ctvlp", "detect", *map(str, bad), "--out", str(out), "--checkpoint",
         str(tiny_checkpoint_dir), "--segmentation", "threshold", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert len(lines) == len(bad), proc.stderr  # exactly one line per bad input
    for path, line in zip(bad, lines):
        assert line.startswith("napari-ctvlp detect:") and str(path) in line, line
    assert _tree(tmp_path) == before  # nothing written anywhere, no partial result folder, no empty --out
    assert not out.exists()
