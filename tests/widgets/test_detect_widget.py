"""End-to-end tests of the detection widget on a small phantom with a tiny random checkpoint."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_ctvlp.widgets.detect_widget import DetectWidget
from napari_ctvlp.widgets.results_table import NOT_ASSESSABLE

pytestmark = pytest.mark.gui

N_ROWS = 7 * 18  # anatomy x abnormality of the tiny model (all 7 anatomies)
WAIT_MS = 60_000


def _snapshot(viewer):
    return [(layer.name, type(layer).__name__, np.array(layer.data, copy=True)) for layer in viewer.layers]


def _same_layers(viewer, snapshot) -> bool:
    now = _snapshot(viewer)
    return [(n, t) for n, t, _ in now] == [(n, t) for n, t, _ in snapshot] and all(
        np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(now, snapshot))


def _detect(widget, qtbot) -> None:
    qtbot.mouseClick(widget.detect_button, Qt.MouseButton.LeftButton)
    assert widget.task is not None
    qtbot.waitUntil(lambda: widget.task.finished, timeout=WAIT_MS)


def _click_row(qtbot, table, row: int) -> None:
    rect = table.visualRect(table.model().index(row, 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def test_detect_adds_aligned_organs_table_and_row_heatmap(ct_viewer, qtbot, tiny_checkpoint, make_detect_widget):
    viewer = ct_viewer
    ct = viewer.layers["ct"]
    widget = make_detect_widget(viewer, tiny_checkpoint)
    assert "Tiny test model" in widget.model_card_text.toPlainText()
    before = _snapshot(viewer)

    _detect(widget, qtbot)
    assert widget.task.outcome.ok, widget.task.outcome.error
    assert widget.cancel_button.isEnabled() is False and widget.detect_button.isEnabled()
    # the engine's progress callback reached the GUI thread (and the napari progress bar)
    assert {"segmentation", "image features", "scoring"} <= set(widget.task.messages)

    # organ Labels layer: aligned with the CT, organ names as features
    organs = viewer.layers["ct organs (detected)"]
    assert type(organs).__name__ == "Labels"
    np.testing.assert_allclose(organs.scale, ct.scale)
    np.testing.assert_allclose(organs.translate, ct.translate)
    assert organs.data.shape == ct.data.shape
    assert "lung_left" in list(organs.features["organ"]) and "heart" in list(organs.features["organ"])
    # the user's layers are untouched (the organ layer was appended)
    assert [layer.name for layer in viewer.layers][: len(before)] == [n for n, _, _ in before]
    assert all(np.array_equal(viewer.layers[n].data, d) for n, _, d in before)

    # table: anatomy x abnormality, probabilities in [0, 1] or "not assessable"
    table = widget.results_table
    assert table.rowCount() == N_ROWS
    values = [table.row_values(r) for r in range(table.rowCount())]
    assert {(v["anatomy"], v["abnormality"]) for v in values} == {
        (r["anatomy"], r["abnormality"]) for r in widget.result.rows()}
    for v in values:
        assert v["probability"] == NOT_ASSESSABLE or 0.0 <= v["probability"] <= 1.0
    probs = [v["probability"] for v in values if v["probability"] != NOT_ASSESSABLE]
    assert probs == sorted(probs, reverse=True)  # sorted by probability
    # sortable by clicking the header (anatomy ascending)
    table.sortItems(0, Qt.SortOrder.AscendingOrder)
    anatomies = [table.item(r, 0).text() for r in range(table.rowCount())]
    assert anatomies == sorted(anatomies)
    assert widget.primary_only_check.isChecked()  # default: each abnormality in its own anatomy
    assert sum(not table.isRowHidden(r) for r in range(table.rowCount())) == 18
    widget.primary_only_check.setChecked(False)
    assert not any(table.isRowHidden(r) for r in range(table.rowCount()))

    # click a heart row: view centred on the heart, heatmap layer with the CT's shape and scale
    row = table.find_row("heart", "Cardiomegaly")
    _click_row(qtbot, table, row)
    qtbot.waitUntil(lambda: "heatmap: Cardiomegaly" in viewer.layers, timeout=WAIT_MS)
    heat = viewer.layers["heatmap: Cardiomegaly"]
    assert heat.data.shape == ct.data.shape
    np.testing.assert_allclose(heat.scale, ct.scale)
    assert heat.blending == "additive" and heat.colormap.name == "inferno" and heat.opacity == pytest.approx(0.5)
    heart = np.argwhere(organs.data == 10).mean(axis=0)
    expected = np.asarray(ct.data_to_world(heart))
    np.testing.assert_allclose(viewer.dims.point, expected, atol=1.5 * max(ct.scale))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    displayed = list(viewer.dims.displayed)
    np.testing.assert_allclose(camera.center[-len(displayed):], expected[displayed], atol=1.5 * max(ct.scale))
    # a second click on the same row reuses the layer
    n_layers = len(viewer.layers)
    _click_row(qtbot, table, row)
    qtbot.wait(200)
    assert len(viewer.layers) == n_layers
    # another finding reuses the one heatmap layer too: renamed, new data, masked outside the body
    _click_row(qtbot, table, table.find_row("lung", "Pleural effusion"))
    qtbot.waitUntil(lambda: "heatmap: Pleural effusion" in viewer.layers, timeout=WAIT_MS)
    assert len(viewer.layers) == n_layers and "heatmap: Cardiomegaly" not in viewer.layers
    heat = viewer.layers["heatmap: Pleural effusion"]
    outside = np.asarray(organs.data) == 0
    assert outside.any() and np.all(heat.data[outside] == heat.contrast_limits[0])
    assert heat.data[~outside].max() == pytest.approx(heat.contrast_limits[1])
    assert heat.colorbar.visible  # the legend on the canvas
    assert widget.heatmap_legend.isVisibleTo(widget) and "Pleural effusion" in widget.heatmap_legend.text()


def test_a_new_detection_hides_the_old_heatmap_and_reuses_its_layer(ct_viewer, qtbot, tiny_checkpoint,
                                                                    make_detect_widget):
    """The previous result's heatmap is hidden and emptied (not removed: napari's removal freezes the GUI
    for a garbage collection); the next row click shows the new result's heatmap in the same layer."""
    from napari_ctvlp.widgets.detect_widget import HEATMAP_IDLE_NAME

    viewer = ct_viewer
    ct = viewer.layers["ct"]
    widget = make_detect_widget(viewer, tiny_checkpoint)
    _detect(widget, qtbot)
    table = widget.results_table
    _click_row(qtbot, table, table.find_row("heart", "Cardiomegaly"))
    qtbot.waitUntil(lambda: "heatmap: Cardiomegaly" in viewer.layers, timeout=WAIT_MS)
    layer = viewer.layers["heatmap: Cardiomegaly"]
    n_layers = len(viewer.layers)

    _detect(widget, qtbot)
    assert len(viewer.layers) == n_layers and layer in viewer.layers
    assert not layer.visible and layer.name == HEATMAP_IDLE_NAME and layer.data.size == 1
    assert not layer.metadata.get("ctvlp_heatmap") and "heatmap: Cardiomegaly" not in viewer.layers
    assert widget.export_panel is not None and not widget._heatmaps  # nothing stale to export

    _click_row(qtbot, widget.results_table, widget.results_table.find_row("lung", "Pleural effusion"))
    qtbot.waitUntil(lambda: "heatmap: Pleural effusion" in viewer.layers, timeout=WAIT_MS)
    assert viewer.layers["heatmap: Pleural effusion"] is layer and layer.visible
    assert layer.data.shape == ct.data.shape
    np.testing.assert_allclose(layer.scale, ct.scale)
    np.testing.assert_allclose(layer.translate, ct.translate)


