"""The detection widget's controls without running a model: pickers, errors, table, export."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _image(viewer, shape=(16, 20, 24), name="ct", scale=(2.0, 1.0, 1.0)):
    data = np.full(shape, -1000, dtype=np.int16)
    return viewer.add_image(data, name=name, scale=scale)


def test_image_picker_lists_only_image_layers_and_follows_changes(make_napari_viewer, qtbot):
    from napari_ctvlp.widgets.detect_widget import DetectWidget

    viewer = make_napari_viewer()
    widget = DetectWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.image_combo.count() == 0
    _image(viewer, name="ct1")
    viewer.add_labels(np.zeros((16, 20, 24), dtype=np.uint8), name="mask")
    viewer.add_points(np.zeros((1, 3)), name="pts")
    items = [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert items == ["ct1"]
    assert [widget.labels_combo.itemText(i) for i in range(widget.labels_combo.count())] == ["mask"]
    viewer.layers["ct1"].name = "renamed"
    assert widget.image_combo.itemText(0) == "renamed"
    viewer.layers.remove("renamed")
    assert widget.image_combo.count() == 0
