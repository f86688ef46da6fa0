"""The detection widget's controls without running a model: pickers, errors, table, export."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _image(viewer, shape=(16, 20, 24), name="ct", scale=(2.0, 1.0, 1.0)):
    data = np.full(shape, -1000, dtype=np.int16)
    return viewer.add_image(data, name=name, scale=scale)


def test_image_picker_lists_only_image_layers_and_follows_changes(make_napari_viewer, qtbot):
    from napari_ctvlp.widgets.detect_widget import DetectWidget

    viewer = make_napari_viewer()
    widget = DetectWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.image_combo.count() == 0
    _image(viewer, name="ct1")
    viewer.add_labels(np.zeros((16, 20, 24), dtype=np.uint8), name="mask")
    viewer.add_points(np.zeros((1, 3)), name="pts")
    items = [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert items == ["ct1"]
    assert [widget.labels_combo.itemText(i) for i in range(widget.labels_combo.count())] == ["mask"]
    viewer.layers["ct1"].name = "renamed"
    assert widget.image_combo.itemText(0) == "renamed"
    viewer.layers.remove("renamed")
    assert widget.image_combo.count() == 0


def test_segmentation_and_device_pickers(make_napari_viewer, qtbot):
    import torch
    from qtpy.QtCore import Qt

    from napari_ctvlp.engine.segmentation import available_backends
    from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

    viewer = make_napari_viewer()
    widget = DetectWidget(viewer)
    qtbot.addWidget(widget)
    combo = widget.segmentation_combo
    texts = [combo.itemText(i) for i in range(combo.count())]
    assert texts[0] == "auto" and texts[-1] == LABELS_LAYER_CHOICE
    for name, reason in available_backends().items():
        idx = combo.findData(name)
        assert combo.model().item(idx).isEnabled() == (reason is None)
        # the item says whether it is ready; the tooltip says what is missing and how to fix it
        assert combo.itemText(idx).startswith(f"{name}: ") and ("ready" in combo.itemText(idx))
        if reason:
            assert "not ready" in combo.itemText(idx)
            assert reason in combo.itemData(idx, Qt.ItemDataRole.ToolTipRole)
        else:
            assert combo.itemText(idx) == f"{name}: ready"
    tip = combo.itemData(combo.findData("totalsegmentator"), Qt.ItemDataRole.ToolTipRole)
    if available_backends().get("totalsegmentator"):
        assert "missing" in tip and "napari-ctvlp weights" in tip
    assert not widget._form.isRowVisible(widget.labels_combo)
    widget.set_segmentation(LABELS_LAYER_CHOICE)
    assert widget._form.isRowVisible(widget.labels_combo)
    cuda = widget.device_combo.model().item(widget.device_combo.findText("cuda"))
    assert cuda.isEnabled() == torch.cuda.is_available()
    with pytest.raises(ValueError):
        widget.set_segmentation("no such backend")


def test_results_table_greys_non_assessable_rows_and_sorts_numerically(qtbot):
    from qtpy.QtCore import Qt

    from napari_ctvlp.widgets.results_table import COLUMNS, NOT_ASSESSABLE, ResultRow, ResultsTable

    table = ResultsTable()
    qtbot.addWidget(table)
    table.set_rows([
        ResultRow("lung", "Emphysema", 0.9, 0.05, True),
        ResultRow("esophagus", "Hiatal hernia", math.nan, math.nan, False),
        ResultRow("heart", "Cardiomegaly", 0.1, 0.2, True, primary=True),
        ResultRow("lung", "Cardiomegaly", 0.55, 0.01, True, primary=False),
    ])
    assert [table.item(r, 1).text() for r in range(4)] == [
        "Emphysema", "Cardiomegaly", "Cardiomegaly", "Hiatal hernia"]  # 0.9, 0.55, 0.1, n/a
    r = table.find_row("esophagus", "Hiatal hernia")
    assert table.row_values(r)["probability"] == NOT_ASSESSABLE
    assert table.item(r, COLUMNS.index("assessable?")).text() == "no"
    assert table.item(r, 0).foreground().color().getRgb()[:3] == (128, 128, 128)
    table.sortItems(2, Qt.SortOrder.AscendingOrder)
    assert table.item(0, 1).text() == "Hiatal hernia" and table.item(3, 1).text() == "Emphysema"
    with qtbot.waitSignal(table.row_activated) as blocker:
        table.cellClicked.emit(table.find_row("lung", "Emphysema"), 2)
    assert blocker.args == ["lung", "Emphysema"]
    table.set_primary_only(True)
    assert table.isRowHidden(table.find_row("lung", "Cardiomegaly"))
    assert not table.isRowHidden(table.find_row("heart", "Cardiomegaly"))


@pytest.mark.realdata
def test_export_masks_as_dicom_seg_for_dicom_input(tmp_path, realdata):
    import pydicom

    from napari_ctvlp.io import read_ct
    from napari_ctvlp.widgets.export_panel import ExportSource, export_detection

    volume = read_ct(realdata / "example_ct_dicom")
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[:, 200:300, 150:250] = 10  # heart
    labels[:, 200:300, 300:400] = 1  # left lung
    source = ExportSource(volume=volume, labels=labels, label_names={1: "lung_left", 10: "heart"})
    files = export_detection(source, tmp_path, results=False, heatmaps=False)
    names = {p.name for p in files}
    assert {"organs.nii.gz", "organs.json", "organs_seg.dcm", "organ_stats.csv"} <= names
    seg = pydicom.dcmread(tmp_path / "organs_seg.dcm")
    assert seg.Modality == "SEG"
    assert sorted(s.SegmentLabel for s in seg.SegmentSequence) == ["heart", "lung_left"]
    with pytest.raises(FileExistsError):
        export_detection(source, tmp_path, results=False, heatmaps=False)
