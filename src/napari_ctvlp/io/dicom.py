"""DICOM part of :mod:`napari_ctvlp.io`: read one CT series, write a DICOM Segmentation.

Use :func:`napari_ctvlp.io.read_ct` and :func:`napari_ctvlp.io.write_labels`; this module is
their implementation (pydicom for reading, highdicom for DICOM-SEG).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp import __version__
from napari_ctvlp.engine.volume import CTVolume, ProgressCallback, report
from napari_ctvlp.io._common import (
    CTReadError,
    axcodes,
    check_memory,
    hu_array,
    one_line,
    read_error,
    spacing_from_affine,
)

logger = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Copied into ``CTVolume.meta`` when present (DICOM keywords as keys).
_META_KEYWORDS = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "SliceThickness",
    "ConvolutionKernel",
    "KVP",
    "BodyPartExamined",
    "PixelPaddingValue",
)


#: Patient/study attributes of type 2 that highdicom copies from the source images.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


class _PydicomLog(logging.Handler):
    """Collects what pydicom logs while reading (instead of letting it reach the user's stderr)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = one_line(record.getMessage(), 200)
        except Exception:  # noqa: BLE001 - a logging handler must never raise
            return
        logger.debug("pydicom: %s", text)
        if record.levelno >= logging.WARNING and text not in self.messages:
            self.messages.append(text)


_PYDICOM_LOG_LOCK = threading.Lock()
_PYDICOM_LOG_STATE: dict[str, Any] = {"users": 0, "propagate": True}


@contextlib.contextmanager
def _capture_pydicom_log() -> Iterator[_PydicomLog]:
    """Route the ``pydicom`` logger into a collecting handler (debug log only) while reading.

    pydicom logs problems of damaged files (e.g. "End of file reached before delimiter") as
    warnings; the reader reports them in its one-line :class:`CTReadError` instead. Reentrant
    and thread-safe: ``propagate`` is restored when the last reader finishes.
    """
    pd_logger = logging.getLogger("pydicom")
    handler = _PydicomLog()
    with _PYDICOM_LOG_LOCK:
        if _PYDICOM_LOG_STATE["users"] == 0:
            _PYDICOM_LOG_STATE["propagate"] = pd_logger.propagate
        _PYDICOM_LOG_STATE["users"] += 1
        pd_logger.addHandler(handler)
        pd_logger.propagate = False
    try:
        yield handler
    finally:
        with _PYDICOM_LOG_LOCK:
            pd_logger.removeHandler(handler)
            _PYDICOM_LOG_STATE["users"] -= 1
            if _PYDICOM_LOG_STATE["users"] == 0:
                pd_logger.propagate = _PYDICOM_LOG_STATE["propagate"]


def _with_pydicom_note(message: str, log: _PydicomLog | None) -> str:
    if log is None or not log.messages:
        return message
    return f"{message}; pydicom: {log.messages[0]}"


def _plain(value: Any) -> Any:
    """A DICOM element value as a plain Python value (float, int, str or list)."""
    import pydicom

    if isinstance(value, pydicom.multival.MultiValue):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return one_line(value, 200)


def _read_header(path: Path) -> Any | None:
    """The header of a DICOM file (no pixels), or None when it is not a readable DICOM file."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # InvalidDicomError, truncated files, bad values ...
        logger.debug("skipping %s: %s", path, exc)
        return None


def _is_slice(ds: Any) -> bool:
    return all(k in ds for k in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))


def _candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")


#: Attributes that are the same for every slice of one series; slices that differ in any of them
#: are different series even when their SeriesInstanceUID is the same (or blank, as in many
#: anonymised exports).
_SERIES_KEYWORDS = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "SeriesDescription")


def _series_key(ds: Any) -> tuple[Any, ...]:
    """What tells one series from another: series-level UIDs/number/description and the slice grid.

    Orientation (rounded to 1e-3), ``Rows`` x ``Columns`` and ``PixelSpacing`` are included too:
    a stack of slices with different orientations or grids cannot be one volume.
    """
    def text(key: str) -> str:
        return one_line(ds.get(key, "") or "", 120)

    try:
        iop = tuple(round(float(v), 3) + 0.0 for v in ds.ImageOrientationPatient)
    except Exception:  # noqa: BLE001 - judged later by _geometry
        iop = ()
    try:
        spacing = tuple(round(float(v), 4) for v in ds.PixelSpacing)
    except Exception:  # noqa: BLE001
        spacing = ()
    size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    return (*(text(k) for k in _SERIES_KEYWORDS), iop, size, spacing)


def _describe_series(keys: list[tuple[Any, ...]], key: tuple[Any, ...], count: int) -> str:
    """``<uid> '<description>' (<n> files)``, plus what tells it from other series with the same UID."""
    uid, study, frame, number, desc, iop, size, spacing = key
    parts = [uid or "(blank SeriesInstanceUID)", f"'{desc or 'no description'}'"]
    others = [k for k in keys if k != key and k[0] == uid]
    if number and any(k[3] != number for k in others):
        parts.append(f"series number {number}")
    if any(k[1] != study for k in others):
        parts.append(f"study {study or '(blank)'}")
    if any(k[2] != frame for k in others):
        parts.append(f"frame of reference {frame or '(blank)'}")
    if any(k[5] != iop for k in others):
        parts.append(f"orientation {list(iop)}")
    if any(k[6] != size for k in others):
        parts.append(f"{size[0]}x{size[1]} pixels")
    if any(k[7] != spacing for k in others):
        parts.append(f"pixel spacing {list(spacing)}")
    return " ".join(parts) + f" ({count} files)"


def _collect(path: Path, progress: ProgressCallback | None) -> tuple[Path, list[tuple[Path, Any]]]:
    """Header of every slice of the one series at ``path`` (a folder or one of its files)."""
    folder = path if path.is_dir() else path.parent
    wanted: tuple[Any, ...] | None = None
    if path.is_file():
        ds = _read_header(path)
        if ds is None:
            raise read_error(path, "is not a readable DICOM file")
        if "SeriesInstanceUID" not in ds:
            raise read_error(path, "DICOM file has no SeriesInstanceUID")
        wanted = _series_key(ds)
    files = _candidates(folder)
    if not files:
        subdirs = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" (it has sub-folders {', '.join(subdirs[:5])}: pass one series folder)" if subdirs else ""
        raise read_error(folder, f"folder is empty{hint}")
    series: dict[tuple[Any, ...], list[tuple[Path, Any]]] = {}
    multiframe = 0
    n = len(files)
    for i, f in enumerate(files):
        if i % 16 == 0:
            report(progress, i, 2 * n, f"scanning {folder.name} ({i}/{n} files)")
        ds = _read_header(f)
        if ds is None:
            continue
        try:  # pydicom converts values lazily: a corrupt element raises on first access
            key = _series_key(ds)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            is_slice = _is_slice(ds)
        except Exception as exc:
            logger.warning("skipping unreadable DICOM file %s: %s", f, one_line(exc))
            continue
        if wanted is not None and key != wanted:
            continue
        if frames > 1:
            multiframe += 1
            continue
        if not is_slice:
            logger.info("ignoring %s: not an image slice", f.name)
            continue
        series.setdefault(key, []).append((f, ds))
    if not series:
        if multiframe:
            raise read_error(folder, "holds only multi-frame DICOM images, which are not supported; convert to one file per slice or NIfTI")
        subdirs = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f"; its sub-folders ({', '.join(subdirs[:5])}) may hold series: pass one of them" if subdirs else ""
        raise read_error(folder, f"folder contains no DICOM image slices ({n} files checked){hint}")
    if len(series) > 1:
        keys = list(series)
        parts = [
            _describe_series(keys, key, len(items))
            for key, items in sorted(series.items(), key=lambda kv: -len(kv[1]))
        ]
        raise read_error(
            folder,
            f"folder holds {len(series)} DICOM series: {'; '.join(parts)}; "
            "pass the folder of one series (or one of its files)",
        )
    return folder, next(iter(series.values()))


def _int_tag(ds: Any, key: str) -> int | None:
    try:
        value = ds.get(key)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _check_one_stack(folder: Path, items: list[tuple[Path, Any]], along: np.ndarray) -> None:
    """Refuse slices that look like several series merged (e.g. two series with a blank UID).

    ``items`` are sorted along the slice normal, ``along`` their positions on it. Signs of a
    merge: the same SOPInstanceUID twice; the same InstanceNumber twice within one acquisition
    (unless every slice has the same number, as some exporters write);
    acquisitions (AcquisitionNumber) whose slice positions interleave instead of following one
    another (multi-acquisition series such as step-and-shoot scans are contiguous blocks).
    """
    sops = [str(ds.get("SOPInstanceUID", "") or "") for _, ds in items]
    dup_sops = [u for u, c in Counter(u for u in sops if u).items() if c > 1]
    if dup_sops:
        raise read_error(
            folder,
            f"{len(dup_sops)} SOPInstanceUID(s) occur in more than one file (e.g. {dup_sops[0]}): copies of the "
            "same slices, or several series merged; pass the folder of one series",
        )
    acquisitions = [_int_tag(ds, "AcquisitionNumber") for _, ds in items]
    instances = [_int_tag(ds, "InstanceNumber") for _, ds in items]
    if all(v is not None for v in instances) and len(set(instances)) > 1:  # a constant number says nothing
        counts = Counter(zip(acquisitions, instances))
        repeated = [key for key, c in counts.items() if c > 1]
        if repeated:
            times = max(counts.values())
            raise read_error(
                folder,
                f"{len(repeated)} InstanceNumber(s) occur on slices at different positions (e.g. "
                f"{repeated[0][1]} x{counts[repeated[0]]}): this looks like {times} series merged into one "
                "folder (their SeriesInstanceUID is blank or shared); pass the folder of one series",
            )
    groups: dict[int, list[float]] = {}
    for acq, z in zip(acquisitions, along):
        if acq is not None:
            groups.setdefault(acq, []).append(float(z))
    if len(groups) > 1:
        spans = sorted((min(v), max(v), k, len(v)) for k, v in groups.items())
        for (lo1, hi1, k1, n1), (lo2, hi2, k2, n2) in zip(spans, spans[1:]):
            if lo2 < hi1 - 1e-3:
                raise read_error(
                    folder,
                    f"slices of AcquisitionNumber {k1} ({n1} slices, {lo1:.1f}..{hi1:.1f} mm) and {k2} "
                    f"({n2} slices, {lo2:.1f}..{hi2:.1f} mm) interleave: several series or acquisitions "
                    "merged into one folder; pass the folder of one series",
                )


def _interleave_hint(steps: np.ndarray) -> str | None:
    """A message when non-uniform steps repeat with period 2 or 3: interleaved series, not missing slices."""
    for period in (2, 3):
        if len(steps) < 2 * period:
            continue
        pattern = steps[:period]
        reps = np.resize(pattern, len(steps))
        if np.max(np.abs(steps - reps)) <= max(1e-2, 0.01 * float(np.median(steps))):
            offsets = ", ".join(f"{v:.3g}" for v in np.cumsum(pattern)[:-1])
            return (
                f"slice positions interleave ({period} stacks of {float(pattern.sum()):.3g} mm spacing shifted by "
                f"{offsets} mm): several series merged into one folder; pass the folder of one series"
            )
    return None


def _geometry(folder: Path, items: list[tuple[Path, Any]]) -> tuple[list[tuple[Path, Any]], np.ndarray]:
    """Sort slices along the normal and build the voxel (i, j, k) -> RAS affine."""
    first = items[0][1]
    try:
        iop = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=float)
        row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
        positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in items], dtype=float)
        orientations = np.asarray([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items], dtype=float)
    except Exception as exc:
        raise read_error(folder, f"invalid DICOM geometry tags ({type(exc).__name__}: {exc})") from exc
    if iop.shape != (6,) or positions.shape != (len(items), 3) or orientations.shape != (len(items), 6):
        raise read_error(folder, "ImageOrientationPatient/ImagePositionPatient have the wrong number of values")
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(iop)) and row_spacing > 0 and col_spacing > 0):
        raise read_error(folder, "invalid DICOM geometry (non-finite position or non-positive PixelSpacing)")
    if np.max(np.abs(orientations - iop)) > 1e-3:
        raise read_error(folder, "slices of the series have different ImageOrientationPatient")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(shapes) > 1:
        raise read_error(folder, f"slices have different sizes {sorted(shapes)}")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 1e-3:
        raise read_error(folder, "ImageOrientationPatient row and column directions are parallel")
    normal /= np.linalg.norm(normal)
    order = np.argsort(positions @ normal, kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]
    n = len(items)
    if n < 2:
        rows, cols = shapes.pop()
        raise read_error(folder, f"is a 2D image (one DICOM slice of {rows}x{cols}); need a 3D series")
    along = positions @ normal
    steps = np.diff(along)
    if steps.min() < 1e-3:
        raise read_error(folder, "several slices share the same position (more than one acquisition or duplicates in the series?)")
    _check_one_stack(folder, items, along)
    median = float(np.median(steps))
    if steps.max() - steps.min() > max(1e-2, 0.01 * median):
        hint = _interleave_hint(steps)
        raise read_error(
            folder,
            hint or f"slice spacing is not uniform ({steps.min():.3f}..{steps.max():.3f} mm); missing slices?",
        )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # column index i runs along the row direction
    lps[:3, 1] = col_dir * row_spacing  # row index j runs along the column direction
    lps[:3, 2] = (positions[-1] - positions[0]) / (n - 1)
    lps[:3, 3] = positions[0]
    return items, _LPS_TO_RAS @ lps


def _pixels(path: Path, ds: Any) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut

    arr = ds.pixel_array
    if arr.ndim != 2:
        raise read_error(path, f"slice pixel data has shape {arr.shape}; need one grey-value frame")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    # int32 only when every stored value times the slope plus the intercept fits it; otherwise
    # float64, where a huge slope (1e36) becomes a value hu_array refuses instead of an overflow
    stored_max = float(max(abs(int(arr.min())), abs(int(arr.max())))) if arr.size and arr.dtype.kind in "iu" else 0.0
    exact = (arr.dtype.kind in "iub" and slope.is_integer() and intercept.is_integer()
             and abs(slope) * stored_max + abs(intercept) < 2**31)
    if "ModalityLUTSequence" in ds or not exact:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    return arr.astype(np.int32) * int(slope) + int(intercept)


def read_dicom_series(path: Path, *, progress: ProgressCallback | None = None) -> CTVolume:
    """Read the one DICOM series at ``path`` (a series folder or one of its files).

    Raises:
        CTReadError: anything wrong with the files, as one line naming the file or folder.
    """
    with _capture_pydicom_log() as log:  # pydicom logs damaged files as warnings: keep them off stderr
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):  # pydicom warns about every malformed value
                warnings.simplefilter("ignore")
                return _read_series(path, progress, log)
        except CTReadError:
            raise
        except Exception as exc:  # lazily parsed DICOM values can fail anywhere
            raise read_error(path, _with_pydicom_note(f"invalid DICOM data ({type(exc).__name__}: {exc})", log)) from exc


def _slice_bytes_per_voxel(ds: Any) -> int:
    """Peak bytes per voxel of decoding: int32 (or float64 when rescaled by non-integers) slices, the stack, the HU copy."""
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        integer = slope.is_integer() and intercept.is_integer() and "ModalityLUTSequence" not in ds
    except (TypeError, ValueError):
        integer = False
    return 4 + 4 + 2 if integer else 8 + 8 + 4


def _read_series(path: Path, progress: ProgressCallback | None, log: _PydicomLog | None = None) -> CTVolume:
    import pydicom

    folder, items = _collect(path, progress)
    items, affine = _geometry(folder, items)
    n = len(items)
    first = items[0][1]
    check_memory(folder, (n, int(first.Rows), int(first.Columns)), _slice_bytes_per_voxel(first),
                 what=f"decoding its {n} slices")
    slices = []
    for k, (f, _) in enumerate(items):
        report(progress, n + k, 2 * n, f"decoding {folder.name} slice {k + 1}/{n}")
        try:
            ds = pydicom.dcmread(str(f))
            slices.append(_pixels(f, ds))
        except CTReadError:
            raise
        except Exception as exc:
            message = f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})"
            raise read_error(f, _with_pydicom_note(message, log)) from exc
    if len({s.shape for s in slices}) > 1:
        raise read_error(folder, "decoded slices have different sizes")
    data = np.stack(slices)  # (k, j, i): slice, row, column
    del slices
    array = np.ascontiguousarray(hu_array(data, folder))
    meta: dict[str, Any] = {"path": str(path), "format": "dicom", "folder": str(folder)}
    for key in ("SeriesInstanceUID", "StudyInstanceUID", "Modality"):
        meta[key] = str(first.get(key, "") or "")
    for key in _META_KEYWORDS:
        if first.get(key) not in (None, ""):
            meta[key] = _plain(first.get(key))
    meta["files"] = [str(f) for f, _ in items]
    meta["SOPInstanceUIDs"] = [
        str(ds.get("SOPInstanceUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPInstanceUID", ""))
        for _, ds in items
    ]
    meta["TransferSyntaxUID"] = str(getattr(first.file_meta, "TransferSyntaxUID", ""))
    for key in ("WindowCenter", "WindowWidth"):
        if key in first:
            value = first.get(key)
            meta[key] = float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    report(progress, 2 * n, 2 * n, f"read {n} slices of {folder.name}")
    logger.info("read DICOM series %s: %d slices from %s", meta.get("SeriesInstanceUID"), n, folder)
    return CTVolume(array, spacing_from_affine(affine), affine, axcodes(affine), meta)


def _fill_missing_uids(sources: list[Any], like: CTVolume) -> None:
    """Fill empty UIDs of (anonymised) source headers so highdicom can reference them.

    SOP Class/Instance UIDs come from the file meta information; empty Study/Series UIDs get
    UIDs derived deterministically from the series folder, so repeated exports agree.
    """
    from pydicom.uid import generate_uid

    seed = [str(like.meta.get("folder", "")), str(like.meta.get("FrameOfReferenceUID", ""))]
    derived = {
        "StudyInstanceUID": generate_uid(entropy_srcs=[*seed, "study"]),
        "SeriesInstanceUID": generate_uid(entropy_srcs=[*seed, "series"]),
    }
    filled: set[str] = set()
    for ds in sources:
        file_meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and file_meta is not None and file_meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
            filled.add("SOPClassUID")
        if not ds.get("SOPInstanceUID") and file_meta is not None and file_meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
            filled.add("SOPInstanceUID")
        for key, uid in derived.items():
            if not ds.get(key):
                setattr(ds, key, uid)
                filled.add(key)
        for key in _TYPE2_KEYWORDS:  # required-but-may-be-empty attributes highdicom copies
            if key not in ds:
                setattr(ds, key, "")
    if filled:
        logger.warning("source DICOM series lacks %s (anonymised?); filled them in for the DICOM-SEG", ", ".join(sorted(filled)))


def write_dicom_seg(
    labels: np.ndarray, *, like: CTVolume, path: Path, names: Mapping[int, str], save_to: Path | None = None
) -> None:
    """Write ``labels`` (display order, on ``like``'s grid) as a binary DICOM Segmentation.

    One segment per label value in ``names`` (the values present), numbered 1..N in increasing
    label value, SegmentLabel = name; frames reference ``like``'s source slices. Errors name
    ``path``; the file is saved to ``save_to`` when given (the temporary file of an atomic write).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = like.meta.get("files")
    if like.meta.get("format") != "dicom" or not files:
        raise ValueError(
            f"{path}: DICOM-SEG needs a volume read from a DICOM series (this one is "
            f"{like.meta.get('format', 'unknown')!r}); write .nii.gz instead"
        )
    if len(files) != like.shape[0]:
        raise ValueError(f"{path}: volume has {like.shape[0]} slices but {len(files)} source files")
    values = sorted(int(v) for v in names)
    if not values:
        raise ValueError(f"{path}: the label map is empty; nothing to write as DICOM-SEG")
    sources = []
    for f in files:
        try:
            sources.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as exc:
            raise ValueError(f"{path}: cannot re-read source slice {f} ({exc})") from exc
    _fill_missing_uids(sources, like)
    lut = np.zeros(max(values) + 1, dtype=np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    segment_map = lut[np.asarray(labels)]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="napari-ctvlp", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=str(names[v])[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"label {v}",
            tracking_uid=hd.UID(),
        )
        for i, v in enumerate(values)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-ctvlp",
        manufacturer_model_name="napari-ctvlp",
        software_versions=__version__,
        device_serial_number="0",
        series_description="napari-ctvlp labels",
        content_label="CTVLP",
    )
    seg.save_as(str(save_to if save_to is not None else path))
