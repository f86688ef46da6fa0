"""TotalSegmentator's success path, end to end and offline, through its real nnU-Net predictor.

The test writes tiny nnU-Net v2 results folders in TotalSegmentator's layout for the tasks our
adapter needs with ``fast=True`` (297, and the 298 crop model for ``roi_subset``), with hand-set
weights whose output is a known function of the image the network sees (see
``_fake_totalseg``): bright blocks ("markers") placed at known patient positions in the real
example CT and DICOM series must come back as the mapped organ at the same voxels, and their
face on the patient's left must carry the "left" class and the face on the patient's right the
"right" class. A flipped, permuted or shifted image anywhere between our adapter and the network
breaks those checks (TotalSegmentator's own undo of its reorientation is self-consistent, so
only the left/right classes see what the network saw).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from napari_ctvlp.engine.segmentation import OrganSegmentation, dice, segment
from napari_ctvlp.engine.segmentation.totalseg import needed_task_ids, totalseg_labels, unavailable_reason
from napari_ctvlp.engine.volume import CTVolume

from tests._network import refuse_network
from tests.engine._fake_totalseg import write_fake_total_fast

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

OURS = {"lung_upper_lobe_left": 3, "lung_upper_lobe_right": 5, "heart": 10, "aorta": 11, "spine": 13, "body": 15}
AORTA_HU, HEART_HU = 3000, 2200
HALF_MM = 12.0  # markers are 24 mm cubes


@dataclass(frozen=True)
class Marker:
    center: tuple[float, float, float]  # RAS mm
    hu: int


def _world(vol: CTVolume) -> np.ndarray:
    """RAS mm of every voxel, shape ``(*vol.shape, 3)`` (display order)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in vol.shape), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk1 @ np.asarray(vol.affine, float).T)[..., :3]


def _zone(xyz: np.ndarray, m: Marker, *, x: tuple[float, float], shrink: float) -> np.ndarray:
    """Voxels with RAS x in ``m.x + x`` and y, z inside the marker shrunk by ``shrink`` mm."""
    d = xyz - np.asarray(m.center)
    inner = HALF_MM - shrink
    return (d[..., 0] >= x[0]) & (d[..., 0] <= x[1]) & (np.abs(d[..., 1]) < inner) & (np.abs(d[..., 2]) < inner)


def _core(xyz, m: Marker, shrink: float = 4.5) -> np.ndarray:
    return _zone(xyz, m, x=(-HALF_MM + shrink, HALF_MM - shrink), shrink=shrink)


def _inside(xyz, m: Marker) -> np.ndarray:
    return np.all(np.abs(xyz - np.asarray(m.center)) < HALF_MM, axis=-1)


def _with_markers(vol: CTVolume, markers: list[Marker]) -> CTVolume:
    """The CT clipped to [-1024, 1000] HU (no natural edge reaches the fake model's edge classes)
    with each marker's voxels set to its HU."""
    hu = np.clip(vol.array, -1024, 1000).astype(np.int16)
    xyz = _world(vol)
    for m in markers:
        hu[_inside(xyz, m)] = m.hu
    return CTVolume(hu, vol.spacing, vol.affine, vol.orientation, dict(vol.meta))


def _spine_centre(vol: CTVolume) -> np.ndarray:
    """RAS mm of the centre of the bone (> 300 HU) within 30 mm of the body's left-right middle."""
    xyz = _world(vol)
    mid_x = xyz[vol.array > -300][:, 0].mean()
    bone = (vol.array > 300) & (np.abs(xyz[..., 0] - mid_x) < 30.0)
    return xyz[bone].mean(axis=0)


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory) -> Path:
    return write_fake_total_fast(tmp_path_factory.mktemp("ts_weights"))


@contextlib.contextmanager
def _offline_totalseg(mp: pytest.MonkeyPatch, weights: Path, home: Path):
    """TotalSegmentator pointed at ``weights`` (it reads the variables at call time), its home
    folder not created yet, and every socket refused; fails if anything tried the network."""
    mp.setenv("TOTALSEG_WEIGHTS_PATH", str(weights))
    mp.setenv("TOTALSEG_HOME_DIR", str(home / "not_yet_created"))
    attempts = refuse_network(mp)
    yield attempts
    assert attempts == [], f"TotalSegmentator tried the network: {attempts}"


@pytest.fixture
def totalseg_env(fake_weights, tmp_path, monkeypatch):
    with _offline_totalseg(monkeypatch, fake_weights, tmp_path) as attempts:
        yield attempts


def _read(realdata: Path, name: str) -> CTVolume:
    from napari_ctvlp.io import read_ct

    return read_ct(realdata / name)


