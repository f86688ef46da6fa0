"""One preprocessing pipeline shared by inference and training: CT grid -> model grid and back.

The model grid is a box of ``image_size`` voxels (display order ``(z, y, x)``) at ``spacing_mm``,
oriented along the world axes (``RAS`` by default) and centred on the body (or the volume).
The input CT is resampled onto it with *one* affine resampling (trilinear,
:func:`scipy.ndimage.affine_transform`), after an optional integer block-mean that both
anti-aliases and speeds up strong downsampling (0.7 mm -> 1.5 mm). Voxels outside the CT get
``pad_hu`` (-1000 HU, air). HU are clipped to ``hu_window`` and scaled to ``[-1, 1]``.

:func:`to_source_grid` maps any array on the model grid (heatmaps: linear, labels: nearest)
back onto the input CT grid, so the CT's own affine applies to it.
:func:`source_axis_matrices` gives the same linear mapping as three small per-axis matrices
(when both grids are axis-aligned, the usual case), which makes upsampling low-resolution
heatmaps to a 512x512x300 CT a few matrix products instead of a 78-million-point resample.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from napari_ctvlp.engine.volume import CTVolume, ProgressCallback, report

logger = logging.getLogger(__name__)

_AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class PreprocessConfig:
    """Geometry and intensity of the model grid.

    Attributes:
        image_size: model grid size in display order ``(D, H, W)`` = ``(z, y, x)``.
        spacing_mm: voxel size in mm in display order ``(sz, sy, sx)``.
        hu_window: HU range mapped linearly to ``[-1, 1]`` (values outside are clipped).
        orientation: axis codes of the model grid's voxel axes ``(i, j, k)``, e.g. ``"RAS"``
            (display axis 2 runs towards R, axis 1 towards A, axis 0 towards S).
        center: ``"body"`` (centre of the bounding box of voxels above ``body_threshold_hu``)
            or ``"volume"`` (centre of the CT's field of view).
        body_threshold_hu: HU threshold for the body bounding box.
        pad_hu: HU value of model voxels outside the CT.
        antialias: block-average the CT by the integer part of the downsampling factor first.
    """

    image_size: tuple[int, int, int] = (112, 256, 352)
    spacing_mm: tuple[float, float, float] = (3.0, 1.5, 1.0)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    orientation: str = "RAS"
    center: str = "body"
    body_threshold_hu: float = -500.0
    pad_hu: float = -1000.0
    antialias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "hu_window", tuple(float(v) for v in self.hu_window))
        if len(self.image_size) != 3 or min(self.image_size) < 1:
            raise ValueError(f"PreprocessConfig.image_size must be 3 positive ints, got {self.image_size}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"PreprocessConfig.spacing_mm must be 3 positive numbers, got {self.spacing_mm}")
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"PreprocessConfig.hu_window must be (low, high) with low < high, got {self.hu_window}")
        codes = self.orientation.upper()
        if len(codes) != 3 or any(c not in _AXIS_CODES for c in codes) or len({_AXIS_CODES[c][0] for c in codes}) != 3:
            raise ValueError(f"PreprocessConfig.orientation must name each of R/L, A/P, S/I once, got {self.orientation!r}")
        if self.center not in ("body", "volume"):
            raise ValueError(f"PreprocessConfig.center must be 'body' or 'volume', got {self.center!r}")

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        """Extent of the model grid in mm, display order."""
        return tuple(n * s for n, s in zip(self.image_size, self.spacing_mm))  # type: ignore[return-value]

    @classmethod
    def for_image_size(
        cls, image_size: tuple[int, int, int], *, field_of_view_mm: tuple[float, float, float] = (336.0, 384.0, 352.0), **kw: Any
    ) -> PreprocessConfig:
        """A config whose grid of ``image_size`` voxels covers ``field_of_view_mm`` (a chest)."""
        spacing = tuple(f / n for f, n in zip(field_of_view_mm, image_size))
        return cls(image_size=tuple(image_size), spacing_mm=spacing, **kw)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists for tuples)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    """A CT on the model grid, with what is needed to map results back.

    Attributes:
        image: ``float32 [D, H, W]`` in ``[-1, 1]``.
        organs: ``uint8 [D, H, W]`` organ labels (nearest-neighbour), or ``None``.
        model_affine: 4x4, model display index ``(d0, d1, d2, 1)`` -> RAS mm.
        source_affine: 4x4, input display index -> RAS mm (``CTVolume.display_affine``).
        source_shape: shape of the input ``CTVolume.array``.
        source_spacing: input voxel size (display order).
        config: the :class:`PreprocessConfig` used.
        center_mm: RAS position of the model grid centre.
        timings: seconds per step.
    """

    image: np.ndarray
    organs: np.ndarray | None
    model_affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    config: PreprocessConfig
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def source_to_model(self) -> np.ndarray:
        """4x4 matrix: input display index -> model display index."""
        return np.linalg.inv(self.model_affine) @ self.source_affine


def model_grid_affine(config: PreprocessConfig, center_mm: np.ndarray) -> np.ndarray:
    """4x4 display-index -> world matrix of the model grid centred at ``center_mm`` (RAS)."""
    codes = config.orientation.upper()
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    # voxel axes (i, j, k) are display axes (2, 1, 0)
    for voxel_axis, code in enumerate(codes):
        world_axis, sign = _AXIS_CODES[code]
        display_axis = 2 - voxel_axis
        aff[world_axis, display_axis] = sign * config.spacing_mm[display_axis]
    half = (np.asarray(config.image_size, dtype=float) - 1.0) / 2.0
    aff[:3, 3] = np.asarray(center_mm, dtype=float) - aff[:3, :3] @ half
    return aff


def _body_center(volume: CTVolume, config: PreprocessConfig) -> np.ndarray:
    """RAS centre of the body bounding box (or of the volume)."""
    shape = np.asarray(volume.shape, dtype=float)
    center_idx = (shape - 1.0) / 2.0
    if config.center == "body":
        steps = [max(1, int(math.ceil(2.0 / s))) for s in volume.spacing]
        sub = volume.array[:: steps[0], :: steps[1], :: steps[2]]
        body = sub > config.body_threshold_hu
        if body.any():
            lo, hi = [], []
            for axis in range(3):
                other = tuple(a for a in range(3) if a != axis)
                idx = np.flatnonzero(body.any(axis=other))
                half = (steps[axis] - 1) / 2.0  # the edge lies between two samples
                lo.append(max(idx[0] * steps[axis] - half, 0.0))
                hi.append(min(idx[-1] * steps[axis] + half, shape[axis] - 1.0))
            center_idx = (np.asarray(lo, float) + np.asarray(hi, float)) / 2.0
        else:
            logger.warning("no voxel above %s HU: centring the model grid on the volume", config.body_threshold_hu)
    return (volume.display_affine @ np.append(center_idx, 1.0))[:3]


def _block_factors(volume: CTVolume, config: PreprocessConfig) -> tuple[int, int, int]:
    """Integer downsampling factor per input display axis (model step along that axis / spacing)."""
    direction = volume.display_affine[:3, :3] / np.asarray(volume.spacing)[None, :]
    # model spacing per world axis
    model_world = np.zeros(3)
    codes = config.orientation.upper()
    for voxel_axis, code in enumerate(codes):
        model_world[_AXIS_CODES[code][0]] = config.spacing_mm[2 - voxel_axis]
    factors = []
    for axis in range(3):
        u = direction[:, axis]
        step = 1.0 / max(float(np.linalg.norm(u / model_world)), 1e-12)
        factors.append(max(1, int(math.floor(step / volume.spacing[axis] + 1e-6))))
    return tuple(factors)  # type: ignore[return-value]


def _block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    n = [s // f for s, f in zip(array.shape, factors)]
    cropped = array[: n[0] * factors[0], : n[1] * factors[1], : n[2] * factors[2]]
    blocks = cropped.reshape(n[0], factors[0], n[1], factors[1], n[2], factors[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def preprocess(
    volume: CTVolume,
    *,
    config: PreprocessConfig,
    organs: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> PreparedVolume:
    """Resample a CT (and optionally its organ labels) onto the model grid.

    Args:
        volume: the input CT in HU.
        config: the model grid and HU window.
        organs: organ label map on the input grid (``volume.shape``), resampled nearest.
        progress: ``progress(done, 3, message)`` before each step ("antialias", "resample",
            "organ labels"); a callback that raises stops the work there (the pipeline's cancel).

    Returns:
        :class:`PreparedVolume` with the image in ``[-1, 1]`` and the geometry to invert.
    """
    from scipy import ndimage
    import time

    if organs is not None and tuple(organs.shape) != volume.shape:
        raise ValueError(f"organs: label map shape {organs.shape} does not match the CT shape {volume.shape}")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    report(progress, 0, 3, "antialias")
    center = _body_center(volume, config)
    model_aff = model_grid_affine(config, center)
    source_aff = volume.display_affine

    array = volume.array
    src_aff = source_aff
    factors = _block_factors(volume, config) if config.antialias else (1, 1, 1)
    if any(f > 1 for f in factors) and all(s >= f for s, f in zip(volume.shape, factors)):
        array = _block_mean(array, factors)
        block = np.eye(4)
        block[:3, :3] = np.diag(factors)
        block[:3, 3] = (np.asarray(factors, dtype=float) - 1.0) / 2.0
        src_aff = source_aff @ block
    timings["antialias"] = time.perf_counter() - t0

    report(progress, 1, 3, "resample")
    t1 = time.perf_counter()
    m = np.linalg.inv(src_aff) @ model_aff  # model index -> (downsampled) source index
    image = ndimage.affine_transform(
        array, m[:3, :3], offset=m[:3, 3], output_shape=config.image_size, order=1,
        mode="constant", cval=config.pad_hu, output=np.float32,
    )
    lo, hi = config.hu_window
    np.clip(image, lo, hi, out=image)
    image -= lo
    image *= 2.0 / (hi - lo)
    image -= 1.0
    timings["resample"] = time.perf_counter() - t1

    organs_model = None
    if organs is not None:
        report(progress, 2, 3, "organ labels")
        t2 = time.perf_counter()
        mo = np.linalg.inv(source_aff) @ model_aff
        organs_model = ndimage.affine_transform(
            np.ascontiguousarray(organs, dtype=np.uint8), mo[:3, :3], offset=mo[:3, 3],
            output_shape=config.image_size, order=0, mode="constant", cval=0, output=np.uint8,
        )
        timings["organs"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return PreparedVolume(
        image=image, organs=organs_model, model_affine=model_aff, source_affine=source_aff,
        source_shape=volume.shape, source_spacing=tuple(volume.spacing), config=config,
        center_mm=tuple(float(c) for c in center), timings=timings,
    )


def to_source_grid(array: np.ndarray, prepared: PreparedVolume, *, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Map an array on the model grid back onto the input CT grid.

    Args:
        array: ``[D, H, W]`` on the model grid, or ``[C, D, H, W]`` (each channel mapped).
        prepared: the :class:`PreparedVolume` that defined the model grid.
        order: 1 = linear (heatmaps, returns ``float32``), 0 = nearest (labels, keeps the dtype).
        cval: value outside the model grid.

    Returns:
        array of shape ``prepared.source_shape`` (``[C, *source_shape]`` for 4D input).
    """
    from scipy import ndimage

    size = tuple(prepared.config.image_size)
    if array.ndim == 4:
        return np.stack([to_source_grid(a, prepared, order=order, cval=cval) for a in array])
    if array.ndim != 3 or tuple(array.shape) != size:
        raise ValueError(f"array: expected the model grid shape {size} (or [C, *{size}]), got {array.shape}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    if order == 1:
        sep = source_axis_matrices(prepared)
        if sep is not None:  # axis-aligned grids: three small matrix products (10x faster)
            out = apply_separable(array, *sep)
            if cval != 0.0:
                inside = apply_separable(np.ones((1, 1, 1), np.float32), sep[0], [m.sum(axis=1, keepdims=True) for m in sep[1]])
                out += np.float32(cval) * (1.0 - inside)
            return out
    m = prepared.source_to_model  # source index -> model index
    if order == 0:
        src = np.ascontiguousarray(array)
        out_dtype = src.dtype
    else:
        src = np.ascontiguousarray(array, dtype=np.float32)
        out_dtype = np.float32
    return ndimage.affine_transform(
        src, m[:3, :3], offset=m[:3, 3], output_shape=prepared.source_shape, order=order,
        mode="constant", cval=cval, output=out_dtype,
    )


def to_model_grid(array: np.ndarray, prepared: PreparedVolume, *, order: int = 0, cval: float = 0.0) -> np.ndarray:
    """Map an array on the input CT grid onto the model grid (labels: ``order=0``)."""
    from scipy import ndimage

    if tuple(array.shape) != tuple(prepared.source_shape):
        raise ValueError(f"array: expected the CT shape {prepared.source_shape}, got {array.shape}")
    m = np.linalg.inv(prepared.source_to_model)
    out_dtype = array.dtype if order == 0 else np.float32
    return ndimage.affine_transform(
        np.ascontiguousarray(array), m[:3, :3], offset=m[:3, 3], output_shape=prepared.config.image_size,
        order=order, mode="constant", cval=cval, output=out_dtype,
    )


def _linear_matrix(coords: np.ndarray, n: int) -> np.ndarray:
    """``[len(coords), n]`` linear-interpolation weights; rows outside ``[0, n-1]`` are zero."""
    out = np.zeros((len(coords), n), dtype=np.float32)
    inside = (coords >= -1e-6) & (coords <= n - 1 + 1e-6)
    c = np.clip(coords, 0, n - 1)
    i0 = np.clip(np.floor(c).astype(np.int64), 0, max(n - 2, 0))
    w = (c - i0).astype(np.float32)
    rows = np.flatnonzero(inside)
    if n == 1:
        out[rows, 0] = 1.0
        return out
    out[rows, i0[rows]] = 1.0 - w[rows]
    out[rows, i0[rows] + 1] += w[rows]
    return out


def source_axis_matrices(prepared: PreparedVolume, *, atol: float = 1e-6) -> tuple[tuple[int, int, int], list[np.ndarray]] | None:
    """Separable form of :func:`to_source_grid` (``order=1``, ``cval=0``), if one exists.

    When every input axis maps onto exactly one model axis (axis-aligned grids, possibly
    flipped or permuted), returns ``(perm, [W0, W1, W2])``: input axis ``a`` reads model axis
    ``perm[a]`` and ``W_a`` (``[source_shape[a], image_size[perm[a]]]``) holds the linear
    interpolation weights. Otherwise returns ``None`` (use :func:`to_source_grid`).
    """
    m = prepared.source_to_model
    lin = m[:3, :3]
    perm: list[int] = []
    for a in range(3):
        col = np.abs(lin[:, a])
        b = int(np.argmax(col))
        if np.sum(col > atol * max(col[b], 1.0)) != 1:
            return None
        perm.append(b)
    if sorted(perm) != [0, 1, 2]:
        return None
    mats = []
    for a in range(3):
        b = perm[a]
        coords = lin[b, a] * np.arange(prepared.source_shape[a]) + m[b, 3]
        mats.append(_linear_matrix(coords, prepared.config.image_size[b]))
    return tuple(perm), mats  # type: ignore[return-value]


def apply_separable(array: np.ndarray, perm: tuple[int, int, int], mats: list[np.ndarray]) -> np.ndarray:
    """Apply per-axis linear maps: ``out[a, b, c] = sum W0[a, i] W1[b, j] W2[c, k] x[i, j, k]``.

    ``x`` is ``array`` transposed by ``perm`` (see :func:`source_axis_matrices`); ``W_a`` may
    be any ``[n_out_a, n_in_a]`` matrices (e.g. composed with a token-grid upsampling).
    Runs as three matrix products in torch (multi-threaded), returns ``float32``.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.transpose(array, perm), dtype=np.float32))
    w0, w1, w2 = (torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)) for m in mats)
    if tuple(x.shape) != (w0.shape[1], w1.shape[1], w2.shape[1]):
        raise ValueError(f"array shape {tuple(x.shape)} (after perm {perm}) does not match the matrices")
    with torch.inference_mode():
        x = x @ w2.T  # (n0, n1, out2)
        x = w1 @ x  # (n0, out1, out2)
        out = (w0 @ x.reshape(x.shape[0], -1)).reshape(w0.shape[0], x.shape[1], x.shape[2])
    return out.numpy()
