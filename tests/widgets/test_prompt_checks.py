"""Free-text prompts: the panel says when a prompt is cut off, mostly unknown or not English, and the
robustness view only ever shows the current prompt."""

from __future__ import annotations

import pytest
from qtpy.QtCore import Qt


pytestmark = pytest.mark.gui
WAIT_MS = 60_000


@pytest.fixture()
def panel(ct_viewer, tiny_checkpoint, make_detect_widget):
    widget = make_detect_widget(ct_viewer, tiny_checkpoint)
    assert widget.run_blocking(timeout=120) is not None
    widget.show()
    widget.tabs.setCurrentWidget(widget.prompt_panel)
    return widget.prompt_panel


def _score(panel, qtbot, text: str):
    panel.prompt_edit.setText(text)
    qtbot.keyClick(panel.prompt_edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: panel.task is not None and panel.task.finished, timeout=WAIT_MS)
    assert panel.task.outcome.ok, panel.task.outcome.error
    return panel.prompt_notice.text() if panel.prompt_notice.isVisible() else ""


@pytest.mark.parametrize("text, expected", [
    ("small left pleural effusion", ""),
    ("cardiomegaly", ""),  # split into pieces by the tokenizer, but one of the model's own findings
    ("pneumothorax", "outside the model's vocabulary ('pneumothorax')"),
    ("kleiner linksseitiger Pleuraerguss", "does not look like English"),
    ("\u53f3\u80ba\u4e0b\u53f6\u7ed3\u8282", "does not look like English"),
    ("There is a " + "very " * 40 + "large left pleural effusion", "cut off: it has 53 tokens"),  # 51 word pieces + [CLS], [SEP]
])
def test_prompt_notices(panel, qtbot, text, expected):
    notice = _score(panel, qtbot, text)
    if expected:
        assert expected in notice
    else:
        assert notice == ""
    assert panel.last_check is not None and panel.last_check.max_tokens == 32


def test_robustness_view_is_always_the_current_prompts(panel, qtbot):
    _score(panel, qtbot, "small left pleural effusion")
    qtbot.mouseClick(panel.robustness_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.task.finished, timeout=WAIT_MS)
    assert panel.robustness_prompt == "small left pleural effusion"
    assert "small left pleural effusion" in panel.robust_box.title() and panel.variants_table.rowCount() > 0
    # editing the prompt empties the view: it never shows the old prompt's wordings
    panel.prompt_edit.setText("enlarged heart")
    assert panel.variants_table.rowCount() == 0 and panel.robustness_prompt is None
    assert "pleural" not in panel.robust_box.title()
    assert all(panel.score_table.item(r, 2).text() == "" for r in range(panel.score_table.rowCount()))
    _score(panel, qtbot, "enlarged heart")
    qtbot.mouseClick(panel.robustness_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.task.finished, timeout=WAIT_MS)
    assert panel.robustness_prompt == "enlarged heart" and "enlarged heart" in panel.robust_box.title()
    prompts = [panel.variants_table.item(r, 0).text() for r in range(panel.variants_table.rowCount())]
    assert prompts and not any("pleural" in p for p in prompts)
    # a robustness run whose prompt was edited meanwhile is not shown
    task = panel.run_robustness()
    panel.prompt_edit.setText("something else")
    qtbot.waitUntil(lambda: task.finished, timeout=WAIT_MS)
    assert panel.variants_table.rowCount() == 0 and panel.robustness_prompt is None
