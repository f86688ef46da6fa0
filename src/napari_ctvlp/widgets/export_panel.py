"""Export a detection: organ masks, results (CSV + JSON), heatmaps and per-organ statistics.

:func:`export_detection` is the whole export (usable from scripts); :class:`ExportPanel` is
its dock-widget front end. Nothing is ever overwritten silently: without ``overwrite=True``
:func:`export_detection` raises :class:`FileExistsError` naming the files, before writing
anything; the panel asks the user (:meth:`ExportPanel.confirm_overwrite`) first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_ctvlp.engine.volume import CTVolume

logger = logging.getLogger(__name__)

MASKS_NIFTI = "organs.nii.gz"
MASKS_SIDECAR = "organs.json"
MASKS_DICOM_SEG = "organs_seg.dcm"
STATISTICS_CSV = "organ_stats.csv"


@dataclass(frozen=True)
class ExportSource:
    """Everything an export needs from one detection run.

    Attributes:
        volume: the CT (its exact affine is written into every NIfTI).
        labels: organ label map on the CT grid.
        label_names: ``{value: organ name}``.
        heatmaps: ``{name: array on the CT grid}`` shown in the viewer (written as NIfTI).
        write_results: ``write_results(out_dir, overwrite=...) -> list[Path]``
            (``pipeline.write_results``: JSON, CSV, organ NIfTI, statistics, prompt heatmaps).
        results_files: names of the files ``write_results`` writes (checked before writing).
        volume_ml: ``{organ or "anatomy:<group>": mL}`` (computed when empty).
        mean_hu: same keys, mean HU.
        incomplete: same keys, region touches the scan border.
    """

    volume: CTVolume
    labels: np.ndarray
    label_names: dict[int, str]
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    write_results: Callable[..., Any] | None = None
    results_files: tuple[str, ...] = ()
    volume_ml: dict[str, float] = field(default_factory=dict)
    mean_hu: dict[str, float] = field(default_factory=dict)
    incomplete: dict[str, bool] = field(default_factory=dict)


def heatmap_filenames(source: ExportSource) -> dict[str, str]:
    """``{heatmap name: file name}`` (``heatmap_<slug>.nii.gz``, unique, not clashing with results)."""
    from napari_ctvlp.engine.results_io import heatmap_filename

    taken = set(source.results_files)
    out: dict[str, str] = {}
    for name in source.heatmaps:
        out[name] = heatmap_filename(name, taken)
        taken.add(out[name])
    return out


def export_paths(
    source: ExportSource,
    out_dir: Path,
    *,
    masks: bool = True,
    results: bool = True,
    heatmaps: bool = True,
    statistics: bool = True,
) -> list[Path]:
    """The files :func:`export_detection` would write with these options (no duplicates)."""
    out_dir = Path(out_dir)
    names: list[str] = []
    if results and source.write_results is not None:
        names += list(source.results_files)
    if masks:
        names += [MASKS_NIFTI, MASKS_SIDECAR]
        if source.volume.meta.get("format") == "dicom":
            names.append(MASKS_DICOM_SEG)
    if heatmaps:
        names += list(heatmap_filenames(source).values())
    if statistics:
        names.append(STATISTICS_CSV)
    return [out_dir / n for n in dict.fromkeys(names)]


def organ_statistics_rows(source: ExportSource) -> list[dict[str, Any]]:
    """Rows ``{region, volume_ml, mean_hu, incomplete}`` per organ and ``anatomy:<group>``."""
    volume_ml, mean_hu, incomplete = dict(source.volume_ml), dict(source.mean_hu), dict(source.incomplete)
    if not volume_ml:
        from napari_ctvlp.engine.segmentation.stats import organ_statistics

        volume_ml, mean_hu, incomplete = organ_statistics(source.labels, source.volume.array, source.volume.spacing)
    return [{"region": key, "volume_ml": f"{float(volume_ml[key]):.6g}",
             "mean_hu": f"{float(mean_hu.get(key, np.nan)):.6g}",
             "incomplete": str(bool(incomplete.get(key, False))).lower()} for key in sorted(volume_ml)]


def export_detection(
    source: ExportSource,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    masks: bool = True,
    results: bool = True,
    heatmaps: bool = True,
    statistics: bool = True,
) -> list[Path]:
    """Write the chosen parts of a detection into ``out_dir`` (created if needed); return the files.

    Args:
        source: what to export (see :class:`ExportSource`).
        out_dir: target folder.
        overwrite: replace existing files; otherwise :class:`FileExistsError` before writing anything.
        masks: organ labels as NIfTI (+ JSON names) aligned with the CT; also DICOM-SEG when the
            CT was read from DICOM.
        results: ``pipeline.write_results`` (results JSON + CSV, and with them the organ NIfTI,
            the statistics CSV and the detection's prompt heatmaps).
        heatmaps: each heatmap shown in the viewer as float32 NIfTI ``heatmap_<name>.nii.gz``.
        statistics: per-organ and per-anatomy volume (mL) and mean HU as CSV.
    """
    from napari_ctvlp.io import write_labels, write_volume

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"export folder {out} exists and is not a folder")
    planned = export_paths(source, out, masks=masks, results=results, heatmaps=heatmaps, statistics=statistics)
    if not planned:
        raise ValueError("nothing to export: choose at least one of masks, results, heatmaps, statistics")
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:6]) + (" ..." if len(existing) > 6 else "")
        raise FileExistsError(f"{len(existing)} file(s) already exist in {out}: {names}; "
                              "pass overwrite=True to replace them")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    # every target was checked above: the writers below may replace files
    if results and source.write_results is not None:
        written += [Path(p) for p in source.write_results(out, overwrite=True)]
    labels = np.asarray(source.labels)
    if masks and out / MASKS_NIFTI not in written:
        written += write_labels(labels, like=source.volume, path=out / MASKS_NIFTI,
                                names=source.label_names, overwrite=True)
    if masks and source.volume.meta.get("format") == "dicom":
        written += write_labels(labels, like=source.volume, path=out / MASKS_DICOM_SEG,
                                names=source.label_names, overwrite=True)
    if heatmaps:
        for name, filename in heatmap_filenames(source).items():
            written.append(Path(write_volume(np.asarray(source.heatmaps[name], dtype=np.float32),
                                             like=source.volume, path=out / filename, overwrite=True)))
    if statistics and out / STATISTICS_CSV not in written:
        from napari_ctvlp.widgets.organ_table import write_statistics_csv

        written.append(write_statistics_csv(organ_statistics_rows(source), out / STATISTICS_CSV))
    logger.info("exported %d file(s) to %s", len(written), out)
    return list(dict.fromkeys(written))


class ExportPanel(QWidget):
    """Folder picker, what-to-export check boxes and an Export button.

    Attributes (driven by tests): ``folder_edit``, ``browse_button``, ``masks_check``,
    ``results_check``, ``heatmaps_check``, ``stats_check``, ``export_button``, ``status_label``;
    :meth:`confirm_overwrite` is the question asked before replacing files (replaceable).
    """

    def __init__(
        self,
        get_source: Callable[[], ExportSource | None],
        parent: QWidget | None = None,
        *,
        notify: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(parent)
        self._get_source = get_source
        self._notify = notify
        self.last_written: list[Path] = []
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("output folder")
        self.browse_button = QPushButton("Browse...")
        self.browse_button.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(self.browse_button)
        self.masks_check = QCheckBox("organ masks (NIfTI; DICOM-SEG for DICOM input)")
        self.results_check = QCheckBox("results (CSV + JSON)")
        self.heatmaps_check = QCheckBox("heatmaps shown in the viewer (NIfTI)")
        self.stats_check = QCheckBox("organ statistics (volume mL, mean HU; CSV)")
        for box in (self.masks_check, self.results_check, self.heatmaps_check, self.stats_check):
            box.setChecked(True)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self.export_clicked)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        for w in (self.masks_check, self.results_check, self.heatmaps_check, self.stats_check,
                  self.export_button, self.status_label):
            layout.addWidget(w)

    def options(self) -> dict[str, bool]:
        """The check-box state as keyword arguments of :func:`export_detection`."""
        return {"masks": self.masks_check.isChecked(), "results": self.results_check.isChecked(),
                "heatmaps": self.heatmaps_check.isChecked(), "statistics": self.stats_check.isChecked()}

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export folder", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)

    def confirm_overwrite(self, existing: list[Path]) -> bool:
        """Ask whether to replace ``existing`` files (tests replace this method)."""
        listing = "\n".join(str(p) for p in existing[:10]) + ("\n..." if len(existing) > 10 else "")
        answer = QMessageBox.question(
            self, "Replace files?", f"{len(existing)} file(s) already exist:\n{listing}\n\nReplace them?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _message(self, level: str, text: str) -> None:
        self.status_label.setText(text)
        if self._notify is not None:
            self._notify(level, text)

    def export_clicked(self) -> list[Path]:
        """The Export button: checks, asks before replacing files, writes; returns the files."""
        source = self._get_source()
        if source is None:
            self._message("warning", "Nothing to export yet: run a detection first.")
            return []
        text = self.folder_edit.text().strip()
        if not text:
            self._message("warning", "Choose an export folder first.")
            return []
        out = Path(text).expanduser()
        existing = [p for p in export_paths(source, out, **self.options()) if p.exists()]
        if existing and not self.confirm_overwrite(existing):
            self._message("info", "Export cancelled: no file was replaced.")
            return []
        try:
            written = export_detection(source, out, overwrite=bool(existing), **self.options())
        except (OSError, ValueError) as exc:
            self._message("error", f"Export failed: {exc}")
            return []
        self.last_written = written
        self._message("info", f"Exported {len(written)} file(s) to {out}")
        return written
