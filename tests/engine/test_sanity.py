"""Input sanity warnings on real CT and on volumes that are not CT in HU, tiny or sheared."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctvlp.engine.sanity import check_volume
from napari_ctvlp.engine.volume import CTVolume


@pytest.fixture(scope="module")
def real_ct(realdata):
    from napari_ctvlp.io import read_ct

    return read_ct(realdata / "example_ct.nii.gz")


def test_real_ct_and_phantom_pass(real_ct) -> None:
    from napari_ctvlp.phantom import make_phantom

    report = check_volume(real_ct)
    assert report.ok, report.summary()
    assert report.value_range[0] <= -1000 and report.air_fraction > 0.01 and report.soft_tissue_fraction > 0.1
    assert check_volume(make_phantom(seed=0, size=(64, 96, 96)).volume).ok


def test_real_slabs_are_tiny(realdata) -> None:
    from napari_ctvlp.io import read_ct

    slab = check_volume(read_ct(realdata / "example_ct_sm.nii.gz"))  # 30 slices of 3 mm
    assert slab.codes == ("tiny",) and "S-I 30 voxels / 90 mm" in slab.summary()
    dicom = check_volume(read_ct(realdata / "example_ct_dicom"))  # 20 slices of 2 mm
    assert dicom.codes == ("tiny",) and "S-I 20 voxels / 40 mm" in dicom.summary()


@pytest.mark.parametrize("case", ["raw_units", "normalised", "mr_like", "labels"])
def test_values_that_are_not_hu(real_ct, case) -> None:
    hu = real_ct.array.astype(np.float32)
    array = {
        "raw_units": hu + 1024.0,  # stored values without RescaleIntercept
        "normalised": np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0),
        "mr_like": np.clip(hu + 1000.0, 0.0, 800.0) * 0.5,
        "labels": (hu > 0).astype(np.int16) * 5,
    }[case]
    report = check_volume(real_ct.with_array(array))
    assert report.codes == ("not_hu",), report.summary()
    assert "Hounsfield" in report.summary()


def test_sheared_affine(real_ct) -> None:
    affine = np.array(real_ct.affine, dtype=float)
    affine[1, 2] = 0.3 * affine[2, 2]  # slices slide along y: a gantry tilt of ~17 degrees kept as shear
    report = check_volume(CTVolume(real_ct.array, real_ct.spacing, affine, real_ct.orientation))
    assert "sheared" in report.codes and "degrees apart" in report.summary()
    rotated = np.array(real_ct.affine, dtype=float)
    c, s = np.cos(0.3), np.sin(0.3)
    rotated[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ rotated[:3, :3]  # oblique, not sheared
    assert check_volume(CTVolume(real_ct.array, real_ct.spacing, rotated, real_ct.orientation)).ok


def test_large_volume_is_subsampled() -> None:
    array = np.full((200, 200, 200), -1000, dtype=np.int16)
    array[:, 50:150, 50:150] = 40
    report = check_volume(CTVolume(array, (1.0, 1.0, 1.0), np.eye(4)), max_sampled_voxels=100_000)
    assert report.ok and 0.2 < report.soft_tissue_fraction < 0.3
