"""Latency of the napari detection widget: click "Detect" -> results shown, and re-prompt latency.

Cases:

* ``phantom``: a 128^3 chest phantom (napari_ctvlp.phantom, or a synthetic stand-in), its organ
  Labels layer used as the mask ("Labels layer...");
* ``real (labels)``: ``../shared/realdata/example_ct.nii.gz`` opened through the plugin's
  reader, with TotalSegmentator's ``example_seg_fast_force_split.nii.gz`` mapped to organ labels
  as a Labels-layer mask;
* ``real (threshold)``: the same CT with the HU-threshold segmentation backend.

For each: a first and a second click (the very first loads the checkpoint), measured from
the button click until the results table is filled and the organ layer added, then the time
from pressing Enter in the prompt box until the per-anatomy scores are shown (median of 5
new prompts), and a row click until its heatmap layer is shown.

Checkpoint: ``--checkpoint``, else the shipped demo model, else a freshly initialised
``CTVLPConfig.phantom_cpu()`` (said in the printout). Runs under a virtual display (Xvfb) when
there is none.

Usage: ``python benchmarks/widget_latency.py [--checkpoint DIR] [--device cpu] [--no-real]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import benchmark_checkpoint, benchmark_phantom

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
#: new texts for each case (the text-embedding cache would make repeated prompts free)
PROMPTS = {
    "phantom": ("small left pleural effusion", "enlarged heart", "ground-glass opacity in the right lung",
                "calcified aortic wall", "dilated esophagus"),
    "real": ("right lower lobe consolidation", "pericardial fluid", "emphysematous bullae in the apex",
             "a nodule in the left lower lobe", "mediastinal lymph node enlargement"),
    "real-threshold": ("bibasal atelectasis", "thickened bronchial walls", "aortic aneurysm",
                       "a central venous catheter", "honeycombing in both lungs"),
}


def _display():
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    from pyvirtualdisplay import Display

    display = Display(visible=False, size=(1600, 1000), color_depth=24)
    display.start()
    return display


def _wait(task, timeout: float = 600.0):
    outcome = task.wait(timeout=timeout)
    if not outcome.ok:
        raise RuntimeError(f"task failed: {outcome.error!r}")
    return outcome


class StallMonitor:
    """Longest gap between ticks of a 5 ms QTimer on the GUI thread: how long the GUI froze."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.last = time.perf_counter()
        self.longest = 0.0

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def __enter__(self) -> StallMonitor:
        self.last = time.perf_counter()
        self.longest = 0.0
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tick()
        self.timer.stop()


