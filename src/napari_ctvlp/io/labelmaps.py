"""Label maps with their own geometry: recognise and read them (NIfTI/NRRD/MHA, TotalSegmentator
``segmentations/`` folders, DICOM-SEG).

:func:`read_label_map` returns a :class:`LabelMap`: the integer labels in display order
``(k, j, i)``, a :class:`~napari_ctvlp.engine.volume.CTVolume` carrying the exact voxel -> RAS
geometry (its ``array`` is the label map), ``{value: name}`` and what the values mean:

* ``"organ"`` -- the organ labels of :mod:`napari_ctvlp.engine.anatomy` (our ``organs.nii.gz``
  with its ``organs.json`` sidecar, our DICOM-SEG);
* ``"totalseg"`` -- TotalSegmentator v2 ``total`` ids (its one-file output, or a folder of
  per-structure masks named after its classes);
* ``"custom"`` -- anything else (names from the file, or ``label_<value>``).

What is a label map (:func:`is_label_volume`): a DICOM Segmentation; a volume with a napari-ctvlp
JSON sidecar; or an integer volume with values in 0..255 and nothing below 0 (a CT in HU always
holds air near -1000).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.volume import CTVolume
from napari_ctvlp.io._common import (
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    CTReadError,
    axcodes,
    is_dicom_file,
    path_stem,
    path_suffix,
    read_error,
    spacing_from_affine,
)

logger = logging.getLogger(__name__)

ORGAN = "organ"
TOTALSEG = "totalseg"
CUSTOM = "custom"
#: largest value of a label map recognised without a sidecar
MAX_PLAIN_LABEL = 255
#: at least this share of a folder's NIfTI files must be named after TotalSegmentator classes
_FOLDER_SHARE = 0.5


@dataclass(frozen=True)
class LabelMap:
    """An integer label map with its geometry.

    Attributes:
        labels: ``uint8``/``uint16`` array in display order ``(k, j, i)``.
        volume: the geometry (``volume.array`` is ``labels``; ``meta['format']`` says the source).
        names: ``{value: name}`` of the label values (background 0 excluded).
        kind: ``"organ"``, ``"totalseg"`` or ``"custom"``.
    """

    labels: np.ndarray
    volume: CTVolume
    names: dict[int, str] = field(default_factory=dict)
    kind: str = CUSTOM


def totalseg_class_names() -> dict[int, str]:
    """``{id: structure}`` of TotalSegmentator v2 ``total``; ``totalseg_<id>`` when it is not installed."""
    try:
        from totalsegmentator.map_to_binary import class_map

        return {int(k): str(v) for k, v in class_map["total"].items()}
    except Exception:  # the names are a convenience; the ids work without them
        logger.debug("TotalSegmentator class map unavailable", exc_info=True)
        return {v: f"totalseg_{v}" for v in range(1, 118)}


def sidecar_path(path: Path) -> Path:
    """``organs.nii.gz`` -> ``organs.json`` (the names file :func:`napari_ctvlp.io.write_labels` writes)."""
    return path.with_name(path_stem(path) + ".json")


def read_sidecar(path: Path) -> dict[int, str] | None:
    """``{value: name}`` from a napari-ctvlp label sidecar next to ``path`` (None: no such sidecar)."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.debug("ignoring sidecar %s: %s", side, exc)
        return None
    if not isinstance(doc, dict) or doc.get("generator") != "napari-ctvlp":
        return None
    table = doc.get("all_names") or doc.get("labels") or {}
    try:
        return {int(k): str(v) for k, v in table.items()}
    except (TypeError, ValueError, AttributeError):
        return None


def kind_of(names: Mapping[int, str], top: int) -> str:
    """What label values mean, from their names (or the largest value when names say nothing)."""
    from napari_ctvlp.engine.anatomy import ORGAN_LABELS

    organ = {o.value: o.name for o in ORGAN_LABELS}
    if names and all(organ.get(int(v)) == n for v, n in names.items()):
        return ORGAN
    ts = totalseg_class_names()
    if names and all(ts.get(int(v)) == n for v, n in names.items()):
        return TOTALSEG
    if names:
        return CUSTOM
    return TOTALSEG if top > max(organ) else ORGAN


