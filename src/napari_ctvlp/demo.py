"""``make demo``: open a synthetic chest-CT phantom with its organ labels in napari.

With a display, napari opens and stays open. Without one (a server, CI), the demo starts a
virtual X server (Xvfb), runs the same steps and saves a screenshot instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _start_virtual_display(size: tuple[int, int]):
    """Start Xvfb when no display is available; returns the display handle or None."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        raise RuntimeError("no display and Xvfb is not installed: run `make demo` as root or "
                           "install xvfb (apt-get install xvfb)")
    from pyvirtualdisplay import Display

    display = Display(visible=False, size=size, color_depth=24)
    display.start()
    return display


def build_demo_viewer(out_dir: Path, *, seed: int, size: tuple[int, int, int], detect: bool):
    """Write a phantom to ``out_dir``, open it through the plugin's reader and return the viewer."""
    import napari

    from napari_ctvlp._sample_data import phantom_layers
    from napari_ctvlp.phantom import make_phantom
    from napari_ctvlp.io import write_labels, write_volume

    phantom = make_phantom(seed=seed, size=size)
    out_dir.mkdir(parents=True, exist_ok=True)
    ct_path = out_dir / "phantom_ct.nii.gz"
    write_volume(phantom.volume.array, like=phantom.volume, path=ct_path, overwrite=True)
    write_labels(phantom.organs, like=phantom.volume, path=out_dir / "phantom_organs.nii.gz", overwrite=True)
    (out_dir / "phantom_report.txt").write_text(
        f"Findings: {phantom.findings}\n\nImpression: {phantom.impression}\n", encoding="utf-8")

    viewer = napari.Viewer(title="napari-ctvlp demo", show=True)
    viewer.open(str(ct_path), plugin="napari-ctvlp")
    data, kwargs, _ = phantom_layers(phantom)[1]
    organs = viewer.add_labels(data, **kwargs)
    if detect:
        _run_detection(viewer, out_dir, organs.name)
    return viewer


def _run_detection(viewer, out_dir: Path, organs_layer: str) -> None:
    """Dock the detection widget and run it synchronously on the CT (when a model is available)."""
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path
    from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

    if default_checkpoint_path() is None:
        logger.warning("no demo checkpoint shipped: showing the CT and organ labels only")
        return
    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="CT abnormality detection", area="right")
    widget.set_segmentation(LABELS_LAYER_CHOICE)  # the phantom's own organ labels
    widget.labels_combo.setCurrentText(organs_layer)
    result = widget.run_blocking()
    if result is None:
        raise RuntimeError("detection failed; see the notification above")
    task = widget.show_row("lung", "Pleural effusion")  # centre on the lungs, show the heatmap
    if task is not None:
        task.wait(timeout=120)
    widget.export_results(out_dir / "results", overwrite=True)
    logger.info("results written to %s", out_dir / "results")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m napari_ctvlp.demo", description=__doc__)
    parser.add_argument("--out", default="demo_out", help="folder for the phantom, results and screenshot")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=3, default=[128, 160, 160], metavar=("D", "H", "W"))
    parser.add_argument("--no-detect", action="store_true", help="only show the CT and organ labels")
    parser.add_argument("--screenshot", action="store_true",
                        help="save a screenshot and exit even when a display is available")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    display = _start_virtual_display((1600, 1000))
    headless = display is not None or args.screenshot
    out_dir = Path(args.out).resolve()
    try:
        viewer = build_demo_viewer(out_dir, seed=args.seed, size=tuple(args.size), detect=not args.no_detect)
        if headless:
            from qtpy.QtWidgets import QApplication

            QApplication.processEvents()
            shot = out_dir / "napari_ctvlp_demo.png"
            viewer.screenshot(str(shot), canvas_only=False, flash=False)
            viewer.close()
            print(f"demo ran headless; screenshot: {shot}")
        else:
            import napari

            napari.run()
    finally:
        if display is not None:
            display.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
