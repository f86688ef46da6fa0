"""The in-memory CT volume shared by the reader, the engine and the widgets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Progress callback used throughout the engine: ``progress(done, total, message)``.
ProgressCallback = Callable[[int, int, str], None]


def report(progress: ProgressCallback | None, done: int, total: int, message: str) -> None:
    """Call ``progress`` if one was given (helper so callers need no ``if``)."""
    if progress is not None:
        progress(done, total, message)


@dataclass(frozen=True)
class CTVolume:
    """A CT volume in Hounsfield units with its geometry.

    Axis convention: ``array`` is in numpy/napari display order, i.e. the *reversed*
    voxel axes of the file: ``array[k, j, i]`` is voxel ``(i, j, k)`` of the NIfTI
    affine. For an axial scan this is (slice, row, column).

    Attributes:
        array: HU values, ``int16`` or ``float32``, shape ``(nk, nj, ni)``.
        spacing: voxel size in mm in ``array`` axis order ``(sk, sj, si)``.
        affine: 4x4 voxel ``(i, j, k, 1)`` -> RAS+ world (mm) matrix, exactly as in
            the source NIfTI (or derived from the DICOM geometry, converted LPS->RAS).
        orientation: axis codes of the voxel axes ``(i, j, k)``, e.g. ``("R", "A", "S")``.
        meta: source metadata (``path``, ``format``, DICOM series UID, ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    orientation: tuple[str, str, str] = ("R", "A", "S")
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"CTVolume needs a 3D array, got shape {self.array.shape}")
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError(f"CTVolume affine must be 4x4, got {np.asarray(self.affine).shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"CTVolume spacing must be 3 positive numbers, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape in display order."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def display_affine(self) -> np.ndarray:
        """4x4 matrix mapping ``array`` indices ``(k, j, i, 1)`` to RAS+ world mm."""
        aff = np.asarray(self.affine, dtype=float)
        out = np.eye(4)
        out[:3, :3] = aff[:3, :3][:, ::-1]
        out[:3, 3] = aff[:3, 3]
        return out

    def with_array(self, array: np.ndarray, **meta: Any) -> CTVolume:
        """Same geometry, another array of the same shape (e.g. a resampled copy)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match volume shape {self.array.shape}")
        return CTVolume(array, self.spacing, self.affine, self.orientation, {**self.meta, **meta})
