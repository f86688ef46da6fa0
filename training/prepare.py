"""Prepare a training cache from a CT-RATE-layout dataset (real CT-RATE or the phantom twin).

``python -m training.prepare --root R --out CACHE [--split train] [--workers N]
[--segmentation auto|phantom|masks:DIR|totalsegmentator|threshold] [--limit N]``

For every volume listed in ``R/radiology_text_reports/<split>_reports.csv``:

1. read the NIfTI with :func:`napari_ctvlp.io.read_ct` and apply the metadata CSV: CT-RATE stores
   raw detector values and unreliable header spacing; ``metadata/<split>_metadata.csv`` gives
   ``RescaleSlope``/``RescaleIntercept`` and ``XYSpacing``/``ZSpacing`` (for phantoms the header
   and the CSV agree, so this is a no-op);
2. get the organ label map (``R/masks/<VolumeName>`` of the phantom dataset, another masks folder,
   or a segmentation backend of :mod:`napari_ctvlp.engine.segmentation`);
3. preprocess ONCE onto the model grid with the engine's :func:`~napari_ctvlp.engine.preprocess.preprocess`
   (the same function inference uses; its config is stored in the cache);
4. compute the anatomy masks (:func:`~napari_ctvlp.engine.anatomy.anatomy_masks`) on the model grid;
5. split the report into per-anatomy sentence sets (:func:`training.report_parsing.parse_report`).

Cache layout (``CACHE/cache.json`` holds the preprocessing config and the anatomy order)::

    CACHE/<split>/manifest.json                     entries of every sample, in CSV order
    CACHE/<split>/shard_00000/<sample>/image.npy    float16 [D, H, W] in [-1, 1]
                                      organs.npy   uint8   [D, H, W] organ labels
                                      anatomy.npy  uint8   [A, D, H, ceil(W/8)] packed bool masks
                                      meta.json    the sample's entry (written last: "complete")

Arrays are plain ``.npy`` files so readers open them with ``np.load(mmap_mode="r")``. Every file is
written to a temporary name and renamed, and ``meta.json`` comes last, so an interrupted run is
resumed by running the same command again (complete samples are skipped).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES, ANATOMY_BY_NAME, ANATOMY_NAMES, ORGAN_LABELS, anatomy_masks
from napari_ctvlp.engine.volume import CTVolume, ProgressCallback, report

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
SHARD_SIZE = 64
_ARRAYS = ("image", "organs", "anatomy")


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_cache` did."""

    split_dir: Path
    manifest: Path
    n_samples: int
    n_written: int
    n_skipped: int
    n_failed: int
    failures: tuple[str, ...]