def _check_marker(labels: np.ndarray, xyz: np.ndarray, m: Marker, organ: int) -> None:
    core = _core(xyz, m)
    assert core.sum() > 10
    assert (labels[core] == organ).mean() > 0.95, np.unique(labels[core], return_counts=True)
    step = 3.0  # zones 3 mm either side of each x face
    left = _zone(xyz, m, x=(-HALF_MM - step, -HALF_MM + step), shrink=4.5)
    right = _zone(xyz, m, x=(HALF_MM - step, HALF_MM + step), shrink=4.5)
    l_left, l_right = OURS["lung_upper_lobe_left"], OURS["lung_upper_lobe_right"]
    # the face on the patient's left (smaller RAS x) carries "left", the other "right"; never swapped
    assert (labels[left] == l_left).mean() > 0.3, np.unique(labels[left], return_counts=True)
    assert (labels[right] == l_right).mean() > 0.3, np.unique(labels[right], return_counts=True)
    assert (labels[left] == l_right).sum() == 0 and (labels[right] == l_left).sum() == 0


def _edge_voxels_are_at_marker_faces(labels, xyz, markers: list[Marker]) -> None:
    near_left = np.zeros(labels.shape, bool)
    near_right = np.zeros(labels.shape, bool)
    for m in markers:
        near_left |= _zone(xyz, m, x=(-HALF_MM - 4.5, -HALF_MM + 4.5), shrink=-4.5)
        near_right |= _zone(xyz, m, x=(HALF_MM - 4.5, HALF_MM + 4.5), shrink=-4.5)
    for organ, near in ((OURS["lung_upper_lobe_left"], near_left), (OURS["lung_upper_lobe_right"], near_right)):
        where = labels == organ
        assert where.sum() > 0
        assert near[where].mean() > 0.95


def _crop_boxes(vol: CTVolume, xyz, m: Marker) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TotalSegmentator's roi_subset crop around marker ``m`` (its box + 20 mm, ``crop_addon``):
    the expected box, a box wider by the 6 mm crop model's rounding, and one narrower by it."""
    idx = np.argwhere(_inside(xyz, m))
    margin = (20.0 / np.asarray(vol.spacing)).astype(int)
    slack = np.ceil(6.0 / np.asarray(vol.spacing)).astype(int) + 1
    lo, hi = idx.min(axis=0) - margin, idx.max(axis=0) + margin
    boxes = []
    for grow in (0, 1, -1):
        b = np.zeros(vol.shape, bool)
        b[tuple(slice(max(a - grow * s, 0), max(c + 1 + grow * s, 0)) for a, c, s in zip(lo, hi, slack))] = True
        boxes.append(b)
    return boxes[0], boxes[1], boxes[2]


@pytest.fixture(scope="module")
def nifti_run(realdata, fake_weights, tmp_path_factory):
    """The example CT with an aorta marker on the patient's right and a heart marker on the left,
    run once without roi_subset (model 297 on the whole CT) and once through ``segment`` (the
    default roi_subset: 298 first, then 297 on its crop)."""
    vol = _read(realdata, "example_ct.nii.gz")
    s = _spine_centre(vol)
    aorta = Marker((s[0], s[1] + 35.0, s[2]), AORTA_HU)  # in front of the spine
    heart = Marker((s[0] - 100.0, s[1] + 35.0, s[2]), HEART_HU)  # patient's left, > 60 mm from the aorta box
    ct = _with_markers(vol, [aorta, heart])
    with pytest.MonkeyPatch.context() as mp, _offline_totalseg(mp, fake_weights, tmp_path_factory.mktemp("home") / "missing"):
        uncropped = totalseg_labels(ct, fast=True, roi_subset=False)
        seg = segment(ct, backend="totalsegmentator", fast=True)
    return ct, aorta, heart, uncropped, seg


def test_fake_weights_satisfy_the_adapter(totalseg_env) -> None:
    assert needed_task_ids(fast=True) == (297, 298)
    assert unavailable_reason(fast=True) is None
    assert unavailable_reason(fast=False) is not None  # 291-295 are not there


def test_uncropped_labels_follow_the_ct_voxel_for_voxel(nifti_run) -> None:
    vol, aorta, heart, labels, _ = nifti_run
    assert labels.shape == vol.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, *OURS.values()}
    assert {3, 5, 10, 11, 13} <= set(np.unique(labels).tolist())
    xyz = _world(vol)
    _check_marker(labels, xyz, aorta, OURS["aorta"])
    _check_marker(labels, xyz, heart, OURS["heart"])
    _edge_voxels_are_at_marker_faces(labels, xyz, [aorta, heart])
    # the model's 150..1800 HU band is "vertebrae_L1" -> spine: the same voxels as the CT's own
    band = (vol.array >= 150) & (vol.array < 1800)
    away = ~np.any([_zone(xyz, m, x=(-HALF_MM - 6, HALF_MM + 6), shrink=-6) for m in (aorta, heart)], axis=0)
    spine = labels == OURS["spine"]
    assert dice(spine & away, band & away) > 0.97
    for axis in range(3):  # a flip of any axis would be far off
        assert dice(spine & away, np.flip(band, axis) & away) < 0.6
    # outside TotalSegmentator's classes nothing is invented: no body filling without roi_subset
    assert (labels[(vol.array < -900)] == 0).mean() > 0.999


