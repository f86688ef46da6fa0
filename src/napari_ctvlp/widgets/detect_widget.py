"""Dock widget "CT abnormality detection": pick a CT, a model and a segmentation, detect.

Detection runs :func:`napari_ctvlp.engine.pipeline.detect` in a napari thread worker with a
progress bar and a Cancel button. Results appear as an organ Labels layer (aligned with the
CT), a sortable results table (click a row: the view centres on the anatomy and its attention
heatmap is shown), a free-text prompt panel and an export panel. Errors become napari
notifications; the user's layers are never modified.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_ctvlp.widgets import _engine
from napari_ctvlp.widgets._worker import Outcome, Task
from napari_ctvlp.widgets.export_panel import ExportPanel, export_detection, organ_statistics_rows
from napari_ctvlp.widgets.organ_table import OrganStatsPanel
from napari_ctvlp.widgets.prompt_panel import PromptPanel
from napari_ctvlp.widgets.results_table import ResultsTable

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

LABELS_LAYER_CHOICE = "Labels layer..."
NO_OPERATING_POINTS_NOTICE = ("This checkpoint stores no operating points: probabilities only, no positive/negative "
                              "call (no operating point for any finding).")
_LABELS_KEY = "__labels_layer__"
#: metadata key marking layers this widget created (never offered as inputs)
OWN_LAYER_KEY = "ctvlp_widget_layer"
_GEOMETRY = ("scale", "translate", "rotate", "shear", "affine")
#: name of our heatmap layer while it waits, hidden, for a row click on a new result
HEATMAP_IDLE_NAME = "heatmap (click a result row)"


def layer_kind_hint(layer: Any) -> str | None:
    """What a mask layer's values are, when its metadata says so (``"organ"``/``"totalseg"``)."""
    kind = layer.metadata.get("ctvlp_label_kind")
    return str(kind) if kind else None


