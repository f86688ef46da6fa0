"""Read CT volumes (NIfTI, NRRD/MHA/MHD; DICOM through :mod:`napari_ctvlp.io.dicom`) and label maps."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.volume import CTVolume, ProgressCallback, report
from napari_ctvlp.io._common import (
    DICOM_SUFFIXES,
    ITK_SUFFIXES,
    MAX_GZIP_RATIO,
    NIFTI_SUFFIXES,
    CTReadError,
    as_3d,
    axcodes,
    check_memory,
    hu_array,
    is_dicom_file,
    path_suffix,
    read_error,
    spacing_from_affine,
)

logger = logging.getLogger(__name__)


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


def _raw_nifti_header(path: Path, img: Any) -> Any:
    """The header as stored in the file: nibabel's ``nib.load`` silently "fixes" some fields (pixdim 0 -> 1)."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path), "rb") as fh:
        return type(img.header).from_fileobj(fh, check=False)


def _check_nifti_voxel_size(path: Path, raw: Any) -> None:
    """Refuse a zero / non-finite voxel size when the affine in use is built from ``pixdim``.

    With ``sform_code > 0`` the sform gives the geometry (its own singularity is checked by
    :func:`_check_affine`); otherwise nibabel builds the affine from ``pixdim[1:4]`` and would
    replace a 0 by 1 mm without a word.
    """
    if int(raw["sform_code"]) > 0:
        return
    pixdim = np.asarray(raw["pixdim"], dtype=float)[1:4]
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        values = ", ".join(f"{v:g}" for v in pixdim)
        raise read_error(
            path, f"zero or invalid voxel size in the header (pixdim {values}, no sform): the voxel spacing is unknown"
        )


def _check_nifti_size(path: Path, img: Any) -> int:
    """Fail before reading the voxels when the header claims more data than the file can hold or memory allows.

    * ``.nii``: the file must hold ``vox_offset + voxels * itemsize`` bytes.
    * ``.nii.gz``: DEFLATE cannot compress more than ~1032:1, so a file of ``n`` bytes holds at
      most ``n * MAX_GZIP_RATIO`` bytes (the gzip ISIZE trailer is only the size modulo 2**32
      and only of the last member, so it is not used).
    * both: the estimated peak memory of the read must fit :func:`~._common.memory_budget`.

    Returns the bytes the header needs (offset + voxel data); a gzip file's real length is checked
    while it is decompressed (:func:`_gunzip_verified`).
    """
    hdr = img.header
    itemsize = hdr.get_data_dtype().itemsize
    voxels = int(np.prod(img.shape, dtype=np.int64))
    # the proxy's offset is where nibabel reads (the loaded header's vox_offset may read 0)
    offset = int(getattr(img.dataobj, "offset", hdr.get_data_offset()))
    need = offset + voxels * itemsize
    size = path.stat().st_size
    suffix = path_suffix(path)
    if suffix == ".nii" and size < need:
        raise read_error(path, f"file is truncated: header needs {need} bytes, file has {size}")
    if suffix == ".nii.gz" and size * MAX_GZIP_RATIO < need:
        raise read_error(
            path,
            f"file is truncated or corrupt: the header claims {voxels * itemsize} bytes of image data, but a "
            f"{size}-byte gzip file can hold at most {size * MAX_GZIP_RATIO}",
        )
    slope, inter = hdr.get_slope_inter()
    scaled = not (slope in (None, 1.0) and inter in (None, 0.0))
    # file data (twice when it is gunzipped into a buffer first) + float64 scaling + HU copy + transpose
    per_voxel = itemsize * (2 if suffix == ".nii.gz" else 1) + (8 if scaled else 0) + 8
    check_memory(path, tuple(img.shape), per_voxel)
    return need