# ---------------------------------------------------------------------------------------- I/O
def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """``bool [A, D, H, W]`` -> ``uint8 [A, D, H, ceil(W/8)]`` (``np.packbits`` on the last axis)."""
    return np.packbits(masks.astype(bool), axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`."""
    return np.unpackbits(np.asarray(packed), axis=-1, count=width).astype(bool)


# ------------------------------------------------------------------------------- CT-RATE layout
def _read_csv(path: Path) -> Any:
    import pandas as pd

    return pd.read_csv(path, keep_default_na=False)


def dataset_root(root: str | Path) -> Path:
    """The folder holding ``radiology_text_reports/`` (``root`` or ``root/dataset``)."""
    root = Path(root)
    for cand in (root, root / "dataset"):
        if (cand / "radiology_text_reports").is_dir():
            return cand
    raise ValueError(f"--root {root}: no radiology_text_reports/ folder (CT-RATE layout expected)")


def _volume_path(root: Path, split: str, name: str, index: dict[str, Path] | None) -> Path | None:
    """``train_12_a_1.nii.gz`` -> ``root/train/train_12/train_12_a/train_12_a_1.nii.gz``."""
    stem = re.sub(r"\.nii(\.gz)?$", "", name)
    parts = stem.split("_")
    if len(parts) >= 4:
        cand = root / split / "_".join(parts[:2]) / "_".join(parts[:3]) / name
        if cand.is_file():
            return cand
    if index is not None:
        return index.get(name)
    return None


def _parse_xy(value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = ast.literal_eval(value.strip())
    if isinstance(value, (int, float)):
        return float(value), float(value)
    vals = [float(v) for v in value]
    if len(vals) == 1:
        return vals[0], vals[0]
    return vals[0], vals[1]


def apply_metadata(volume: CTVolume, row: dict[str, Any] | None, *, rescale: str = "auto") -> CTVolume:
    """Apply CT-RATE metadata (spacing, rescale slope/intercept) to a volume read from NIfTI.

    Args:
        volume: as read from the NIfTI file.
        row: the volume's metadata CSV row (``XYSpacing`` "[row, col]" mm, ``ZSpacing``,
            ``RescaleSlope``, ``RescaleIntercept``); ``None`` returns the volume unchanged.
        rescale: ``"auto"`` applies slope/intercept only when the stored values look raw
            (no value below 0 while the intercept is negative), ``"always"``, or ``"never"``.

    The header's axis directions are kept and rescaled to the metadata spacing (display order
    ``(z, row, column)``), so the affine and ``spacing`` agree.
    """
    if row is None:
        return volume
    if rescale not in ("auto", "always", "never"):
        raise ValueError(f"rescale must be 'auto', 'always' or 'never', got {rescale!r}")
    array = volume.array
    slope = float(row.get("RescaleSlope") or 1.0)
    intercept = float(row.get("RescaleIntercept") or 0.0)
    if (slope != 1.0 or intercept != 0.0) and rescale != "never":
        raw = rescale == "always" or (intercept < 0 and float(np.min(array)) >= 0)
        if raw:
            array = array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    spacing = tuple(volume.spacing)
    if row.get("XYSpacing") not in (None, "") and row.get("ZSpacing") not in (None, ""):
        sy, sx = _parse_xy(row["XYSpacing"])
        spacing = (float(row["ZSpacing"]), sy, sx)
    affine = np.asarray(volume.affine, dtype=float).copy()
    if not np.allclose(spacing, volume.spacing, rtol=1e-3):
        # voxel axes (i, j, k) are display axes (2, 1, 0)
        for voxel_axis in range(3):
            col = affine[:3, voxel_axis]
            norm = float(np.linalg.norm(col)) or 1.0
            affine[:3, voxel_axis] = col / norm * spacing[2 - voxel_axis]
        logger.debug("%s: spacing %s -> %s (metadata CSV)", volume.meta.get("path"), volume.spacing, spacing)
    return CTVolume(array, spacing, affine, volume.orientation, {**volume.meta, "metadata_applied": True})


def _organ_kind(labels: np.ndarray) -> str:
    return "totalseg" if int(np.max(labels)) > max(o.value for o in ORGAN_LABELS) else "organ"


def organ_labels_for(volume: CTVolume, *, segmentation: str, root: Path, name: str,
                     source: CTVolume | None = None) -> np.ndarray:
    """Organ label map on the volume grid, from a masks folder or a segmentation backend.

    ``source`` is the volume as read from the file (before :func:`apply_metadata`): mask files
    share its header geometry and are checked (and reoriented) against it.
    """
    from napari_ctvlp.engine import segmentation as seg

    mask_dir: Path | None = None
    if segmentation in ("auto", "phantom"):
        if (root / "masks" / name).is_file():
            mask_dir = root / "masks"
        elif segmentation == "phantom":
            raise ValueError(f"--segmentation phantom: {root / 'masks' / name} does not exist")
    elif segmentation.startswith("masks:"):
        mask_dir = Path(segmentation[len("masks:"):])
        if not (mask_dir / name).is_file():
            raise ValueError(f"--segmentation {segmentation}: {mask_dir / name} does not exist")
    if mask_dir is not None:
        from napari_ctvlp.io import read_labels

        raw = np.asarray(read_labels(mask_dir / name, like=source if source is not None else volume, reorient=True))
        return np.asarray(seg.from_label_file(raw, like=volume, kind=_organ_kind(raw)).labels, dtype=np.uint8)
    backend = "auto" if segmentation == "auto" else segmentation
    return np.asarray(seg.segment(volume, backend=backend).labels, dtype=np.uint8)


# ------------------------------------------------------------------------------------ worker
def _sample_complete(sample_dir: Path) -> bool:
    return (sample_dir / "meta.json").is_file() and all((sample_dir / f"{a}.npy").is_file() for a in _ARRAYS)


def _prepare_one(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: prepare one sample, write its files, return its manifest entry."""
    from napari_ctvlp.engine.preprocess import PreprocessConfig, preprocess
    from napari_ctvlp.io import read_ct

    from training.report_parsing import parse_report

    sample_dir = Path(task["sample_dir"])
    config = PreprocessConfig.from_dict(task["preprocess"])
    source = read_ct(task["path"])
    volume = apply_metadata(source, task["metadata"], rescale=task["rescale"])
    organs = organ_labels_for(volume, segmentation=task["segmentation"], root=Path(task["root"]), name=task["name"],
                              source=source)
    prepared = preprocess(volume, config=config, organs=organs)
    anatomies = tuple(ANATOMY_BY_NAME[a] for a in task["anatomies"])
    masks = anatomy_masks(prepared.organs, spacing=config.spacing_mm, anatomies=anatomies)
    parsed = parse_report(task["findings"], task["impression"])
    sentences = {a: list(parsed.sentences.get(a, ())) for a in task["anatomies"]}

    sample_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(sample_dir / "image.npy", prepared.image.astype(np.float16))
    _atomic_save_npy(sample_dir / "organs.npy", prepared.organs.astype(np.uint8))
    _atomic_save_npy(sample_dir / "anatomy.npy", pack_masks(masks))
    entry = {
        "id": task["id"],
        "volume_name": task["name"],
        "source": str(task["path"]),
        "dir": task["rel_dir"],
        "image": f"{task['rel_dir']}/image.npy",
        "organs": f"{task['rel_dir']}/organs.npy",
        "anatomy": f"{task['rel_dir']}/anatomy.npy",
        "shape": list(prepared.image.shape),
        "anatomy_present": [bool(m.any()) for m in masks],
        "labels": task["labels"],
        "sentences": sentences,
        "findings": task["findings"],
        "impression": task["impression"],
        "source_spacing": list(volume.spacing),
        "source_shape": list(volume.shape),
    }
    atomic_write_json(sample_dir / "meta.json", entry)
    return entry


def _init_worker() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------------- driver
def _check_cache_config(out: Path, info: dict[str, Any]) -> None:
    path = out / "cache.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("preprocess", "anatomies"):
            if old.get(key) != info[key]:
                raise ValueError(
                    f"--out {out}: the existing cache was prepared with another {key} "
                    f"({old.get(key)} != {info[key]}); use a new --out folder"
                )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, info)


def prepare_cache(
    root: str | Path,
    out: str | Path,
    *,
    preprocess_config: Any,
    split: str = "train",
    workers: int = 1,
    segmentation: str = "auto",
    limit: int | None = None,
    anatomies: tuple[str, ...] = ANATOMY_NAMES,
    rescale: str = "auto",
    progress: ProgressCallback | None = None,
) -> PrepareResult:
    """Prepare (or resume preparing) the cache of one split.

    Args:
        root: dataset in the CT-RATE layout (or its parent holding ``dataset/``).
        out: cache folder.
        preprocess_config: the :class:`~napari_ctvlp.engine.preprocess.PreprocessConfig` of the
            model grid (stored in ``out/cache.json``; a cache holds one config).
        split: ``train``, ``valid``, ...
        workers: processes (1 = in this process).
        segmentation: ``auto`` (``masks/`` folder of the dataset if there, else the engine's
            automatic backend), ``phantom``, ``masks:DIR``, ``totalsegmentator`` or ``threshold``.
        limit: only the first ``limit`` volumes of the reports CSV.
        anatomies: anatomy groups (order of the mask channels).
        rescale: see :func:`apply_metadata`.
        progress: ``progress(done, total, message)``.

    Returns:
        :class:`PrepareResult`; samples that fail are logged and left out of the manifest.
    """
    root = dataset_root(root)
    out = Path(out)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    ok_seg = ("auto", "phantom", "totalsegmentator", "threshold")
    if segmentation not in ok_seg and not segmentation.startswith("masks:"):
        raise ValueError(f"segmentation {segmentation!r} must be one of {', '.join(ok_seg)} or masks:DIR")
    unknown = [a for a in anatomies if a not in ANATOMY_BY_NAME]
    if unknown:
        raise ValueError(f"unknown anatomies {unknown}; known: {', '.join(ANATOMY_NAMES)}")
    reports_csv = root / "radiology_text_reports" / f"{split}_reports.csv"
    if not reports_csv.is_file():
        raise ValueError(f"--split {split}: {reports_csv} does not exist")
    reports = _read_csv(reports_csv)
    meta_csv = root / "metadata" / f"{split}_metadata.csv"
    metadata = {r["VolumeName"]: r for r in _read_csv(meta_csv).to_dict("records")} if meta_csv.is_file() else {}
    labels_csv = root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    label_rows = {r["VolumeName"]: r for r in _read_csv(labels_csv).to_dict("records")} if labels_csv.is_file() else {}
    if not label_rows:
        logger.warning("%s is missing: labels will be -1 (unknown)", labels_csv)

    info = {"version": CACHE_VERSION, "preprocess": preprocess_config.to_dict(), "anatomies": list(anatomies),
            "abnormalities": list(ABNORMALITY_NAMES)}
    _check_cache_config(out, info)
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)

    rows = reports.to_dict("records")
    if limit is not None:
        rows = rows[:limit]
    index: dict[str, Path] | None = None
    tasks: list[dict[str, Any]] = []
    entries: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    for i, row in enumerate(rows):
        name = str(row["VolumeName"])
        rel_dir = f"shard_{i // SHARD_SIZE:05d}/{re.sub(r'.nii(.gz)?$', '', name)}"
        sample_dir = split_dir / rel_dir
        if _sample_complete(sample_dir):
            entries[i] = json.loads((sample_dir / "meta.json").read_text())
            continue
        path = _volume_path(root, split, name, index)
        if path is None and index is None:
            index = {p.name: p for p in (root / split).rglob("*.nii*")} if (root / split).is_dir() else {}
            path = index.get(name)
        if path is None:
            failures.append(f"{name}: volume file not found under {root / split}")
            continue
        lab = label_rows.get(name)
        labels = [int(lab[a]) if lab is not None and str(lab.get(a, "")) != "" else -1 for a in ABNORMALITY_NAMES]
        tasks.append({
            "index": i, "id": i, "name": name, "path": str(path), "root": str(root), "rel_dir": rel_dir,
            "sample_dir": str(sample_dir), "preprocess": info["preprocess"], "anatomies": list(anatomies),
            "metadata": metadata.get(name), "rescale": rescale, "segmentation": segmentation,
            "findings": str(row.get("Findings_EN", "") or ""), "impression": str(row.get("Impressions_EN", "") or ""),
            "labels": labels,
        })
    n_skipped = len(entries)
    total = len(rows)
    done = n_skipped
    report(progress, done, total, f"{n_skipped} already prepared")

    n_written = 0

    def _finish(task: dict[str, Any], result: dict[str, Any] | None, error: BaseException | None) -> None:
        nonlocal done, n_written
        done += 1
        if error is not None:
            logger.error("%s: %s", task["name"], error)
            failures.append(f"{task['name']}: {error}")
        else:
            entries[task["index"]] = result  # type: ignore[assignment]
            n_written += 1
        report(progress, done, total, task["name"])

    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            try:
                _finish(task, _prepare_one(task), None)
            except Exception as exc:  # noqa: BLE001 - one bad volume must not stop the run
                _finish(task, None, exc)
    elif tasks:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_prepare_one, t): t for t in tasks}
            for fut in as_completed(futures):
                exc = fut.exception()
                _finish(futures[fut], None if exc else fut.result(), exc)

    manifest = {**info, "split": split, "root": str(root), "entries": [entries[i] for i in sorted(entries)]}
    manifest_path = split_dir / "manifest.json"
    atomic_write_json(manifest_path, manifest)
    return PrepareResult(split_dir, manifest_path, len(manifest["entries"]), n_written,
                         n_skipped, len(failures), tuple(failures))


# ---------------------------------------------------------------------------------------- CLI
def default_preprocess_config(image_size: tuple[int, int, int], spacing_mm: Any = None, hu_window: Any = None) -> Any:
    """The model grid for ``image_size``: a ~34x38x35 cm chest box unless ``spacing_mm`` is given."""
    from napari_ctvlp.engine.preprocess import PreprocessConfig

    kw: dict[str, Any] = {}
    if hu_window is not None:
        kw["hu_window"] = tuple(hu_window)
    if spacing_mm is not None:
        return PreprocessConfig(image_size=tuple(image_size), spacing_mm=tuple(spacing_mm), **kw)
    return PreprocessConfig.for_image_size(tuple(image_size), **kw)


def preprocess_config_from_params(params: Any) -> Any:
    """The :class:`PreprocessConfig` a :class:`training.params.TrainParams` implies."""
    return default_preprocess_config(params.model.image_size, params.preprocess.get("spacing_mm"),
                                     params.preprocess.get("hu_window"))


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m training.prepare``."""
    p = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="dataset in the CT-RATE layout (real CT-RATE or phantoms)")
    p.add_argument("--out", required=True, help="cache folder (resumable)")
    p.add_argument("--split", default="train", help="split name (default: train)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    p.add_argument("--segmentation", default="auto",
                   help="auto | phantom | masks:DIR | totalsegmentator | threshold (default: auto)")
    p.add_argument("--limit", type=int, default=None, help="only the first N volumes")
    p.add_argument("--config", default=None, help="training YAML: its model grid and preprocess section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of the YAML")
    p.add_argument("--image-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="model grid (default: the config's, else the phantom_cpu preset's 64 96 96)")
    p.add_argument("--spacing-mm", type=float, nargs=3, default=None, metavar=("SZ", "SY", "SX"))
    p.add_argument("--rescale", default="auto", choices=("auto", "always", "never"),
                   help="apply the metadata RescaleSlope/Intercept (default: auto-detect raw values)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 when some volumes failed."""
    from tqdm import tqdm

    from training.params import load_params

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.config, overrides=args.set)
    image_size = tuple(args.image_size) if args.image_size else params.model.image_size
    spacing = args.spacing_mm or params.preprocess.get("spacing_mm")
    config = default_preprocess_config(image_size, spacing, params.preprocess.get("hu_window"))
    bar = tqdm(total=0, unit="vol", desc=f"prepare {args.split}")

    def progress(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message[-40:])
        bar.refresh()

    try:
        result = prepare_cache(args.root, args.out, preprocess_config=config, split=args.split,
                               workers=args.workers, segmentation=args.segmentation, limit=args.limit,
                               rescale=args.rescale, progress=progress)
    except ValueError as exc:
        bar.close()
        logger.error("%s", exc)
        return 2
    bar.close()
    logger.info("%s: %d samples (%d written, %d skipped, %d failed) -> %s", args.split, result.n_samples,
                result.n_written, result.n_skipped, result.n_failed, result.manifest)
    for f in result.failures:
        logger.error("failed: %s", f)
    return 1 if result.n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
