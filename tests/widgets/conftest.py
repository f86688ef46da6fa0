"""Fixtures of the widget tests: a tiny random-weight checkpoint, a small chest-CT phantom, a widget
set up to use the phantom's reference organs."""

from __future__ import annotations

from pathlib import Path

import pytest

#: small enough that a whole detection takes about a second on 2 CPU cores
PHANTOM_SIZE = (48, 56, 56)
TINY_PREP = {"image_size": [32, 32, 32], "spacing_mm": [6.0, 6.0, 6.0], "hu_window": [-1000.0, 1000.0]}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny CTVLP saved with ``engine.checkpoint.save_checkpoint``."""
    import torch

    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    torch.manual_seed(0)
    model = CTVLP(CTVLPConfig.tiny()).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", preprocessing=TINY_PREP,
                           model_card="# Tiny test model\n\nRandom weights, for tests only.\n")


@pytest.fixture(scope="session")
def phantom():
    """``(CTVolume, organ labels)`` of a small synthetic chest-CT phantom."""
    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=1, size=PHANTOM_SIZE)
    return ph.volume, ph.organs


@pytest.fixture()
def ct_viewer(make_napari_viewer, phantom):
    """A viewer with the phantom CT (through the reader's layer tuple) and its organ Labels layer."""
    from napari_ctvlp._layers import organ_labels_layer
    from napari_ctvlp._reader import layer_data

    volume, organs = phantom
    viewer = make_napari_viewer()
    data, kwargs, _ = layer_data(volume, name="ct")
    viewer.add_image(data, **kwargs)
    data, kwargs, _ = organ_labels_layer(organs, volume, name="reference organs")
    viewer.add_labels(data, **kwargs)
    return viewer


@pytest.fixture()
def make_detect_widget(qtbot):
    """``make(viewer, checkpoint)``: a DetectWidget on ``checkpoint`` with the viewer's "reference
    organs" Labels layer as the organ mask, on the CPU."""
    from napari_ctvlp.widgets.detect_widget import LABELS_LAYER_CHOICE, DetectWidget

    def make(viewer, checkpoint):
        widget = DetectWidget(viewer)
        qtbot.addWidget(widget)
        widget.set_checkpoint(checkpoint)
        widget.set_segmentation(LABELS_LAYER_CHOICE)
        widget.labels_combo.setCurrentText("reference organs")
        widget.device_combo.setCurrentText("cpu")
        return widget

    return make
