"""Real anatomy lands where a radiologist expects it on screen, for every reader path.

example_ct.nii.gz (RAS) and its TotalSegmentator reference labels are reoriented on disk into
other voxel orders (nibabel), converted to NRRD/MHA (SimpleITK), and the DICOM series is read
with its own reference; each is opened through the plugin's reader in a real viewer. Screen
positions are computed from each layer's data and its world transform as napari shows it
(displayed dims and camera orientation), and once from pixels of a real screenshot.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = [pytest.mark.gui, pytest.mark.realdata]

# TotalSegmentator v2 "total" ids (../shared/realdata/class_map_total_v2.json)
SPLEEN, LIVER, BLADDER = 1, 5, 21
VERTEBRAE = tuple(range(26, 51))
AXIAL, CORONAL, SAGITTAL = (0, 1, 2), (1, 0, 2), (2, 0, 1)  # viewer.dims.order


def _check_class_map(realdata: Path) -> None:
    import json

    names = json.loads((realdata / "class_map_total_v2.json").read_text())
    assert names[str(LIVER)] == "liver" and names[str(SPLEEN)] == "spleen"
    assert names[str(BLADDER)] == "urinary_bladder" and names["31"] == "vertebrae_L1"


def _reoriented(src: Path, codes: str, out: Path) -> Path:
    """``src`` with its voxel axes permuted/flipped to point towards ``codes`` (same world)."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    img = nib.load(src)
    ornt = ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(codes)))
    new = img.as_reoriented(ornt)
    assert "".join(nib.aff2axcodes(new.affine)) == codes
    nib.save(new, out)
    return out


def _itk_copy(src: Path, out: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(src)), str(out))
    return out


def on_screen(viewer, layer, values) -> tuple[float, float]:
    """Screen ``(x, y)`` (right, down; in world mm) of the centroid of ``values`` in ``layer``."""
    centroid = np.argwhere(np.isin(np.asarray(layer.data), values)).mean(axis=0)
    world = np.asarray(layer.data_to_world(centroid), dtype=float)
    rows, cols = viewer.dims.displayed
    vertical, horizontal = (str(getattr(o, "value", o)) for o in viewer.scene.camera.orientation2d)
    y = world[rows] if vertical == "down" else -world[rows]
    x = world[cols] if horizontal == "right" else -world[cols]
    return float(x), float(y)


def _open_pair(viewer, ct_path: Path, seg_path: Path):
    """The CT and its reference labels, both through the plugin reader (an Image and a Labels layer)."""
    (ct,) = viewer.open(str(ct_path), plugin="napari-ctvlp", stack=False)
    (seg,) = viewer.open(str(seg_path), plugin="napari-ctvlp", stack=False)
    assert type(ct).__name__ == "Image" and type(seg).__name__ == "Labels"
    assert seg.metadata["ctvlp_label_kind"] == "totalseg"
    return ct, seg


