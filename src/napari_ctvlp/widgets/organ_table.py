"""Organ statistics of a detection: volume (mL), mean HU and a cut-off flag per organ and anatomy."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_ctvlp.widgets.results_table import VALUE_ROLE, NumericItem

logger = logging.getLogger(__name__)

STATS_COLUMNS = ("region", "volume (mL)", "mean HU", "cut off?")
#: CSV columns (the same as ``organ_stats.csv`` of an export)
CSV_FIELDS = ("region", "volume_ml", "mean_hu", "incomplete")
_WARN = QColor(230, 140, 0)


def write_statistics_csv(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write statistics rows (``organ_statistics_rows``) as CSV; returns the path."""
    target = Path(path).expanduser()
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        writer.writerows({k: row[k] for k in CSV_FIELDS} for row in rows)
    return target


class OrganStatsPanel(QWidget):
    """A table of the organs and anatomy groups of the last detection, and a Save CSV button.

    Attributes (driven by tests): ``table``, ``save_button``, ``status_label``; ``rows`` are the
    shown rows (``{region, volume_ml, mean_hu, incomplete}`` as strings, like the CSV).
    """

    def __init__(self, parent: QWidget | None = None, *, notify: Callable[[str, str], None] | None = None) -> None:
        super().__init__(parent)
        self._notify = notify
        self.rows: list[dict[str, Any]] = []
        self.table = QTableWidget(0, len(STATS_COLUMNS))
        self.table.setObjectName("ctvlp_organ_stats")
        self.table.setHorizontalHeaderLabels(list(STATS_COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.setSortingEnabled(True)
        self.save_button = QPushButton("Save CSV...")
        self.save_button.clicked.connect(self._save_clicked)
        self.save_button.setEnabled(False)
        self.status_label = QLabel("Run a detection first.")
        self.status_label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.save_button)
        layout.addWidget(self.status_label)

    def set_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Show statistics rows (``region``, ``volume_ml``, ``mean_hu``, ``incomplete``)."""
        self.rows = [dict(r) for r in rows]
        table = self.table
        table.setSortingEnabled(False)
        table.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            cut = str(row["incomplete"]).lower() == "true"
            region = str(row["region"])
            what = f"anatomy group {region.split(':', 1)[1]}" if region.startswith("anatomy:") else f"organ {region}"
            items = [QTableWidgetItem(region), NumericItem(f"{float(row['volume_ml']):.1f}"),
                     NumericItem(f"{float(row['mean_hu']):.0f}"),
                     QTableWidgetItem("yes: touches the scan edge" if cut else "no")]
            items[1].setData(VALUE_ROLE, float(row["volume_ml"]))
            items[2].setData(VALUE_ROLE, float(row["mean_hu"]))
            notes = [what, "volume in millilitres", "mean CT value inside it (HU)",
                     "it reaches the first/last slice or the edge of the field of view: probably cut off by "
                     "the scan, its volume is a lower bound" if cut else "inside the scan"]
            for c, (item, note) in enumerate(zip(items, notes)):
                item.setToolTip(f"{item.text()}\n{note}")
                if cut:
                    item.setForeground(QBrush(_WARN))
                table.setItem(r, c, item)
        table.setSortingEnabled(True)
        self.save_button.setEnabled(bool(self.rows))
        n_cut = sum(str(r["incomplete"]).lower() == "true" for r in self.rows)
        self.status_label.setText(f"{len(self.rows)} regions; {n_cut} cut off by the scan (orange)." if self.rows
                                  else "No organ in the mask.")

    def save_csv(self, path: str | Path) -> Path:
        """Write the shown statistics to ``path`` (CSV, the columns of ``organ_stats.csv``)."""
        if not self.rows:
            raise RuntimeError("no organ statistics to save: run a detection first")
        return write_statistics_csv(self.rows, path)

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save organ statistics", "organ_stats.csv", "CSV (*.csv)")
        if not path:
            return
        try:
            written = self.save_csv(path)
        except (OSError, RuntimeError) as exc:
            self._message("error", f"Saving the organ statistics failed: {exc}")
            return
        self._message("info", f"Organ statistics saved to {written}")

    def _message(self, level: str, text: str) -> None:
        self.status_label.setText(text)
        if self._notify is not None:
            self._notify(level, text)
