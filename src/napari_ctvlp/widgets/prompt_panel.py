"""Free-text prompts: score a typed finding per anatomy, check its robustness over wordings.

The panel needs a *scorer* (set after a detection run, see
:class:`napari_ctvlp.widgets._engine.ResultScorer`): the cached image features of the last
detection, so a prompt only runs the text encoder. Work runs in a worker thread
(:class:`~napari_ctvlp.widgets._worker.Task`); results are shown on the GUI thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from qtpy.QtCore import Signal
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_ctvlp.widgets._worker import Outcome, Task
from napari_ctvlp.widgets.results_table import VALUE_ROLE, ProbabilityBarDelegate

if TYPE_CHECKING:
    from napari_ctvlp.widgets._engine import PromptCheck, PromptScore, ResultScorer, Robustness

logger = logging.getLogger(__name__)
_RED = QColor(230, 50, 50)
#: columns of the per-anatomy table (the last two are filled by the robustness check)
SCORE_COLUMNS = ("anatomy", "probability", "mean +- std", "flips")
_GREY = QColor(128, 128, 128)
ROBUSTNESS_TITLE = "Robustness (of the current prompt: press the button)"


def _table(columns: tuple[str, ...], name: str) -> QTableWidget:
    table = QTableWidget(0, len(columns))
    table.setObjectName(name)
    table.setHorizontalHeaderLabels(list(columns))
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.verticalHeader().setVisible(False)
    table.horizontalHeader().setStretchLastSection(True)
    return table


def _tip(item: QTableWidgetItem, note: str = "") -> QTableWidgetItem:
    """Tooltip = the cell's full text (columns elide long texts), plus ``note``."""
    item.setToolTip("\n".join(t for t in (item.text(), note) if t))
    return item


def _prob_item(p: float) -> QTableWidgetItem:
    item = QTableWidgetItem()
    if math.isnan(p):
        item.setText("not assessable")
        item.setData(VALUE_ROLE, -1.0)
        item.setForeground(QBrush(_GREY))
        return _tip(item, "the anatomy is not in the organ mask: no score")
    item.setText(f"{p:.3f}")
    item.setData(VALUE_ROLE, float(p))
    return _tip(item)


