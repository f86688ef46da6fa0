"""Sortable table of abnormality probabilities per anatomy, with a probability colour bar."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from qtpy.QtCore import QModelIndex, QRect, Qt, Signal
from qtpy.QtGui import QBrush, QColor, QPainter
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableWidget,
    QTableWidgetItem,
)

NOT_ASSESSABLE = "not assessable"
NO_OPERATING_POINT = "no operating point"
#: Added to a call's tooltip when the checkpoint is the phantom-trained demo model.
DEMO_CALL_NOTE = ("\nThis is the phantom-trained demo model: its operating points were chosen on synthetic "
                  "phantoms, so on a real CT this call means nothing.")
COLUMNS = ("anatomy", "abnormality", "probability", "std", "call", "assessable?")
_GREY = QColor(128, 128, 128)
#: item role holding the row's (anatomy, abnormality) key
KEY_ROLE = int(Qt.ItemDataRole.UserRole) + 1
#: item role holding the numeric value used for sorting and the bar (-1: not assessable)
VALUE_ROLE = int(Qt.ItemDataRole.UserRole) + 2
#: item role: True when the anatomy is the abnormality's own
PRIMARY_ROLE = int(Qt.ItemDataRole.UserRole) + 3


@dataclass(frozen=True)
class ResultRow:
    """One row of the results table.

    Attributes:
        anatomy: anatomy group name (e.g. ``"lung"``).
        abnormality: CT-RATE abnormality name or a free-text prompt.
        probability: mean probability over templates in [0, 1]; ``nan`` when not assessable.
        std: standard deviation over templates.
        assessable: False when the anatomy is absent from the mask (no score).
        primary: the anatomy is the abnormality's own (the detection result; others are context).
        threshold: the checkpoint's operating point of the abnormality (None: it has none; only
            for primary rows, where it was chosen).
        call: ``"positive"``/``"negative"`` at that operating point (None without one or no score).
    """

    anatomy: str
    abnormality: str
    probability: float
    std: float
    assessable: bool
    primary: bool = True
    threshold: float | None = None
    call: str | None = None


_POSITIVE = QColor(200, 40, 40)


def _call_text(row: ResultRow, ok: bool) -> str:
    """The call column: positive/negative at the checkpoint's operating point, or why there is none."""
    if not ok or not row.primary:
        return ""
    if row.threshold is None:
        return NO_OPERATING_POINT
    return row.call or ""


def _call_tooltip(row: ResultRow, ok: bool) -> str:
    text = _call_text(row, ok)
    if not ok:
        return "not assessable: no call"
    if not row.primary:
        return ("operating points are set for each finding in its own anatomy (the bold rows); "
                "this row is context")
    if row.threshold is None:
        return f"{text}\nthis checkpoint stores no decision threshold for {row.abnormality}: only the probability"
    return (f"{text}\np = {row.probability:.3f} {'>=' if row.call == 'positive' else '<'} threshold "
            f"{row.threshold:.3f} (the operating point stored with the checkpoint)")


def probability_color(p: float) -> QColor:
    """Colour of the probability bar: green (0) through yellow to red (1)."""
    p = min(max(float(p), 0.0), 1.0)
    if p < 0.5:
        return QColor(int(80 + 350 * p), 190, 80)
    return QColor(235, int(190 - 260 * (p - 0.5)), 60)


class ProbabilityBarDelegate(QStyledItemDelegate):
    """Paints the probability column as a horizontal bar with the value written on it."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        value = index.data(VALUE_ROLE)
        if not isinstance(value, float) or math.isnan(value) or value < 0:
            super().paint(painter, option, index)
            return
        painter.save()
        if option.state & QStyle.StateFlag.State_Selected:
            painter.fillRect(option.rect, option.palette.highlight())
        rect: QRect = option.rect.adjusted(2, 3, -2, -3)
        bar = QRect(rect.left(), rect.top(), int(rect.width() * min(value, 1.0)), rect.height())
        painter.fillRect(bar, probability_color(value))
        painter.setPen(option.palette.text().color())
        painter.drawText(rect, int(Qt.AlignmentFlag.AlignCenter), f"{value:.3f}")
        painter.restore()


class NumericItem(QTableWidgetItem):
    """Item that sorts by its numeric value (``VALUE_ROLE``), not the displayed text."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.data(VALUE_ROLE), other.data(VALUE_ROLE)
        if isinstance(a, float) and isinstance(b, float):
            return a < b
        return super().__lt__(other)


_NumericItem = NumericItem