def _gunzip_verified(path: Path, need: int, *, chunk: int = 1 << 24) -> bytes:
    """The first ``need`` decompressed bytes of a ``.nii.gz``, or CTReadError when the file holds fewer.

    nibabel allocates the header's full array before it finds out that the stream is short, so a small
    crafted file could claim ~1100x its size. Decompressing in chunks keeps the memory proportional
    to the data that is really there; the joined bytes and the array read from them are the "twice"
    of :func:`_check_nifti_size`'s estimate.
    """
    import gzip

    parts: list[bytes] = []
    got = 0
    with gzip.open(path, "rb") as fh:
        while got < need:
            part = fh.read(min(chunk, need - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
    if got < need:
        raise read_error(path, f"file is truncated: header needs {need} bytes of uncompressed data, file holds {got}")
    return b"".join(parts)


def _check_affine(affine: np.ndarray, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise read_error(path, "has an invalid (non-finite) voxel-to-world affine")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9 or min(spacing_from_affine(affine)) <= 0:
        raise read_error(path, "has a singular voxel-to-world affine (zero voxel size)")
    return affine


# ----------------------------------------------------------------------------------- readers


def _load_nifti(path: Path, what: str = "NIfTI") -> tuple[np.ndarray, np.ndarray, Any]:
    """``(data in file order (i, j, k), affine, image)`` of a 3D NIfTI, or CTReadError."""
    import nibabel as nib

    try:
        # nibabel prints header fixes to stderr, and numpy warns about NaN/overflow in crafted
        # headers (qform from NaN pixdim, scaling): every problem is reported by one CTReadError
        with _quiet_nibabel(), np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise read_error(path, f"is not a NIfTI image ({type(img).__name__})")
            shape = as_3d(img.shape, path)
            _check_nifti_voxel_size(path, _raw_nifti_header(path, img))
            affine = _check_affine(img.affine, path)
            need = _check_nifti_size(path, img)
            if path_suffix(path) == ".nii.gz":
                img = type(img).from_bytes(_gunzip_verified(path, need))
            data = np.asanyarray(img.dataobj).reshape(shape)  # scaling overflows: checked by hu_array
    except CTReadError:
        raise
    except Exception as exc:  # nibabel/gzip/zlib/numpy raise many types on corrupt files
        raise read_error(path, f"cannot read {what} ({type(exc).__name__}: {exc})") from exc
    return data, affine, img


def _read_nifti(path: Path, progress: ProgressCallback | None) -> CTVolume:
    report(progress, 0, 2, f"reading {path.name}")
    data, affine, img = _load_nifti(path)
    array = np.ascontiguousarray(hu_array(data, path).transpose(2, 1, 0))
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
    return CTVolume(array, spacing_from_affine(affine), affine, axcodes(affine), meta)


def _itk_affine(image: Any) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _itk_bytes_per_component(reader: Any) -> int:
    """Bytes per voxel component of the file SimpleITK is about to read (8 when unknown)."""
    import SimpleITK as sitk

    match = re.match(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    return max(1, int(match.group(1)) // 8) if match else 8


def _read_itk(path: Path, progress: ProgressCallback | None) -> CTVolume:
    import SimpleITK as sitk

    report(progress, 0, 2, f"reading {path.name}")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = tuple(reader.GetSize())
        if reader.GetNumberOfComponents() != 1:
            raise read_error(path, f"has {reader.GetNumberOfComponents()} components per voxel; need a scalar image")
        as_3d(size, path)
        check_memory(path, size, 2 * _itk_bytes_per_component(reader) + 8)
        image = reader.Execute()
        if image.GetDimension() != 3:
            raise read_error(path, f"is a {image.GetDimension()}D image; need a 3D volume")
        affine = _check_affine(_itk_affine(image), path)
        data = sitk.GetArrayFromImage(image)  # already (k, j, i)
    except CTReadError:
        raise
    except Exception as exc:
        raise read_error(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    array = np.ascontiguousarray(hu_array(data, path))
    meta = {"path": str(path), "format": "itk", "source_dtype": str(data.dtype)}
    report(progress, 2, 2, f"read {path.name}")
    return CTVolume(array, spacing_from_affine(affine), affine, axcodes(affine), meta)


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
        raise read_error(p, "no such file or folder")
    if p.is_dir():
        from napari_ctvlp.io.dicom import read_dicom_series

        return read_dicom_series(p, progress=progress)
    suffix = path_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(p, progress)
    if suffix in ITK_SUFFIXES:
        return _read_itk(p, progress)
    if suffix in DICOM_SUFFIXES or is_dicom_file(p):
        from napari_ctvlp.io.dicom import read_dicom_series

        return read_dicom_series(p, progress=progress)
    raise read_error(
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
        raise read_error(p, "no such label file")
    if reorient and like is None:
        raise ValueError("read_labels: reorient=True needs like=<CTVolume>")
    suffix = path_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        data, affine, _ = _load_nifti(p, "NIfTI label map")
    elif suffix in ITK_SUFFIXES:
        vol = _read_itk(p, None)
        affine, data = vol.affine, vol.array.transpose(2, 1, 0)
    else:
        raise read_error(p, f"unsupported label file type {suffix!r}; expected .nii, .nii.gz, .nrrd, .mha")
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise read_error(p, "is not a label map (non-integer values)")
    if data.size and data.min() < 0:
        raise read_error(p, "is not a label map (negative values)")
    top = int(data.max()) if data.size else 0
    data = data.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32, copy=False)
    if like is not None:
        if reorient:
            data, affine = _reorient_to(data, affine, like)
        like_shape_xyz = tuple(like.shape[::-1])
        if data.shape != like_shape_xyz:
            raise read_error(p, f"label grid {data.shape[::-1]} (display order) does not match volume shape {like.shape}")
        diff = float(np.max(np.abs(affine - np.asarray(like.affine, dtype=float))))
        if diff > atol_mm:
            raise read_error(
                p,
                f"label affine differs from the volume's by {diff:.4g} mm "
                f"(labels {axcodes(affine)}, volume {axcodes(like.affine)}); "
                "pass reorient=True if only the axis order/direction differs",
            )
    return np.ascontiguousarray(data.transpose(2, 1, 0))
