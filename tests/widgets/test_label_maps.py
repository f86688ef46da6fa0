"""Label maps open as Labels layers on the CT's world grid and serve as the detection mask.

TotalSegmentator ``total`` output (one file, or a ``segmentations/`` folder of per-structure
masks), our exported ``organs.nii.gz`` + ``organs.json`` and our DICOM-SEG are read by the plugin's
reader; the detection widget takes such a layer as its mask and recognises what the values mean
(TotalSegmentator ids or our organ values) from the layer or from the values themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_ctvlp.engine.anatomy import ORGAN_BY_NAME, totalseg_to_organ_lut
from napari_ctvlp.widgets._engine import map_signed_permutation

pytestmark = pytest.mark.gui
LIVER, SPLEEN = 5, 1


def _widget(viewer, qtbot, checkpoint, ct, mask):
    from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

    widget = DetectWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_checkpoint(checkpoint)
    widget.image_combo.setCurrentText(ct.name)
    widget.set_segmentation(LABELS_LAYER_CHOICE)
    widget.labels_combo.setCurrentText(mask.name)
    widget.device_combo.setCurrentText("cpu")
    return widget


def _detect(widget):
    result = widget.run_blocking(timeout=180)
    assert result is not None, widget.messages[-1:]
    return result


def _shown_on_same_grid(a, b) -> None:
    np.testing.assert_allclose(a.scale, b.scale)
    np.testing.assert_allclose(a.translate, b.translate)
    assert a.data.shape == b.data.shape


def test_map_signed_permutation_flips_permutes_and_pads() -> None:
    src = np.arange(24).reshape(2, 3, 4)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, 2  # dst j = 2 - src j
    assert np.array_equal(map_signed_permutation(src, flip, (2, 3, 4)), src[:, ::-1, :])
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 0] = perm[2, 1] = perm[3, 3] = 1  # dst (a, b, c) = src (c, a, b)
    assert np.array_equal(map_signed_permutation(src, perm, (4, 2, 3)), src.transpose(2, 0, 1))
    shift = np.eye(4)
    shift[0, 3] = 3  # a 2-slice block inside a 6-slice grid: zeros elsewhere
    out = map_signed_permutation(src, shift, (6, 3, 4))
    assert np.array_equal(out[3:5], src) and not out[:3].any() and not out[5:].any()
    half = np.eye(4)
    half[0, 3] = 0.5  # half a voxel off: not the same grid
    assert map_signed_permutation(src, half, (2, 3, 4)) is None
    assert map_signed_permutation(src, shift, (4, 3, 4)) is None  # does not fit
    oblique = np.eye(4)
    oblique[0, 1] = 0.3
    assert map_signed_permutation(src, oblique, (2, 3, 4)) is None


@pytest.mark.realdata
def test_totalseg_file_and_folder_open_as_labels_on_the_ct_grid(make_napari_viewer, realdata, tmp_path):
    seg_path = realdata / "example_seg_fast_force_split.nii.gz"
    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(realdata / "example_ct.nii.gz"), plugin="napari-ctvlp")
    (seg,) = viewer.open(str(seg_path), plugin="napari-ctvlp")
    assert type(ct).__name__ == "Image" and type(seg).__name__ == "Labels"
    _shown_on_same_grid(seg, ct)
    assert np.array_equal(seg.data, np.asarray(nib.load(seg_path).dataobj).transpose(2, 1, 0))
    names = dict(zip(seg.features["index"], seg.features["name"]))
    assert names[LIVER] == "liver" and names[SPLEEN] == "spleen" and names[21] == "urinary_bladder"
    assert seg.metadata["ctvlp_label_kind"] == "totalseg"
    liver, spleen = (np.asarray(seg.get_color(v)) for v in (LIVER, SPLEEN))
    assert liver[3] > 0 and spleen[3] > 0 and not np.allclose(liver, spleen)

    # TotalSegmentator's per-structure output: segmentations/<class>.nii.gz
    class_map = json.loads((realdata / "class_map_total_v2.json").read_text())
    img = nib.load(seg_path)
    ids = np.asarray(img.dataobj)
    folder = tmp_path / "segmentations"
    folder.mkdir()
    present = [int(v) for v in np.unique(ids) if v]
    for name in class_map.values():  # TotalSegmentator writes every class, empty ones too
        value = int(next(k for k, n in class_map.items() if n == name))
        mask = (ids == value).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, img.affine), folder / f"{name}.nii.gz")
    (folder_layer,) = viewer.open(str(folder), plugin="napari-ctvlp")
    assert type(folder_layer).__name__ == "Labels" and folder_layer.name == "segmentations"
    assert folder_layer.metadata["ctvlp_label_kind"] == "totalseg"
    _shown_on_same_grid(folder_layer, ct)
    assert np.array_equal(folder_layer.data, seg.data)
    folder_names = dict(zip(folder_layer.features["index"], folder_layer.features["name"]))
    assert all(folder_names[v] == class_map[str(v)] for v in present)


@pytest.mark.realdata
def test_totalseg_layer_is_the_mask_and_its_kind_is_recognised(make_napari_viewer, qtbot, realdata, tiny_checkpoint):
    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(realdata / "example_ct_dicom"), plugin="napari-ctvlp", stack=False)
    # TotalSegmentator's output for the series: its row axis runs the other way than the DICOM rows
    (seg,) = viewer.open(str(realdata / "example_seg_dicom.nii.gz"), plugin="napari-ctvlp")
    assert not np.allclose(seg.scale, ct.scale)  # another voxel order ...
    world = [seg.data_to_world(np.zeros(3)), seg.data_to_world(np.asarray(seg.data.shape) - 1)]
    corners = [ct.data_to_world(np.zeros(3)), ct.data_to_world(np.asarray(ct.data.shape) - 1)]
    np.testing.assert_allclose(np.sort(np.array(world), axis=0), np.sort(np.array(corners), axis=0), atol=1e-3)
    volume = ct.metadata["ctvlp_volume"]
    from napari_ctvlp.io import read_labels

    reference = totalseg_to_organ_lut()[read_labels(realdata / "example_seg_dicom.nii.gz", like=volume,
                                                    reorient=True)]
    widget = _widget(viewer, qtbot, tiny_checkpoint, ct, seg)
    result = _detect(widget)
    assert result.segmentation.backend == "file"
    assert np.array_equal(result.segmentation.labels, reference)  # ... mapped onto the CT grid, ids mapped

    # a Labels layer without our metadata (e.g. painted or made by another plugin): kind from its values
    plain = viewer.add_labels(np.array(seg.data), scale=seg.scale, translate=seg.translate, name="plain ids")
    widget.labels_combo.setCurrentText(plain.name)
    assert np.array_equal(_detect(widget).segmentation.labels, reference)
    organs = viewer.add_labels(np.array(viewer.layers[f"{ct.name} organs (detected)"].data), scale=ct.scale,
                               translate=ct.translate, name="plain organs")
    widget.labels_combo.setCurrentText(organs.name)
    assert np.array_equal(_detect(widget).segmentation.labels, reference)  # organ values kept as they are


@pytest.mark.realdata
def test_exported_organs_and_dicom_seg_reopen_as_masks(make_napari_viewer, qtbot, realdata, tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(realdata / "example_ct_dicom"), plugin="napari-ctvlp", stack=False)
    (seg,) = viewer.open(str(realdata / "example_seg_dicom.nii.gz"), plugin="napari-ctvlp")
    widget = _widget(viewer, qtbot, tiny_checkpoint, ct, seg)
    first = _detect(widget).segmentation.labels
    files = widget.export_results(tmp_path / "out")
    assert {"organs.nii.gz", "organs.json", "organs_seg.dcm"} <= {p.name for p in files}
    detected = viewer.layers[f"{ct.name} organs (detected)"]
    for name in ("organs.nii.gz", "organs_seg.dcm"):
        (layer,) = viewer.open(str(tmp_path / "out" / name), plugin="napari-ctvlp")
        assert type(layer).__name__ == "Labels", name
        assert layer.metadata["ctvlp_label_kind"] == "organ", name
        names = dict(zip(layer.features["index"], layer.features["name"]))
        assert names[ORGAN_BY_NAME["spine"].value] == "spine", name
        # on the CT's world grid: every voxel of the detected organs is at the same world position
        from napari_ctvlp.widgets._engine import layer_mask

        assert np.array_equal(layer_mask(layer, ct.metadata["ctvlp_volume"], ct_layer=ct), first), name
        widget.labels_combo.setCurrentText(layer.name)
        assert np.array_equal(_detect(widget).segmentation.labels, first), name
        assert np.array_equal(detected.data, viewer.layers[f"{ct.name} organs (detected)"].data)