def test_prompt_scores_robustness_and_prompt_heatmap(ct_viewer, qtbot, tiny_checkpoint, make_detect_widget):
    viewer = ct_viewer
    widget = make_detect_widget(viewer, tiny_checkpoint)
    panel = widget.prompt_panel
    assert not panel.score_button.isEnabled()  # nothing to score before a detection
    _detect(widget, qtbot)
    assert panel.score_button.isEnabled()

    qtbot.keyClicks(panel.prompt_edit, "small left pleural effusion")
    qtbot.keyClick(panel.prompt_edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: panel.task is not None and panel.task.finished, timeout=WAIT_MS)
    assert panel.task.outcome.ok, panel.task.outcome.error
    assert panel.score_table.rowCount() == 7
    anatomies = {panel.score_table.item(r, 0).text() for r in range(7)}
    assert {"lung", "heart", "aorta"} <= anatomies
    for s in panel.last_scores:
        assert 0.0 <= s.probability <= 1.0

    panel.paraphrase_edit.setPlainText("Fluid collects around the left lung.\n\nThe pleural space holds fluid.")
    qtbot.mouseClick(panel.robustness_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.task.finished, timeout=WAIT_MS)
    assert panel.task.outcome.ok, panel.task.outcome.error
    rob = panel.last_robustness
    assert panel.score_table.rowCount() == 7  # robustness columns added to the per-anatomy table
    assert sorted(panel.flipped_anatomies()) == sorted(row.anatomy for row in rob.rows if row.flips)
    lung = next(r for r in range(7) if panel.score_table.item(r, 0).text() == "lung")
    assert "+-" in panel.score_table.item(lung, 2).text()
    assert panel.variants_table.rowCount() == 7 * (6 + 2)  # 6 templates + 2 paraphrases per anatomy
    prompts = {panel.variants_table.item(r, 0).text().lstrip("\u26a0 ") for r in range(panel.variants_table.rowCount())}
    assert "Fluid collects around the left lung." in prompts
    for row in rob.rows:
        assert 0.0 <= row.mean <= 1.0 and row.std >= 0.0
    assert len(panel.flipped_rows()) == sum(row.flips for row in rob.rows)
    for table in (panel.score_table, panel.variants_table):  # full cell texts in tooltips
        for r in range(table.rowCount()):
            for c in range(table.columnCount()):
                item = table.item(r, c)
                assert item is not None and item.text() in item.toolTip(), (r, c, item.text(), item.toolTip())

    qtbot.mouseClick(panel.heatmap_button, Qt.MouseButton.LeftButton)
    name = "heatmap: prompt: small left pleural effusion"
    qtbot.waitUntil(lambda: name in viewer.layers, timeout=WAIT_MS)
    assert viewer.layers[name].data.shape == viewer.layers["ct"].data.shape
    assert [lyr.name for lyr in viewer.layers if lyr.metadata.get("ctvlp_heatmap")] == [name]  # one layer


