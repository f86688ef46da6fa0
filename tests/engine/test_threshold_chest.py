"""The weight-free threshold fallback on real CT: contrast and plain aorta, no lung outside the chest
wall, no trachea where there is none, contrast blood is not bone, no trachea below the carina.

../shared/realdata holds abdominal CTs (lung bases, no heart); the chest rows are checked on
the synthetic phantoms only (see benchmarks/segmentation_dice.py for the figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_ctvlp.engine.anatomy import LUNG_LABELS
from napari_ctvlp.engine.segmentation import dice, from_label_file, segment
from napari_ctvlp.engine.segmentation._grid import canonical_grid
from napari_ctvlp.engine.volume import CTVolume

AORTA, TRACHEA, HEART, SPINE, BONE = 11, 8, 10, 13, 14


def _case(realdata: Path, ct: str, ref: str) -> tuple[CTVolume, np.ndarray, np.ndarray]:
    from napari_ctvlp.io import read_ct

    if not (realdata / ct).exists():
        pytest.skip(f"{realdata / ct} is absent")
    vol = read_ct(realdata / ct)
    ref_labels = from_label_file(realdata / ref, like=vol, kind="totalseg").labels
    return vol, ref_labels, segment(vol, backend="threshold").labels


@pytest.fixture(scope="module")
def dicom(realdata):
    return _case(realdata, "example_ct_dicom", "example_seg_dicom.nii.gz")


@pytest.fixture(scope="module")
def abdomen(realdata):
    return _case(realdata, "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")


def _outside_air(vol: CTVolume) -> np.ndarray:
    """Air connected to the in-plane edge of the field of view: outside the patient (the first and
    last slices do not count: lungs cut off by the scan touch them)."""
    lab, _ = ndi.label(vol.array < -500)
    edge = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    return np.isin(lab, edge[edge > 0])


@pytest.mark.realdata
def test_contrast_aorta_is_found_and_not_called_spine(dicom) -> None:
    vol, ref, seg = dicom
    aorta = ref == AORTA
    assert dice(seg == AORTA, aorta) >= 0.75
    # before: 63% of the reference aorta was labelled spine and 7% bone (it touches the vertebra)
    assert np.isin(seg[aorta], (SPINE, BONE)).mean() < 0.15
    assert dice(np.isin(seg, (SPINE, BONE)), np.isin(ref, (SPINE, BONE))) > 0.6


@pytest.mark.realdata
def test_plain_aorta_is_found_and_ends_at_the_bifurcation(abdomen) -> None:
    """example_ct's aorta is unenhanced (median 41 HU): found as a round tube in fat, not the psoas,
    and not followed into the iliac arteries (TotalSegmentator's aorta ends at the bifurcation)."""
    vol, ref, pred = abdomen
    assert np.median(vol.array[ref == AORTA]) < 80  # the premise: no contrast
    assert dice(pred == AORTA, ref == AORTA) >= 0.75
    axis = int(np.argmax(np.abs(vol.affine[2, :3])))  # the array axis along the patient's z
    ref_z = np.nonzero(np.any(ref == AORTA, axis=tuple(a for a in range(3) if a != axis)))[0]
    pred_z = np.nonzero(np.any(pred == AORTA, axis=tuple(a for a in range(3) if a != axis)))[0]
    assert pred_z.size and abs(int(pred_z.min()) - int(ref_z.min())) * vol.spacing[axis] <= 10.0
    assert abs(int(pred_z.max()) - int(ref_z.max())) * vol.spacing[axis] <= 10.0


@pytest.mark.realdata
def test_no_lung_in_the_air_between_arm_and_chest_wall(dicom) -> None:
    vol, ref, seg = dicom
    assert not np.isin(ref, LUNG_LABELS).any()  # an upper-abdomen slab: no lung in the reference
    assert not np.isin(seg, LUNG_LABELS + (TRACHEA,)).any()  # before: a 6 ml "lung_right" beside the arm


@pytest.mark.realdata
def test_no_trachea_at_the_lung_bases(abdomen) -> None:
    vol, ref, seg = abdomen
    assert (ref == TRACHEA).sum() == 0
    assert (seg == TRACHEA).sum() == 0  # before: 2.6 ml of central gas below the lungs' widest level
    lungs = np.isin(ref, LUNG_LABELS)
    assert dice(np.isin(seg, LUNG_LABELS), lungs) >= 0.9  # the lung bases themselves are kept


@pytest.mark.realdata
@pytest.mark.parametrize("case", ["dicom", "abdomen"])
def test_nothing_is_labelled_in_the_air_outside_the_patient(case, request) -> None:
    vol, _, seg = request.getfixturevalue(case)
    outside = _outside_air(vol)
    assert outside.sum() > 1000
    anatomy = (seg != 0) & (seg != 15)
    assert anatomy[outside].sum() == 0  # no organ in the air around the patient
    assert (seg[outside] == 15).mean() < 0.01  # "body" only at the skin (3 mm blocks) and in closed arm pits

def test_contrast_heart_is_heart_not_bone() -> None:
    """Phantom seed 1 has contrast-filled heart chambers (~120-260 HU): they used to be "bone"."""
    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=1)
    organs = np.asarray(ph.organs)
    heart = organs == HEART
    assert np.median(ph.volume.array[heart]) > 100  # the premise: enhanced blood
    seg = segment(ph.volume, backend="threshold").labels
    assert dice(seg == HEART, heart) >= 0.75
    assert np.isin(seg[heart], (SPINE, BONE)).mean() < 0.05
    assert dice(seg == AORTA, organs == AORTA) >= 0.4  # the descending aorta (not the ascending part)