class PromptPanel(QWidget):
    """Type a finding, score it per anatomy, run the robustness check, show its heatmap.

    One per-anatomy table (``score_table``) holds the prompt's probability and, after the
    robustness check, the mean +- std over wordings and the number of wordings whose answer
    flips (red); ``variants_table`` lists every wording's probability, flipped ones in red.

    Attributes (driven by tests): ``prompt_edit``, ``score_button``, ``score_table``,
    ``paraphrase_edit``, ``robustness_button``, ``variants_table``, ``heatmap_button``,
    ``status_label``; ``task`` is the running/last :class:`Task`.
    """

    #: (heatmap name, :class:`~napari_ctvlp.widgets._engine.Heatmap` on the CT grid) of the prompt
    heatmap_ready = Signal(str, object)

    def __init__(self, parent: QWidget | None = None, *, notify: Callable[[str, str], None] | None = None) -> None:
        super().__init__(parent)
        self._scorer: ResultScorer | None = None
        self._notify = notify
        self.task: Task | None = None
        self.last_scores: list[PromptScore] = []
        self.last_robustness: Robustness | None = None

        self.prompt_edit = QLineEdit()
        self.prompt_edit.setPlaceholderText("Type a finding, e.g. small left pleural effusion")
        self.prompt_edit.returnPressed.connect(self.score)
        self.prompt_edit.textChanged.connect(self._prompt_edited)
        self.score_button = QPushButton("Score")
        self.score_button.clicked.connect(self.score)
        row = QHBoxLayout()
        row.addWidget(self.prompt_edit, 1)
        row.addWidget(self.score_button)

        self.score_table = _table(SCORE_COLUMNS, "ctvlp_prompt_scores")
        self.score_table.setItemDelegateForColumn(1, ProbabilityBarDelegate(self.score_table))
        self.score_table.setMinimumHeight(7 * 26 + 30)
        header = self.score_table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Fixed)
        header.resizeSection(1, 110)

        self.paraphrase_edit = QPlainTextEdit()
        self.paraphrase_edit.setPlaceholderText("Paraphrases, one per line (optional)")
        self.paraphrase_edit.setMaximumHeight(70)
        self.robustness_button = QPushButton("Robustness over templates + paraphrases")
        self.robustness_button.clicked.connect(self.run_robustness)
        self.variants_table = _table(("prompt", "anatomy", "probability"), "ctvlp_prompt_variants")
        self.variants_table.setItemDelegateForColumn(2, ProbabilityBarDelegate(self.variants_table))
        header = self.variants_table.horizontalHeader()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.resizeSection(2, 110)
        robust_box = QGroupBox(ROBUSTNESS_TITLE)
        self.robust_box = robust_box
        rb = QVBoxLayout(robust_box)
        rb.setContentsMargins(4, 4, 4, 4)
        rb.addWidget(self.paraphrase_edit)
        rb.addWidget(self.robustness_button)
        rb.addWidget(self.variants_table, 1)

        self.heatmap_button = QPushButton("Show prompt heatmap")
        self.heatmap_button.clicked.connect(self.show_heatmap)
        self.status_label = QLabel("Run a detection first: prompts reuse its image features.")
        self.status_label.setWordWrap(True)
        self.prompt_notice = QLabel("")
        self.prompt_notice.setObjectName("ctvlp_prompt_notice")
        self.prompt_notice.setWordWrap(True)
        self.prompt_notice.setStyleSheet("QLabel { color: #ffb000; }")
        self.prompt_notice.setVisible(False)
        #: the prompt the robustness view shows (None: nothing shown)
        self.robustness_prompt: str | None = None
        self.last_check: PromptCheck | None = None

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.prompt_notice)
        layout.addWidget(self.score_table)
        layout.addWidget(self.heatmap_button)
        layout.addWidget(robust_box, 1)
        layout.addWidget(self.status_label)
        self._update_enabled()

    # ---------------------------------------------------------------------------- state
    def set_scorer(self, scorer: ResultScorer | None) -> None:
        """Use the features of a new detection (``None``: disable the panel)."""
        self._scorer = scorer
        self.score_table.setRowCount(0)
        self._clear_robustness()
        self.prompt_notice.setVisible(False)
        self.status_label.setText("Type a finding and press Enter." if scorer else
                                  "Run a detection first: prompts reuse its image features.")
        self._update_enabled()

    @property
    def busy(self) -> bool:
        """True while a prompt task runs."""
        return self.task is not None and not self.task.finished

    def _update_enabled(self) -> None:
        ready = self._scorer is not None and not self.busy
        for w in (self.score_button, self.robustness_button, self.heatmap_button, self.prompt_edit):
            w.setEnabled(ready)

    def _text(self) -> str | None:
        text = " ".join(self.prompt_edit.text().split())
        if not text:
            self._message("warning", "Type a finding first, e.g. 'small left pleural effusion'.")
            return None
        return text

    def _message(self, level: str, text: str) -> None:
        self.status_label.setText(text)
        if self._notify is not None:
            self._notify(level, text)

    def _start(self, func: Callable, on_done: Callable[[Outcome], None]) -> Task | None:
        if self._scorer is None or self.busy:
            return None

        def done(outcome: Outcome) -> None:
            self._update_enabled()
            if not outcome.ok:
                self._message("error", f"Prompt failed: {outcome.error}")
                return
            on_done(outcome)

        self.task = Task(func, on_done=done, desc=None, start=False)
        self._update_enabled()
        self.task.worker.start()
        return self.task

    # --------------------------------------------------------------------------- actions
    def score(self) -> Task | None:
        """Score the typed finding per anatomy (in a worker); returns the task."""
        text = self._text()
        if text is None or self._scorer is None:
            return None
        scorer = self._scorer
        return self._start(lambda progress, cancel: (scorer.score(text), scorer.check_prompt(text)),
                           lambda o: self._show_scores(text, o))

    def _anatomy_row(self, anatomy: str) -> int:
        """Row of ``anatomy`` in ``score_table`` (appended when missing)."""
        table = self.score_table
        for r in range(table.rowCount()):
            if table.item(r, 0).text() == anatomy:
                return r
        r = table.rowCount()
        table.setRowCount(r + 1)
        table.setItem(r, 0, _tip(QTableWidgetItem(anatomy)))
        for c in range(1, len(SCORE_COLUMNS)):
            table.setItem(r, c, QTableWidgetItem(""))
        return r

    def _show_scores(self, text: str, outcome: Outcome) -> None:
        scores, check = outcome.value
        self.last_scores = scores
        self.last_check = check
        self.score_table.setRowCount(0)  # a new prompt: the robustness columns are stale
        if self.robustness_prompt != text:
            self._clear_robustness()
        for s in scores:
            self.score_table.setItem(self._anatomy_row(s.anatomy), 1, _prob_item(s.probability))
        self.prompt_notice.setText(" ".join(check.notes))
        self.prompt_notice.setVisible(bool(check.notes))
        self.status_label.setText(f"'{text}' scored in {outcome.seconds:.2f} s")

    def _clear_robustness(self) -> None:
        """Empty the robustness view (it must never show another prompt than the current one)."""
        self.robustness_prompt = None
        self.last_robustness = None
        self.variants_table.setRowCount(0)
        self.robust_box.setTitle(ROBUSTNESS_TITLE)
        table = self.score_table
        for r in range(table.rowCount()):
            for c in (2, 3):
                table.setItem(r, c, QTableWidgetItem(""))

    def _prompt_edited(self, text: str) -> None:
        if self.robustness_prompt is not None and " ".join(text.split()) != self.robustness_prompt:
            self._clear_robustness()

    def run_robustness(self) -> Task | None:
        """Score the finding with every template and each paraphrase; flag answers that flip."""
        text = self._text()
        if text is None or self._scorer is None:
            return None
        paraphrases = tuple(" ".join(line.split()) for line in self.paraphrase_edit.toPlainText().splitlines())
        paraphrases = tuple(p for p in paraphrases if p)
        scorer = self._scorer
        return self._start(lambda progress, cancel: scorer.robustness(text, paraphrases=paraphrases),
                           lambda o: self._show_robustness(text, o))

    def _show_robustness(self, text: str, outcome: Outcome) -> None:
        if " ".join(self.prompt_edit.text().split()) != text:
            return  # the prompt changed while it ran: not the current prompt's robustness
        rob: Robustness = outcome.value
        self.last_robustness = rob
        self.robustness_prompt = text
        self.robust_box.setTitle(f"Robustness of '{text}'")
        for row in rob.rows:
            r = self._anatomy_row(row.anatomy)
            if math.isnan(row.mean):
                items = {2: QTableWidgetItem("not assessable"), 3: QTableWidgetItem("")}
            else:
                items = {2: QTableWidgetItem(f"{row.mean:.3f} +- {row.std:.3f}"),
                         3: QTableWidgetItem(("\u26a0 " if row.flips else "") + str(row.flips))}
            for c, item in items.items():
                _tip(item, f"{row.flips} wording(s) give the opposite answer in the {row.anatomy}" if row.flips
                     else "mean +- std over the templates and your paraphrases" if c == 2 else "")
                if row.flips:
                    item.setForeground(QBrush(_RED))
                self.score_table.setItem(r, c, item)
        self.variants_table.setRowCount(len(rob.variants))
        for r, v in enumerate(rob.variants):
            items = [QTableWidgetItem(("\u26a0 " if v.flipped else "") + v.prompt),
                     QTableWidgetItem(v.anatomy), _prob_item(v.probability)]
            for c, item in enumerate(items):
                if c < 2:
                    _tip(item)
                if v.flipped:
                    item.setForeground(QBrush(_RED))
                    _tip(item, "answer flips relative to the majority of wordings")
                self.variants_table.setItem(r, c, item)
        n_flip = sum(row.flips for row in rob.rows)
        self.status_label.setText(f"robustness over {len(rob.variants)} scores in {outcome.seconds:.2f} s; "
                                  f"{n_flip} flip(s)")

    def show_heatmap(self) -> Task | None:
        """Compute the typed finding's heatmap and emit :attr:`heatmap_ready`."""
        text = self._text()
        if text is None or self._scorer is None:
            return None
        scorer = self._scorer

        def done(outcome: Outcome) -> None:
            if outcome.value is None:
                self._message("warning", "this checkpoint gives no prompt heatmap")
                return
            self.heatmap_ready.emit(outcome.value.name, outcome.value)

        return self._start(lambda progress, cancel: scorer.heatmap(text), done)

    def flipped_anatomies(self) -> list[str]:
        """Anatomies of ``score_table`` flagged in red by the robustness check."""
        t = self.score_table
        return [t.item(r, 0).text() for r in range(t.rowCount())
                if t.item(r, 3) is not None and t.item(r, 3).foreground().color() == _RED]

    def flipped_rows(self) -> list[int]:
        """Rows of ``variants_table`` shown in red (flipped answers)."""
        return [r for r in range(self.variants_table.rowCount())
                if self.variants_table.item(r, 0).foreground().color() == _RED]

