"""Shared low-level helpers of :mod:`napari_ctvlp.io`: suffixes, errors, geometry, HU checks.

Every other module of the package imports from here; this module imports none of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
ITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")

#: Largest volume read_ct accepts (voxels); protects against corrupt headers claiming huge sizes.
MAX_VOXELS = 2**31

#: CT display windows as ``(level, width)`` in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "soft tissue": (50.0, 350.0),
    "abdomen": (60.0, 400.0),
    "liver": (80.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOW = "mediastinum"


class CTReadError(ValueError):
    """A CT or label file could not be read; the message is one line naming the file."""


def one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def read_error(path: Path | str, problem: str) -> CTReadError:
    return CTReadError(one_line(f"{path}: {problem}", limit=600))


def contrast_limits(preset: str | tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` HU display limits of a window preset name or a ``(level, width)`` pair."""
    if isinstance(preset, str):
        key = preset.strip().lower().replace("_", " ")
        if key not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {preset!r}; known: {', '.join(WINDOW_PRESETS)}")
        level, width = WINDOW_PRESETS[key]
    else:
        level, width = (float(v) for v in preset)
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
    return (level - width / 2.0, level + width / 2.0)


# ----------------------------------------------------------------------------------- helpers


def path_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def path_stem(path: Path) -> str:
    suffix = path_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.name


def is_dicom_file(path: Path | str) -> bool:
    """True if ``path`` is a file with the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in display order ``(sk, sj, si)`` from a voxel -> world affine."""
    norms = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return tuple(float(v) for v in norms[::-1])  # type: ignore[return-value]


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine, dtype=float))
    return tuple(c if c is not None else "?" for c in codes)  # type: ignore[return-value]


def hu_array(data: np.ndarray, path: Path) -> np.ndarray:
    """int16 when all values are integers within int16 range, else float32."""
    if data.dtype.kind == "b":
        data = data.astype(np.int16)
    if data.dtype.kind in "iu":
        if data.size and (data.min() < -32768 or data.max() > 32767):
            return data.astype(np.float32)
        return data.astype(np.int16, copy=False)
    if data.dtype.kind != "f":
        raise read_error(path, f"unsupported voxel type {data.dtype} (need a scalar grey-value image)")
    if not np.all(np.isfinite(data)):
        raise read_error(path, "contains NaN or infinite values")
    if data.size and data.min() >= -32768 and data.max() <= 32767 and np.array_equal(data, np.round(data)):
        return data.astype(np.int16)
    return data.astype(np.float32, copy=False)


def as_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Validate a voxel shape (file order): squeeze trailing singleton axes beyond 3."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise read_error(path, f"has invalid dimensions {shape} (corrupt header?)")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise read_error(path, f"is a {len(shape)}D image (shape {shape}); need a single 3D volume")
    if len(shape) < 3 or min(shape) < 2:
        raise read_error(path, f"is a 2D image (shape {shape}); need a 3D volume with at least 2 slices")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise read_error(path, f"claims {shape} voxels, more than the {MAX_VOXELS} supported (corrupt header?)")
    return shape  # type: ignore[return-value]