def test_export_round_trip_never_overwrites_without_asking(ct_viewer, qtbot, tiny_checkpoint, tmp_path, phantom,
                                                           make_detect_widget):
    import nibabel as nib

    volume, organs = phantom
    widget = make_detect_widget(ct_viewer, tiny_checkpoint)
    with pytest.raises(RuntimeError):
        widget.export_results(tmp_path / "early")
    _detect(widget, qtbot)
    out = tmp_path / "export"
    files = widget.export_results(out, overwrite=False)
    names = {p.name for p in files}
    assert {"results.csv", "results.json", "organs.nii.gz", "organs.json", "organ_stats.csv"} <= names
    assert all(p.is_file() for p in files)
    img = nib.load(out / "organs.nii.gz")
    np.testing.assert_allclose(img.affine, volume.affine, atol=1e-5)
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), organs)
    stats = (out / "organ_stats.csv").read_text().splitlines()
    assert stats[0].startswith("region,volume_ml,mean_hu") and any(line.startswith("heart,") for line in stats)

    stamp = {p: p.stat().st_mtime_ns for p in files}
    (out / "results.csv").write_text("user edit")
    with pytest.raises(FileExistsError):
        widget.export_results(out, overwrite=False)
    assert (out / "results.csv").read_text() == "user edit"

    # the Export button asks first: "No" keeps the files, "Yes" replaces them
    panel = widget.export_panel
    panel.folder_edit.setText(str(out))
    asked = []
    panel.confirm_overwrite = lambda existing: asked.append(existing) or False
    qtbot.mouseClick(panel.export_button, Qt.MouseButton.LeftButton)
    assert asked and (out / "results.csv").read_text() == "user edit"
    panel.confirm_overwrite = lambda existing: True
    qtbot.mouseClick(panel.export_button, Qt.MouseButton.LeftButton)
    assert (out / "results.csv").read_text().startswith("anatomy,abnormality,probability")
    assert all(p.stat().st_mtime_ns >= stamp[p] for p in files)


