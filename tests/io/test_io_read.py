"""read_ct / read_labels on tiny synthetic NIfTI, DICOM and ITK files with known geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctio_helpers import write_dicom_series, write_nifti
from napari_ctvlp.io import CTVolume, contrast_limits, read_ct, read_labels, WINDOW_PRESETS


def test_nifti_keeps_exact_affine_and_display_order(tiny_nifti: Path) -> None:
    img = nib.load(tiny_nifti)
    vol = read_ct(tiny_nifti)
    assert isinstance(vol, CTVolume)
    assert np.array_equal(vol.affine, img.affine)
    xyz = np.asanyarray(img.dataobj)
    assert vol.shape == (3, 4, 5)
    assert vol.array.dtype == np.int16
    assert vol.array[2, 1, 4] == xyz[4, 1, 2]
    assert vol.spacing == pytest.approx((2.5, 0.6, 0.8))
    assert vol.orientation == ("L", "P", "S")
    assert vol.meta["format"] == "nifti" and vol.meta["path"] == str(tiny_nifti)
    assert vol.meta["sform_code"] == 2 and vol.meta["qform_code"] == 1
    # display_affine maps array indices (k, j, i) to the same world point as affine (i, j, k)
    k, j, i = 2, 3, 1
    assert np.allclose(vol.display_affine @ [k, j, i, 1], img.affine @ [i, j, k, 1])


def test_nifti_dtypes(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ints = np.full((3, 3, 3), -1024, dtype=np.int32)
    assert read_ct(write_nifti(tmp_path / "i.nii", ints, affine)).array.dtype == np.int16
    big = ints.copy()
    big[0, 0, 0] = 70000
    assert read_ct(write_nifti(tmp_path / "b.nii", big, affine)).array.dtype == np.float32
    floats = np.linspace(-1000, 1000, 27, dtype=np.float64).reshape(3, 3, 3) + 0.25
    vol = read_ct(write_nifti(tmp_path / "f.nii.gz", floats, affine))
    assert vol.array.dtype == np.float32
    assert np.allclose(vol.array, floats.transpose(2, 1, 0))


def test_nifti_4d_singleton_is_squeezed(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.int16).reshape(4, 3, 2, 1)
    vol = read_ct(write_nifti(tmp_path / "s.nii.gz", data, np.eye(4)))
    assert vol.shape == (2, 3, 4)
    assert np.array_equal(vol.array, data[..., 0].transpose(2, 1, 0))


def test_dicom_series_geometry_sorting_and_rescale(tiny_series: Path, tiny_pixels: np.ndarray) -> None:
    steps = []
    vol = read_ct(tiny_series, progress=lambda d, t, m: steps.append((d, t)))
    # files are named in reverse position order: the reader must sort by position
    assert np.array_equal(vol.array, tiny_pixels.astype(np.int32) - 1024)
    assert vol.array.dtype == np.int16
    expected = np.array([[-0.75, 0, 0, 10.0], [0, -0.5, 0, -20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
    assert np.allclose(vol.affine, expected)
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.75))
    assert vol.orientation == ("L", "P", "S")
    assert vol.meta["format"] == "dicom" and vol.meta["Modality"] == "CT"
    assert [Path(f).name for f in vol.meta["files"]] == ["IM0003.dcm", "IM0002.dcm", "IM0001.dcm", "IM0000.dcm"]
    assert vol.meta["SeriesInstanceUID"] and vol.meta["StudyInstanceUID"]
    assert steps and steps[-1][0] == steps[-1][1]


def test_dicom_oblique_coronal_and_float_rescale(tmp_path: Path, tiny_pixels: np.ndarray) -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    iop = (c, s, 0.0, 0.0, 0.0, -1.0)  # coronal, rotated about z
    write_dicom_series(tmp_path / "cor", tiny_pixels, orientation=iop, slope=0.5, intercept=-1000.0, slice_step=3.0)
    vol = read_ct(tmp_path / "cor")
    assert vol.array.dtype == np.float32
    assert np.allclose(vol.array, tiny_pixels * 0.5 - 1000.0)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * 0.75, col * 0.5, normal * 3.0, (-10.0, 20.0, -30.0)
    assert np.allclose(vol.affine, np.diag([-1, -1, 1, 1]) @ lps)
    assert vol.spacing == pytest.approx((3.0, 0.5, 0.75))


def test_single_dicom_file_reads_its_series_only(tmp_path: Path, tiny_pixels: np.ndarray) -> None:
    folder = tmp_path / "mixed"
    a = write_dicom_series(folder, tiny_pixels, description="A")
    other = tmp_path / "other"
    write_dicom_series(other, tiny_pixels[:3] + 5, description="B", origin=(0.0, 0.0, 0.0))
    for f in other.iterdir():  # second series in the same folder, other names
        f.rename(folder / f"B_{f.name}")
    vol = read_ct(a[1])
    assert vol.shape == (4, 6, 5)
    assert np.array_equal(vol.array, tiny_pixels.astype(np.int32) - 1024)
    vol_b = read_ct(folder / "B_IM0000.dcm")
    assert vol_b.shape == (3, 6, 5) and vol_b.meta["SeriesDescription"] == "B"


def test_itk_formats_match_nibabel(tmp_path: Path) -> None:
    import SimpleITK as sitk

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 100  # (z, y, x)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((5.0, -6.0, 7.0))
    c, s = np.cos(0.2), np.sin(0.2)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    for name in ("v.mha", "v.nrrd", "v.nii.gz"):
        sitk.WriteImage(image, str(tmp_path / name))
    mha, nrrd, nii = (read_ct(tmp_path / n) for n in ("v.mha", "v.nrrd", "v.nii.gz"))
    assert mha.meta["format"] == "itk" and nii.meta["format"] == "nifti"
    for vol in (mha, nrrd, nii):
        assert np.array_equal(vol.array, data)
        assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    # ITK writes NIfTI in RAS itself: both code paths must agree on the world geometry
    assert np.allclose(mha.affine, nii.affine, atol=1e-5)
    assert np.allclose(nrrd.affine, nii.affine, atol=1e-5)


def test_read_labels_grid_checks_and_reorient(tmp_path: Path, tiny_nifti: Path) -> None:
    vol = read_ct(tiny_nifti)
    img = nib.load(tiny_nifti)
    labels_xyz = (np.arange(60).reshape(5, 4, 3) % 4).astype(np.uint8)
    same = write_nifti(tmp_path / "lab.nii.gz", labels_xyz, img.affine)
    assert np.array_equal(read_labels(same, like=vol), labels_xyz.transpose(2, 1, 0))
    # the same labels stored with the j axis flipped (as dcm2niix/TotalSegmentator do)
    flip = img.affine @ np.array([[1, 0, 0, 0], [0, -1, 0, 3], [0, 0, 1, 0], [0, 0, 0, 1]])
    flipped = write_nifti(tmp_path / "flip.nii.gz", labels_xyz[:, ::-1, :], flip)
    with pytest.raises(ValueError, match="reorient=True"):
        read_labels(flipped, like=vol)
    assert np.array_equal(read_labels(flipped, like=vol, reorient=True), labels_xyz.transpose(2, 1, 0))
    other = write_nifti(tmp_path / "small.nii.gz", labels_xyz[:4], img.affine)
    with pytest.raises(ValueError, match="does not match volume shape"):
        read_labels(other, like=vol)
    floaty = write_nifti(tmp_path / "float.nii.gz", labels_xyz.astype(np.float32) + 0.5, img.affine)
    with pytest.raises(ValueError, match="non-integer"):
        read_labels(floaty)


def test_window_presets() -> None:
    assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert contrast_limits("lung") == (-1350.0, 150.0)
    assert contrast_limits("mediastinum") == (-160.0, 240.0)
    assert contrast_limits("Soft_Tissue") == contrast_limits("soft tissue")
    assert contrast_limits((0, 100)) == (-50.0, 50.0)
    with pytest.raises(ValueError, match="unknown window preset 'brainz'"):
        contrast_limits("brainz")
    with pytest.raises(ValueError, match="positive"):
        contrast_limits((0, 0))
