"""The radiological display frame of ``napari_ctvlp._layers`` (no viewer: the geometry itself)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from napari_ctvlp._layers import RAS_TO_DISPLAY, display_geometry, display_geometry_from_affine, volume_affine_from_layer
from napari_ctvlp.engine.volume import CTVolume


def _volume(codes: str, shape=(7, 9, 11), spacing=(0.7, 0.8, 2.5), origin=(10.0, -20.0, 30.0)) -> CTVolume:
    """A volume whose voxel axes (i, j, k) point towards ``codes`` (e.g. "LPS"), array (k, j, i)."""
    direction = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
    affine = np.eye(4)
    for axis, (code, size) in enumerate(zip(codes, spacing)):
        affine[:3, axis] = np.asarray(direction[code], float) * size
    affine[:3, 3] = origin
    array = np.zeros(shape[::-1], np.int16)  # array shape (nk, nj, ni) for file shape (ni, nj, nk)
    return CTVolume(array, tuple(spacing[::-1]), affine, tuple(codes))  # type: ignore[arg-type]


ALL_CODES = ["".join(p) for axes in itertools.permutations(["RL", "AP", "SI"])
             for p in itertools.product(*axes)]


@pytest.mark.parametrize("codes", ALL_CODES)
def test_every_axis_order_shows_inferior_posterior_left(codes: str) -> None:
    vol = _volume(codes)
    geometry = display_geometry(vol)
    assert not geometry.oblique
    assert sorted(geometry.axes) == [0, 1, 2]
    rng = np.random.default_rng(0)
    for _ in range(5):
        index = rng.uniform(0, 6, size=3)  # an index of vol.array
        ras = vol.display_affine @ np.append(index, 1.0)
        shown = geometry.data_to_world() @ np.append(geometry.index_to_display(index), 1.0)
        # the displayed world position is the exact RAS position, in the display frame
        np.testing.assert_allclose(shown[:3], RAS_TO_DISPLAY @ ras[:3], atol=1e-9)
    # display frame: axis 0 towards inferior, 1 towards posterior, 2 towards the patient's left
    np.testing.assert_allclose(RAS_TO_DISPLAY @ [0, 0, 1], [-1, 0, 0])  # superior -> smaller axis 0
    np.testing.assert_allclose(RAS_TO_DISPLAY @ [0, 1, 0], [0, -1, 0])  # anterior -> up on screen
    np.testing.assert_allclose(RAS_TO_DISPLAY @ [1, 0, 0], [0, 0, -1])  # patient's right -> screen left
    assert np.linalg.det(RAS_TO_DISPLAY) == pytest.approx(1.0)  # a rotation: 3D views are not mirrored
    # layer data is a view of the array and goes back exactly
    data = np.arange(vol.array.size).reshape(vol.shape)
    shown = geometry.to_display(data)
    assert shown.shape == geometry.display_shape(vol.shape) and np.shares_memory(shown, data)
    assert np.array_equal(geometry.from_display(shown), data)


def test_axial_files_are_not_transposed_only_flipped() -> None:
    ras = display_geometry(_volume("RAS"))
    assert ras.axes == (0, 1, 2) and all(s < 0 for s in ras.scale)  # every axis runs against the display
    lps = display_geometry(_volume("LPS"))  # DICOM's own axes: only the slice axis is flipped
    assert lps.axes == (0, 1, 2) and lps.scale[0] < 0 < lps.scale[1] and lps.scale[2] > 0
    assert display_geometry(_volume("PIR")).axes != (0, 1, 2)  # a sagittal acquisition is transposed


def test_oblique_affine_is_shown_along_the_nearest_axes() -> None:
    vol = _volume("LPS")
    angle = np.deg2rad(12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = vol.affine.copy()
    affine[:3, :3] = rot @ affine[:3, :3]
    geometry = display_geometry(CTVolume(vol.array, vol.spacing, affine, vol.orientation))
    assert geometry.oblique and geometry.axes == (0, 1, 2)
    np.testing.assert_allclose(np.abs(geometry.scale), vol.spacing)


def test_layer_in_display_frame_maps_back_to_ras() -> None:
    vol = _volume("RAS")
    geometry = display_geometry(vol)
    affine = volume_affine_from_layer(geometry.scale, geometry.translate)
    np.testing.assert_allclose(affine, vol.affine, atol=1e-12)  # same axis order: the file's own affine
    assert display_geometry_from_affine(vol.display_affine) == geometry