def is_label_volume(volume: CTVolume, *, sidecar: bool = False) -> bool:
    """True when ``volume`` (read by :func:`napari_ctvlp.io.read_ct`) holds labels, not HU.

    Args:
        volume: the read volume.
        sidecar: a napari-ctvlp label sidecar sits next to the file (then any integer map is labels).
    """
    array = volume.array
    if array.dtype.kind not in "iub" or not array.size:
        return False
    lo, hi = int(array.min()), int(array.max())
    if lo < 0:
        return False
    return sidecar or hi <= MAX_PLAIN_LABEL


def _as_labels(array: np.ndarray) -> np.ndarray:
    top = int(array.max()) if array.size else 0
    return np.ascontiguousarray(array.astype(np.uint8 if top < 256 else np.uint16, copy=False))


def label_map_from_volume(volume: CTVolume, *, names: Mapping[int, str] | None = None) -> LabelMap:
    """A :class:`LabelMap` of a volume :func:`is_label_volume` accepted (names: sidecar, else by kind)."""
    labels = _as_labels(volume.array)
    top = int(labels.max()) if labels.size else 0
    kind = kind_of(names or {}, top)
    if not names:
        if kind == TOTALSEG:
            names = totalseg_class_names()
        else:
            from napari_ctvlp.engine.anatomy import organ_label_names

            names = organ_label_names()
    present = {int(v) for v in np.unique(labels)} - {0}
    table = {int(k): str(v) for k, v in names.items()}
    for v in sorted(present - set(table)):
        table[v] = f"label_{v}"
    return LabelMap(labels, volume.with_array(labels), table, kind)


# ---------------------------------------------------------------------------- folders
def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and path_suffix(p) in NIFTI_SUFFIXES)


def is_segmentation_folder(folder: Path) -> bool:
    """A folder of per-structure NIfTI masks named after TotalSegmentator classes (``liver.nii.gz``...)."""
    try:
        files = _nifti_files(Path(folder))
    except OSError:
        return False
    if not files:
        return False
    known = set(totalseg_class_names().values())
    named = sum(path_stem(p) in known for p in files)
    return named >= 1 and named >= _FOLDER_SHARE * len(files)


def read_segmentation_folder(folder: Path) -> LabelMap:
    """Combine a TotalSegmentator ``segmentations/`` folder into one map of TotalSegmentator ids.

    Files whose names are not TotalSegmentator ``total`` classes get ids after 117 (named after the
    file). Every mask must lie on the grid of the first one.
    """
    from napari_ctvlp.io.read import read_ct

    folder = Path(folder)
    files = _nifti_files(folder)
    if not files:
        raise read_error(folder, "holds no NIfTI masks")
    ids = {name: v for v, name in totalseg_class_names().items()}
    extra = max(ids.values(), default=0) + 1
    labels: np.ndarray | None = None
    first: CTVolume | None = None
    names: dict[int, str] = {}
    for path in files:
        mask = read_ct(path)
        if not is_label_volume(mask) or int(mask.array.max()) > 1:
            raise read_error(path, "is not a binary mask (values other than 0 and 1)")
        if first is None:
            first = mask
            labels = np.zeros(mask.shape, dtype=np.uint16)
        elif mask.shape != first.shape or not np.allclose(mask.affine, first.affine, atol=1e-3):
            raise read_error(path, f"is not on the grid of {files[0].name} (shape or affine differ)")
        stem = path_stem(path)
        value = ids.get(stem)
        if value is None:
            value, extra = extra, extra + 1
        names[value] = stem
        labels[mask.array > 0] = value  # type: ignore[index]
    assert labels is not None and first is not None
    out = _as_labels(labels)
    meta = {**first.meta, "path": str(folder), "format": "segmentation-folder", "files": [str(p) for p in files]}
    volume = CTVolume(out, first.spacing, first.affine, first.orientation, meta)
    present = {int(v) for v in np.unique(out)} - {0}
    return LabelMap(out, volume, {v: n for v, n in names.items() if v in present} or names, TOTALSEG)


