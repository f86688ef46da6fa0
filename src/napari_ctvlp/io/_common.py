"""Shared low-level helpers of :mod:`napari_ctvlp.io`: suffixes, errors, geometry, HU checks.

Every other module of the package imports from here; this module imports none of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")
ITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")

#: Largest volume read_ct accepts (voxels); protects against corrupt headers claiming huge sizes.
MAX_VOXELS = 2**31

#: Upper bound of the DEFLATE compression ratio (the format cannot exceed ~1032:1); a gzip file of
#: ``n`` bytes never decompresses to more than ``n * MAX_GZIP_RATIO`` bytes.
MAX_GZIP_RATIO = 1100

#: Environment variable that overrides the memory budget of a read (bytes; for tests and small machines).
MEMORY_BUDGET_ENV = "NAPARI_CTVLP_READ_BUDGET_BYTES"

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


def memory_budget() -> int | None:
    """Bytes a read may allocate: ``$NAPARI_CTVLP_READ_BUDGET_BYTES``, else the available memory.

    The available memory is ``MemAvailable`` of ``/proc/meminfo`` (Linux) or the free physical
    pages (``os.sysconf``); None when neither is known (then no budget is enforced).
    """
    override = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if override:
        try:
            return max(0, int(float(override)))
        except ValueError:
            logger.warning("ignoring %s=%r (not a number of bytes)", MEMORY_BUDGET_ENV, override)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_memory(path: Path, shape: tuple[int, ...], bytes_per_voxel: float, what: str = "reading it") -> None:
    """Refuse, before allocating, a read whose peak memory (``voxels * bytes_per_voxel``) exceeds the budget.

    ``bytes_per_voxel`` is the caller's estimate of the peak: the decoded file data plus the
    HU copies made by :func:`hu_array` and the axis transpose.
    """
    voxels = int(np.prod(shape, dtype=np.int64))
    need = voxels * float(bytes_per_voxel)
    budget = memory_budget()
    if budget is not None and need > budget:
        raise read_error(
            path,
            f"image of {tuple(int(s) for s in shape)} voxels: {what} needs about {_gb(need)} of memory, "
            f"more than the {_gb(budget)} available (corrupt header, or too large for this machine)",
        )


def hu_array(data: np.ndarray, path: Path) -> np.ndarray:
    """int16 when all values are integers within int16 range, else float32.

    Raises:
        CTReadError: NaN or infinite values, also ones that appear only when a (rescaled)
            float64 value does not fit float32 (e.g. ``scl_slope`` / ``RescaleSlope`` of 1e36).
    """
    if data.dtype.kind == "b":
        data = data.astype(np.int16)
    if data.dtype.kind in "iu":
        if data.size and (data.min() < -32768 or data.max() > 32767):
            return data.astype(np.float32)
        return data.astype(np.int16, copy=False)
    if data.dtype.kind != "f":
        raise read_error(path, f"unsupported voxel type {data.dtype} (need a scalar grey-value image)")
    with np.errstate(all="ignore"):
        if not np.all(np.isfinite(data)):
            raise read_error(path, "contains NaN or infinite values (after applying the intensity scaling)")
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        limit = float(np.finfo(np.float32).max)
        if lo < -limit or hi > limit:
            raise read_error(
                path,
                f"values {lo:.3g}..{hi:.3g} are not finite as float32 (intensity scaling such as "
                "scl_slope/RescaleSlope out of range?)",
            )
        if data.size and lo >= -32768 and hi <= 32767 and np.array_equal(data, np.round(data)):
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