def _settle(seconds: float = 0.5) -> None:
    """Run the event loop a while: deferred display steps, repaints and the colour bar happen here."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def _measure(viewer, widget, *, label: str, segmentation: str, mask_layer: str | None) -> dict[str, float]:
    from qtpy.QtWidgets import QApplication

    widget.set_segmentation(segmentation)
    if mask_layer is not None:
        widget.labels_combo.setCurrentText(mask_layer)
    out: dict[str, float] = {}
    for run in ("first", "second"):
        QApplication.processEvents()
        t0 = time.perf_counter()
        with StallMonitor() as stall:
            widget.detect_button.click()
            if widget.task is None:
                raise RuntimeError(f"{label}: detection did not start: {widget.messages[-1:]}")
            _wait(widget.task)
            QApplication.processEvents()  # the table and the layers are drawn
            out[f"detect_{run}"] = time.perf_counter() - t0
            _settle()  # deferred display steps and repaints count towards the stall
        out[f"stall_detect_{run}"] = stall.longest
        assert widget.results_table.rowCount() > 0
    out["engine_total"] = float(widget.result.timings["total"])
    panel = widget.prompt_panel
    times = []
    for prompt in PROMPTS[label]:
        panel.prompt_edit.setText(prompt)
        t0 = time.perf_counter()
        panel.prompt_edit.returnPressed.emit()
        _wait(panel.task)
        QApplication.processEvents()
        times.append(time.perf_counter() - t0)
    out["reprompt_median"] = statistics.median(times)
    out["reprompt_first"] = times[0]
    table = widget.results_table
    row = max(range(table.rowCount()), key=lambda r: table.item(r, 0).text() == "lung")
    anatomy, abnormality = table.item(row, 0).text(), table.item(row, 1).text()
    t0 = time.perf_counter()
    with StallMonitor() as stall:
        task = widget.show_row(anatomy, abnormality)
        if task is not None:
            _wait(task)
        QApplication.processEvents()
        out["row_heatmap"] = time.perf_counter() - t0
        _settle()
    out["stall_heatmap"] = stall.longest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 128], metavar=("D", "H", "W"))
    parser.add_argument("--no-real", action="store_true", help="skip the real-data cases")
    args = parser.parse_args(argv)

    display = _display()
    try:
        import napari
        import torch

        from napari_ctvlp._layers import organ_labels_layer
        from napari_ctvlp._reader import layer_data
        from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

        torch.manual_seed(0)
        rows: list[tuple[str, dict[str, float]]] = []
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, ckpt_desc = benchmark_checkpoint(args.checkpoint, Path(tmp))
            print(f"checkpoint: {ckpt_desc}")
            print(f"device: {args.device}; torch threads: {torch.get_num_threads()}; CPU cores: {os.cpu_count()}")

            volume, organs, desc = benchmark_phantom(tuple(args.size))
            print(f"phantom: {desc}, shape {volume.shape}, spacing {volume.spacing}")
            viewer = napari.Viewer(show=True)
            widget = DetectWidget(viewer)
            viewer.window.add_dock_widget(widget, name="CT abnormality detection", area="right")
            widget.set_checkpoint(ckpt)
            widget.device_combo.setCurrentText(args.device)
            data, kw, _ = layer_data(volume, name="phantom")
            viewer.add_image(data, **kw)
            data, kw, _ = organ_labels_layer(organs, volume, name="phantom organs")
            viewer.add_labels(data, **kw)
            widget.image_combo.setCurrentText("phantom")
            rows.append((f"phantom {volume.shape} (mask layer)",
                         _measure(viewer, widget, label="phantom", segmentation=LABELS_LAYER_CHOICE,
                                  mask_layer="phantom organs")))

            ct_path = REALDATA / "example_ct.nii.gz"
            seg_path = REALDATA / "example_seg_fast_force_split.nii.gz"
            if args.no_real:
                print("real data: skipped (--no-real)")
            elif not ct_path.is_file() or not seg_path.is_file():
                print(f"real data: skipped ({REALDATA} is absent)")
            else:
                from napari_ctvlp.engine.segmentation import from_label_file
                from napari_ctvlp.io import read_ct

                real = read_ct(ct_path)
                seg = from_label_file(seg_path, like=real, kind="totalseg")
                data, kw, _ = layer_data(real, name="example_ct")
                viewer.add_image(data, **kw)
                data, kw, _ = organ_labels_layer(seg.labels, real, name="example organs")
                viewer.add_labels(data, **kw)
                widget.image_combo.setCurrentText("example_ct")
                rows.append((f"example_ct {real.shape} (TotalSegmentator labels as mask layer)",
                             _measure(viewer, widget, label="real", segmentation=LABELS_LAYER_CHOICE,
                                      mask_layer="example organs")))
                rows.append((f"example_ct {real.shape} (threshold backend)",
                             _measure(viewer, widget, label="real-threshold", segmentation="threshold",
                                      mask_layer=None)))
            viewer.close()

        print()
        print(f"{'case':64s} {'1st detect':>11s} {'2nd detect':>11s} {'engine':>8s} {'re-prompt':>10s} "
              f"{'1st prompt':>10s} {'row heatmap':>11s} {'stall 1st':>10s} {'stall 2nd':>10s} {'stall heat':>10s}")
        for name, r in rows:
            print(f"{name:64s} {r['detect_first']:10.2f}s {r['detect_second']:10.2f}s {r['engine_total']:7.2f}s "
                  f"{r['reprompt_median']:9.3f}s {r['reprompt_first']:9.3f}s {r['row_heatmap']:10.3f}s "
                  f"{r['stall_detect_first']:9.3f}s {r['stall_detect_second']:9.3f}s {r['stall_heatmap']:9.3f}s")
        print("detect = click -> table filled and organ layer shown (the 1st detect of the 1st case loads the "
              "checkpoint); engine = detect()'s own total (2nd run); re-prompt = Enter -> per-anatomy scores "
              "shown, median of 5 new prompts; row heatmap = row click -> heatmap layer shown; stall 1st / 2nd / heat = "
              "longest gap of a 5 ms GUI-thread timer during the 1st detect (checkpoint loading included) / the 2nd "
              "detect / the row heatmap, each until 0.5 s after its results were shown (target < 0.3 s)")
    finally:
        if display is not None:
            display.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
