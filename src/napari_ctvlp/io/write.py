"""Writing part of :mod:`napari_ctvlp.io`: label maps (NIfTI + JSON, DICOM-SEG) and float maps.

Use :func:`napari_ctvlp.io.write_labels` / :func:`napari_ctvlp.io.write_volume` (re-exported
there). All writes are atomic: a temporary file in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.volume import CTVolume
from napari_ctvlp.io._common import NIFTI_SUFFIXES, path_stem, path_suffix

logger = logging.getLogger(__name__)


def _check_targets(paths: list[Path], overwrite: bool) -> None:
    for target in paths:
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        if not target.parent.is_dir():
            raise ValueError(f"{target}: folder {target.parent} does not exist")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _naming_target(exc: BaseException, tmp: Path, path: Path) -> BaseException | None:
    """``exc`` re-made to name ``path`` where it names the temporary file ``tmp`` (None: leave it)."""
    text = str(exc)
    if str(tmp) not in text and tmp.name not in text and getattr(exc, "filename", None) != str(tmp):
        return None
    try:
        if isinstance(exc, OSError) and exc.errno is not None:
            return type(exc)(exc.errno, exc.strerror, str(path))
        return type(exc)(text.replace(str(tmp), str(path)).replace(tmp.name, path.name))
    except Exception:  # noqa: BLE001 - an exception type with another signature: keep the original
        return None


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then ``os.replace`` it.

    The temporary name keeps ``path``'s suffix (``.nii.gz`` etc.) so writers that pick the
    format from the name behave the same. The temporary file is removed on failure, and an
    error that names it is re-raised naming ``path`` instead (the user never chose the temp name).
    """
    suffix = path_suffix(path) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path_stem(path)}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            write(tmp)
        except Exception as exc:
            renamed = _naming_target(exc, tmp, path)
            if renamed is None:
                raise
            raise renamed from exc
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _nifti_image(array_kji: np.ndarray, like: CTVolume, dtype: np.dtype) -> Any:
    """A NIfTI-1 image of ``array_kji`` on ``like``'s grid (qform/sform codes kept)."""
    import nibabel as nib

    data = np.ascontiguousarray(np.asarray(array_kji).transpose(2, 1, 0)).astype(dtype, copy=False)
    affine = np.asarray(like.affine, dtype=float)
    src = like.meta.get("nifti_header")
    if isinstance(src, nib.Nifti1Header) and np.array_equal(src.get_best_affine(), affine):
        # Re-use the source header's geometry fields verbatim: bit-for-bit qform/sform/pixdim.
        hdr = src.copy()
        hdr.set_data_shape(data.shape)
        hdr.set_data_dtype(dtype)
        hdr.set_slope_inter(1.0, 0.0)
        hdr["cal_min"] = 0
        hdr["cal_max"] = 0
        hdr["descrip"] = b"napari-ctvlp"
        img = nib.Nifti1Image(data, hdr.get_best_affine(), header=hdr)
        img.header.set_slope_inter(1.0, 0.0)
        return img
    img = nib.Nifti1Image(data, affine)
    qcode = int(like.meta.get("qform_code", 1)) or 0
    scode = int(like.meta.get("sform_code", 1 if like.meta.get("format") != "nifti" else 0))
    if scode == 0 and qcode == 0:
        scode = 1
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode if scode else (qcode or 1))
    img.header.set_data_dtype(dtype)
    img.header["descrip"] = b"napari-ctvlp"
    return img


def _label_format(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in ("nifti", "dicom-seg"):
            raise ValueError(f"write_labels: format must be 'nifti' or 'dicom-seg', got {format!r}")
        return format
    suffix = path_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix == ".dcm":
        return "dicom-seg"
    raise ValueError(f"{path}: cannot tell the label format from the suffix {suffix!r}; use .nii.gz or .dcm")


def write_labels(
    labels: np.ndarray,
    *,
    like: CTVolume,
    path: str | os.PathLike[str],
    names: Mapping[int, str] | None = None,
    overwrite: bool = False,
    format: str | None = None,
) -> list[Path]:
    """Write a label map on ``like``'s grid; return the files written.

    Args:
        labels: integer labels in display order, shape ``like.shape``, values 0..65535.
        like: the volume the labels were computed on (its exact affine is written).
        path: ``*.nii``/``*.nii.gz`` -> NIfTI (uint8/uint16) plus ``<stem>.json`` naming the
            label values; ``*.dcm`` -> a DICOM Segmentation (highdicom; only when ``like`` was
            read from DICOM), one segment per label value present.
        names: ``{value: name}``; default the organ names of ``engine.anatomy``. Values without
            a name are called ``label_<value>``.
        overwrite: replace existing files; otherwise ``FileExistsError``.
        format: ``"nifti"`` or ``"dicom-seg"``; default from the suffix of ``path``.
    """
    from napari_ctvlp.engine.anatomy import organ_label_names

    target = Path(path).expanduser()
    fmt = _label_format(target, format)
    labels = np.asarray(labels)
    if labels.shape != like.shape:
        raise ValueError(f"write_labels: labels shape {labels.shape} does not match volume shape {like.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"write_labels: labels must be integers, got {labels.dtype}")
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"write_labels: label values must be in 0..65535, got {lo}..{hi}")
    table = dict(organ_label_names() if names is None else names)
    present = [int(v) for v in np.unique(labels) if v != 0]
    value_names = {v: str(table.get(v, f"label_{v}")) for v in present}

    if fmt == "dicom-seg":
        from napari_ctvlp.io.dicom import write_dicom_seg

        _check_targets([target], overwrite)
        return [atomic_write(target, lambda tmp: write_dicom_seg(labels, like=like, path=target, names=value_names,
                                                                   save_to=tmp))]

    sidecar = target.with_name(path_stem(target) + ".json")
    _check_targets([target, sidecar], overwrite)
    dtype = np.dtype(np.uint8 if hi < 256 else np.uint16)
    img = _nifti_image(labels, like, dtype)
    atomic_write(target, lambda tmp: img.to_filename(str(tmp)))
    doc = {
        "labels": {str(v): value_names[v] for v in present},
        "all_names": {str(k): str(v) for k, v in sorted(table.items())},
        "source": str(like.meta.get("path", "")),
        "shape": list(like.shape),
        "generator": "napari-ctvlp",
    }
    text = json.dumps(doc, indent=2)
    atomic_write(sidecar, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    logger.info("wrote %s (%d labels) and %s", target, len(present), sidecar)
    return [target, sidecar]


def write_volume(
    array: np.ndarray,
    *,
    like: CTVolume,
    path: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """Write a float map (heatmap, probability) on ``like``'s grid as NIfTI float32.

    Args:
        array: values in display order, shape ``like.shape``.
        like: the volume whose geometry is written.
        path: ``*.nii`` or ``*.nii.gz``.
        overwrite: replace an existing file; otherwise ``FileExistsError``.
    """
    target = Path(path).expanduser()
    if path_suffix(target) not in NIFTI_SUFFIXES:
        raise ValueError(f"write_volume: {target} must end with .nii or .nii.gz")
    array = np.asarray(array)
    if array.shape != like.shape:
        raise ValueError(f"write_volume: array shape {array.shape} does not match volume shape {like.shape}")
    _check_targets([target], overwrite)
    img = _nifti_image(array.astype(np.float32, copy=False), like, np.dtype(np.float32))
    return atomic_write(target, lambda tmp: img.to_filename(str(tmp)))
