"""Grid helpers shared by the segmentation backends: canonical (RAS) orientation and block resampling.

The working orientation is nibabel's closest canonical RAS: ``arr[x, y, z]`` with ``x`` increasing
toward the patient's **right**, ``y`` toward anterior and ``z`` toward superior (RAS+ world
convention, as in NIfTI/MNI: positive x is the patient's right side).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..volume import CTVolume

_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass(frozen=True)
class CanonicalGrid:
    """How a volume's array maps to the canonical RAS working array."""

    ornt: np.ndarray  # nibabel orientation of the voxel axes (i, j, k) w.r.t. RAS
    shape: tuple[int, int, int]  # canonical (x, y, z) shape at full resolution
    spacing: tuple[float, float, float]  # canonical (x, y, z) voxel size in mm

    def to_canonical(self, display_array: np.ndarray) -> np.ndarray:
        """Display-order ``(k, j, i)`` array -> canonical ``(x, y, z)`` array (a view when possible)."""
        from nibabel.orientations import apply_orientation

        return apply_orientation(display_array.transpose(2, 1, 0), self.ornt)

    def from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        """Canonical ``(x, y, z)`` array -> display-order ``(k, j, i)`` array (C-contiguous copy)."""
        from nibabel.orientations import apply_orientation, ornt_transform

        back = apply_orientation(canonical, ornt_transform(_RAS, self.ornt))
        return np.ascontiguousarray(back.transpose(2, 1, 0))


def canonical_grid(volume: CTVolume) -> CanonicalGrid:
    """The canonical RAS working grid of ``volume`` (from its affine)."""
    from nibabel.orientations import io_orientation

    ornt = io_orientation(np.asarray(volume.affine, dtype=float))
    ijk_shape = volume.shape[::-1]
    ijk_spacing = tuple(float(s) for s in volume.spacing[::-1])
    shape = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(ornt):
        shape[int(dst_axis)] = int(ijk_shape[src_axis])
        spacing[int(dst_axis)] = ijk_spacing[src_axis]
    return CanonicalGrid(ornt, tuple(shape), tuple(spacing))  # type: ignore[arg-type]


def block_factors(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Integer block sizes that bring ``spacing`` closest to (not above) ``target_mm``."""
    return tuple(max(1, int(np.floor(target_mm / s + 1e-6))) for s in spacing)  # type: ignore[return-value]


def block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over non-overlapping blocks (edge-padded to a multiple of the block size), float32."""
    if factors == (1, 1, 1):
        return np.asarray(array, dtype=np.float32)
    pad = [(0, (-n) % f) for n, f in zip(array.shape, factors)]
    a = np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array
    out_shape = tuple(n // f for n, f in zip(a.shape, factors))
    out = np.zeros(out_shape, dtype=np.float32)
    fx, fy, fz = factors
    for dx in range(fx):  # strided sums: no float64 copy of the whole volume
        for dy in range(fy):
            for dz in range(fz):
                out += a[dx::fx, dy::fy, dz::fz]
    out /= fx * fy * fz
    return out


def block_upsample(small: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`block_mean`, cropped to ``shape``."""
    out = small
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]
