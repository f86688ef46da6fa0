"""write_labels / write_volume: bit-for-bit grid round trips, sidecars, atomicity, DICOM-SEG."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctio_helpers import write_nifti
from napari_ctvlp.engine.anatomy import organ_label_names
from napari_ctvlp.io import read_ct, read_labels, write_labels, write_volume


def _labels(shape: tuple[int, ...], top: int = 15) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, top + 1, size=shape).astype(np.uint16)


def test_nifti_labels_round_trip_bit_for_bit(tmp_path: Path, tiny_nifti: Path) -> None:
    vol = read_ct(tiny_nifti)
    labels = _labels(vol.shape)
    labels[0, 0, 0] = 0
    written = write_labels(labels, like=vol, path=tmp_path / "labels.nii.gz")
    assert [p.name for p in written] == ["labels.nii.gz", "labels.json"]
    src, out = nib.load(tiny_nifti).header, nib.load(written[0]).header
    assert out.get_data_dtype() == np.uint8
    for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c",
                "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim"):
        assert np.array_equal(out[key], src[key]), key
    assert np.array_equal(nib.load(written[0]).affine, vol.affine)
    back = read_labels(written[0], like=vol)
    assert back.shape == vol.shape and np.array_equal(back, labels)
    doc = json.loads(written[1].read_text())
    names = organ_label_names()
    assert doc["labels"] == {str(v): names[v] for v in np.unique(labels) if v}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_uint16_and_custom_names(tmp_path: Path, tiny_nifti: Path) -> None:
    vol = read_ct(tiny_nifti)
    labels = np.zeros(vol.shape, np.int32)
    labels[0] = 300
    labels[1, 0] = 7
    written = write_labels(labels, like=vol, path=tmp_path / "big.nii", names={300: "lesion"})
    assert nib.load(written[0]).get_data_dtype() == np.uint16
    assert json.loads(written[1].read_text())["labels"] == {"7": "label_7", "300": "lesion"}
    assert np.array_equal(read_labels(written[0], like=vol), labels)


def test_overwrite_guard(tmp_path: Path, tiny_nifti: Path) -> None:
    vol = read_ct(tiny_nifti)
    labels = _labels(vol.shape)
    target = tmp_path / "l.nii.gz"
    write_labels(labels, like=vol, path=target)
    with pytest.raises(FileExistsError, match=r"l\.nii\.gz already exists; pass overwrite=True"):
        write_labels(labels * 0, like=vol, path=target)
    assert np.array_equal(read_labels(target), labels)  # untouched
    (tmp_path / "only.json").write_text("{}")  # an existing sidecar also blocks the write
    with pytest.raises(FileExistsError, match="only.json"):
        write_labels(labels, like=vol, path=tmp_path / "only.nii.gz")
    assert not (tmp_path / "only.nii.gz").exists()
    write_labels(labels * 0, like=vol, path=target, overwrite=True)
    assert read_labels(target).max() == 0


def test_failed_write_leaves_nothing(tmp_path: Path, tiny_nifti: Path) -> None:
    vol = read_ct(tiny_nifti)
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    with pytest.raises(ValueError, match="does not match volume shape"):
        write_labels(np.zeros((2, 2, 2), np.uint8), like=vol, path=tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="0..65535"):
        write_labels(np.full(vol.shape, -1, np.int16), like=vol, path=tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="integers"):
        write_labels(np.zeros(vol.shape, np.float32), like=vol, path=tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="suffix"):
        write_labels(np.zeros(vol.shape, np.uint8), like=vol, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="DICOM-SEG needs a volume read from a DICOM series"):
        write_labels(np.ones(vol.shape, np.uint8), like=vol, path=tmp_path / "x.dcm")
    assert list(tmp_path.iterdir()) == []


def test_write_volume_float_heatmap(tmp_path: Path, tiny_nifti: Path) -> None:
    vol = read_ct(tiny_nifti)
    heat = np.random.default_rng(1).random(vol.shape)
    path = write_volume(heat, like=vol, path=tmp_path / "heat.nii.gz")
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32
    assert np.array_equal(img.affine, vol.affine)
    assert np.array_equal(read_ct(path).array, heat.astype(np.float32))
    with pytest.raises(FileExistsError):
        write_volume(heat, like=vol, path=path)
    with pytest.raises(ValueError, match=".nii"):
        write_volume(heat, like=vol, path=tmp_path / "heat.npy")


def test_dicom_derived_grid_round_trip(tmp_path: Path, tiny_series: Path) -> None:
    vol = read_ct(tiny_series)
    labels = _labels(vol.shape, top=3).astype(np.uint8)
    written = write_labels(labels, like=vol, path=tmp_path / "seg.nii.gz")
    img = nib.load(written[0])
    assert np.array_equal(img.affine, vol.affine)  # these spacings are exact in float32
    assert nib.aff2axcodes(img.affine) == vol.orientation
    assert np.array_equal(read_labels(written[0], like=vol), labels)


def test_dicom_seg_round_trip(tmp_path: Path, tiny_series: Path) -> None:
    import highdicom as hd

    vol = read_ct(tiny_series)
    labels = np.zeros(vol.shape, np.uint8)
    labels[0, :3, :2] = 10  # heart
    labels[2, 2:, 1:] = 3
    labels[3, 5, 4] = 3
    (path,) = write_labels(labels, like=vol, path=tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung_upper_lobe_left", "heart"]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "napari-ctvlp"
    assert seg.SeriesInstanceUID != vol.meta["SeriesInstanceUID"]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=vol.meta["SOPInstanceUIDs"], combine_segments=True, skip_overlap_checks=True
    )
    expected = np.select([labels == 3, labels == 10], [1, 2], 0)
    assert np.array_equal(back, expected)
    with pytest.raises(FileExistsError):
        write_labels(labels, like=vol, path=path)


def test_written_files_get_the_usual_permissions(tmp_path) -> None:
    """Atomic writes go through mkstemp (mode 0600); the result must follow the umask like open()."""
    import os
    import stat

    import numpy as np

    from napari_ctvlp.engine.volume import CTVolume
    from napari_ctvlp.io import write_labels

    vol = CTVolume(np.zeros((3, 4, 5), np.int16), (1.0, 1.0, 1.0), np.eye(4))
    out = write_labels(np.ones((3, 4, 5), np.uint8), like=vol, path=tmp_path / "m.nii.gz")[0]
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    assert stat.S_IMODE(os.stat(out).st_mode) == stat.S_IMODE(os.stat(reference).st_mode)