def _assert_radiological(viewer, seg, *, coronal: bool = True) -> None:
    from napari_ctvlp._layers import DISPLAY_AXIS_LABELS

    assert tuple(viewer.dims.axis_labels) == DISPLAY_AXIS_LABELS
    assert all(str(u) == "millimeter" for u in seg.units)
    viewer.dims.order = AXIAL
    liver, spleen, spine = (on_screen(viewer, seg, v) for v in ((LIVER,), (SPLEEN,), VERTEBRAE))
    assert liver[0] < spleen[0] - 50  # the liver (patient's right) is on the screen's left
    assert spine[1] > liver[1] + 20  # the spine (posterior) is below the liver
    if coronal:
        viewer.dims.order = CORONAL
        liver, spleen, bladder = (on_screen(viewer, seg, v) for v in ((LIVER,), (SPLEEN,), (BLADDER,)))
        assert liver[1] < bladder[1] - 80  # head up: the liver above the bladder
        assert liver[0] < spleen[0] - 50
        viewer.dims.order = SAGITTAL
        liver, bladder, spine = (on_screen(viewer, seg, v) for v in ((LIVER,), (BLADDER,), VERTEBRAE))
        assert liver[1] < bladder[1] - 80  # head up
        assert spine[0] > liver[0]  # anterior on the left, the spine (posterior) on the right
    viewer.dims.order = AXIAL


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR", "SLA", "IRP"])
def test_nifti_any_orientation_is_radiological_and_round_trips(make_napari_viewer, realdata, tmp_path, codes):
    from napari_ctvlp._writer import write_labels_layer

    _check_class_map(realdata)
    ct_path = _reoriented(realdata / "example_ct.nii.gz", codes, tmp_path / f"ct_{codes}.nii.gz")
    seg_path = _reoriented(realdata / "example_seg_fast_force_split.nii.gz", codes, tmp_path / f"seg_{codes}.nii.gz")
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Non-orthogonal slicing")
        ct, seg = _open_pair(viewer, ct_path, seg_path)
        _assert_radiological(viewer, seg)
    # the CT and its labels are on one world grid
    np.testing.assert_allclose(seg.scale, ct.scale)
    np.testing.assert_allclose(seg.translate, ct.translate)
    assert seg.data.shape == ct.data.shape
    # the CT voxels are those of the file, only transposed for display
    volume = ct.metadata["ctvlp_volume"]
    assert np.array_equal(np.asarray(nib.load(ct_path).dataobj).transpose(2, 1, 0), volume.array)
    # writing the labels layer gives back the reference file: same voxel order, same affine
    out = tmp_path / "saved.nii.gz"
    write_labels_layer(str(out), seg.data, {"metadata": seg.metadata, "scale": seg.scale})
    ref, saved = nib.load(seg_path), nib.load(out)
    np.testing.assert_array_equal(saved.affine, ref.affine)
    assert np.array_equal(np.asarray(saved.dataobj), np.asarray(ref.dataobj))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_are_radiological(make_napari_viewer, realdata, tmp_path, suffix):
    ct_path = _itk_copy(realdata / "example_ct.nii.gz", tmp_path / f"ct{suffix}")
    seg_path = _itk_copy(realdata / "example_seg_fast_force_split.nii.gz", tmp_path / f"seg{suffix}")
    viewer = make_napari_viewer()
    ct, seg = _open_pair(viewer, ct_path, seg_path)
    assert ct.metadata["ctvlp"]["format"] == "itk"
    _assert_radiological(viewer, seg)


def test_dicom_series_is_radiological(make_napari_viewer, realdata):
    viewer = make_napari_viewer()
    ct, seg = _open_pair(viewer, realdata / "example_ct_dicom", realdata / "example_seg_dicom.nii.gz")
    assert ct.metadata["ctvlp"]["format"] == "dicom" and ct.data.shape == (20, 512, 512)
    _assert_radiological(viewer, seg, coronal=False)  # 20 slices of 2 mm: no bladder in it
    # coronal and sagittal: the most superior slice is drawn above the most inferior one
    volume = ct.metadata["ctvlp_volume"]
    z = (volume.display_affine @ np.array([[0, 0, 0, 1], [volume.shape[0] - 1, 0, 0, 1]]).T)[2]
    top, bottom = (0, volume.shape[0] - 1) if z[0] > z[1] else (volume.shape[0] - 1, 0)
    geometry = ct.metadata["ctvlp_display"]
    for order in (CORONAL, SAGITTAL):
        viewer.dims.order = order
        rows = viewer.dims.displayed[0]
        ys = [ct.data_to_world(geometry.index_to_display([k, 256, 256]))[rows] for k in (top, bottom)]
        assert ys[0] < ys[1]


def _pixels_centroid(viewer) -> np.ndarray:
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))
    ys, xs = np.nonzero(shot[..., :3].astype(int).sum(axis=-1) > 30)
    assert ys.size > 50, "nothing drawn"
    return np.array([xs.mean(), ys.mean()])