def test_segment_with_roi_subset_crops_around_the_crop_model(nifti_run) -> None:
    vol, aorta, heart, uncropped, seg = nifti_run
    assert isinstance(seg, OrganSegmentation) and seg.backend == "totalsegmentator"
    labels = seg.labels
    assert labels.shape == vol.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, *OURS.values()}
    xyz = _world(vol)
    _check_marker(labels, xyz, aorta, OURS["aorta"])
    # the crop model (298) sees only the aorta marker: TotalSegmentator crops to its box + 20 mm,
    # so the heart marker (> 60 mm away) is outside the crop and only "body" is left there
    assert (labels[_core(xyz, heart)] == OURS["body"]).mean() > 0.95
    box, wide, inner = _crop_boxes(vol, xyz, aorta)
    model_labels = (labels != 0) & (labels != OURS["body"])
    assert model_labels[~wide].sum() == 0  # nothing of the model outside the crop
    assert model_labels[inner].mean() > 0.02
    in_crop = (uncropped[box] == OURS["spine"]).sum()
    assert in_crop > 50 and (labels[box] == OURS["spine"]).sum() >= 0.9 * in_crop  # bone inside the crop is labelled
    # inside the crop the prediction is put back exactly where the uncropped run has it
    expected = uncropped.copy()
    expected[(expected == 0) & (labels == OURS["body"])] = OURS["body"]
    assert (labels[inner] == expected[inner]).mean() > 0.995
    # statistics on the result
    marker_ml = _inside(xyz, aorta).sum() * float(np.prod(vol.spacing)) / 1000.0
    assert 0.5 * marker_ml < seg.volume_ml["aorta"] < 1.1 * marker_ml
    assert seg.mean_hu["aorta"] > 2500
    assert seg.incomplete["aorta"] is False
    assert seg.volume_ml["spine"] > 10 and 100 < seg.mean_hu["spine"] < 1000
    assert "heart" not in seg.volume_ml or seg.volume_ml["heart"] < 0.2 * marker_ml  # only the aorta's rim
    assert seg.volume_ml["body"] > 1000
    assert {"backend", "statistics", "total"} <= set(seg.timings)


def test_dicom_series_through_totalsegmentator(totalseg_env, realdata) -> None:
    """The DICOM series is stored with rows and columns mirrored against RAS and at 0.98 x 0.98 x
    2 mm: TotalSegmentator reorients, resamples to 3 mm and back; the markers and their left/right
    faces must still land on the patient's side they were put."""
    if not (realdata / "example_ct_dicom").is_dir():
        pytest.skip(f"{realdata / 'example_ct_dicom'} is absent")
    vol = _read(realdata, "example_ct_dicom")
    assert np.sign(vol.affine[0, 0]) < 0  # i runs towards the patient's left: not RAS
    s = _spine_centre(vol)
    aorta = Marker((s[0], s[1] + 35.0, s[2]), AORTA_HU)
    heart = Marker((s[0] - 90.0, s[1] + 35.0, s[2]), HEART_HU)  # outside the crop (box + 20 mm)
    ct = _with_markers(vol, [aorta, heart])
    seg = segment(ct, backend="totalsegmentator", fast=True)
    labels = seg.labels
    assert labels.shape == vol.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, *OURS.values()}
    xyz = _world(ct)
    _check_marker(labels, xyz, aorta, OURS["aorta"])
    assert (labels[_core(xyz, heart)] == OURS["body"]).mean() > 0.95  # cropped away
    _edge_voxels_are_at_marker_faces(labels, xyz, [aorta])
    band = (ct.array >= 150) & (ct.array < 1800)
    spine = labels == OURS["spine"]
    near = np.any([_zone(xyz, m, x=(-HALF_MM - 6, HALF_MM + 6), shrink=-6) for m in (aorta, heart)], axis=0)
    _, wide, inner = _crop_boxes(ct, xyz, aorta)
    model_labels = (labels != 0) & (labels != OURS["body"])
    assert model_labels[~wide].sum() == 0  # nothing of the model outside the crop
    region = inner & ~near
    assert dice(spine & region, band & region) > 0.6  # 3 mm round trip of thin bone
    assert dice(spine & region, band[:, ::-1, :] & region) < 0.3
    assert seg.mean_hu["aorta"] > 2500