def test_cancel_stops_the_run_without_adding_layers(ct_viewer, qtbot, tiny_checkpoint, make_detect_widget):
    viewer = ct_viewer
    widget = make_detect_widget(viewer, tiny_checkpoint)
    reached, release = threading.Event(), threading.Event()

    def hook(done, total, message):  # runs in the worker thread: pause at the segmentation stage
        if message == "segmentation":
            reached.set()
            release.wait(30)

    widget.progress_hook = hook
    before = _snapshot(viewer)
    qtbot.mouseClick(widget.detect_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(reached.is_set, timeout=WAIT_MS)
    assert widget.busy and widget.cancel_button.isEnabled() and not widget.detect_button.isEnabled()
    qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)
    assert widget.task.cancel_event.is_set()
    release.set()
    qtbot.waitUntil(lambda: widget.task.finished, timeout=WAIT_MS)
    assert type(widget.task.outcome.error).__name__ == "DetectionCancelled"
    assert widget.result is None
    assert _same_layers(viewer, before)
    assert widget.detect_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.messages[-1][0] == "info" and "cancel" in widget.messages[-1][1].lower()


def test_errors_become_notifications_and_keep_layers(ct_viewer, make_napari_viewer, qtbot, tiny_checkpoint, tmp_path,
                                                     make_detect_widget):
    from napari.utils.notifications import notification_manager

    # no image layer at all
    empty = make_napari_viewer()
    empty.add_points(np.zeros((2, 3)), name="pts")
    widget = DetectWidget(empty)
    qtbot.addWidget(widget)
    n = len(notification_manager.records)
    qtbot.mouseClick(widget.detect_button, Qt.MouseButton.LeftButton)
    assert widget.task is None
    assert len(notification_manager.records) > n
    assert "No CT image layer" in str(notification_manager.records[-1].message)

    # a broken checkpoint folder: the run fails in the worker, notification, layers intact
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    viewer = ct_viewer
    widget = make_detect_widget(viewer, broken)
    before = _snapshot(viewer)
    n = len(notification_manager.records)
    _detect(widget, qtbot)
    assert not widget.task.outcome.ok
    assert widget.messages[-1][0] == "error"
    assert len(notification_manager.records) > n
    assert _same_layers(viewer, before)

    # a mask layer of the wrong shape: refused before any work starts
    viewer.add_labels(np.zeros((4, 4, 4), dtype=np.uint8), name="small mask")
    widget.set_checkpoint(tiny_checkpoint)
    widget.labels_combo.setCurrentText("small mask")
    before = _snapshot(viewer)
    widget.task = None
    qtbot.mouseClick(widget.detect_button, Qt.MouseButton.LeftButton)
    assert widget.task is None and "shape" in widget.messages[-1][1]
    assert _same_layers(viewer, before)


def test_run_blocking_and_export_as_in_the_demo(ct_viewer, qtbot, tiny_checkpoint, tmp_path, make_detect_widget):
    widget = make_detect_widget(ct_viewer, tiny_checkpoint)
    result = widget.run_blocking(timeout=60)
    assert result is not None and result is widget.result
    assert not any(math.isnan(v) for v in [r["std"] for r in result.rows() if r["assessable"]])
    files = widget.export_results(tmp_path / "demo", overwrite=True)
    assert (tmp_path / "demo" / "results.json").is_file() and files