def test_screenshot_pixels_show_liver_left_and_spine_below(make_napari_viewer, realdata, qtbot):
    """The rendered canvas (not only the transforms): liver pixels left of spleen pixels, spine below."""
    viewer = make_napari_viewer(show=True)
    ct, seg = _open_pair(viewer, realdata / "example_ct.nii.gz", realdata / "example_seg_fast_force_split.nii.gz")
    ct.visible = False
    seg.opacity = 1.0
    seg.show_selected_label = True
    volume = ct.metadata["ctvlp_volume"]
    geometry = ct.metadata["ctvlp_display"]
    # the axial slice through the middle of the spleen also cuts liver and spine
    spleen = np.argwhere(np.asarray(seg.data) == SPLEEN).mean(axis=0)
    viewer.dims.set_point(0, float(seg.data_to_world(spleen)[0]))
    viewer.reset_view()
    centres = {}
    for name, value in (("liver", LIVER), ("spleen", SPLEEN), ("L1", 31)):
        seg.selected_label = value
        qtbot.wait(50)
        centres[name] = _pixels_centroid(viewer)
    assert centres["liver"][0] < centres["spleen"][0] - 40
    assert centres["L1"][1] > centres["liver"][1] + 20
    assert geometry.display_shape(volume.shape) == ct.data.shape


def test_detection_layers_and_exports_stay_on_a_permuted_ct_grid(make_napari_viewer, qtbot, realdata, tmp_path,
                                                                 tiny_checkpoint):
    """A sagittal-order (PIR) file: organ and heatmap layers overlay the CT, exports keep the file's grid."""
    from napari_ctvlp.engine.anatomy import totalseg_to_organ_lut
    from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

    ct_path = _reoriented(realdata / "example_ct.nii.gz", "PIR", tmp_path / "ct.nii.gz")
    seg_path = _reoriented(realdata / "example_seg_fast_force_split.nii.gz", "PIR", tmp_path / "seg.nii.gz")
    viewer = make_napari_viewer()
    ct, seg = _open_pair(viewer, ct_path, seg_path)
    assert ct.metadata["ctvlp_display"].axes != (0, 1, 2)  # this file's array is transposed for display
    widget = DetectWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_checkpoint(tiny_checkpoint)
    widget.set_segmentation(LABELS_LAYER_CHOICE)
    widget.labels_combo.setCurrentText(seg.name)
    widget.device_combo.setCurrentText("cpu")
    assert viewer.canvas.overlays.scale_bar.visible  # mm scale bar (the layers' unit)
    assert widget.run_blocking(timeout=120) is not None, widget.messages[-1:]
    organs = viewer.layers[f"{ct.name} organs (detected)"]
    expected = totalseg_to_organ_lut()[np.asarray(seg.data)]  # TotalSegmentator ids -> organ labels
    assert np.array_equal(organs.data, expected)
    for layer in (organs,):
        np.testing.assert_allclose(layer.scale, ct.scale)
        np.testing.assert_allclose(layer.translate, ct.translate)
    task = widget.show_row("heart", "Cardiomegaly")
    if task is not None:
        task.wait(timeout=120)
    heat = viewer.layers["heatmap: Cardiomegaly"]
    assert heat.data.shape == ct.data.shape
    np.testing.assert_allclose(heat.scale, ct.scale)
    np.testing.assert_allclose(heat.translate, ct.translate)
    viewer.dims.order = AXIAL
    spine = on_screen(viewer, seg, (*VERTEBRAE, 79))  # TotalSegmentator vertebrae + spinal cord = organ "spine"
    assert on_screen(viewer, organs, (13,)) == pytest.approx(spine, abs=1e-6)

    files = widget.export_results(tmp_path / "out", overwrite=False)
    assert tmp_path / "out" / "organs.nii.gz" in files
    ref = nib.load(seg_path)
    for name in ("organs.nii.gz", "heatmap_cardiomegaly.nii.gz"):
        img = nib.load(tmp_path / "out" / name)
        np.testing.assert_array_equal(img.affine, ref.affine)
        assert img.shape == ref.shape
    saved = np.asarray(nib.load(tmp_path / "out" / "organs.nii.gz").dataobj)
    assert np.array_equal(saved, totalseg_to_organ_lut()[np.asarray(ref.dataobj)])
