"""Read CT volumes (NIfTI, DICOM series, NRRD/MHA/MHD) and write label maps and heatmaps.

Everything returns or takes a :class:`~napari_ctvlp.engine.volume.CTVolume` (array in display
order ``(k, j, i)``, exact voxel -> RAS+ affine). Errors in the input raise :class:`CTReadError`
(a :class:`ValueError`) with a one-line message naming the file and the problem.

Supported inputs of :func:`read_ct`:

* ``.nii`` / ``.nii.gz`` (nibabel): the file's affine is kept as is (``img.affine``: sform if
  set, else qform); a 4D file whose 4th axis has length 1 is squeezed.
* a DICOM series folder (pydicom; JPEG2000/JPEG-LS via pylibjpeg/gdcm): slices sorted along the
  slice normal, RescaleSlope/Intercept applied, affine built from the DICOM geometry (LPS -> RAS).
  A folder holding several series is rejected (the message lists them). A *single DICOM file* is
  read as the whole series it belongs to: the files of its folder that share its
  SeriesInstanceUID (other series in that folder are ignored).
* ``.nrrd`` / ``.nhdr`` / ``.mha`` / ``.mhd`` (SimpleITK).

Heavy libraries are imported inside the functions so that napari starts fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.volume import CTVolume, ProgressCallback, report

__all__ = [
    "CTReadError",
    "CTVolume",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "WINDOW_PRESETS",
    "contrast_limits",
    "is_dicom_file",
    "read_ct",
    "read_labels",
    "write_labels",
    "write_volume",
]

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


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fail(path: Path | str, problem: str) -> CTReadError:
    return CTReadError(_one_line(f"{path}: {problem}", limit=600))


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


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _stem(path: Path) -> str:
    suffix = _suffix(path)
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


def _axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine, dtype=float))
    return tuple(c if c is not None else "?" for c in codes)  # type: ignore[return-value]


def _hu_array(data: np.ndarray, path: Path) -> np.ndarray:
    """int16 when all values are integers within int16 range, else float32."""
    if data.dtype.kind == "b":
        data = data.astype(np.int16)
    if data.dtype.kind in "iu":
        if data.size and (data.min() < -32768 or data.max() > 32767):
            return data.astype(np.float32)
        return data.astype(np.int16, copy=False)
    if data.dtype.kind != "f":
        raise _fail(path, f"unsupported voxel type {data.dtype} (need a scalar grey-value image)")
    if not np.all(np.isfinite(data)):
        raise _fail(path, "contains NaN or infinite values")
    if data.size and data.min() >= -32768 and data.max() <= 32767 and np.array_equal(data, np.round(data)):
        return data.astype(np.int16)
    return data.astype(np.float32, copy=False)


def _as_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Validate a voxel shape (file order): squeeze trailing singleton axes beyond 3."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise _fail(path, f"has invalid dimensions {shape} (corrupt header?)")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise _fail(path, f"is a {len(shape)}D image (shape {shape}); need a single 3D volume")
    if len(shape) < 3 or min(shape) < 2:
        raise _fail(path, f"is a 2D image (shape {shape}); need a 3D volume with at least 2 slices")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise _fail(path, f"claims {shape} voxels, more than the {MAX_VOXELS} supported (corrupt header?)")
    return shape  # type: ignore[return-value]


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence the ``nibabel.global`` logger (it prints header fixes to stderr) for a load."""
    nib_logger = logging.getLogger("nibabel.global")
    level = nib_logger.level
    nib_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        nib_logger.setLevel(level)


def _check_nifti_size(path: Path, img: Any) -> None:
    """Fail early, with a clear message, when an uncompressed ``.nii`` is shorter than its header says.

    (A truncated ``.nii.gz`` is detected by gzip while decompressing; its trailer cannot be
    trusted as a size because multi-member gzip files are valid.)
    """
    if _suffix(path) != ".nii":
        return
    hdr = img.header
    need = int(hdr.get_data_offset()) + int(np.prod(img.shape, dtype=np.int64)) * hdr.get_data_dtype().itemsize
    size = path.stat().st_size
    if size < need:
        raise _fail(path, f"file is truncated: header needs {need} bytes, file has {size}")


