"""Reliability of read_ct (issue 14): merged DICOM series, crafted sizes, scaling overflow, quiet errors.

Every test builds real files in ``tmp_path``; each one failed before its fix.
"""

from __future__ import annotations

import logging
import shutil
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ctio_helpers import raw_nifti, realdata_path, write_dicom_series, write_nifti
from napari_ctvlp.io import CTReadError, CTVolume, read_ct, write_labels
from napari_ctvlp.io._common import MEMORY_BUDGET_ENV


def _one_line_error(path: Path, *words: str) -> str:
    with pytest.raises(CTReadError) as info:
        read_ct(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def _stamp(files: list[Path], **tags: object) -> None:
    """Set DICOM tags on written slices (``None`` deletes the tag)."""
    for f in files:
        ds = pydicom.dcmread(f)
        for key, value in tags.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(f)


# ------------------------------------------------------------------ 1. merged DICOM series


@pytest.fixture
def pixels() -> np.ndarray:
    return (np.arange(6 * 8 * 7, dtype=np.uint16).reshape(6, 8, 7) % 400 + 800)


def _two_stacks(folder: Path, pixels: np.ndarray, shift: float, **second: object) -> tuple[list[Path], list[Path]]:
    """Two 2 mm stacks in one folder, the second shifted ``shift`` mm along the normal, all series tags equal."""
    a = write_dicom_series(folder / "a", pixels, slice_step=2.0)
    b = write_dicom_series(folder / "b", pixels, slice_step=2.0, origin=(-10.0, 20.0, -30.0 + shift))
    same = dict(SeriesInstanceUID="", StudyInstanceUID="1.2.826.0.1.3680043.8.498.7",
                FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.8")
    _stamp(a, **same)
    _stamp(b, **same, **second)
    moved: tuple[list[Path], list[Path]] = ([], [])
    for files, out, prefix in ((a, moved[0], "a_"), (b, moved[1], "b_")):
        for f in files:
            target = folder / f"{prefix}{f.name}"
            shutil.move(f, target)
            out.append(target)
    (folder / "a").rmdir()
    (folder / "b").rmdir()
    return moved


def test_blank_uid_series_with_other_study_tags_are_split(tmp_path: Path, pixels: np.ndarray) -> None:
    folder = tmp_path / "two"
    write_dicom_series(folder, pixels, description="Lung 1.0")
    other = write_dicom_series(tmp_path / "b", pixels[:4], description="Soft 3.0")
    for f in other:
        shutil.move(f, folder / f"b_{f.name}")
    _stamp(sorted(folder.iterdir()), SeriesInstanceUID="")
    message = _one_line_error(folder, "2 DICOM series", "(blank SeriesInstanceUID)", "pass the folder of one series")
    assert "(6 files)" in message and "(4 files)" in message


def test_blank_uid_series_shifted_by_1mm_are_not_merged(tmp_path: Path, pixels: np.ndarray) -> None:
    """The issue's case: every tag equal, the second stack 1 mm further: was read as 12 slices at 1 mm."""
    folder = tmp_path / "merged"
    _two_stacks(folder, pixels, shift=1.0)
    _one_line_error(folder, "InstanceNumber", "2 series merged")


def test_renumbered_interleaved_acquisitions_are_refused(tmp_path: Path, pixels: np.ndarray) -> None:
    folder = tmp_path / "merged"
    a, b = _two_stacks(folder, pixels, shift=1.0)
    _stamp(a, AcquisitionNumber=1)
    for k, f in enumerate(sorted(b)):
        _stamp([f], AcquisitionNumber=2, InstanceNumber=100 + k)
    _one_line_error(folder, "AcquisitionNumber 1", "interleave")


def test_interleaved_positions_without_numbers_are_named_as_such(tmp_path: Path, pixels: np.ndarray) -> None:
    folder = tmp_path / "merged"
    _two_stacks(folder, pixels, shift=0.5)
    _stamp(sorted(folder.iterdir()), InstanceNumber=None, AcquisitionNumber=None)
    message = _one_line_error(folder, "interleave", "several series merged")
    assert "missing slices" not in message


def test_contiguous_acquisitions_of_one_series_still_read(tmp_path: Path, pixels: np.ndarray) -> None:
    """Step-and-shoot style: two acquisitions one after the other along z, numbers restarting: one volume."""
    files = write_dicom_series(tmp_path / "s", pixels, slice_step=2.0)
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for k, f in enumerate(by_z):
        _stamp([f], AcquisitionNumber=1 + k // 3, InstanceNumber=1 + k % 3)
    vol = read_ct(tmp_path / "s")
    assert vol.shape == (6, 8, 7) and vol.spacing[0] == pytest.approx(2.0)


def test_constant_instance_numbers_do_not_refuse_a_series(tmp_path: Path, pixels: np.ndarray) -> None:
    files = write_dicom_series(tmp_path / "s", pixels)
    _stamp(files, InstanceNumber=1)
    assert read_ct(tmp_path / "s").shape == (6, 8, 7)


@pytest.mark.realdata
def test_real_blank_uid_series_and_its_1mm_shifted_copy(tmp_path: Path) -> None:
    """The shipped example (blank SeriesInstanceUID) plus a copy 1 mm along the normal: was 40 slices at 1 mm."""
    src = realdata_path("example_ct_dicom")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in sorted(src.iterdir()):
        shutil.copy(f, mixed / f.name)
        ds = pydicom.dcmread(f)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        ds.ImagePositionPatient = [float(v) for v in np.asarray([float(v) for v in ds.ImagePositionPatient]) + normal]
        ds.save_as(mixed / f"shifted_{f.name}")
    _one_line_error(mixed, "InstanceNumber", "2 series merged")


# ------------------------------------------------------------------ 2. crafted sizes / memory


def test_tiny_gz_claiming_8gb_is_refused_before_allocating(tmp_path: Path) -> None:
    """608 bytes claiming 1280^3 float32: was read towards 8.6 GB before failing."""
    path = raw_nifti(tmp_path / "huge.nii.gz", shape=(1280, 1280, 1280), dtype=np.float32, data=b"\0" * 256)
    tracemalloc.start()
    try:
        _one_line_error(path, "truncated or corrupt", "claims 8388608000 bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, peak


def test_header_over_the_memory_budget_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_nifti(tmp_path / "ok.nii.gz", np.zeros((40, 40, 40), np.int16), np.eye(4))
    assert read_ct(path).shape == (40, 40, 40)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(100_000))
    _one_line_error(path, "needs about", "more than the 0.1 MB available")


def test_dicom_series_over_the_memory_budget_is_refused(tmp_path: Path, pixels: np.ndarray,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write_dicom_series(tmp_path / "s", pixels)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "100")
    _one_line_error(tmp_path / "s", "decoding its 6 slices needs about")


# ------------------------------------------------------------------ 4. non-finite after scaling


def test_scl_slope_overflow_is_refused_without_warnings(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    data = np.full((6, 5, 4), 30000, np.int16).tobytes()
    path = raw_nifti(tmp_path / "slope.nii.gz", shape=(6, 5, 4), slope=1e36, data=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _one_line_error(path, "not finite")
    assert not caught, [str(w.message) for w in caught]
    assert capfd.readouterr().err == ""


def test_dicom_rescale_slope_overflow_is_refused(tmp_path: Path, pixels: np.ndarray) -> None:
    write_dicom_series(tmp_path / "s", pixels, slope=1e36, intercept=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _one_line_error(tmp_path / "s", "not finite")
    assert not caught


# ------------------------------------------------------------------ 10. messages


def test_zero_pixdim_without_sform_is_refused(tmp_path: Path) -> None:
    """pixdim 0 used to become 1 mm without a word."""
    path = raw_nifti(tmp_path / "zero.nii.gz", shape=(6, 5, 4), pixdim=(0.0, 0.8, 2.0), qform_code=1)
    _one_line_error(path, "zero or invalid voxel size in the header", "spacing is unknown")
    path = raw_nifti(tmp_path / "nocode.nii", shape=(6, 5, 4), pixdim=(0.7, 0.8, 0.0))
    _one_line_error(path, "zero or invalid voxel size")


def test_zero_pixdim_with_a_valid_sform_reads_the_sform(tmp_path: Path) -> None:
    sform = np.diag([0.7, 0.8, 2.0, 1.0])
    path = raw_nifti(tmp_path / "s.nii.gz", shape=(6, 5, 4), pixdim=(0.0, 0.0, 0.0), sform=sform)
    assert read_ct(path).spacing == pytest.approx((2.0, 0.8, 0.7))


def test_truncated_compressed_slice_is_one_line_without_pydicom_log(tmp_path: Path, pixels: np.ndarray) -> None:
    """A truncated encapsulated slice: pydicom logged a warning (a second stderr line) before the error."""
    from pydicom.uid import RLELossless

    files = write_dicom_series(tmp_path / "s", pixels)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        ds.save_as(f)
    files[2].write_bytes(files[2].read_bytes()[:-30])
    seen: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    grab = Grab(level=logging.WARNING)
    root.addHandler(grab)
    try:
        message = _one_line_error(tmp_path / "s", "cannot decode", "End of file")
    finally:
        root.removeHandler(grab)
    assert files[2].name in message
    assert not [r for r in seen if r.name.startswith("pydicom")], [r.getMessage() for r in seen]
    assert logging.getLogger("pydicom").propagate  # restored after the read


def test_dicom_seg_error_names_the_target_not_its_temp_file(tmp_path: Path) -> None:
    vol = read_ct(write_nifti(tmp_path / "ct.nii.gz", np.zeros((5, 4, 3), np.int16), np.eye(4)))
    with pytest.raises(ValueError) as info:
        write_labels(np.ones(vol.shape, np.uint8), like=vol, path=tmp_path / "e.dcm", names={1: "x"})
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'e.dcm'}:"), message
    assert ".e." not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


# ------------------------------------------------------------------ property test over headers

_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64, np.complex64]
_odd = st.sampled_from([0.0, -1.0, 1e-6, 0.5, 1.0, 2.5, 1e30, float("nan"), float("inf")])


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prop")


def _check_contract(path: Path) -> None:
    """read_ct returns a valid finite volume or raises a one-line CTReadError; memory stays small."""
    vol: CTVolume | None = None
    message = ""
    tracemalloc.start()
    try:
        try:
            vol = read_ct(path)
        except CTReadError as exc:
            message = str(exc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"{path}: read_ct allocated {peak / 1e6:.0f} MB"
    if vol is None:
        assert "\n" not in message and str(path) in message, message
        return
    assert vol.array.ndim == 3 and vol.array.dtype in (np.int16, np.float32)
    assert np.all(np.isfinite(vol.array))
    assert np.all(np.isfinite(vol.affine)) and min(vol.spacing) > 0 and np.all(np.isfinite(vol.spacing))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    dims=st.lists(st.sampled_from([0, 1, 2, 3, 5, 40, 1280, 32767, -3]), min_size=3, max_size=4),
    dtype=st.sampled_from(_DTYPES),
    pixdim=st.tuples(_odd, _odd, _odd),
    slope=st.sampled_from([0.0, 1.0, -2.0, 1e-30, 1e36, float("nan"), float("inf")]),
    inter=st.sampled_from([0.0, -1024.0, 1e38, float("nan")]),
    sform=st.none() | st.lists(_odd, min_size=12, max_size=12),
    qform_code=st.sampled_from([0, 1]),
    data_len=st.sampled_from(["exact", "short", "none"]),
    gz=st.booleans(),
)
@example(dims=[6, 5, 4], dtype=np.int16, pixdim=(1.0, 1.0, 1.0), slope=1e36, inter=0.0, sform=None,
         qform_code=0, data_len="exact", gz=True)  # the scaling overflow: was +-inf voxels
@example(dims=[1280, 1280, 1280], dtype=np.float32, pixdim=(1.0, 1.0, 1.0), slope=1.0, inter=0.0, sform=None,
         qform_code=0, data_len="none", gz=True)  # the 608-byte file claiming 8 GB
@example(dims=[2, 1280, 32767], dtype=np.uint8, pixdim=(1.0, 1.0, 1.0), slope=1.0, inter=0.0, sform=None,
         qform_code=0, data_len="exact", gz=True)  # 2 MB of gzip data under an 84 MB header: was a 168 MB read
def test_property_nifti_header_fields(prop_dir: Path, dims: list[int], dtype: object, pixdim: tuple[float, float, float],
                                      slope: float, inter: float, sform: list[float] | None, qform_code: int,
                                      data_len: str, gz: bool) -> None:
    shape = tuple(dims)
    declared = int(np.prod([max(d, 0) for d in shape], dtype=np.int64)) * np.dtype(dtype).itemsize
    n = {"exact": declared, "short": declared // 2, "none": 0}[data_len]
    n = min(n, 2_000_000)  # crafted huge headers carry (at most) a little data
    rng = np.random.default_rng(len(shape) + n)
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    affine = None if sform is None else np.vstack([np.asarray(sform).reshape(3, 4), [0, 0, 0, 1]])
    path = prop_dir / ("case.nii.gz" if gz else "case.nii")
    with np.errstate(all="ignore"):
        raw_nifti(path, shape=shape, dtype=dtype,
                  pixdim=pixdim, slope=slope, inter=inter, sform=affine, qform_code=qform_code, data=data)
    _check_contract(path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    slope=st.sampled_from(["1", "0", "1e36", "-1e36", "1e-30", "0.5"]),
    rows=st.sampled_from([None, 1, 8, 65535]),
    columns=st.sampled_from([None, 7, 65535]),
    spacing=st.sampled_from([None, ["0", "0"], ["-1", "1"], ["0.5", "0.5"], ["1e30", "1"]]),
)
def test_property_dicom_tags(prop_dir: Path, slope: str, rows: int | None, columns: int | None,
                             spacing: list[str] | None) -> None:
    template = prop_dir / "dicom_template"
    if not template.exists():
        write_dicom_series(template, (np.arange(3 * 8 * 7, dtype=np.uint16).reshape(3, 8, 7) + 900))
    case = prop_dir / "dicom_case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(template, case)
    tags: dict[str, object] = {"RescaleSlope": slope}
    if rows is not None:
        tags["Rows"] = rows
    if columns is not None:
        tags["Columns"] = columns
    if spacing is not None:
        tags["PixelSpacing"] = spacing
    _stamp(sorted(case.iterdir()), **tags)
    _check_contract(case)
