"""Fixtures of the widget tests: a tiny random-weight checkpoint and a small chest-CT phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    """``(CTVolume, organ labels)`` of a small synthetic chest CT (engine.phantom when available)."""
    try:
        from napari_ctvlp.engine.phantom import make_phantom
    except ImportError:
        make_phantom = None
    if make_phantom is not None:
        ph = make_phantom(seed=1, size=PHANTOM_SIZE)
        return ph.volume, ph.organs
    return _box_phantom(PHANTOM_SIZE)


def _box_phantom(shape: tuple[int, int, int]):
    """Fallback: ellipsoid body, two lungs, heart, aorta, esophagus, trachea on a 3 mm grid."""
    from napari_ctvlp.engine.anatomy import ORGAN_BY_NAME
    from napari_ctvlp.engine.volume import CTVolume

    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [s / 2 for s in shape]

    def ell(cz, cy, cx, rz, ry, rx):
        return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1

    hu = np.full(shape, -1000, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    body = ell(c[0], c[1], c[2], shape[0], shape[1] * 0.45, shape[2] * 0.47)
    hu[body], labels[body] = 30, ORGAN_BY_NAME["body"].value
    for name, centre, radii, value in (
        ("lung_right", (c[0], c[1], c[2] * 0.6), (shape[0] * 0.4, shape[1] * 0.3, shape[2] * 0.17), -850),
        ("lung_left", (c[0], c[1], c[2] * 1.4), (shape[0] * 0.4, shape[1] * 0.3, shape[2] * 0.17), -850),
        ("heart", (c[0] * 0.8, c[1] * 0.85, c[2] * 1.05), (shape[0] * 0.18, shape[1] * 0.14, shape[2] * 0.12), 40),
        ("aorta", (c[0], c[1] * 1.15, c[2] * 0.95), (shape[0] * 0.4, 2.5, 2.5), 45),
        ("esophagus", (c[0], c[1] * 1.3, c[2]), (shape[0] * 0.4, 1.5, 1.5), 20),
        ("trachea", (c[0] * 1.5, c[1], c[2]), (shape[0] * 0.2, 2, 2), -1000),
    ):
        m = ell(*centre, *radii) & body
        hu[m], labels[m] = value, ORGAN_BY_NAME[name].value
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-80.0, -90.0, -70.0)
    return CTVolume(hu, (3.0, 3.0, 3.0), affine, ("R", "A", "S"), {"path": "phantom", "format": "nifti"}), labels


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