class ResultsTable(QTableWidget):
    """Anatomy x abnormality probabilities; emits :attr:`row_activated` when a row is clicked.

    Non-assessable rows show "not assessable" in grey and sort below every probability.
    """

    #: (anatomy, abnormality) of the clicked row
    row_activated = Signal(str, str)

    def __init__(self, parent=None) -> None:
        super().__init__(0, len(COLUMNS), parent)
        self.setObjectName("ctvlp_results_table")
        self.setHorizontalHeaderLabels(list(COLUMNS))
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setItemDelegateForColumn(COLUMNS.index("probability"), ProbabilityBarDelegate(self))
        self.horizontalHeader().setStretchLastSection(False)
        self.setWordWrap(False)
        self.setMinimumWidth(540)
        self._set_resize_modes(fill=False)
        self.verticalHeader().setVisible(False)
        self.setSortingEnabled(True)
        self.cellClicked.connect(self._on_cell_clicked)
        self._primary_only = False

    def _set_resize_modes(self, *, fill: bool) -> None:
        """Fixed sizes while filling (resize-to-contents per inserted item is quadratic)."""
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive if fill else
                                    QHeaderView.ResizeMode.ResizeToContents)
        if not fill:
            header.setSectionResizeMode(COLUMNS.index("abnormality"), QHeaderView.ResizeMode.Stretch)
            for name, width in (("probability", 90), ("std", 50), ("call", 120), ("assessable?", 85)):
                header.setSectionResizeMode(COLUMNS.index(name), QHeaderView.ResizeMode.Fixed)
                header.resizeSection(COLUMNS.index(name), width)

    def set_rows(self, rows: Iterable[ResultRow], *, demo_model: bool = False) -> None:
        """Replace the table contents; sorted by probability, highest first.

        ``demo_model``: the checkpoint is phantom-trained (its model card says so). Its calls are
        then written ``"positive (demo)"`` / ``"negative (demo)"`` in grey, not red, and their
        tooltips say that its operating points come from phantoms and mean nothing on a real CT.
        """
        rows = list(rows)
        self._set_resize_modes(fill=True)
        self.setUpdatesEnabled(False)
        self.setSortingEnabled(False)
        self.clearContents()
        self.setRowCount(len(rows))
        for r, row in enumerate(rows):
            key = (row.anatomy, row.abnormality)
            ok = row.assessable and not math.isnan(row.probability)
            items = [
                QTableWidgetItem(row.anatomy),
                QTableWidgetItem(row.abnormality),
                _NumericItem(),
                _NumericItem(),
                QTableWidgetItem(_call_text(row, ok)),
                QTableWidgetItem("yes" if ok else "no"),
            ]
            prob, std, call = items[2], items[3], items[4]
            context = f"{row.abnormality} in the {row.anatomy}" + ("" if row.primary else
                                                                   " (context: not this finding's own anatomy)")
            items[0].setToolTip(f"{row.anatomy}\n{context}")
            items[1].setToolTip(f"{row.abnormality}\n{context}")
            if ok:
                prob.setData(VALUE_ROLE, float(row.probability))
                prob.setText(f"{row.probability:.3f}")
                std.setData(VALUE_ROLE, float(row.std))
                std.setText(f"{row.std:.3f}")
                prob.setToolTip(f"{row.probability:.3f}\np = {row.probability:.3f} +- {row.std:.3f} over prompt "
                                f"templates ({context})")
                std.setToolTip(f"{row.std:.3f}\nstandard deviation over the prompt templates")
            else:
                prob.setData(VALUE_ROLE, -1.0)
                prob.setText(NOT_ASSESSABLE)
                std.setData(VALUE_ROLE, -1.0)
                prob.setToolTip(f"{NOT_ASSESSABLE}\n{row.anatomy} is not in the segmentation: no score")
                std.setToolTip(f"{NOT_ASSESSABLE}\nno score")
            if demo_model and row.call:
                call.setText(f"{row.call} (demo)")
                call.setToolTip(f"{row.call} (demo)\n{_call_tooltip(row, ok)}{DEMO_CALL_NOTE}")
            else:
                call.setToolTip(_call_tooltip(row, ok))
            items[5].setToolTip(f"{items[5].text()}\n" + ("the anatomy is in the organ mask" if ok else
                                                           f"the {row.anatomy} is not in the organ mask"))
            if row.call == "positive":
                call.setForeground(QBrush(_GREY if demo_model else _POSITIVE))
            for c, item in enumerate(items):
                item.setData(KEY_ROLE, key)
                item.setData(PRIMARY_ROLE, bool(row.primary))
                if not ok:
                    item.setForeground(QBrush(_GREY))
                if row.primary:
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                self.setItem(r, c, item)
        self.setSortingEnabled(True)
        self.sortItems(COLUMNS.index("probability"), Qt.SortOrder.DescendingOrder)
        self._set_resize_modes(fill=False)
        self.setUpdatesEnabled(True)
        self.set_primary_only(self._primary_only)

    def show_calls(self, on: bool) -> None:
        """Show the ``call`` column (hidden when the checkpoint has no operating point at all)."""
        self.setColumnHidden(COLUMNS.index("call"), not on)

    def set_primary_only(self, on: bool) -> None:
        """Show only each abnormality's own anatomy (bold rows) or every anatomy."""
        self._primary_only = bool(on)
        for r in range(self.rowCount()):
            self.setRowHidden(r, self._primary_only and not self.item(r, 0).data(PRIMARY_ROLE))

    def row_values(self, row: int) -> dict[str, object]:
        """Displayed values of a row as ``{column: value}`` (probability as float or the text)."""
        out: dict[str, object] = {}
        for c, name in enumerate(COLUMNS):
            item = self.item(row, c)
            if name in ("probability", "std"):
                value = item.data(VALUE_ROLE)
                out[name] = NOT_ASSESSABLE if (name == "probability" and value == -1.0) else value
            else:
                out[name] = item.text()
        return out

    def find_row(self, anatomy: str, abnormality: str) -> int:
        """Current row index of ``(anatomy, abnormality)``; -1 when absent."""
        for r in range(self.rowCount()):
            if self.item(r, 0).data(KEY_ROLE) == (anatomy, abnormality):
                return r
        return -1

    def _on_cell_clicked(self, row: int, _column: int) -> None:
        item = self.item(row, 0)
        if item is not None:
            anatomy, abnormality = item.data(KEY_ROLE)
            self.row_activated.emit(anatomy, abnormality)
