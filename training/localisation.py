"""Do the heatmaps point at the lesion? Localisation metrics on phantoms with lesion maps.

For every held-out phantom of a dataset in the CT-RATE layout written by
:func:`napari_ctvlp.phantom.write_phantom_dataset` (it has ``masks/`` organ labels and ``lesions/``
maps, value ``index + 1`` of the abnormality that painted each voxel), detection runs with the
phantom's own organ labels, and for each finding present with at least one lesion voxel two maps
are scored on the input grid:

* ``prompt``: the prompt heatmap of the finding term (cosine of the prompt embedding with every
  token embedding), as ``napari-ctvlp detect --prompt "<finding>"`` writes it;
* ``tags``: the MOSMOS pixel-tag map of the finding (the tag decoder's cross-attention);
* ``attribution`` (models with voxel statistics): which voxels of the finding's anatomy raise the
  finding's margin over its 6 template pairs (:mod:`napari_ctvlp.engine.attribution`), at voxel resolution;
* ``evidence`` (models with ``tag_evidence``): the finding's evidence map over its anatomy
  (:mod:`napari_ctvlp.engine.evidence_maps`), the recognition head's own reading;
* ``prompt_in_anatomy`` / ``tags_in_anatomy``: the same maps normalised over the finding's anatomy
  (the lungs for a nodule), zero elsewhere, as a reader looking at one row of the results table
  would want them. Pointing and AUROC are over the body for every kind, so a scoped map gets no
  credit inside its anatomy that a whole-body map would not also have to earn there.

Metrics per map kind, over (scan, finding) pairs:

* **pointing game**: the hottest voxel lies within ``tolerance_mm`` (5 mm) of a lesion voxel;
* **voxel AUROC** of heat vs lesion inside the body (organ label > 0);
* **cross-finding correlation**: per scan, the mean Pearson correlation between the maps of
  different findings (all 18 terms, on the model grid); near 1 means every finding gets the same map.
  For ``evidence`` maps (each zero outside its own anatomy) it is taken between the 11 lung
  findings, inside the lungs.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITIES, ABNORMALITY_NAMES, prompt_pairs
from napari_ctvlp.engine.volume import ProgressCallback, report

logger = logging.getLogger(__name__)

__all__ = ["LocalisationResult", "cross_map_correlation", "evaluate_localisation", "pointing_hit", "voxel_auroc"]

KINDS = ("prompt", "tags")
#: maps normalised over the finding's anatomy (pointing and AUROC only: their cross-finding
#: correlation would mostly measure that different anatomies do not overlap)
SCOPED_KINDS = ("prompt_in_anatomy", "tags_in_anatomy")
#: voxel attribution through the voxel statistics (models with ``statistics_edges`` only)
ATTRIBUTION_KIND = "attribution"
#: finding evidence maps (models with ``tag_evidence`` only)
EVIDENCE_KIND = "evidence"


def pointing_hit(heat: np.ndarray, lesion: np.ndarray, *, spacing: Sequence[float], tolerance_mm: float = 5.0,
                 within: np.ndarray | None = None) -> bool:
    """True when the hottest voxel of ``heat`` (inside ``within``) is within ``tolerance_mm`` of ``lesion``."""
    from scipy import ndimage

    if not lesion.any():
        raise ValueError("pointing_hit needs a non-empty lesion mask")
    h = np.where(within, heat, -np.inf) if within is not None else heat
    idx = np.unravel_index(int(np.argmax(h)), h.shape)
    if lesion[idx]:
        return True
    box = [slice(max(0, i - int(np.ceil(tolerance_mm / s)) - 1), i + int(np.ceil(tolerance_mm / s)) + 2)
           for i, s in zip(idx, spacing)]
    sub = lesion[tuple(box)]
    if not sub.any():
        return False
    dist = ndimage.distance_transform_edt(~sub, sampling=list(spacing))
    local = tuple(i - b.start for i, b in zip(idx, box))
    return bool(dist[local] <= tolerance_mm)


def voxel_auroc(heat: np.ndarray, lesion: np.ndarray, *, within: np.ndarray | None = None,
                max_voxels: int = 400_000, seed: int = 0) -> float:
    """AUROC of heat values for lesion vs non-lesion voxels (inside ``within``); NaN for one class."""
    from sklearn.metrics import roc_auc_score

    keep = within if within is not None else np.ones(heat.shape, dtype=bool)
    y = lesion[keep].astype(np.int8)
    s = heat[keep].astype(np.float32)
    if y.min(initial=0) == y.max(initial=0):
        return float("nan")
    if y.size > max_voxels:  # all lesion voxels, a random sample of the others
        rng = np.random.default_rng(seed)
        pos = np.flatnonzero(y == 1)
        neg = np.flatnonzero(y == 0)
        neg = rng.choice(neg, size=min(neg.size, max_voxels - min(pos.size, max_voxels // 2)), replace=False)
        pos = pos if pos.size <= max_voxels // 2 else rng.choice(pos, size=max_voxels // 2, replace=False)
        sel = np.concatenate([pos, neg])
        y, s = y[sel], s[sel]
    return float(roc_auc_score(y, s))


def cross_map_correlation(maps: np.ndarray) -> float:
    """Mean pairwise Pearson correlation between the rows of ``maps`` ``[K, ...]`` (constant rows skipped)."""
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    flat = flat[flat.std(axis=1) > 0]
    if flat.shape[0] < 2:
        return float("nan")
    c = np.corrcoef(flat)
    iu = np.triu_indices(c.shape[0], k=1)
    return float(np.mean(c[iu]))


@dataclass(frozen=True)
class LocalisationResult:
    """Summary of :func:`evaluate_localisation` (``metrics`` is the full JSON-safe record)."""

    pointing: dict[str, float]
    voxel_auroc: dict[str, float]
    cross_correlation: dict[str, float]
    n_pairs: int
    n_scans: int
    metrics: dict[str, Any]


def _heatmap(session: Any, kind: str, k: int, *, grid: str) -> np.ndarray:
    """Map ``kind`` (``"prompt"``: the finding term's prompt heatmap; ``"tags"``: its pixel-tag map;
    ``*_in_anatomy``: normalised over the finding's anatomy) of abnormality number ``k`` on ``grid``."""
    anatomy = ABNORMALITIES[k].anatomy if kind.endswith("_in_anatomy") else None
    if kind == EVIDENCE_KIND:
        return session.evidence_heatmap(ABNORMALITY_NAMES[k], grid=grid)
    if kind == ATTRIBUTION_KIND:  # the margin of the finding's 6 template pairs, as its probability uses
        return session.attribution_heatmap(prompt_pairs(ABNORMALITY_NAMES[k]), anatomy=ABNORMALITIES[k].anatomy,
                                           grid=grid)
    if kind.startswith("prompt"):
        return session.prompt_heatmap(ABNORMALITIES[k].term, grid=grid, anatomy=anatomy)
    return session.abnormality_heatmap(ABNORMALITY_NAMES[k], grid=grid, anatomy=anatomy)


def _cases(root: Path, split: str) -> list[tuple[str, Path, Path, Path]]:
    names = []
    labels = root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    if not labels.is_file():
        raise ValueError(f"{root} has no {labels.relative_to(root)} (a dataset written by napari-ctvlp phantom?)")
    with labels.open(newline="") as fh:
        names = [r["VolumeName"] for r in csv.DictReader(fh)]
    out = []
    for name in names:
        stem = name[: -len(".nii.gz")]
        parts = stem.split("_")
        ct = root / split / "_".join(parts[:2]) / "_".join(parts[:3]) / name
        masks, lesions = root / "masks" / name, root / "lesions" / name
        if ct.is_file() and masks.is_file() and lesions.is_file():
            out.append((name, ct, masks, lesions))
    if not out:
        raise ValueError(f"{root}: no {split} volume has both masks/ and lesions/ maps")
    return out


def evaluate_localisation(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "valid",
    limit: int | None = None,
    tolerance_mm: float = 5.0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> LocalisationResult:
    """Pointing game, voxel AUROC and cross-finding correlation of the heatmaps (see the module doc).

    Args:
        checkpoint: checkpoint directory.
        data: phantom dataset root (CT-RATE layout with ``masks/`` and ``lesions/``).
        split: split to evaluate.
        limit: only the first ``limit`` volumes.
        tolerance_mm: pointing-game distance.
        device: torch device.
        progress: ``progress(done, total, message)``.
    """
    from napari_ctvlp.engine.pipeline import detect, load_model
    from napari_ctvlp.io import read_ct, read_labels

    cases = _cases(Path(data), split)[: limit or None]
    loaded = load_model(checkpoint, device=device)  # fail early on a bad checkpoint (cached for detect)
    scored = KINDS + SCOPED_KINDS
    if loaded.model.statistics is not None:
        scored += (ATTRIBUTION_KIND,)
    if loaded.model.evidence is not None:
        scored += (EVIDENCE_KIND,)
    hits: dict[str, list[bool]] = {k: [] for k in scored}
    aucs: dict[str, list[float]] = {k: [] for k in scored}
    per_finding: dict[str, dict[str, list[float]]] = {k: {n: [] for n in ABNORMALITY_NAMES} for k in scored}
    corr: dict[str, list[float]] = {k: [] for k in KINDS}
    for i, (name, ct, masks, lesions) in enumerate(cases):
        volume = read_ct(ct)
        organs = read_labels(masks, like=volume)
        lesion_map = read_labels(lesions, like=volume)
        result = detect(volume, checkpoint=str(checkpoint), segmentation=organs.astype(np.uint8), device=device,
                        heatmaps=False)
        session = result.session
        body = organs > 0
        for kind in KINDS:
            maps = np.stack([_heatmap(session, kind, k, grid="model") for k in range(len(ABNORMALITY_NAMES))])
            corr[kind].append(cross_map_correlation(maps))
        if EVIDENCE_KIND in scored and session.features.present[session.features.anatomies.index("lung")]:
            # the 11 lung findings share one anatomy: are their maps different inside it?
            lung = [k for k, a in enumerate(ABNORMALITIES) if a.anatomy == "lung"]
            maps = np.stack([_heatmap(session, EVIDENCE_KIND, k, grid="model") for k in lung])
            inside = maps.max(axis=0) > 0
            corr.setdefault(EVIDENCE_KIND, []).append(cross_map_correlation(maps[:, inside]))
        for k, finding in enumerate(ABNORMALITY_NAMES):
            lesion = lesion_map == k + 1
            if not lesion.any():
                continue
            for kind in scored:
                if kind not in KINDS and not session.features.present[
                        session.features.anatomies.index(ABNORMALITIES[k].anatomy)]:
                    hits[kind].append(False)  # its anatomy is not in the mask: nothing to point with
                    aucs[kind].append(float("nan"))
                    continue
                heat = _heatmap(session, kind, k, grid="source")
                hit = pointing_hit(heat, lesion, spacing=volume.spacing, tolerance_mm=tolerance_mm, within=body)
                auc = voxel_auroc(heat, lesion, within=body)
                hits[kind].append(hit)
                aucs[kind].append(auc)
                per_finding[kind][finding].append(float(hit))
        report(progress, i + 1, len(cases), name)

    def mean(v: list[float]) -> float:
        v = [x for x in v if np.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    pointing = {k: mean([float(h) for h in hits[k]]) for k in scored}
    auroc = {k: mean(aucs[k]) for k in scored}
    cross = {k: mean(v) for k, v in corr.items()}
    metrics = {
        "checkpoint": str(checkpoint), "data": str(data), "split": split, "n_scans": len(cases),
        "n_pairs": len(hits["prompt"]), "tolerance_mm": tolerance_mm,
        "pointing": pointing, "voxel_auroc": auroc, "cross_finding_correlation": cross,
        "pointing_per_finding": {k: {n: (mean(v) if v else None) for n, v in per_finding[k].items()} for k in scored},
        "pairs_per_finding": {n: len(v) for n, v in per_finding["prompt"].items()},
    }
    return LocalisationResult(pointing, auroc, cross, len(hits["prompt"]), len(cases), metrics)
