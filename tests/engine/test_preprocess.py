"""Model-grid resampling: world coordinates preserved, inverse mapping, labels, flipped affines."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctvlp.engine.preprocess import (
    PreparedVolume,
    PreprocessConfig,
    model_grid_affine,
    preprocess,
    source_axis_matrices,
    to_model_grid,
    to_source_grid,
)
from napari_ctvlp.engine.volume import CTVolume

SHAPE = (30, 40, 44)  # display order (k, j, i)
SPACING = (2.0, 1.5, 1.25)  # (sk, sj, si)


def _affine(kind: str) -> np.ndarray:
    """Voxel (i, j, k) -> RAS affines of several orientations."""
    si, sj, sk = SPACING[2], SPACING[1], SPACING[0]
    if kind == "RAS":
        lin = np.diag([si, sj, sk])
    elif kind == "LPS":  # DICOM-like: i runs to the left, j to the back
        lin = np.diag([-si, -sj, sk])
    elif kind == "sagittal":  # i -> A, j -> S (inferior first flipped), k -> L
        lin = np.array([[0, 0, -sk], [si, 0, 0], [0, -sj, 0]], dtype=float)
    elif kind == "oblique":  # rotated 20 degrees about S: no separable form
        c, s_ = np.cos(np.radians(20)), np.sin(np.radians(20))
        lin = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1.0]]) @ np.diag([si, sj, sk])
    else:
        raise AssertionError(kind)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = (12.5, -40.0, 103.0)
    return aff


def _volume(kind: str, cube: tuple[slice, slice, slice]) -> CTVolume:
    arr = np.full(SHAPE, -1000, dtype=np.int16)
    arr[2:-2, 3:-3, 3:-3] = 0  # a soft-tissue "body"
    arr[cube] = 800
    return CTVolume(arr, SPACING, _affine(kind))


def _world_centroid(mask: np.ndarray, display_affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return (display_affine @ np.append(idx, 1.0))[:3]


@pytest.mark.parametrize("kind", ["RAS", "LPS", "sagittal", "oblique"])
def test_bright_cube_keeps_its_world_position(kind: str) -> None:
    cube = (slice(8, 14), slice(10, 18), slice(26, 34))
    vol = _volume(kind, cube)
    cfg = PreprocessConfig(image_size=(40, 40, 40), spacing_mm=(1.5, 1.5, 1.5), center="volume", antialias=False)
    prep = preprocess(vol, config=cfg)
    assert prep.image.shape == (40, 40, 40) and prep.image.dtype == np.float32
    # HU 800 -> 0.8 in [-1, 1]; the cube is the only region above 0.4
    bright = prep.image > 0.4
    assert bright.sum() > 50
    src_mask = np.zeros(SHAPE, bool)
    src_mask[cube] = True
    expected = _world_centroid(src_mask, vol.display_affine)
    got = _world_centroid(bright, prep.model_affine)
    np.testing.assert_allclose(got, expected, atol=1.0)
    # the model grid is RAS: display axis 2 runs towards +R, 1 towards +A, 0 towards +S
    lin = prep.model_affine[:3, :3]
    assert lin[0, 2] > 0 and lin[1, 1] > 0 and lin[2, 0] > 0
    # outside the CT is padded with air (-1000 HU -> -1)
    assert prep.image.min() == pytest.approx(-1.0)


def test_model_affine_orientation_and_centre() -> None:
    cfg = PreprocessConfig(image_size=(4, 6, 8), spacing_mm=(3.0, 2.0, 1.0), orientation="LPS")
    aff = model_grid_affine(cfg, np.array([10.0, 20.0, 30.0]))
    # display axis 2 (voxel i) runs towards L = -x, axis 1 towards P = -y, axis 0 towards +z
    np.testing.assert_allclose(aff[:3, 2], [-1.0, 0, 0])
    np.testing.assert_allclose(aff[:3, 1], [0, -2.0, 0])
    np.testing.assert_allclose(aff[:3, 0], [0, 0, 3.0])
    centre = aff @ np.array([1.5, 2.5, 3.5, 1.0])
    np.testing.assert_allclose(centre[:3], [10, 20, 30])


def test_body_centre_follows_the_body() -> None:
    arr = np.full((20, 60, 60), -1000, dtype=np.int16)
    arr[:, 5:25, 30:56] = 40  # body off-centre
    vol = CTVolume(arr, (2.0, 1.0, 1.0), np.diag([1.0, 1.0, 2.0, 1.0]))
    prep = preprocess(vol, config=PreprocessConfig(image_size=(8, 16, 16), spacing_mm=(4.0, 2.0, 2.0)))
    # body bbox centre in display index (9.5, 14.5, 42.5) -> RAS (x=i=42.5, y=j=14.5, z=2*9.5)
    np.testing.assert_allclose(prep.center_mm, (42.5, 14.5, 19.0), atol=2.0)


@pytest.mark.parametrize("kind", ["RAS", "LPS", "sagittal", "oblique"])
def test_round_trip_of_a_smooth_field(kind: str) -> None:
    vol = _volume(kind, (slice(0, 1),) * 3)
    cfg = PreprocessConfig(image_size=(48, 48, 48), spacing_mm=(1.6, 1.6, 1.6), center="volume")
    prep = preprocess(vol, config=cfg)

    def field(world: np.ndarray) -> np.ndarray:
        x, y, z = world
        return np.sin(x / 25.0) + np.cos(y / 30.0) * 0.5 + z / 100.0

    def grid_world(shape: tuple[int, ...], aff: np.ndarray) -> np.ndarray:
        idx = np.indices(shape).reshape(3, -1).astype(float)
        return (aff[:3, :3] @ idx + aff[:3, 3:4]).reshape(3, *shape)

    on_model = field(grid_world(cfg.image_size, prep.model_affine)).astype(np.float32)
    back = to_source_grid(on_model, prep)
    assert back.shape == vol.shape and back.dtype == np.float32
    expected = field(grid_world(vol.shape, vol.display_affine))
    # the source box lies inside the model box (48*1.6 = 77 mm > 60 mm extent)
    np.testing.assert_allclose(back, expected, atol=5e-3)
    # the separable form gives the same numbers
    sep = source_axis_matrices(prep)
    if kind == "oblique":
        assert sep is None
        return
    assert sep is not None
    perm, mats = sep
    t = np.transpose(on_model, perm)
    t = np.einsum("ai,ijk->ajk", mats[0], t)
    t = np.einsum("bj,ajk->abk", mats[1], t)
    t = np.einsum("ck,abk->abc", mats[2], t)
    np.testing.assert_allclose(t, back, atol=1e-4)


def test_organs_nearest_keep_label_values_and_invert() -> None:
    organs = np.zeros(SHAPE, np.uint8)
    organs[5:20, 5:30, 5:20] = 3
    organs[5:20, 5:30, 22:40] = 7
    organs[20:28, 10:30, 10:30] = 12
    vol = _volume("LPS", (slice(0, 1),) * 3)
    cfg = PreprocessConfig(image_size=(40, 40, 48), spacing_mm=(2.0, 1.5, 1.25), center="volume")
    prep = preprocess(vol, config=cfg, organs=organs)
    assert prep.organs is not None and prep.organs.dtype == np.uint8
    assert set(np.unique(prep.organs)) == {0, 3, 7, 12}
    back = to_source_grid(prep.organs, prep, order=0)
    assert back.dtype == np.uint8 and back.shape == SHAPE
    assert (back == organs).mean() > 0.99
    again = to_model_grid(back, prep, order=0)
    assert set(np.unique(again)) <= {0, 3, 7, 12}


def test_antialias_block_mean_preserves_position_and_mean() -> None:
    arr = np.full((40, 64, 64), -1000, dtype=np.int16)
    arr[10:30, 16:48, 16:48] = 100
    vol = CTVolume(arr, (1.0, 0.5, 0.5), np.diag([0.5, 0.5, 1.0, 1.0]))
    cfg_a = PreprocessConfig(image_size=(20, 16, 16), spacing_mm=(2.0, 2.0, 2.0), center="volume", antialias=True)
    cfg_b = PreprocessConfig(**{**cfg_a.to_dict(), "antialias": False})
    a, b = preprocess(vol, config=cfg_a), preprocess(vol, config=cfg_b)
    inside_a, inside_b = a.image > -0.5, b.image > -0.5
    np.testing.assert_allclose(
        _world_centroid(inside_a, a.model_affine), _world_centroid(inside_b, b.model_affine), atol=0.6
    )
    assert abs(inside_a.sum() - inside_b.sum()) <= 0.15 * inside_b.sum()


def test_config_round_trip_and_errors(tmp_path) -> None:
    cfg = PreprocessConfig.for_image_size((64, 96, 96))
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.field_of_view_mm == pytest.approx((336.0, 384.0, 352.0))
    with pytest.raises(ValueError, match="orientation"):
        PreprocessConfig(orientation="RRS")
    with pytest.raises(ValueError, match="hu_window"):
        PreprocessConfig(hu_window=(100, -100))
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessConfig.from_dict({"bogus": 1})
    vol = _volume("RAS", (slice(0, 1),) * 3)
    with pytest.raises(ValueError, match="organs"):
        preprocess(vol, config=cfg, organs=np.zeros((3, 3, 3), np.uint8))
    prep = preprocess(vol, config=PreprocessConfig(image_size=(8, 8, 8), spacing_mm=(8, 8, 8)))
    assert isinstance(prep, PreparedVolume)
    with pytest.raises(ValueError, match="model grid shape"):
        to_source_grid(np.zeros((4, 4, 4), np.float32), prep)


def test_separable_path_matches_scipy_with_cval() -> None:
    from scipy import ndimage

    vol = _volume("LPS", (slice(0, 1),) * 3)
    prep = preprocess(vol, config=PreprocessConfig(image_size=(16, 20, 24), spacing_mm=(2.5, 2.0, 1.5)))
    arr = np.random.default_rng(1).random((16, 20, 24)).astype(np.float32)
    fast = to_source_grid(arr, prep, cval=-3.0)
    m = prep.source_to_model
    ref = ndimage.affine_transform(arr, m[:3, :3], offset=m[:3, 3], output_shape=vol.shape, order=1, cval=-3.0)
    assert (ref == -3.0).any()  # part of the CT lies outside the model box
    np.testing.assert_allclose(fast, ref, atol=1e-5)
