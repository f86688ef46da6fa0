"""The widget says what the results are worth: demo model, segmentation used, operating-point calls."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget
from napari_ctvlp.widgets.results_table import COLUMNS, NO_OPERATING_POINT

pytestmark = pytest.mark.gui


def _widget(viewer, qtbot) -> DetectWidget:
    widget = DetectWidget(viewer)
    qtbot.addWidget(widget)
    widget.device_combo.setCurrentText("cpu")
    widget.show()
    return widget


def test_demo_model_notice_stays_while_the_demo_is_selected(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path

    widget = _widget(make_napari_viewer(), qtbot)
    if default_checkpoint_path() is not None:  # the shipped demo is selected first: phantom-trained
        assert widget.model_notice.isVisible()
        assert "synthetic phantoms" in widget.model_notice.text() and "meaningless" in widget.model_notice.text()
    widget.set_checkpoint(tiny_checkpoint)  # "Random weights, for tests only": no phantom claim
    assert not widget.model_notice.isVisible()
    phantom = shutil.copytree(tiny_checkpoint, tmp_path / "phantom_model")
    (phantom / "MODEL_CARD.md").write_text("# Small model\n\nPhantom-trained demo weights.\n")
    widget.set_checkpoint(phantom)
    assert widget.model_notice.isVisible() and "synthetic phantoms" in widget.model_notice.text()


def test_segmentation_notice_names_the_segmentation_and_the_better_one(ct_viewer, qtbot, tiny_checkpoint):
    from napari_ctvlp.engine.segmentation import available_backends

    widget = _widget(ct_viewer, qtbot)
    widget.set_checkpoint(tiny_checkpoint)
    ts_missing = available_backends()["totalsegmentator"] is not None
    widget.set_segmentation("threshold")
    notice = widget.segmentation_notice
    assert notice.isVisible() and "to be used: the HU-threshold fallback" in notice.text()
    assert ("totalseg_download_weights" in notice.text()) == ts_missing
    assert widget.run_blocking(timeout=120) is not None, widget.messages[-1:]
    assert widget.result.segmentation.backend == "threshold"
    assert "used: the HU-threshold fallback" in notice.text() and "to be used" not in notice.text()

    widget.set_segmentation(LABELS_LAYER_CHOICE)
    widget.labels_combo.setCurrentText("reference organs")
    assert "your Labels layer 'reference organs'" in notice.text()
    assert widget.run_blocking(timeout=120) is not None
    assert widget.result.segmentation.backend == "file"
    assert notice.text() == "Segmentation used: your Labels layer 'reference organs'."


def _with_operating_points(checkpoint, folder, thresholds):
    ckpt = shutil.copytree(checkpoint, folder)
    config = json.loads((ckpt / "config.json").read_text())
    config["operating_points"] = {"thresholds": thresholds, "chosen_on": {"split": "test fixture"}}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def _cells(table, anatomy, abnormality):
    row = table.find_row(anatomy, abnormality)
    return {name: table.item(row, c) for c, name in enumerate(COLUMNS)}


def test_results_table_calls_at_operating_points_and_tooltips(ct_viewer, qtbot, tiny_checkpoint, tmp_path):
    widget = _widget(ct_viewer, qtbot)
    widget.set_segmentation(LABELS_LAYER_CHOICE)
    widget.labels_combo.setCurrentText("reference organs")
    ckpt = _with_operating_points(tiny_checkpoint, tmp_path / "with_ops", {"Cardiomegaly": 0.0, "Emphysema": 1.01})
    widget.set_checkpoint(ckpt)
    result = widget.run_blocking(timeout=120)
    assert result is not None and result.checkpoint.operating_points == {"Cardiomegaly": 0.0, "Emphysema": 1.01}
    table = widget.results_table
    cardio, emphysema = _cells(table, "heart", "Cardiomegaly"), _cells(table, "lung", "Emphysema")
    assert cardio["call"].text() == "positive" and "threshold 0.000" in cardio["call"].toolTip()
    assert emphysema["call"].text() == "negative" and "threshold 1.010" in emphysema["call"].toolTip()
    assert _cells(table, "lung", "Atelectasis")["call"].text() == NO_OPERATING_POINT  # none stored for it
    assert _cells(table, "lung", "Cardiomegaly")["call"].text() == ""  # context row: no call
    # every cell's full text is in its tooltip (the columns elide long texts)
    for r in range(table.rowCount()):
        for c in range(table.columnCount()):
            item = table.item(r, c)
            assert item.text() in item.toolTip(), (r, COLUMNS[c], item.text(), item.toolTip())

    assert not table.isColumnHidden(COLUMNS.index("call")) and not widget.calls_notice.isVisible()

    # the same weights and operating points, marked as a phantom-trained demo: calls are muted and explained
    (ckpt / "MODEL_CARD.md").write_text("# Small model\n\nPhantom-trained demo weights.\n")
    widget.set_checkpoint(ckpt)
    assert widget.run_blocking(timeout=120) is not None
    cardio = _cells(table, "heart", "Cardiomegaly")["call"]
    assert cardio.text() == "positive (demo)" and cardio.text() in cardio.toolTip()
    assert "phantom-trained demo model" in cardio.toolTip() and "means nothing" in cardio.toolTip()
    from napari_ctvlp.widgets.results_table import _GREY, _POSITIVE

    assert cardio.foreground().color() == _GREY != _POSITIVE
    assert _cells(table, "lung", "Emphysema")["call"].text() == "negative (demo)"

    widget.set_checkpoint(tiny_checkpoint)  # a checkpoint without operating points
    assert widget.run_blocking(timeout=120) is not None
    calls = {table.item(r, COLUMNS.index("call")).text() for r in range(table.rowCount())
             if table.item(r, 0).font().bold() and table.item(r, COLUMNS.index("assessable?")).text() == "yes"}
    assert calls == {NO_OPERATING_POINT}
    # the column would only repeat it: hidden, and one line says so
    assert table.isColumnHidden(COLUMNS.index("call"))
    assert widget.calls_notice.isVisible() and "no operating point" in widget.calls_notice.text()
    table.sortItems(COLUMNS.index("call"), Qt.SortOrder.AscendingOrder)


def test_input_sanity_warning_is_a_notification_and_the_run_goes_on(ct_viewer, qtbot, tiny_checkpoint, phantom):
    from napari.utils.notifications import notification_manager

    widget = _widget(ct_viewer, qtbot)
    widget.set_checkpoint(tiny_checkpoint)
    widget.set_segmentation(LABELS_LAYER_CHOICE)
    widget.labels_combo.setCurrentText("reference organs")
    assert widget.run_blocking(timeout=120) is not None
    assert not widget.input_notice.isVisible()  # the phantom is a CT in HU of a usable size
    assert not [m for m in widget.messages if m[0] == "warning"]

    volume, _ = phantom  # the same CT in stored units (no RescaleIntercept)
    ct = ct_viewer.layers["ct"]
    ct_viewer.add_image(np.asarray(volume.array) + 1024, name="raw units", scale=ct.scale, translate=ct.translate,
                        axis_labels=ct.axis_labels, units=ct.units)
    widget.image_combo.setCurrentText("raw units")
    n = len(notification_manager.records)
    assert widget.run_blocking(timeout=120) is not None  # warned, not refused
    warnings = [text for level, text in widget.messages if level == "warning"]
    assert len(warnings) == 1 and "Hounsfield" in warnings[0]
    assert any("Hounsfield" in str(r.message) for r in notification_manager.records[n:])
    assert widget.input_notice.isVisible() and "Hounsfield" in widget.input_notice.text()
