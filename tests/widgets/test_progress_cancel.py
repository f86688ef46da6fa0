"""Progress, cancel, the organ statistics tab and warnings of a whole widget session."""

from __future__ import annotations

import csv
import threading
import warnings

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

pytestmark = pytest.mark.gui
WAIT_MS = 60_000


def _widget(viewer, qtbot, checkpoint, *, segmentation=LABELS_LAYER_CHOICE) -> DetectWidget:
    widget = DetectWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_checkpoint(checkpoint)
    widget.set_segmentation(segmentation)
    if segmentation == LABELS_LAYER_CHOICE:
        widget.labels_combo.setCurrentText("reference organs")
    widget.device_combo.setCurrentText("cpu")
    widget.show()
    return widget


def test_progress_bar_shows_the_stage_and_cancel_frees_the_widget_at_once(ct_viewer, qtbot, tiny_checkpoint):
    viewer = ct_viewer
    widget = _widget(viewer, qtbot, tiny_checkpoint)
    reached, release = threading.Event(), threading.Event()
    seen = []

    def hook(done, total, message):  # worker thread: hold the run inside "image features"
        seen.append(message)
        if message == "image features":
            reached.set()
            release.wait(60)

    widget.progress_hook = hook
    names = [layer.name for layer in viewer.layers]
    qtbot.mouseClick(widget.detect_button, Qt.MouseButton.LeftButton)
    old = widget.task
    qtbot.waitUntil(reached.is_set, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.progress_bar.format().startswith("preprocess"), timeout=WAIT_MS)
    assert widget.progress_bar.isVisible() and widget.progress_bar.format() == "preprocess (4/7)"
    assert widget.progress_bar.value() == 3 and widget.progress_bar.maximum() == 7

    qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
    # free at once, while the worker is still held inside the stage
    assert not old.finished and old.cancel_event.is_set()
    assert not widget.busy and widget.detect_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert not widget.progress_bar.isVisible()
    assert widget.messages[-1][0] == "info" and "cancelled" in widget.messages[-1][1]

    widget.progress_hook = None  # a new run starts right away and completes
    assert widget.run_blocking(timeout=120) is not None
    new_layers = [layer.name for layer in viewer.layers][len(names):]
    release.set()
    qtbot.waitUntil(lambda: old.finished, timeout=WAIT_MS)
    assert type(old.outcome.error).__name__ == "DetectionCancelled"  # stopped at its next report
    assert seen[-1] == "image features"  # nothing of the cancelled run ran after the held report
    qtbot.wait(100)
    assert [layer.name for layer in viewer.layers][len(names):] == new_layers  # its outcome was dropped
    assert widget.result is widget.task.outcome.value


def test_cancel_stops_inside_a_long_stage(ct_viewer, qtbot, tiny_checkpoint):
    widget = _widget(ct_viewer, qtbot, tiny_checkpoint, segmentation="threshold")
    reached, release = threading.Event(), threading.Event()
    seen = []

    def hook(done, total, message):  # the threshold backend's own steps inside "segmentation"
        seen.append(message)
        if message == "threshold: body":
            reached.set()
            release.wait(60)

    widget.progress_hook = hook
    qtbot.mouseClick(widget.detect_button, Qt.MouseButton.LeftButton)
    task = widget.task
    qtbot.waitUntil(reached.is_set, timeout=WAIT_MS)
    widget.cancel()
    release.set()
    qtbot.waitUntil(lambda: task.finished, timeout=WAIT_MS)
    assert type(task.outcome.error).__name__ == "DetectionCancelled"
    assert "threshold: body" in str(task.outcome.error)
    assert seen[-1] == "threshold: body"  # the later threshold steps and stages never ran
    assert widget.result is None


def test_organ_statistics_tab_and_csv(ct_viewer, qtbot, tiny_checkpoint, tmp_path, phantom):
    from napari_ctvlp.engine.anatomy import ORGAN_BY_NAME

    volume, organs = phantom
    widget = _widget(ct_viewer, qtbot, tiny_checkpoint)
    assert not widget.organ_panel.save_button.isEnabled()
    assert widget.run_blocking(timeout=120) is not None
    panel = widget.organ_panel
    rows = {r["region"]: r for r in panel.rows}
    heart = organs == ORGAN_BY_NAME["heart"].value
    assert float(rows["heart"]["volume_ml"]) == pytest.approx(heart.sum() * np.prod(volume.spacing) / 1000, rel=1e-4)
    assert float(rows["heart"]["mean_hu"]) == pytest.approx(volume.array[heart].mean(), abs=0.01)
    assert "anatomy:lung" in rows and panel.table.rowCount() == len(rows)
    cut = [r for r in panel.rows if r["incomplete"] == "true"]
    assert any(r["region"] == "body" for r in cut)  # the body reaches the edges of the phantom's field of view
    texts = {panel.table.item(r, 0).text(): panel.table.item(r, 3).text() for r in range(panel.table.rowCount())}
    assert texts["body"].startswith("yes") and texts["heart"] == "no"
    path = panel.save_csv(tmp_path / "stats.csv")
    with open(path, newline="") as fh:
        saved = list(csv.DictReader(fh))
    assert saved == panel.rows
    exported = widget.export_results(tmp_path / "out")
    with open(next(p for p in exported if p.name == "organ_stats.csv"), newline="") as fh:
        assert list(csv.DictReader(fh)) == saved  # the same table as the export


def test_a_widget_session_raises_no_deprecation_warnings_from_our_code(ct_viewer, qtbot, tiny_checkpoint):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        widget = _widget(ct_viewer, qtbot, tiny_checkpoint)
        assert widget.run_blocking(timeout=120) is not None
        task = widget.show_row("heart", "Cardiomegaly")
        if task is not None:
            task.wait(timeout=60)
        widget.centre_on("lung")
        ct_viewer.layers["ct"].name = "renamed ct"
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and "napari_ctvlp" in str(w.filename)]
    assert ours == [], [(w.filename, w.lineno, str(w.message)[:120]) for w in ours]
