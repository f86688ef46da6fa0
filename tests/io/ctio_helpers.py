"""Helpers for the CT input/output tests: tiny synthetic NIfTI and DICOM files, real-data paths."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

REALDATA = Path(__file__).resolve().parents[2] / "../shared/realdata"


def realdata_path(name: str) -> Path:
    """Path of a real-data file, or skip the test when the shared folder is absent."""
    path = (REALDATA / name).resolve()
    if not path.exists():
        pytest.skip(f"real data {name} not found under {REALDATA} (only present in the dev workspace)")
    return path


def write_nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data_xyz, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.to_filename(str(path))
    return path


def raw_nifti(
    path: Path,
    *,
    shape: tuple[int, ...],
    dtype: object = np.int16,
    pixdim: tuple[float, float, float] = (1.0, 1.0, 1.0),
    slope: float = 1.0,
    inter: float = 0.0,
    sform: np.ndarray | None = None,
    qform_code: int = 0,
    data: bytes | None = None,
) -> Path:
    """A NIfTI-1 file written byte by byte: the header says exactly what the test wants (no nibabel fixes).

    ``data`` defaults to zeros of the declared size; ``.nii.gz`` paths are gzipped.
    """
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr["dim"][0] = len(shape)
    hdr["dim"][1 : 1 + len(shape)] = shape
    hdr["pixdim"][1:4] = pixdim
    hdr["scl_slope"] = slope
    hdr["scl_inter"] = inter
    hdr["vox_offset"] = 352
    hdr["qform_code"] = qform_code
    if sform is not None:
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = np.asarray(sform, dtype=float)[:3]
        hdr["sform_code"] = 2
    else:
        hdr["sform_code"] = 0
    if data is None:
        data = bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    raw = hdr.binaryblock + b"\0" * 4 + data
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def write_dicom_series(
    folder: Path,
    pixels_kji: np.ndarray,
    *,
    origin: tuple[float, float, float] = (-10.0, 20.0, -30.0),
    pixel_spacing: tuple[float, float] = (0.5, 0.75),
    slice_step: float = 2.0,
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    description: str = "tiny test series",
    reverse_names: bool = True,
) -> list[Path]:
    """Write ``pixels_kji`` (uint16 stored values, slice k at origin + k * step * normal).

    File names run in the opposite order of the slice positions (``reverse_names``) so that
    a reader that sorts by name instead of by position gets the volume upside down.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    n = pixels_kji.shape[0]
    out = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.SeriesDescription = description
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.PatientName = "Test^Tiny"
        ds.PatientID = "tiny"
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * slice_step * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = slice_step
        ds.Rows, ds.Columns = pixels_kji.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(pixels_kji[k].astype("<u2")).tobytes()
        name = f"IM{(n - 1 - k) if reverse_names else k:04d}.dcm"
        path = folder / name
        ds.save_as(str(path), enforce_file_format=True)
        out.append(path)
    return out