def show_scale_bar(viewer: Any) -> None:
    """Show the viewer's scale bar (its unit follows the layers' units: mm for our CT layers)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)  # napari >= 0.9
    bar = getattr(overlays, "scale_bar", None) if overlays is not None else None
    if bar is None:
        bar = viewer.scale_bar
    bar.visible = True


def _notify(level: str, message: str) -> None:
    from napari.utils.notifications import show_error, show_info, show_warning

    {"error": show_error, "warning": show_warning}.get(level, show_info)(message)


class DetectWidget(QWidget):
    """Zero-shot abnormality detection on a CT image layer.

    Args:
        viewer: the napari viewer (napari passes it when the widget is opened from the menu).

    Sub-widgets are public attributes so tests and scripts can drive them: ``image_combo``,
    ``checkpoint_combo``, ``browse_checkpoint_button``, ``model_card_text``,
    ``segmentation_combo``, ``labels_combo``, ``device_combo``, ``detect_button``,
    ``cancel_button``, ``progress_bar``, ``status_label``, ``model_notice``, ``input_notice``,
    ``segmentation_notice``, ``heatmap_legend``, ``results_table``, ``primary_only_check``,
    ``prompt_panel``, ``organ_panel``, ``export_panel``; ``progress_hook`` observes a run from the
    worker thread.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ctvlp_detect_widget")
        self.viewer = viewer
        self.result: Any = None
        self.task: Task | None = None
        self.messages: list[tuple[str, str]] = []
        self._run_info: dict[str, Any] = {}
        self._organ_layer: Any = None
        self._centroids: dict[str, np.ndarray | None] = {}
        self._heatmaps: dict[str, Any] = {}
        self._heatmap_layer: Any = None
        self._heatmap_tasks: list[Task] = []
        #: called as ``hook(done, total, message)`` in the worker thread before each progress
        #: update (scripts, benchmarks and tests use it to observe or pause a run)
        self.progress_hook: Any = None
        self._hooked_layers: weakref.WeakSet = weakref.WeakSet()
        self._stages: tuple[str, ...] = ()
        self._stage: str | None = None

        # ---- inputs
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("CT image layer to analyse (3D Image layers only)")
        self.checkpoint_combo = QComboBox()
        self.checkpoint_combo.setToolTip("model checkpoint folder (model.safetensors + config.json)")
        self.browse_checkpoint_button = QPushButton("Browse...")
        self.browse_checkpoint_button.clicked.connect(self._browse_checkpoint)
        ckpt_row = QHBoxLayout()
        ckpt_row.addWidget(self.checkpoint_combo, 1)
        ckpt_row.addWidget(self.browse_checkpoint_button)
        self.model_card_text = QPlainTextEdit()
        self.model_card_text.setReadOnly(True)
        self.model_card_text.setMaximumHeight(160)
        self.model_notice = QLabel("")
        self.model_notice.setObjectName("ctvlp_model_notice")
        self.model_notice.setWordWrap(True)
        self.model_notice.setStyleSheet("QLabel { color: #ffb000; font-weight: bold; }")
        from superqt import QCollapsible

        self.model_card_box = QCollapsible("Model card")
        self.model_card_box.addWidget(self.model_card_text)
        self.segmentation_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Labels layer with organ labels (values of the organ table) on the CT grid")
        self.device_combo = QComboBox()

        form = QFormLayout()
        form.addRow("CT image", self.image_combo)
        form.addRow("Checkpoint", ckpt_row)
        form.addRow(self.model_notice)
        form.addRow(self.model_card_box)
        form.addRow("Segmentation", self.segmentation_combo)
        form.addRow("Mask layer", self.labels_combo)
        form.addRow("Device", self.device_combo)
        self._form = form

        self.detect_button = QPushButton("Detect abnormalities")
        self.detect_button.clicked.connect(self.start_detection)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.detect_button, 1)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("ctvlp_progress")
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setVisible(False)
        self.status_label = QLabel("Choose a CT image layer and press Detect.")
        self.status_label.setWordWrap(True)
        self.input_notice = QLabel("")
        self.input_notice.setObjectName("ctvlp_input_notice")
        self.input_notice.setWordWrap(True)
        self.input_notice.setStyleSheet("QLabel { color: #ffb000; }")
        self.input_notice.setVisible(False)
        self.heatmap_legend = QLabel("")
        self.heatmap_legend.setObjectName("ctvlp_heatmap_legend")
        self.heatmap_legend.setWordWrap(True)
        self.heatmap_legend.setVisible(False)
        self.segmentation_notice = QLabel("")
        self.segmentation_notice.setObjectName("ctvlp_segmentation_notice")
        self.segmentation_notice.setWordWrap(True)
        self.segmentation_notice.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        # ---- outputs
        self.results_table = ResultsTable()
        self.results_table.row_activated.connect(self.show_row)
        self.prompt_panel = PromptPanel(notify=self._message)
        self.prompt_panel.heatmap_ready.connect(self._show_heatmap)
        self.export_panel = ExportPanel(self._export_source, notify=self._message)
        self.organ_panel = OrganStatsPanel(notify=self._message)
        self.primary_only_check = QCheckBox("only each abnormality's own anatomy (bold rows)")
        self.primary_only_check.toggled.connect(self.results_table.set_primary_only)
        # a clinician first wants each finding in its own organ (18 rows); untick for the full matrix
        self.primary_only_check.setChecked(True)
        results_page = QWidget()
        results_layout = QVBoxLayout(results_page)
        results_layout.setContentsMargins(0, 0, 0, 0)
        results_layout.addWidget(self.primary_only_check)
        self.calls_notice = QLabel(NO_OPERATING_POINTS_NOTICE)
        self.calls_notice.setObjectName("ctvlp_calls_notice")
        self.calls_notice.setWordWrap(True)
        self.calls_notice.setVisible(False)
        results_layout.addWidget(self.calls_notice)
        results_layout.addWidget(self.results_table)
        results_layout.addWidget(self.heatmap_legend)
        self.tabs = QTabWidget()
        self.tabs.addTab(results_page, "Results")
        self.tabs.addTab(self.prompt_panel, "Prompts")
        self.tabs.addTab(self.organ_panel, "Organs")
        self.tabs.addTab(self.export_panel, "Export")

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.input_notice)
        layout.addWidget(self.segmentation_notice)
        layout.addWidget(self.tabs, 1)

        show_scale_bar(viewer)
        self._fill_checkpoints()
        self._fill_segmentation()
        self._fill_devices()
        self.checkpoint_combo.currentIndexChanged.connect(self._update_model_card)
        self.segmentation_combo.currentIndexChanged.connect(self._update_labels_visibility)
        self.segmentation_combo.currentIndexChanged.connect(self._update_segmentation_notice)
        self.labels_combo.currentIndexChanged.connect(self._update_segmentation_notice)
        self._update_model_card()
        self.refresh_layers()
        self._update_labels_visibility()
        self._update_segmentation_notice()
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed,
                      viewer.layers.events.moved, viewer.layers.events.changed):
            event.connect(self.refresh_layers)

    # ------------------------------------------------------------------------ pickers
    def _message(self, level: str, text: str) -> None:
        self.messages.append((level, text))
        self.status_label.setText(text)
        _notify(level, text)

    def _input_layers(self, kind: str) -> list[Any]:
        return [layer for layer in self.viewer.layers
                if _engine.layer_kind(layer) == kind and not layer.metadata.get(OWN_LAYER_KEY)]

    def refresh_layers(self, event: Any = None) -> None:
        """Re-list the Image and Labels layers (called when layers are added/removed/renamed)."""
        for combo, kind in ((self.image_combo, "image"), (self.labels_combo, "labels")):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            for layer in self._input_layers(kind):
                combo.addItem(layer.name)
                if layer not in self._hooked_layers:
                    layer.events.name.connect(self.refresh_layers)
                    self._hooked_layers.add(layer)
            idx = combo.findText(current)
            combo.setCurrentIndex(idx if idx >= 0 else (0 if combo.count() else -1))
            combo.blockSignals(False)

    def _fill_checkpoints(self) -> None:
        path = _engine.default_checkpoint()
        if path is not None:
            self.checkpoint_combo.addItem(f"demo model ({path.name})", str(path))
        else:
            self.checkpoint_combo.addItem("(no demo model shipped: Browse...)", None)

    def set_checkpoint(self, path: str | Path) -> None:
        """Add a checkpoint folder to the picker and select it."""
        path = str(Path(path).expanduser())
        idx = self.checkpoint_combo.findData(path)
        if idx < 0:
            self.checkpoint_combo.addItem(Path(path).name or path, path)
            idx = self.checkpoint_combo.count() - 1
            self.checkpoint_combo.setItemData(idx, path, Qt.ItemDataRole.ToolTipRole)
        self.checkpoint_combo.setCurrentIndex(idx)

    def _browse_checkpoint(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Checkpoint folder")
        if folder:
            self.set_checkpoint(folder)

    def _update_model_card(self) -> None:
        path = self.checkpoint_combo.currentData()
        self.model_card_text.setPlainText(_engine.model_card_text(path))
        notice = _engine.model_notice(path)
        self.model_notice.setText(notice or "")
        self.model_notice.setVisible(bool(notice))

    def _update_segmentation_notice(self) -> None:
        """Say which segmentation the next run will use (after a run: the one it used)."""
        choice = self.segmentation_combo.currentData()
        if choice == _LABELS_KEY:
            backend, layer = "file", self.labels_combo.currentText() or None
        else:
            backend, layer = (_engine.auto_backend() if choice == "auto" else choice), None
        self.segmentation_notice.setText(_engine.segmentation_notice(backend, mask_layer=layer, planned=True))

    def _fill_segmentation(self) -> None:
        combo = self.segmentation_combo
        combo.addItem("auto", "auto")
        combo.setItemData(0, "first available: TotalSegmentator, built-in, threshold", Qt.ItemDataRole.ToolTipRole)
        for name, text, ready, tip in _engine.segmentation_picker_items():
            combo.addItem(text, name)
            idx = combo.count() - 1
            combo.setItemData(idx, tip, Qt.ItemDataRole.ToolTipRole)
            if not ready:
                combo.model().item(idx).setEnabled(False)
        combo.addItem(LABELS_LAYER_CHOICE, _LABELS_KEY)
        combo.setItemData(combo.count() - 1, "use an existing Labels layer as the organ mask",
                          Qt.ItemDataRole.ToolTipRole)

    def set_segmentation(self, choice: str) -> None:
        """Select a backend name, ``"auto"`` or :data:`LABELS_LAYER_CHOICE`."""
        combo = self.segmentation_combo
        idx = combo.findText(choice) if choice == LABELS_LAYER_CHOICE else combo.findData(choice)
        if idx < 0:
            raise ValueError(f"unknown segmentation choice {choice!r}")
        self.segmentation_combo.setCurrentIndex(idx)

    def _update_labels_visibility(self) -> None:
        use_layer = self.segmentation_combo.currentData() == _LABELS_KEY
        self._form.setRowVisible(self.labels_combo, use_layer)

    def _fill_devices(self) -> None:
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        reason = _engine.cuda_unavailable_reason()
        if reason:
            self.device_combo.model().item(2).setEnabled(False)
            self.device_combo.setItemData(2, reason, Qt.ItemDataRole.ToolTipRole)

    # ----------------------------------------------------------------------- detection
    @property
    def busy(self) -> bool:
        """True while a detection runs (a cancelled one no longer counts: its result is dropped)."""
        return self.task is not None and not self.task.finished and not self.task.cancel_event.is_set()

    def _layer(self, name: str) -> Any | None:
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _prepare(self) -> dict[str, Any] | None:
        """Collect the inputs on the GUI thread; None (with a notification) when something is wrong."""
        layer = self._layer(self.image_combo.currentText())
        if layer is None:
            self._message("error", "No CT image layer: open a CT (File > Open) or a sample first.")
            return None
        mask_kind: str | None = None
        mask_name: str | None = None
        try:
            volume = _engine.layer_volume(layer)
            segmentation: Any = self.segmentation_combo.currentData()
            if segmentation == _LABELS_KEY:
                mask_layer = self._layer(self.labels_combo.currentText())
                if mask_layer is None:
                    raise ValueError("'Labels layer...' is selected but there is no Labels layer")
                segmentation = _engine.layer_mask(mask_layer, volume, ct_layer=layer)
                mask_kind = layer_kind_hint(mask_layer)
                mask_name = mask_layer.name
        except ValueError as exc:
            self._message("error", str(exc))
            return None
        warning = _engine.input_warning(volume)
        self.input_notice.setText(warning or "")
        self.input_notice.setVisible(bool(warning))
        if warning:
            self._message("warning", warning)
        geometry = {k: np.array(getattr(layer, k)) if k != "affine" else layer.affine for k in _GEOMETRY}
        geometry["units"] = layer.units
        geometry["axis_labels"] = layer.axis_labels
        return {"layer_name": layer.name, "volume": volume, "segmentation": segmentation, "mask_kind": mask_kind,
                "mask_layer": mask_name,
                "checkpoint": self.checkpoint_combo.currentData(), "device": self.device_combo.currentText(),
                "geometry": geometry, "display": _engine.layer_display(layer, volume)}

    def start_detection(self) -> Task | None:
        """The Detect button: start a detection in a worker; returns its task (None if not started)."""
        if self.busy:
            return None
        info = self._prepare()
        if info is None:
            return None
        self._run_info = info

        hook = self.progress_hook
        extras: dict[str, Any] = {}

        def work(progress, cancel):
            def report(done: int, total: int, message: str) -> None:
                if hook is not None:
                    hook(done, total, message)
                if cancel.is_set():  # stop at the engine's next report, also inside a long stage
                    raise _engine.cancelled(message)
                progress(done, total, message)

            # model, then organs with the backend's own steps reported (a cancel stops inside them)
            segmentation = _engine.prepare_segmentation(
                info["volume"], info["segmentation"], checkpoint=info["checkpoint"], device=info["device"],
                mask_kind_hint=info["mask_kind"], progress=report)
            result = _engine.run_detection(info["volume"], checkpoint=info["checkpoint"],
                                           segmentation=segmentation, device=info["device"],
                                           progress=report, cancel=cancel)
            extras["centroids"] = _engine.result_centroids(result)  # here, not in the GUI thread
            return result

        task: Task | None = None

        def done(outcome: Outcome) -> None:
            if task is self.task and not task.cancel_event.is_set():
                self._detection_done(outcome, centroids=extras.get("centroids"))
            # a cancelled run already told the user and freed the widget: its outcome is dropped

        task = Task(work, on_done=done, desc="Detecting abnormalities", start=False, on_progress=self._on_progress)
        self.task = task
        self._stages = _engine.detection_stages()
        self._stage = None
        self.progress_bar.setRange(0, len(self._stages))
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("starting...")
        self._set_busy(True)
        self.status_label.setText(f"Detecting abnormalities in {info['layer_name']}...")
        self.task.worker.start()
        return self.task

    def _on_progress(self, done: int, total: int, message: str) -> None:
        """Progress of the running detection (GUI thread): stage bar, sub-step in its text."""
        stages = self._stages
        if message in stages:
            index = stages.index(message)
            if self._stage in stages and index < stages.index(self._stage):
                return  # detect() passes quickly through the stages the widget ran before it
            self._stage = message
            self.progress_bar.setValue(index)
            self.progress_bar.setFormat(f"{message} ({index + 1}/{len(stages)})")
        elif self._stage:
            self.progress_bar.setFormat(f"{self._stage}: {message}")

    def cancel(self) -> None:
        """The Cancel button: stop the running detection.

        The widget is free again at once and nothing of the run will be added; the engine stops at
        its next progress report (the worker ends shortly after, its outcome is dropped).
        """
        if self.busy:
            self.task.cancel()
            self._set_busy(False)
            level, text = _engine.describe_error(_engine.cancelled("cancel"))
            self._message(level, text)
            if self.result is not None:
                self.prompt_panel.set_scorer(_engine.ResultScorer(self.result))

    def _set_busy(self, busy: bool) -> None:
        self.detect_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.progress_bar.setVisible(busy)
        self.export_panel.export_button.setEnabled(not busy)
        if busy:
            self.prompt_panel.set_scorer(None)

    def _detection_done(self, outcome: Outcome, *, centroids: dict[str, Any] | None = None) -> None:
        self._set_busy(False)
        if not outcome.ok:
            level, text = _engine.describe_error(outcome.error)
            self._message(level, text)
            if self.result is not None:
                self.prompt_panel.set_scorer(_engine.ResultScorer(self.result))
            return
        self.result = outcome.value
        self._centroids = dict(centroids or {})  # empty: centre_on computes them
        self._show_result(outcome.seconds)

    def _show_result(self, seconds: float) -> None:
        info, result = self._run_info, self.result
        keep = self._heatmap_layer if self._heatmap_layer in self.viewer.layers else None
        for layer in [lyr for lyr in self.viewer.layers if lyr.metadata.get("ctvlp_heatmap")
                      and lyr.metadata.get(OWN_LAYER_KEY) and lyr is not keep]:
            self.viewer.layers.remove(layer)  # stray heatmaps of the previous result (ours only)
        if keep is not None:
            # the previous result's heatmap: hidden and emptied for reuse, not removed (napari's layer
            # removal runs a full garbage collection: 0.2-0.4 s of frozen GUI)
            keep.visible = False
            keep.metadata = {**keep.metadata, "ctvlp_heatmap": None}
            keep.data = np.zeros((1,) * keep.ndim, dtype=np.float32)
            keep.name = HEATMAP_IDLE_NAME
            for key, value in info["geometry"].items():  # on the new CT's grid, like the organ layer
                setattr(keep, key, value)
        self._heatmaps = {}
        self._heatmap_layer = keep
        self.heatmap_legend.setVisible(False)
        labels, names = _engine.result_labels(result)
        self._organ_layer = self._put_layer(
            f"{info['layer_name']} organs (detected)", "labels", labels,
            _engine.organ_layer_kwargs(labels, info["volume"], names), replace_data=True)
        rows = _engine.result_rows(result)
        self.results_table.set_rows(rows, demo_model=_engine.model_notice(info.get("checkpoint")) is not None)
        has_ops = any(r.threshold is not None for r in rows)
        self.results_table.show_calls(has_ops)
        self.calls_notice.setVisible(not has_ops)
        self.prompt_panel.set_scorer(_engine.ResultScorer(result))
        self.organ_panel.set_rows(organ_statistics_rows(self._export_source()))
        n = self.results_table.rowCount()
        backend = _engine.backend_name(result)
        self.status_label.setText(f"{n} results in {seconds:.1f} s (segmentation: {backend}). "
                                  "Click a row to see its anatomy and heatmap.")
        mask = info.get("mask_layer") if backend == "file" else None
        self.segmentation_notice.setText(_engine.segmentation_notice(backend, mask_layer=mask))
        self.tabs.setCurrentIndex(0)

    def _put_layer(self, name: str, kind: str, data: np.ndarray, kwargs: dict[str, Any], *,
                   replace_data: bool) -> Any:
        """Add a layer of volume-grid ``data`` shown like the CT, or replace the data of the one we added before."""
        data = self._run_info["display"].to_display(data)
        geometry = self._run_info["geometry"]
        kwargs = {**kwargs, **{k: v for k, v in geometry.items()}, "name": name}
        kwargs["metadata"] = {**kwargs.get("metadata", {}), OWN_LAYER_KEY: True}
        existing = self._layer(name)
        if existing is not None and existing.metadata.get(OWN_LAYER_KEY) and replace_data:
            existing.data = data
            if "contrast_limits" in kwargs:
                existing.contrast_limits = kwargs["contrast_limits"]
            existing.visible = True
            return existing
        return getattr(self.viewer, f"add_{kind}")(data, **kwargs)

    # ------------------------------------------------------------------ row / heatmaps
    def show_row(self, anatomy: str, abnormality: str) -> Task | None:
        """Centre the view on ``anatomy`` and show the heatmap of ``abnormality``.

        The heatmap is computed in a worker (returned task) unless it was shown before.
        """
        if self.result is None:
            return None
        self.centre_on(anatomy)
        if abnormality in self._heatmaps:
            self._show_heatmap(abnormality, self._heatmaps[abnormality])
            return None
        result = self.result

        def done(outcome: Outcome) -> None:
            if result is not self.result:
                return  # a newer detection replaced this one
            if outcome.ok:
                self._show_heatmap(outcome.value.name, outcome.value)
                self.status_label.setText(f"{abnormality}: heatmap shown, view centred on the {anatomy}")
            else:
                self._message("error", f"Heatmap of {abnormality} failed: {outcome.error}")

        self._heatmap_tasks = [t for t in self._heatmap_tasks if not t.finished]
        task = Task(lambda progress, cancel: _engine.row_heatmap(result, anatomy, abnormality), on_done=done)
        self._heatmap_tasks.append(task)
        self.status_label.setText(f"computing the heatmap of {abnormality}...")
        return task

    def centre_on(self, anatomy: str) -> np.ndarray | None:
        """Move the camera and the slider to the centroid of ``anatomy``; returns world coordinates."""
        if not self._centroids:
            self._centroids = _engine.result_centroids(self.result)
        centroid = self._centroids.get(anatomy)
        if centroid is None:
            self.status_label.setText(f"the {anatomy} is not in the organ mask")
            return None
        layer = self._organ_layer
        shown = self._run_info["display"].index_to_display(centroid)
        world = np.asarray(layer.data_to_world(shown) if layer is not None else shown, dtype=float)
        ndim = self.viewer.dims.ndim
        world_nd = world[-ndim:] if ndim <= world.size else np.concatenate([np.zeros(ndim - world.size), world])
        self.viewer.dims.set_point(range(ndim), tuple(world_nd))
        displayed = list(self.viewer.dims.displayed)
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9 moved the camera to viewer.scene
        camera = scene.camera if scene is not None else self.viewer.camera
        camera.center = tuple(world_nd[displayed])
        return world_nd

    def _show_heatmap(self, name: str, heat: Any) -> Any:
        """Show a heatmap in the one heatmap layer this widget keeps (replaced, renamed), with a colour bar."""
        if not isinstance(heat, _engine.Heatmap):  # a plain array (scripts): mask and range it here
            labels = _engine.result_labels(self.result)[0] if self.result is not None else None
            heat = _engine.masked_heatmap(name, heat, labels)
        self._heatmaps[name] = heat
        kwargs = {"colormap": "inferno", "blending": "additive", "opacity": 0.5, "contrast_limits": heat.limits,
                  "metadata": {"ctvlp_heatmap": name}}
        layer = self._heatmap_layer
        title = f"heatmap: {name}"
        if layer is not None and layer in self.viewer.layers:
            layer.data = self._run_info["display"].to_display(heat.array)
            layer.contrast_limits_range = heat.limits
            layer.contrast_limits = heat.limits
            layer.metadata = {**layer.metadata, "ctvlp_heatmap": name}
            layer.visible = True
            if layer.name != title:
                layer.name = title
        else:
            if title in self.viewer.layers and not self.viewer.layers[title].metadata.get(OWN_LAYER_KEY):
                title = f"{title} (ctvlp)"  # never touch a user's layer of that name
            layer = self._put_layer(title, "image", heat.array, kwargs, replace_data=True)
            self._heatmap_layer = layer
        colorbar = getattr(layer, "colorbar", None)  # napari >= 0.6: the legend on the canvas
        if colorbar is not None and not colorbar.visible:
            # its first display builds a canvas overlay (~0.15 s): in the next event-loop turn, so
            # the GUI never freezes for the layer and its legend at once
            QTimer.singleShot(30, lambda: setattr(colorbar, "visible", True))
        lo, hi = heat.limits
        if getattr(heat, "kind", "attention") == "evidence":
            self.heatmap_legend.setText(
                f"Heatmap: {name}. Where in the organ the model's finding recognition sees it (evidence "
                f"from each voxel's HU, compartment and texture, 1 cm cells; {lo:.3g} dark .. {hi:.3g} bright, "
                f"colour bar at the top right); 0 outside the organ. Not a lesion outline.")
        elif getattr(heat, "kind", "attention") == "prompt_evidence":
            self.heatmap_legend.setText(
                f"Heatmap: {name}. Where the organ shows what the sentence says: the cell scores its "
                f"probability is computed from (each voxel's HU, compartment and texture, 1 cm cells; {lo:.3g} "
                f"dark .. {hi:.3g} bright, colour bar at the top right); 0 outside the organ. Not a lesion outline.")
        elif getattr(heat, "kind", "attention") == "attribution":
            self.heatmap_legend.setText(
                f"Heatmap: {name}. Which voxels of the organ raise the model's score for it (first-order "
                f"attribution through the organ's HU histogram and local features; {lo:.3g} dark .. "
                f"{hi:.3g} bright, colour bar at the top right); 0 outside the organ. Not a lesion outline.")
        else:
            self.heatmap_legend.setText(
                f"Heatmap: {name}. Attention of the model (arbitrary units, {lo:.3g} dark .. {hi:.3g} bright, "
                "colour bar at the top right); outside the body masked. It shows where the model looked, "
                "not a lesion outline.")
        self.heatmap_legend.setVisible(True)
        self.status_label.setText(f"{name}: heatmap shown")
        return layer

    # --------------------------------------------------------------------- scripting
    def run_blocking(self, *, timeout: float | None = None) -> Any:
        """Run detection on the selected image layer and wait (event loop running); return the result.

        Returns None when the run failed or was cancelled (a notification says why).
        """
        task = self.start_detection()
        if task is None:
            return None
        outcome = task.wait(timeout=timeout)
        return outcome.value if outcome.ok else None

    def _export_source(self) -> Any:
        if self.result is None:
            return None
        return _engine.export_source(self.result, extra_heatmaps={k: h.array for k, h in self._heatmaps.items()})

    def export_results(self, out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Export masks, results, heatmaps and statistics of the last detection to ``out_dir``.

        Raises:
            RuntimeError: no detection has run yet.
            FileExistsError: files exist and ``overwrite`` is False (nothing is written).
        """
        if self.result is None:
            raise RuntimeError("no detection results to export: run a detection first")
        return export_detection(self._export_source(), out_dir, overwrite=overwrite,
                                **self.export_panel.options())