def test_no_trachea_below_the_carina() -> None:
    """The phantom paints trachea and main bronchi with one label; ours stops at the carina and
    gives the bronchi to their lungs."""
    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=0)
    grid = canonical_grid(ph.volume)
    ref = grid.to_canonical(np.asarray(ph.organs)) == TRACHEA
    seg = grid.to_canonical(segment(ph.volume, backend="threshold").labels)
    two = [z for z in range(ref.shape[2]) if ndi.label(ref[:, :, z])[1] >= 2]
    assert two, "the phantom's airway should split"
    carina = max(two)
    ours = np.nonzero((seg == TRACHEA).any(axis=(0, 1)))[0]
    assert ours.size and ours.min() >= carina - 1  # nothing of "trachea" below the carina's level
    above = ref.copy()
    above[:, :, : carina + 1] = False
    assert dice(seg == TRACHEA, above) >= 0.6
    bronchi = ref & ~above
    assert np.isin(seg[bronchi], (0, TRACHEA)).mean() < 0.5  # mostly handed to the lungs (or body walls)


def _tube_scene(split_below: int | None = None):
    """Canonical 3 mm grid in fat: a vertebral column, an unenhanced aorta in front of it and left of
    the midline, and a larger muscle (psoas-like) farther out; optionally the aorta jumps 18 mm to
    the right below slice ``split_below`` (a bifurcation)."""
    nx, ny, nz = 60, 60, 40
    x, y = np.meshgrid(np.arange(nx) * 3.0, np.arange(ny) * 3.0, indexing="ij")
    hu = np.full((nx, ny, nz), -100.0)
    spine2d = np.hypot(x - 90.0, y - 60.0) <= 15.0  # anterior edge at y = 75 mm
    psoas2d = np.hypot(x - 40.0, y - 55.0) <= 18.0
    spine = np.repeat(spine2d[:, :, None], nz, axis=2)
    truth = np.zeros_like(spine)
    for z in range(nz):
        cx = 78.0 + (18.0 if split_below is not None and z < split_below else 0.0)
        truth[:, :, z] = np.hypot(x - cx, y - 90.0) <= 10.0
    hu[spine] = 400.0
    hu[np.repeat(psoas2d[:, :, None], nz, axis=2)] = 50.0
    hu[truth] = 40.0
    return hu, spine, truth


def test_track_tube_follows_a_plain_aorta_not_the_muscle_beside_it() -> None:
    from napari_ctvlp.engine.segmentation.tubes import AORTA_PLAIN, track_tube

    hu, spine, truth = _tube_scene()
    found = track_tube(hu, spine, ~spine, (3.0, 3.0, 3.0), AORTA_PLAIN)
    assert dice(found, truth) >= 0.8
    assert not (found & (hu == 50.0)).any()  # nothing of the muscle
    # no tube, only fat around the spine: nothing found
    hu_none = np.where(spine, hu, -100.0)
    assert not track_tube(hu_none, spine, ~spine, (3.0, 3.0, 3.0), AORTA_PLAIN).any()


def test_track_tube_stops_where_the_tube_divides() -> None:
    from napari_ctvlp.engine.segmentation.tubes import AORTA_PLAIN, track_tube

    hu, spine, truth = _tube_scene(split_below=15)
    found = track_tube(hu, spine, ~spine, (3.0, 3.0, 3.0), AORTA_PLAIN)
    zs = np.nonzero(found.any(axis=(0, 1)))[0]
    assert zs.max() == hu.shape[2] - 1 and 14 <= zs.min() <= 16  # the straight part only
    assert dice(found[:, :, 15:], truth[:, :, 15:]) >= 0.8


def test_ascending_aorta_above_the_heart_on_a_phantom() -> None:
    """Phantom seed 3 (no contrast): besides the descending aorta, a tube in front of the spine above
    the heart, which is the phantom's ascending aorta (not heart, not another vessel)."""
    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=3)
    ref = np.asarray(ph.organs)
    pred = segment(ph.volume, backend="threshold").labels
    grid = canonical_grid(ph.volume)
    ref_c, pred_c = grid.to_canonical(ref), grid.to_canonical(pred)
    spine_y = np.nonzero((pred_c == SPINE).any(axis=(0, 2)))[0].max()
    front = np.zeros(pred_c.shape, dtype=bool)
    front[:, spine_y + int(30.0 / grid.spacing[1]):, :] = True  # >= 30 mm in front of the spine
    ascending = (pred_c == AORTA) & front
    assert ascending.sum() * np.prod(grid.spacing) / 1000.0 >= 20.0
    assert (ref_c[ascending] == AORTA).mean() >= 0.9
