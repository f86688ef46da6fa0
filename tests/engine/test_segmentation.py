"""Segmentation backends: registry, threshold fallback, TotalSegmentator offline behaviour, label files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from napari_ctvlp.engine.anatomy import LEFT_LUNG_LABELS, LUNG_LABELS, RIGHT_LUNG_LABELS
from napari_ctvlp.engine.segmentation import (
    BACKENDS,
    OrganSegmentation,
    SegmentationUnavailable,
    available_backends,
    dice,
    from_label_file,
    register_backend,
    segment,
)
from napari_ctvlp.engine.volume import CTVolume
from tests._network import refuse_network

REALDATA = Path(__file__).resolve().parents[2] / "../shared/realdata"


def _phantom_chest(flip_x: bool = False) -> tuple[CTVolume, np.ndarray, np.ndarray]:
    """Tiny chest: body ellipse, two lungs (-850 HU), a spine (500 HU). RAS affine, 4 mm voxels.

    Returns the volume and the true left / right lung masks (display order). Canonical +x is the
    patient's right, so the right lung sits at large i.
    """
    rng = np.random.default_rng(0)
    nk, nj, ni = 24, 40, 48
    k, j, i = np.mgrid[0:nk, 0:nj, 0:ni].astype(float)
    hu = np.full((nk, nj, ni), -1000.0)
    body = ((i - 24) / 21) ** 2 + ((j - 20) / 16) ** 2 <= 1
    hu[body] = 40.0
    right = ((i - 33) / 6) ** 2 + ((j - 21) / 7) ** 2 + ((k - 12) / 9) ** 2 <= 1
    left = ((i - 15) / 6) ** 2 + ((j - 21) / 7) ** 2 + ((k - 12) / 9) ** 2 <= 1
    hu[right | left] = -850.0
    spine = ((i - 24) / 3) ** 2 + ((j - 8) / 3) ** 2 <= 1
    hu[spine & body] = 500.0
    hu += rng.normal(0, 15, hu.shape)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    if flip_x:  # same anatomy stored with i running right -> left (LAS): array flipped, affine x negated
        hu, left, right = hu[:, :, ::-1], left[:, :, ::-1], right[:, :, ::-1]
        affine = affine.copy()
        affine[0, 0] = -4.0
        affine[0, 3] = 4.0 * (ni - 1)
    return CTVolume(np.ascontiguousarray(hu.astype(np.float32)), (4.0, 4.0, 4.0), affine), left, right


@pytest.mark.parametrize("flip_x", [False, True])
def test_threshold_backend_finds_lungs_on_the_right_sides(flip_x: bool) -> None:
    vol, left, right = _phantom_chest(flip_x)
    seg = segment(vol, backend="threshold")
    assert isinstance(seg, OrganSegmentation)
    assert seg.backend == "threshold"
    assert seg.labels.shape == vol.shape and seg.labels.dtype == np.uint8
    assert dice(np.isin(seg.labels, LEFT_LUNG_LABELS), left) > 0.9
    assert dice(np.isin(seg.labels, RIGHT_LUNG_LABELS), right) > 0.9
    assert (seg.labels[vol.array > 300] == 13).mean() > 0.8  # the posterior midline bone is spine
    assert seg.labels[0, 0, 0] == 0  # outside air is background
    assert seg.volume_ml["lung_left"] == pytest.approx(left.sum() * 64 / 1000, rel=0.15)
    assert seg.mean_hu["lung_right"] < -700
    assert seg.volume_ml["anatomy:lung"] > seg.volume_ml["lung_left"] + seg.volume_ml["lung_right"]
    assert seg.incomplete["body"] is True  # the body runs through the first/last slice
    assert seg.incomplete["lung_left"] is False
    assert {"backend", "statistics", "total"} <= set(seg.timings)


def test_threshold_backend_reports_progress() -> None:
    vol, _, _ = _phantom_chest()
    calls: list[tuple[int, int, str]] = []
    segment(vol, backend="threshold", progress=lambda d, t, m: calls.append((d, t, m)))
    assert calls and calls[-1][0] == calls[-1][1]


def test_unknown_backend_is_rejected() -> None:
    vol, _, _ = _phantom_chest()
    with pytest.raises(ValueError, match="unknown segmentation backend 'nope'"):
        segment(vol, backend="nope")


@pytest.fixture
def no_totalseg_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def blocked_network(monkeypatch):
    return refuse_network(monkeypatch, allow_local=False)


@pytest.mark.parametrize(("fast", "command"), [(True, "totalseg_download_weights -t total_fast"), (False, "totalseg_download_weights -t total")])
def test_totalsegmentator_without_weights_fails_fast_offline(no_totalseg_weights, blocked_network, fast, command) -> None:
    vol, _, _ = _phantom_chest()
    t0 = time.perf_counter()
    with pytest.raises(SegmentationUnavailable) as info:
        segment(vol, backend="totalsegmentator", fast=fast)
    assert time.perf_counter() - t0 < 5.0
    message = str(info.value)
    assert command in message
    assert "TOTALSEG_WEIGHTS_PATH" in message and "TOTALSEG_HOME_DIR" in message
    assert str(no_totalseg_weights / "weights") in message
    assert blocked_network == []
    assert not (no_totalseg_weights / "weights").exists()  # nothing created, nothing downloaded


def test_totalsegmentator_usage_statistics_are_disabled(blocked_network) -> None:
    import totalsegmentator.python_api as ts_api

    from napari_ctvlp.engine.segmentation.totalseg import _no_usage_stats

    original = ts_api.send_usage_stats
    params = {"task": "total", "fast": True, "preview": False, "multilabel": True, "roi_subset": None,
              "statistics": False, "radiomics": False}
    with _no_usage_stats():
        ts_api.send_usage_stats({"send_usage_stats": True, "totalseg_id": "x", "prediction_counter": 0}, dict(params))
    assert blocked_network == []
    assert ts_api.send_usage_stats is original
    # the real function does try to connect (so the check above can fail)
    ts_api.send_usage_stats({"send_usage_stats": True, "totalseg_id": "x", "prediction_counter": 0}, dict(params))
    assert blocked_network != []


def test_auto_falls_back_and_prefers_registered_builtin(no_totalseg_weights, blocked_network) -> None:
    vol, _, _ = _phantom_chest()
    reasons = available_backends()
    assert "totalseg_download_weights" in reasons["totalsegmentator"]
    assert reasons["threshold"] is None
    assert segment(vol).backend == "threshold"
    saved = BACKENDS.pop("builtin", None)
    try:
        register_backend(
            "builtin",
            lambda volume, *, device="cpu", fast=True, progress=None: np.full(volume.shape, 15, np.uint8),
            lambda *, fast=True: None,
        )
        seg = segment(vol)
        assert seg.backend == "builtin" and (seg.labels == 15).all()
        register_backend("builtin", BACKENDS["builtin"].run, lambda *, fast=True: "no weights")
        assert segment(vol).backend == "threshold"
        with pytest.raises(SegmentationUnavailable, match="no weights"):
            segment(vol, backend="builtin")
    finally:
        BACKENDS.pop("builtin", None)
        if saved is not None:
            BACKENDS["builtin"] = saved


def test_from_label_file_checks_its_input(tmp_path) -> None:
    vol, _, _ = _phantom_chest()
    with pytest.raises(ValueError, match="not organ labels"):
        from_label_file(np.full(vol.shape, 99, np.uint8), like=vol, kind="organ")
    with pytest.raises(ValueError, match="does not match the CT shape"):
        from_label_file(np.zeros((2, 2, 2), np.uint8), like=vol)
    with pytest.raises(ValueError, match="does not exist"):
        from_label_file(tmp_path / "missing.nii.gz", like=vol)
    with pytest.raises(ValueError, match="kind must be"):
        from_label_file(np.zeros(vol.shape, np.uint8), like=vol, kind="other")  # type: ignore[arg-type]
    ts = np.zeros(vol.shape, np.uint8)
    ts[2:4, 2:4, 2:4] = 51  # TotalSegmentator heart
    ts[5:7, 5:7, 5:7] = 5  # liver -> body
    seg = from_label_file(ts, like=vol, kind="totalseg")
    assert seg.backend == "file"
    assert set(np.unique(seg.labels)) == {0, 10, 15}


def _read(path: Path) -> CTVolume:
    try:
        from napari_ctvlp.io import read_ct
    except ImportError:
        read_ct = None
    if read_ct is not None:
        return read_ct(path)
    import nibabel as nib

    img = nib.load(str(path))
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3][::-1])
    return CTVolume(np.asarray(img.dataobj).transpose(2, 1, 0), zooms, img.affine)


@pytest.fixture
def example_ct() -> tuple[CTVolume, OrganSegmentation]:
    if not (REALDATA / "example_ct.nii.gz").exists():
        pytest.skip(f"real data {REALDATA.resolve()} is absent")
    vol = _read(REALDATA / "example_ct.nii.gz")
    ref = from_label_file(REALDATA / "example_seg_fast_force_split.nii.gz", like=vol, kind="totalseg")
    return vol, ref


@pytest.mark.realdata
def test_totalseg_reference_maps_to_our_labels(example_ct) -> None:
    vol, ref = example_ct
    present = set(np.unique(ref.labels).tolist())
    assert {4, 3, 7, 11, 13, 14, 15} <= present  # lung lobes, aorta, spine, bone, body (liver etc.)
    assert 2 not in present and 1 not in present  # lobes keep their lobe labels
    assert 80 < sum(ref.volume_ml[n] for n in ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_lower_lobe_right")) < 150
    assert 20 < ref.volume_ml["aorta"] < 120
    assert 250 < ref.volume_ml["spine"] < 700
    assert ref.volume_ml["anatomy:lung"] > 100  # dilated by 8 mm
    assert 0 < ref.mean_hu["aorta"] < 400  # blood
    assert ref.mean_hu["lung_lower_lobe_right"] < -500
    assert ref.incomplete["lung_lower_lobe_right"] is True  # lung bases: cut off at the top slice


@pytest.mark.realdata
def test_threshold_lungs_dice_on_example_ct(example_ct) -> None:
    vol, ref = example_ct
    seg = segment(vol, backend="threshold")
    assert dice(np.isin(seg.labels, LUNG_LABELS), np.isin(ref.labels, LUNG_LABELS)) >= 0.90
    assert dice(np.isin(seg.labels, LEFT_LUNG_LABELS), np.isin(ref.labels, LEFT_LUNG_LABELS)) >= 0.85
    assert dice(np.isin(seg.labels, RIGHT_LUNG_LABELS), np.isin(ref.labels, RIGHT_LUNG_LABELS)) >= 0.85
    assert dice(seg.labels == 13, ref.labels == 13) >= 0.6
    assert seg.timings["backend"] < 10.0


@pytest.mark.realdata
def test_dicom_reference_is_reoriented_to_the_series() -> None:
    if not (REALDATA / "example_ct_dicom").is_dir():
        pytest.skip(f"real data {REALDATA.resolve()} is absent")
    pytest.importorskip("napari_ctvlp.io")
    from napari_ctvlp.io import read_ct

    vol = read_ct(REALDATA / "example_ct_dicom")
    ref = from_label_file(REALDATA / "example_seg_dicom.nii.gz", like=vol, kind="totalseg")
    seg = segment(vol, backend="threshold")
    # bone overlaps only if the reference's flipped row axis was undone
    assert dice(np.isin(seg.labels, (13, 14)), np.isin(ref.labels, (13, 14))) > 0.5
    flipped = ref.labels[:, ::-1, :]
    assert dice(np.isin(seg.labels, (13, 14)), np.isin(flipped, (13, 14))) < 0.3


def test_anatomy_centroids_match_scipy_center_of_mass() -> None:
    from scipy import ndimage

    from napari_ctvlp.engine.anatomy import ANATOMIES
    from napari_ctvlp.engine.segmentation.stats import anatomy_centroids, label_centroids

    rng = np.random.default_rng(3)
    values = sorted({v for a in ANATOMIES for v in a.organ_labels})
    labels = rng.choice(np.asarray([0, *values[:-1]], dtype=np.uint8), size=(9, 13, 11))  # last one absent
    counts, centres = label_centroids(labels)
    assert counts.sum() == labels.size
    for v in values[:-1]:
        np.testing.assert_allclose(centres[v], ndimage.center_of_mass(labels == v), atol=1e-9)
    out = anatomy_centroids(labels)
    assert set(out) == {a.name for a in ANATOMIES}
    for anatomy in ANATOMIES:
        mask = np.isin(labels, anatomy.organ_labels)
        if mask.any():
            np.testing.assert_allclose(out[anatomy.name], ndimage.center_of_mass(mask), atol=1e-9)
        else:
            assert out[anatomy.name] is None
    with pytest.raises(ValueError, match="0..255"):
        label_centroids(np.full((2, 2, 2), 300, dtype=np.int16))
