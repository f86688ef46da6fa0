"""Fixtures for the CT input/output tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctio_helpers import write_dicom_series, write_nifti


@pytest.fixture
def tiny_pixels() -> np.ndarray:
    """Stored DICOM values (k, j, i) = (4, 6, 5) with a distinct value per voxel."""
    return (np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5) * 7 + 1000)


@pytest.fixture
def tiny_series(tmp_path: Path, tiny_pixels: np.ndarray) -> Path:
    folder = tmp_path / "series"
    write_dicom_series(folder, tiny_pixels)
    return folder


@pytest.fixture
def tiny_nifti(tmp_path: Path) -> Path:
    """A 5x4x3 int16 NIfTI with an LPS-like, shifted affine."""
    data = (np.arange(60, dtype=np.int16).reshape(5, 4, 3) * 10 - 300)
    affine = np.array([[-0.8, 0, 0, 12.5], [0, -0.6, 0, -7.25], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    return write_nifti(tmp_path / "tiny.nii.gz", data, affine)
