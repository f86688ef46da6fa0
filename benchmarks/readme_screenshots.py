"""Screenshots of the detection widget for the README: ``docs/images/widget_results.png`` and
``docs/images/widget_prompt.png``.

Opens a napari viewer (under a virtual display when there is none), opens the real CT
``../shared/realdata/example_ct.nii.gz`` and its TotalSegmentator labels through the plugin's
reader (radiological display, the labels as a Labels layer), docks "CT abnormality detection",
runs detection with the labels as the mask, selects a row (its heatmap is shown, the view centred
on the anatomy) and saves the first screenshot; then types a free-text prompt, runs the robustness
check with a paraphrase, shows the prompt heatmap and saves the second. Without the real data it
falls back to a synthetic chest phantom. Uses the shipped demo model (``--checkpoint`` to choose
another; with neither, a random-weight ``CTVLPConfig.phantom_cpu()`` so the layout can still be
checked): its scores on real CT are meaningless, which the widget says.

Usage: ``python benchmarks/readme_screenshots.py [--out docs/images] [--checkpoint DIR]``
or ``save_readme_screenshots(Path("docs/images"))`` from Python.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
PROMPT = "small left pleural effusion"
PARAPHRASES = ("Fluid collects in the left pleural space.", "The left costophrenic angle is blunted.")
ROW = ("lung", "Pleural effusion")


def _process(ms: int = 300) -> None:
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def _open_inputs(viewer, size: tuple[int, int, int]) -> tuple[str, str]:
    """The CT and its organ labels in ``viewer``; returns (CT layer name, labels layer name)."""
    ct_path, seg_path = REALDATA / "example_ct.nii.gz", REALDATA / "example_seg_fast_force_split.nii.gz"
    if ct_path.is_file() and seg_path.is_file():
        (ct,) = viewer.open(str(ct_path), plugin="napari-ctvlp")
        (seg,) = viewer.open(str(seg_path), plugin="napari-ctvlp")
        print(f"CT: {ct_path} with TotalSegmentator labels {seg_path.name}")
        return ct.name, seg.name
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _bench_common import benchmark_phantom

    from napari_ctvlp._layers import organ_labels_layer
    from napari_ctvlp._reader import layer_data

    volume, organs, desc = benchmark_phantom(size)
    print(f"real data absent ({REALDATA}): phantom {desc}")
    data, kw, _ = layer_data(volume, name="chest CT phantom")
    viewer.add_image(data, **kw)
    data, kw, _ = organ_labels_layer(organs, volume, name="phantom organs")
    viewer.add_labels(data, **kw)
    return "chest CT phantom", "phantom organs"


def save_readme_screenshots(
    out_dir: Path = REPO / "docs" / "images",
    *,
    checkpoint: str | Path | None = None,
    size: tuple[int, int, int] = (128, 128, 128),
    window: tuple[int, int] = (1600, 1000),
) -> list[Path]:
    """Write the two README screenshots into ``out_dir``; returns their paths."""
    display = None
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        from pyvirtualdisplay import Display

        display = Display(visible=False, size=window, color_depth=24)
        display.start()
    try:
        import napari

        sys.path.insert(0, str(REPO / "benchmarks"))
        from _bench_common import benchmark_checkpoint

        from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, desc = benchmark_checkpoint(str(checkpoint) if checkpoint else None, Path(tmp))
            print(f"checkpoint: {desc}")
            viewer = napari.Viewer(title="napari-ctvlp", show=True)
            viewer.window.resize(*window)
            ct_name, labels_name = _open_inputs(viewer, size)
            viewer.layers[labels_name].visible = False
            widget = DetectWidget(viewer)
            viewer.window.add_dock_widget(widget, name="CT abnormality detection", area="right")
            widget.set_checkpoint(ckpt)
            widget.image_combo.setCurrentText(ct_name)
            widget.set_segmentation(LABELS_LAYER_CHOICE)
            widget.labels_combo.setCurrentText(labels_name)
            widget.device_combo.setCurrentText("cpu")
            if widget.run_blocking(timeout=600) is None:
                raise RuntimeError(f"detection failed: {widget.messages[-1:]}")
            table = widget.results_table
            row = table.find_row(*ROW)
            table.selectRow(row)
            table.scrollToItem(table.item(row, 0))
            task = widget.show_row(*ROW)
            if task is not None:
                task.wait(timeout=120)
            viewer.reset_view()
            widget.centre_on(ROW[0])
            _process()
            results_png = out_dir / "widget_results.png"
            viewer.screenshot(str(results_png), canvas_only=False, flash=False)

            panel = widget.prompt_panel
            widget.tabs.setCurrentWidget(panel)
            panel.prompt_edit.setText(PROMPT)
            panel.score().wait(timeout=120)
            panel.paraphrase_edit.setPlainText("\n".join(PARAPHRASES))
            panel.run_robustness().wait(timeout=120)
            panel.show_heatmap().wait(timeout=120)
            _process()
            prompt_png = out_dir / "widget_prompt.png"
            viewer.screenshot(str(prompt_png), canvas_only=False, flash=False)
            viewer.close()
        return [results_png, prompt_png]
    finally:
        if display is not None:
            display.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images"))
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 128], metavar=("D", "H", "W"))
    args = parser.parse_args(argv)
    for path in save_readme_screenshots(Path(args.out), checkpoint=args.checkpoint, size=tuple(args.size)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
