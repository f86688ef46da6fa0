"""Real CT files: orientation/geometry checked by overlaying TotalSegmentator reference labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctio_helpers import realdata_path
from napari_ctvlp._reader import napari_get_reader
from napari_ctvlp.io import CTReadError, read_ct, read_labels, write_labels

pytestmark = pytest.mark.realdata

LIVER, SPLEEN, COLON, AORTA = 5, 1, 20, 52
LUNG = (10, 11, 12, 13, 14)
VERTEBRAE = tuple(range(26, 51))


def _world_centroid(vol, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)  # (k, j, i)
    return (vol.display_affine @ [*idx, 1.0])[:3]


def test_nifti_ct_with_reference_labels() -> None:
    vol = read_ct(realdata_path("example_ct.nii.gz"))
    img = nib.load(realdata_path("example_ct.nii.gz"))
    assert vol.shape == (112, 101, 122) and vol.array.dtype == np.int16  # int32 file, int16 range
    assert np.array_equal(vol.affine, img.affine)
    assert vol.spacing == (3.0, 3.0, 3.0) and vol.orientation == ("R", "A", "S")
    labels = read_labels(realdata_path("example_seg_fast_force_split.nii.gz"), like=vol)
    liver = float(vol.array[labels == LIVER].mean())
    lung = float(vol.array[np.isin(labels, LUNG)].mean())
    assert 40 <= liver <= 150, liver
    assert lung < -500, lung
    # RAS+: x grows towards the patient's right, where the liver is (spleen on the left)
    assert _world_centroid(vol, labels == LIVER)[0] > _world_centroid(vol, labels == SPLEEN)[0] + 50


def test_dicom_series_geometry_and_reference_labels() -> None:
    folder = realdata_path("example_ct_dicom")
    vol = read_ct(folder)
    assert vol.shape == (20, 512, 512) and vol.array.dtype == np.int16
    assert vol.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert vol.meta["format"] == "dicom" and vol.meta["Modality"] == "CT" and len(vol.meta["files"]) == 20
    assert vol.meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    seg_path = realdata_path("example_seg_dicom.nii.gz")
    # TotalSegmentator's NIfTI of this series stores the row axis flipped (L,A,S vs our L,P,S):
    # same grid after flipping j, which read_labels(reorient=True) does from the affines.
    with pytest.raises(ValueError, match="reorient=True"):
        read_labels(seg_path, like=vol)
    labels = read_labels(seg_path, like=vol, reorient=True)
    raw = np.asanyarray(nib.load(seg_path).dataobj).transpose(2, 1, 0)
    assert np.array_equal(labels, raw[:, ::-1, :])
    liver = float(vol.array[labels == LIVER].mean())
    assert 40 <= liver <= 150, liver
    # these 20 slices are below the lungs: check air and bone instead
    assert not np.isin(labels, LUNG).any()
    assert float(vol.array[labels == COLON].mean()) < -300
    assert float(vol.array[np.isin(labels, VERTEBRAE)].mean()) > 150
    assert _world_centroid(vol, labels == LIVER)[0] > _world_centroid(vol, labels == SPLEEN)[0] + 50
    # the unflipped overlay would be wrong: the test can fail
    assert not 40 <= float(vol.array[raw == LIVER].mean()) <= 150


def test_dicom_matches_simpleitk_series_reader() -> None:
    import SimpleITK as sitk

    folder = realdata_path("example_ct_dicom")
    vol = read_ct(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    ref = sitk.GetArrayFromImage(image)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ref_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    # ITK may stack the slices in the other direction; compare the world geometry
    if not np.allclose(ref_affine, vol.affine, atol=1e-4):
        ref = ref[::-1]
        ref_affine = ref_affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, ref.shape[0] - 1], [0, 0, 0, 1]])
    assert np.allclose(ref_affine, vol.affine, atol=1e-4)
    assert np.array_equal(ref, vol.array)


def test_single_file_and_two_series_from_real_copies(tmp_path: Path) -> None:
    import pydicom

    folder = realdata_path("example_ct_dicom")
    files = sorted(folder.iterdir())
    vol = read_ct(files[3])
    assert vol.shape == (20, 512, 512)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        uid = "1.2.826.0.1.3680043.8.498.1" if n % 2 else "1.2.826.0.1.3680043.8.498.2"
        ds.SeriesInstanceUID = uid
        ds.save_as(mixed / f.name)
    with pytest.raises(CTReadError) as info:
        read_ct(mixed)
    message = str(info.value)
    assert "\n" not in message and str(mixed) in message
    assert "2 DICOM series" in message and "'CT Body 3.0' (10 files)" in message
    assert "1.2.826.0.1.3680043.8.498.1" in message and "1.2.826.0.1.3680043.8.498.2" in message
    half = read_ct(mixed / files[1].name)
    assert half.shape == (10, 512, 512) and half.spacing[0] == pytest.approx(4.0)


def test_dicom_seg_of_reference_labels(tmp_path: Path) -> None:
    import highdicom as hd

    vol = read_ct(realdata_path("example_ct_dicom"))
    labels = read_labels(realdata_path("example_seg_dicom.nii.gz"), like=vol, reorient=True)
    classes = json.loads(realdata_path("class_map_total_v2.json").read_text())
    keep = np.where(np.isin(labels, (LIVER, SPLEEN, AORTA)), labels, 0)
    names = {int(k): v for k, v in classes.items()}
    (path,) = write_labels(keep, like=vol, path=tmp_path / "organs.dcm", names=names)
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["spleen", "liver", "aorta"]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=vol.meta["SOPInstanceUIDs"], combine_segments=True, skip_overlap_checks=True
    )
    assert np.array_equal(back, np.select([keep == SPLEEN, keep == LIVER, keep == AORTA], [1, 2, 3], 0))
    # highdicom's own geometry (LPS) puts each segment at the same world position as ours
    volume = seg.get_volume(combine_segments=True)
    hd_liver = np.argwhere(volume.array == 2).mean(axis=0)
    hd_world_lps = (volume.affine @ [*hd_liver, 1.0])[:3]
    ours = _world_centroid(vol, keep == LIVER)
    assert np.allclose(hd_world_lps * [-1, -1, 1], ours, atol=1e-3)


def test_reader_layer_scale_for_real_files() -> None:
    folder = realdata_path("example_ct_dicom")
    (layer,) = napari_get_reader(str(folder))(str(folder))
    # radiological display (napari_ctvlp._layers): the LPS series' slice axis runs against the S->I axis
    assert layer[1]["scale"] == pytest.approx((-2.0, 0.9765625, 0.9765625))
    assert layer[1]["name"] == "example_ct_dicom"
    nii = realdata_path("example_ct.nii.gz")
    (layer,) = napari_get_reader(str(nii))(str(nii))
    assert layer[1]["scale"] == (-3.0, -3.0, -3.0) and layer[1]["name"] == "example_ct"  # RAS: every axis flipped