def test_out_of_memory_and_2d_layer_are_reported(ct_viewer, qtbot, tiny_checkpoint, make_detect_widget):
    viewer = ct_viewer
    widget = make_detect_widget(viewer, tiny_checkpoint)

    def hook(done, total, message):  # the allocation fails inside the engine's worker thread
        if message == "image features":
            raise MemoryError("cannot allocate 80 GiB")

    widget.progress_hook = hook
    before = _snapshot(viewer)
    _detect(widget, qtbot)
    level, text = widget.messages[-1]
    assert level == "error" and "Out of memory" in text
    assert _same_layers(viewer, before) and widget.result is None

    viewer.add_image(np.zeros((20, 30), dtype=np.float32), name="slice")
    widget.image_combo.setCurrentText("slice")
    widget.task = None
    qtbot.mouseClick(widget.detect_button, Qt.MouseButton.LeftButton)
    assert widget.task is None and "3D" in widget.messages[-1][1]


@pytest.mark.realdata
def test_real_ct_with_totalsegmentator_labels_layer(make_napari_viewer, qtbot, tiny_checkpoint, realdata,
                                                    make_detect_widget):
    from napari_ctvlp._layers import organ_labels_layer
    from napari_ctvlp.engine.segmentation import from_label_file

    viewer = make_napari_viewer()
    (ct,) = viewer.open(str(realdata / "example_ct.nii.gz"), plugin="napari-ctvlp")
    volume = ct.metadata["ctvlp_volume"]
    seg = from_label_file(realdata / "example_seg_fast_force_split.nii.gz", like=volume, kind="totalseg")
    data, kwargs, _ = organ_labels_layer(seg.labels, volume, name="reference organs")
    viewer.add_labels(data, **kwargs)
    widget = make_detect_widget(viewer, tiny_checkpoint)
    widget.image_combo.setCurrentText(ct.name)
    _detect(widget, qtbot)
    assert widget.task.outcome.ok, widget.task.outcome.error
    organs = viewer.layers[f"{ct.name} organs (detected)"]
    np.testing.assert_allclose(organs.scale, ct.scale)
    np.testing.assert_allclose(organs.translate, ct.translate)
    assert np.array_equal(organs.data, seg.labels)
    assert widget.results_table.rowCount() == N_ROWS


def test_prompt_heatmap_of_a_prompt_evidence_checkpoint_is_its_cell_map(ct_viewer, qtbot, tmp_path,
                                                                       make_detect_widget):
    """With a prompt evidence head the prompt heatmap is the head's cell map of the prompt, 0 outside
    the organs, and the legend says what it shows (not an attention map)."""
    import torch

    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    torch.manual_seed(0)
    cfg = CTVLPConfig.tiny(stem="conv", feature_stride=8, statistics_edges=(-0.9, -0.5, 0.0, 0.05, 0.5),
                           texture_statistics=True, prompt_evidence=True)
    model = CTVLP(cfg).eval()
    with torch.no_grad():
        for p in model.prompt_evidence.parameters():  # away from the zero start: a map with contrast
            p.normal_(0.0, 0.5)
    prep = {"image_size": [32, 32, 32], "spacing_mm": [6.0, 6.0, 6.0], "hu_window": [-1000.0, 1000.0]}
    ckpt = save_checkpoint(model, tmp_path / "pe", preprocessing=prep, model_card="# Tiny\n\nTest only.\n")
    viewer = ct_viewer
    organs = np.asarray(viewer.layers["reference organs"].data)
    widget = make_detect_widget(viewer, ckpt)
    _detect(widget, qtbot)
    panel = widget.prompt_panel
    qtbot.keyClicks(panel.prompt_edit, "pleural effusion")
    qtbot.keyClick(panel.prompt_edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: panel.task is not None and panel.task.finished, timeout=WAIT_MS)
    assert panel.task.outcome.ok, panel.task.outcome.error
    qtbot.mouseClick(panel.heatmap_button, Qt.MouseButton.LeftButton)
    name = "heatmap: prompt: pleural effusion"
    qtbot.waitUntil(lambda: name in viewer.layers, timeout=WAIT_MS)
    heat = viewer.layers[name]
    outside = organs == 0
    assert np.all(heat.data[outside] == heat.contrast_limits[0])
    assert float(np.ptp(heat.data[~outside])) > 0
    legend = widget.heatmap_legend.text()
    assert "what the sentence says" in legend and "Not a lesion outline" in legend
