"""Write synthetic chest-CT phantoms in the CT-RATE dataset layout (volumes, masks, CSV tables)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES
from napari_ctvlp.engine.volume import ProgressCallback, report

from .canvas import make_phantom

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhantomDatasetInfo:
    """What :func:`write_phantom_dataset` wrote (all paths absolute).

    Attributes:
        root: dataset root.
        split: ``"train"`` or ``"valid"``.
        volume_names: CT-RATE style names, e.g. ``train_1_a_1.nii.gz``.
        volumes, masks, lesions: NIfTI paths per volume (HU int16, organ labels, lesion maps).
        reports_csv, metadata_csv, labels_csv: the three CT-RATE tables.
    """

    root: Path
    split: str
    volume_names: tuple[str, ...]
    volumes: tuple[Path, ...]
    masks: tuple[Path, ...]
    lesions: tuple[Path, ...]
    reports_csv: Path
    metadata_csv: Path
    labels_csv: Path


_CLINICAL = ("Cough.", "Shortness of breath.", "Chest pain.", "Fever and cough.", "Follow-up.",
             "Screening.", "Dyspnea.", "Not given.")


def write_phantom_dataset(
    out: str | Path,
    *,
    n: int,
    seed: int,
    size: tuple[int, int, int] = (128, 128, 128),
    split: str = "train",
    progress: ProgressCallback | None = None,
) -> PhantomDatasetInfo:
    """Write ``n`` phantoms in the CT-RATE layout under ``out``.

    Layout (``<s>`` = split, ``p`` = 1..n): ``<s>/<s>_p/<s>_p_a/<s>_p_a_1.nii.gz`` (int16 HU,
    slope 1, intercept 0), ``masks/<s>_p_a_1.nii.gz`` (organ labels), ``lesions/<s>_p_a_1.nii.gz``
    (lesion maps), ``radiology_text_reports/<s>_reports.csv``, ``metadata/<s>_metadata.csv``,
    ``multi_abnormality_labels/<s>_predicted_labels.csv``. Phantom ``p`` uses seed
    ``seed * 100003 + p`` so datasets with different seeds do not overlap.

    Args:
        out: dataset root (created; existing files of the same names are overwritten).
        n: number of volumes (>= 1).
        seed: dataset seed.
        size: volume shape ``(D, H, W)``.
        split: ``"train"`` or ``"valid"``.
        progress: ``progress(done, total, message)`` callback.
    """
    import csv

    import nibabel as nib

    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    root = Path(out).resolve()
    dirs = {k: root / k for k in ("masks", "lesions", "radiology_text_reports", "metadata", "multi_abnormality_labels")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    reports, meta, labels = [], [], []
    names, vols, masks, lesions = [], [], [], []
    for p in range(1, int(n) + 1):
        report(progress, p - 1, int(n), f"phantom {p}/{n}")
        ph = make_phantom(seed=int(seed) * 100003 + p, size=size)
        name = f"{split}_{p}_a_1.nii.gz"
        vdir = root / split / f"{split}_{p}" / f"{split}_{p}_a"
        vdir.mkdir(parents=True, exist_ok=True)
        aff = ph.volume.affine
        paths = (vdir / name, dirs["masks"] / name, dirs["lesions"] / name)
        for arr, path in zip((ph.volume.array, ph.organs, ph.lesions), paths):
            img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), aff)
            img.header.set_xyzt_units("mm")
            img.header.set_slope_inter(1.0, 0.0)
            img.set_qform(aff, code=1)
            img.set_sform(aff, code=1)
            nib.save(img, path)
        names.append(name)
        vols.append(paths[0])
        masks.append(paths[1])
        lesions.append(paths[2])
        crng = np.random.default_rng([int(seed), p, 7])
        technique = ("Contrast-enhanced thoracic CT was obtained in the axial plane." if ph.contrast
                     else "Non-contrast thoracic CT was obtained in the axial plane.")
        reports.append([name, _CLINICAL[int(crng.integers(len(_CLINICAL)))], technique, ph.findings, ph.impression])
        sz, sy, sx = ph.volume.spacing
        d, h, w = ph.volume.shape
        meta.append([name, "PHANTOM", "CHEST" + (" CONTRAST" if ph.contrast else ""), ph.sex, f"{ph.age:03d}Y",
                     f"[{sx:.6g}, {sy:.6g}]", f"{sz:.6g}", 1, 0, h, w, d])
        labels.append([name] + [ph.labels[a] for a in ABNORMALITY_NAMES])
    tables = (
        (dirs["radiology_text_reports"] / f"{split}_reports.csv",
         ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"], reports),
        (dirs["metadata"] / f"{split}_metadata.csv",
         ["VolumeName", "Manufacturer", "SeriesDescription", "PatientSex", "PatientAge", "XYSpacing",
          "ZSpacing", "RescaleSlope", "RescaleIntercept", "Rows", "Columns", "NumberofSlices"], meta),
        (dirs["multi_abnormality_labels"] / f"{split}_predicted_labels.csv", ["VolumeName", *ABNORMALITY_NAMES], labels),
    )
    for path, header, rows in tables:
        with open(path, "w", newline="", encoding="utf-8") as f:
            wr = csv.writer(f)
            wr.writerow(header)
            wr.writerows(rows)
    report(progress, int(n), int(n), "done")
    logger.info("wrote %d phantoms to %s", n, root)
    return PhantomDatasetInfo(root, split, tuple(names), tuple(vols), tuple(masks), tuple(lesions),
                              tables[0][0], tables[1][0], tables[2][0])