# ---------------------------------------------------------------------------- DICOM-SEG
def is_dicom_seg(path: Path) -> bool:
    """True for a DICOM file whose Modality is SEG."""
    if not Path(path).is_file() or not is_dicom_file(path):
        return False
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:
        return False
    return str(ds.get("Modality", "")).upper() == "SEG"


def _segment_value(tracking_id: Any, number: int) -> int:
    """Our writer stores the label value as TrackingID ``label <value>``; else the segment number."""
    text = str(tracking_id or "")
    if text.startswith("label "):
        try:
            return int(text.split()[1])
        except (IndexError, ValueError):
            pass
    return int(number)


def read_dicom_seg(path: Path) -> LabelMap:
    """A DICOM Segmentation (highdicom) as one label map on its own grid.

    Segment ``n`` becomes value ``n``, or the label value our writer recorded (TrackingID
    ``label <value>``); names are the SegmentLabels. Overlapping segments are refused.
    """
    import highdicom as hd

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.segread(str(path))
            vol = seg.get_volume(combine_segments=True, relabel=False)
    except Exception as exc:  # highdicom raises many types on files it cannot map to a volume
        raise read_error(path, f"cannot read the DICOM Segmentation as a volume ({type(exc).__name__}: {exc})") from exc
    array = np.asarray(vol.array)
    if array.ndim != 3:
        raise read_error(path, f"DICOM Segmentation volume has shape {array.shape}; need 3D")
    values, names = {}, {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        value = _segment_value(item.get("TrackingID"), number)
        values[number] = value
        names[value] = str(item.get("SegmentLabel", f"segment_{number}"))
    lut = np.zeros(max([int(array.max()), *values]) + 1, dtype=np.uint16)
    for number, value in values.items():
        lut[number] = value
    labels = _as_labels(lut[array.astype(np.int64)])
    display = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(vol.affine, dtype=float)  # LPS -> RAS
    affine = np.eye(4)
    affine[:3, :3] = display[:3, :3][:, ::-1]  # array (k, j, i) -> voxel axes (i, j, k)
    affine[:3, 3] = display[:3, 3]
    meta = {"path": str(path), "format": "dicom-seg",
            "SeriesInstanceUID": str(getattr(seg, "SeriesInstanceUID", "")),
            "FrameOfReferenceUID": str(getattr(seg, "FrameOfReferenceUID", ""))}
    volume = CTVolume(labels, spacing_from_affine(affine), affine, axcodes(affine), meta)
    top = int(labels.max()) if labels.size else 0
    return LabelMap(labels, volume, names, kind_of(names, top))


# ---------------------------------------------------------------------------- entry point
def read_label_map(path: str | os.PathLike[str]) -> LabelMap:
    """Read a label map: a DICOM-SEG file, a TotalSegmentator ``segmentations/`` folder, or a
    NIfTI/NRRD/MHA integer label volume (with or without a napari-ctvlp sidecar).

    Raises:
        CTReadError: unreadable, or not a label map.
    """
    from napari_ctvlp.io.read import read_ct

    p = Path(path).expanduser()
    if p.is_dir():
        if not is_segmentation_folder(p):
            raise read_error(p, "is not a folder of TotalSegmentator masks")
        return read_segmentation_folder(p)
    if is_dicom_seg(p):
        return read_dicom_seg(p)
    if path_suffix(p) not in NIFTI_SUFFIXES + ITK_SUFFIXES:
        raise read_error(p, "is not a label map file (.nii, .nii.gz, .nrrd, .mha, or a DICOM-SEG)")
    volume = read_ct(p)
    names = read_sidecar(p)
    if not is_label_volume(volume, sidecar=names is not None):
        raise read_error(p, "holds CT values (negative or above 255), not labels")
    return label_map_from_volume(volume, names=names)


__all__ = [
    "CUSTOM",
    "ORGAN",
    "TOTALSEG",
    "CTReadError",
    "LabelMap",
    "is_dicom_seg",
    "is_label_volume",
    "is_segmentation_folder",
    "kind_of",
    "label_map_from_volume",
    "read_dicom_seg",
    "read_label_map",
    "read_segmentation_folder",
    "read_sidecar",
    "totalseg_class_names",
]
