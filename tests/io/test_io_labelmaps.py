"""Label maps are told apart from CTs and read with their names, kind and exact geometry."""

from __future__ import annotations

import numpy as np
import pytest

from ctio_helpers import realdata_path, write_nifti
from napari_ctvlp.io import read_ct, write_labels
from napari_ctvlp.io.labelmaps import CUSTOM, ORGAN, TOTALSEG, is_label_volume, read_label_map
from napari_ctvlp._reader import napari_get_reader


def test_ct_is_not_a_label_map(tiny_nifti) -> None:
    assert not is_label_volume(read_ct(tiny_nifti))  # holds negative HU
    with pytest.raises(ValueError, match="CT values"):
        read_label_map(tiny_nifti)
    (layer,) = napari_get_reader(str(tiny_nifti))(str(tiny_nifti))
    assert layer[2] == "image"


def test_real_ct_and_totalsegmentator_output() -> None:
    ct = realdata_path("example_ct.nii.gz")
    assert not is_label_volume(read_ct(ct))
    seg = read_label_map(realdata_path("example_seg_fast_force_split.nii.gz"))
    assert seg.kind == TOTALSEG and seg.names[5] == "liver" and seg.labels.dtype == np.uint8
    np.testing.assert_array_equal(seg.volume.affine, read_ct(ct).affine)


def test_our_sidecar_names_organs_and_allows_large_values(tmp_path, tiny_nifti) -> None:
    like = read_ct(tiny_nifti)
    organs = np.zeros(like.shape, np.uint8)
    organs[0, :2, :2], organs[1, 2:, 1:] = 10, 13  # heart, spine
    write_labels(organs, like=like, path=tmp_path / "organs.nii.gz")
    back = read_label_map(tmp_path / "organs.nii.gz")
    assert back.kind == ORGAN and back.names[10] == "heart" and back.names[13] == "spine"
    assert np.array_equal(back.labels, organs)
    np.testing.assert_array_equal(back.volume.affine, like.affine)
    # values above 255 are labels only with our sidecar
    big = np.zeros(like.shape, np.uint16)
    big[0, 0, 0] = 1000
    write_labels(big, like=like, path=tmp_path / "big.nii.gz", names={1000: "lesion"})
    back = read_label_map(tmp_path / "big.nii.gz")
    assert back.kind == CUSTOM and back.names == {1000: "lesion"} and int(back.labels.max()) == 1000
    (tmp_path / "big.json").unlink()
    with pytest.raises(ValueError, match="CT values"):
        read_label_map(tmp_path / "big.nii.gz")


def test_plain_small_integer_volume_is_labels(tmp_path) -> None:
    data = np.zeros((6, 5, 4), np.uint8)
    data[1:3, 1:3, 1:3] = 51  # TotalSegmentator's heart id
    path = write_nifti(tmp_path / "seg.nii.gz", data, np.diag([1.5, 1.5, 2.0, 1.0]))
    back = read_label_map(path)
    assert back.kind == TOTALSEG and back.names[51] == "heart"
    (layer,) = napari_get_reader(str(path))(str(path))
    assert layer[2] == "labels" and layer[1]["metadata"]["ctvlp_label_kind"] == TOTALSEG


def test_dicom_seg_covering_some_slices_reads_on_its_own_grid(tmp_path, tiny_series) -> None:
    from napari_ctvlp.widgets._engine import map_signed_permutation

    ct = read_ct(tiny_series)
    labels = np.zeros(ct.shape, np.uint8)
    labels[1:3, 2:4, 1:3] = 11  # aorta on slices 1 and 2 only
    labels[2, 0, 0] = 8  # trachea
    (path,) = write_labels(labels, like=ct, path=tmp_path / "organs_seg.dcm")
    seg = read_label_map(path)
    assert seg.kind == ORGAN and seg.names == {8: "trachea", 11: "aorta"}
    assert seg.volume.meta["format"] == "dicom-seg"
    assert seg.labels.shape[0] < ct.shape[0]  # highdicom leaves out the empty slices
    # its own grid is a block of the CT grid: mapping it back gives the labels exactly
    index_map = np.linalg.inv(ct.display_affine) @ seg.volume.display_affine
    assert np.array_equal(map_signed_permutation(seg.labels, index_map, ct.shape), labels)
    (layer,) = napari_get_reader(str(path))(str(path))
    assert layer[2] == "labels" and layer[1]["metadata"]["ctvlp_label_kind"] == ORGAN
