"""Bad inputs give one-line ValueErrors naming the file and the problem; fuzzed headers never crash."""

from __future__ import annotations

import gzip
import signal
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctio_helpers import write_dicom_series, write_nifti
from napari_ctvlp.io import CTReadError, CTVolume, read_ct


def _assert_one_line_error(path: Path, *words: str) -> CTReadError:
    with pytest.raises(ValueError) as info:
        read_ct(path)
    err = info.value
    assert isinstance(err, CTReadError)
    message = str(err)
    assert "\n" not in message, message
    assert str(path) in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return err


def test_missing_path(tmp_path: Path) -> None:
    _assert_one_line_error(tmp_path / "nope.nii.gz", "no such file")


@pytest.mark.parametrize("name", ["notes.txt", "image.png", "noext"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("hello")
    _assert_one_line_error(path, "unsupported file type")


def test_truncated_nii_gz(tmp_path: Path, tiny_nifti: Path) -> None:
    data = tiny_nifti.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(bad, "cannot read NIfTI")


def test_truncated_uncompressed_nii(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "g.nii", np.zeros((8, 8, 8), np.int16), np.eye(4))
    bad = tmp_path / "trunc.nii"
    bad.write_bytes(good.read_bytes()[:600])
    _assert_one_line_error(bad, "truncated")


def test_text_file_renamed_nii_gz(tmp_path: Path) -> None:
    bad = tmp_path / "report.nii.gz"
    bad.write_text("FINDINGS: no pleural effusion.\nIMPRESSION: normal.\n")
    _assert_one_line_error(bad, "cannot read NIfTI")


def test_gzipped_text_named_nii_gz(tmp_path: Path) -> None:
    bad = tmp_path / "text.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header at all\n" * 40))
    _assert_one_line_error(bad, "cannot read NIfTI")


def test_empty_folder(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    _assert_one_line_error(folder, "empty")


def test_folder_without_dicom(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    (folder / "b.dcm").write_bytes(b"\x00" * 50)
    _assert_one_line_error(folder, "no DICOM")


def test_2d_nifti(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "flat.nii.gz", np.zeros((6, 5), np.int16), np.eye(4))
    _assert_one_line_error(path, "2D image")


def test_single_slice_nifti_is_2d(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "one.nii.gz", np.zeros((6, 5, 1), np.int16), np.eye(4))
    _assert_one_line_error(path, "2D image")


def test_4d_nifti(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "time.nii.gz", np.zeros((4, 3, 2, 2), np.int16), np.eye(4))
    _assert_one_line_error(path, "4D image")


def test_single_dicom_slice_is_2d(tmp_path: Path, tiny_pixels: np.ndarray) -> None:
    write_dicom_series(tmp_path / "one", tiny_pixels[:1])
    _assert_one_line_error(tmp_path / "one", "2D image")


def test_two_series_in_one_folder(tmp_path: Path, tiny_pixels: np.ndarray) -> None:
    folder = tmp_path / "two"
    write_dicom_series(folder, tiny_pixels, series_uid="1.2.3.4.1", description="Lung 1.0")
    other = tmp_path / "b"
    write_dicom_series(other, tiny_pixels[:3], series_uid="1.2.3.4.2", description="Soft 3.0")
    for f in other.iterdir():
        shutil.move(f, folder / f"b_{f.name}")
    err = _assert_one_line_error(folder, "2 DICOM series", "1.2.3.4.1", "1.2.3.4.2", "pass the folder of one series")
    assert "'Lung 1.0' (4 files)" in str(err) and "'Soft 3.0' (3 files)" in str(err)


def test_duplicate_and_missing_slices(tmp_path: Path, tiny_pixels: np.ndarray) -> None:
    files = write_dicom_series(tmp_path / "dup", tiny_pixels)
    shutil.copy(files[0], tmp_path / "dup" / "copy.dcm")
    _assert_one_line_error(tmp_path / "dup", "same position")
    files = write_dicom_series(tmp_path / "gap", tiny_pixels)
    files[1].unlink()
    _assert_one_line_error(tmp_path / "gap", "not uniform")


def test_corrupt_dicom_pixels(tmp_path: Path, tiny_pixels: np.ndarray) -> None:
    files = write_dicom_series(tmp_path / "bad", tiny_pixels)
    data = files[2].read_bytes()
    files[2].write_bytes(data[:-20])  # pixel data shorter than Rows x Columns
    err = _assert_one_line_error(tmp_path / "bad")
    assert files[2].name in str(err)


# ----------------------------------------------------------------------------------- fuzzing


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise TimeoutError(f"read_ct took more than {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _check_read(path: Path) -> None:
    with _time_limit(20):
        try:
            vol = read_ct(path)
        except ValueError as exc:
            assert "\n" not in str(exc)
            return
    assert isinstance(vol, CTVolume)
    assert vol.array.ndim == 3 and vol.array.dtype in (np.int16, np.float32)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, region: int) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % min(region, len(buf))] = value
    if cut is not None:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf)


_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)
_cut = st.none() | st.integers(0, 10**6)
_fuzz = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@_fuzz
@given(edits=_edits, cut=_cut, compressed=st.booleans())
def test_fuzz_nifti_header(fuzz_dir: Path, edits: list[tuple[int, int]], cut: int | None, compressed: bool) -> None:
    source = fuzz_dir / "source.nii"
    if not source.exists():
        write_nifti(source, (np.arange(120, dtype=np.int16).reshape(6, 5, 4) - 60), np.diag([0.7, 0.8, 2.0, 1.0]))
    raw = _mutate(source.read_bytes(), edits, cut, region=352)  # the NIfTI-1 header is 348 bytes
    path = fuzz_dir / ("case.nii.gz" if compressed else "case.nii")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    _check_read(path)


@_fuzz
@given(edits=_edits, cut=_cut, which=st.integers(0, 2))
def test_fuzz_dicom_header(fuzz_dir: Path, edits: list[tuple[int, int]], cut: int | None, which: int) -> None:
    template = fuzz_dir / "dicom_template"
    if not template.exists():
        pixels = (np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5) + 900)
        write_dicom_series(template, pixels)
    case = fuzz_dir / "dicom_case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(template, case)
    target = sorted(case.iterdir())[which]
    target.write_bytes(_mutate(target.read_bytes(), edits, cut, region=len(target.read_bytes())))
    _check_read(case)
    _check_read(target)
