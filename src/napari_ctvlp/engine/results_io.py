"""Writing detection results (the batch command behind ``napari-ctvlp detect`` is :mod:`napari_ctvlp.cli_detect`).

:func:`write_results` writes, into one folder:

* ``results.json`` -- every number (NaN as ``null``), input, checkpoint, model card name, timings;
* ``results.csv`` -- one row per anatomy x abnormality: anatomy, abnormality, probability, std,
  assessable, primary (empty probability when not assessable);
* ``organs.nii.gz`` (+ JSON sidecar with the label names) on the input grid;
* ``heatmap_<slug>.nii.gz`` per prompt heatmap, on the input grid;
* ``organ_stats.csv`` -- volume (mL), mean HU and "incomplete" per organ and anatomy group.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_ctvlp.engine.pipeline import DetectionResult

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
ORGANS_NIFTI = "organs.nii.gz"
ORGAN_STATS_CSV = "organ_stats.csv"


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars/arrays -> Python, Paths -> str (recursively)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _num(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.6g}"


def heatmap_filename(prompt: str, taken: set[str] | None = None) -> str:
    """``heatmap_<slug>.nii.gz``, made unique against ``taken``."""
    from napari_ctvlp.engine.attention import heatmap_slug

    base = f"heatmap_{heatmap_slug(prompt)}"
    name, i = f"{base}.nii.gz", 2
    while taken is not None and name in taken:
        name, i = f"{base}_{i}.nii.gz", i + 1
    return name


def results_summary(result: DetectionResult) -> dict[str, Any]:
    """The content of ``results.json`` (JSON-safe, NaN as None)."""
    scores = result.probabilities
    primary = {}
    for k, ab in enumerate(scores.abnormalities):
        j = scores.primary_index(ab)
        primary[ab] = {
            "anatomy": scores.primary[k],
            "probability": float("nan") if j is None else scores.probability[k, j],
            "std": float("nan") if j is None else scores.std[k, j],
            "assessable": False if j is None else bool(scores.assessable[k, j]),
            "per_template": [] if j is None else scores.per_template[k, j].tolist(),
        }
    seg = result.segmentation
    vol = result.volume
    summary = {
        "input": {"path": vol.meta.get("path"), "shape": list(vol.shape), "spacing": list(vol.spacing),
                  "affine": np.asarray(vol.affine).tolist(), "orientation": list(vol.orientation)},
        "checkpoint": {"path": result.checkpoint.path, "model_card": result.checkpoint.name,
                       "version": result.checkpoint.version, "architecture": result.checkpoint.architecture,
                       "preprocessing": result.checkpoint.preprocessing},
        "device": result.device,
        "segmentation": {"backend": seg.backend, "names": {str(k): v for k, v in seg.names.items()}},
        "templates": [list(t) for t in scores.templates],
        "abnormalities": primary,
        "table": scores.rows(),
        "prompts": {p: s.as_dict() for p, s in result.prompts.items()},
        "timings": dict(result.timings),
    }
    return _json_safe(summary)


def write_results(result: DetectionResult, out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write the result files (see the module doc) into ``out_dir``; returns the written paths.

    Raises:
        FileExistsError: a target exists and ``overwrite`` is False (nothing is written).
    """
    from napari_ctvlp.io import write_labels, write_volume

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    taken: set[str] = set()
    heat_names = {}
    for prompt in result.heatmaps:
        heat_names[prompt] = heatmap_filename(prompt, taken)
        taken.add(heat_names[prompt])
    targets = [RESULTS_JSON, RESULTS_CSV, ORGANS_NIFTI, "organs.json", ORGAN_STATS_CSV, *heat_names.values()]
    if not overwrite:
        existing = [t for t in targets if (out / t).exists()]
        if existing:
            raise FileExistsError(f"{out / existing[0]} already exists; pass overwrite=True to replace the results")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    path = out / RESULTS_JSON
    path.write_text(json.dumps(results_summary(result), indent=1, allow_nan=False))
    written.append(path)

    path = out / RESULTS_CSV
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["anatomy", "abnormality", "probability", "std", "assessable", "primary"])
        for row in result.probabilities.rows():
            w.writerow([row["anatomy"], row["abnormality"], _num(row["probability"]), _num(row["std"]),
                        str(row["assessable"]).lower(), str(row["primary"]).lower()])
    written.append(path)

    seg = result.segmentation
    written += list(write_labels(seg.labels, like=result.volume, path=out / ORGANS_NIFTI, names=seg.names, overwrite=True))

    path = out / ORGAN_STATS_CSV
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["region", "volume_ml", "mean_hu", "incomplete"])
        for key in sorted(set(seg.volume_ml) | set(seg.mean_hu)):
            w.writerow([key, _num(float(seg.volume_ml.get(key, float("nan")))),
                        _num(float(seg.mean_hu.get(key, float("nan")))), str(bool(seg.incomplete.get(key, False))).lower()])
    written.append(path)

    for prompt, array in result.heatmaps.items():
        written.append(Path(write_volume(np.asarray(array, dtype=np.float32), like=result.volume,
                                         path=out / heat_names[prompt], overwrite=True)))
    return written