def _check_affine(affine: np.ndarray, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise _fail(path, "has an invalid (non-finite) voxel-to-world affine")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9 or min(spacing_from_affine(affine)) <= 0:
        raise _fail(path, "has a singular voxel-to-world affine (zero voxel size)")
    return affine


# ----------------------------------------------------------------------------------- readers


def _load_nifti(path: Path, what: str = "NIfTI") -> tuple[np.ndarray, np.ndarray, Any]:
    """``(data in file order (i, j, k), affine, image)`` of a 3D NIfTI, or CTReadError."""
    import nibabel as nib

    try:
        with _quiet_nibabel():  # nibabel prints header fixes to stderr
            img = nib.load(str(path))
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise _fail(path, f"is not a NIfTI image ({type(img).__name__})")
            shape = _as_3d(img.shape, path)
            affine = _check_affine(img.affine, path)
            _check_nifti_size(path, img)
            data = np.asanyarray(img.dataobj).reshape(shape)
    except CTReadError:
        raise
    except Exception as exc:  # nibabel/gzip/zlib/numpy raise many types on corrupt files
        raise _fail(path, f"cannot read {what} ({type(exc).__name__}: {exc})") from exc
    return data, affine, img


def _read_nifti(path: Path, progress: ProgressCallback | None) -> CTVolume:
    report(progress, 0, 2, f"reading {path.name}")
    data, affine, img = _load_nifti(path)
    array = np.ascontiguousarray(_hu_array(data, path).transpose(2, 1, 0))
    hdr = img.header
    meta = {
        "path": str(path),
        "format": "nifti",
        "nifti_header": hdr.copy(),
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "source_dtype": str(img.get_data_dtype()),
    }
    report(progress, 2, 2, f"read {path.name}")
    return CTVolume(array, spacing_from_affine(affine), affine, _axcodes(affine), meta)


def _itk_affine(image: Any) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_itk(path: Path, progress: ProgressCallback | None) -> CTVolume:
    import SimpleITK as sitk

    report(progress, 0, 2, f"reading {path.name}")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = tuple(reader.GetSize())
        if reader.GetNumberOfComponents() != 1:
            raise _fail(path, f"has {reader.GetNumberOfComponents()} components per voxel; need a scalar image")
        _as_3d(size, path)
        image = reader.Execute()
        if image.GetDimension() != 3:
            raise _fail(path, f"is a {image.GetDimension()}D image; need a 3D volume")
        affine = _check_affine(_itk_affine(image), path)
        data = sitk.GetArrayFromImage(image)  # already (k, j, i)
    except CTReadError:
        raise
    except Exception as exc:
        raise _fail(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    array = np.ascontiguousarray(_hu_array(data, path))
    meta = {"path": str(path), "format": "itk", "source_dtype": str(data.dtype)}
    report(progress, 2, 2, f"read {path.name}")
    return CTVolume(array, spacing_from_affine(affine), affine, _axcodes(affine), meta)


def read_ct(path: str | os.PathLike[str], *, progress: ProgressCallback | None = None) -> CTVolume:
    """Read a CT volume in Hounsfield units with its exact geometry.

    Args:
        path: a ``.nii``/``.nii.gz`` file, a DICOM series folder, one DICOM file (its whole
            series in the same folder is read), or a ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file.
        progress: optional ``progress(done, total, message)`` callback.

    Returns:
        A :class:`CTVolume`: ``array`` in display order ``(k, j, i)``, ``int16`` when the values
        are integers that fit, else ``float32``; ``meta`` has ``path``, ``format``
        (``"nifti"``, ``"dicom"`` or ``"itk"``) and, for DICOM, ``files`` (sorted slice files),
        ``SeriesInstanceUID``, ``StudyInstanceUID``, ``Modality`` and more.

    Raises:
        CTReadError: (a ``ValueError``) missing path, unsupported type, corrupt file, 2D or 4D
            image, folder without DICOM files or with several series.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise _fail(p, "no such file or folder")
    if p.is_dir():
        from napari_ctvlp._io_dicom import read_dicom_series

        return read_dicom_series(p, progress=progress)
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(p, progress)
    if suffix in ITK_SUFFIXES:
        return _read_itk(p, progress)
    if suffix in DICOM_SUFFIXES or is_dicom_file(p):
        from napari_ctvlp._io_dicom import read_dicom_series

        return read_dicom_series(p, progress=progress)
    raise _fail(
        p,
        f"unsupported file type {suffix or '(no extension)'!r}; expected .nii, .nii.gz, "
        ".nrrd, .mha, .mhd, a DICOM file or a DICOM series folder",
    )


def _reorient_to(data_xyz: np.ndarray, affine: np.ndarray, like: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the voxel axes of ``data_xyz`` so that they run like ``like``'s axes."""
    from nibabel import orientations as ornt

    src = ornt.io_orientation(affine)
    dst = ornt.io_orientation(np.asarray(like.affine, dtype=float))
    transform = ornt.ornt_transform(src, dst)
    out = ornt.apply_orientation(data_xyz, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, data_xyz.shape)
    return out, new_affine


def read_labels(
    path: str | os.PathLike[str],
    *,
    like: CTVolume | None = None,
    reorient: bool = False,
    atol_mm: float = 1e-3,
) -> np.ndarray:
    """Read an integer label map (NIfTI, NRRD/MHA) in display order ``(k, j, i)``.

    Args:
        path: the label file.
        like: the volume the labels belong to; its grid must match (same shape, affine equal
            within ``atol_mm``) or ``ValueError`` is raised.
        reorient: with ``like``, first permute/flip the label axes to ``like``'s orientation
            (e.g. TotalSegmentator output of a DICOM series, whose row axis is flipped).
        atol_mm: tolerance for comparing affines (float32 storage rounds DICOM geometry).

    Returns:
        The labels, unsigned integer type (as stored when it was integer).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise _fail(p, "no such label file")
    if reorient and like is None:
        raise ValueError("read_labels: reorient=True needs like=<CTVolume>")
    suffix = _suffix(p)
    if suffix in NIFTI_SUFFIXES:
        data, affine, _ = _load_nifti(p, "NIfTI label map")
    elif suffix in ITK_SUFFIXES:
        vol = _read_itk(p, None)
        affine, data = vol.affine, vol.array.transpose(2, 1, 0)
    else:
        raise _fail(p, f"unsupported label file type {suffix!r}; expected .nii, .nii.gz, .nrrd, .mha")
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise _fail(p, "is not a label map (non-integer values)")
    if data.size and data.min() < 0:
        raise _fail(p, "is not a label map (negative values)")
    top = int(data.max()) if data.size else 0
    data = data.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32, copy=False)
    if like is not None:
        if reorient:
            data, affine = _reorient_to(data, affine, like)
        like_shape_xyz = tuple(like.shape[::-1])
        if data.shape != like_shape_xyz:
            raise _fail(p, f"label grid {data.shape[::-1]} (display order) does not match volume shape {like.shape}")
        diff = float(np.max(np.abs(affine - np.asarray(like.affine, dtype=float))))
        if diff > atol_mm:
            raise _fail(
                p,
                f"label affine differs from the volume's by {diff:.4g} mm "
                f"(labels {_axcodes(affine)}, volume {_axcodes(like.affine)}); "
                "pass reorient=True if only the axis order/direction differs",
            )
    return np.ascontiguousarray(data.transpose(2, 1, 0))


# The writers live in _io_write (kept apart for size); they are part of this module's API.
from napari_ctvlp._io_write import atomic_write, write_labels, write_volume  # noqa: E402
