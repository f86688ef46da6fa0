"""Writing detection results (the batch command behind ``napari-ctvlp detect`` is :mod:`napari_ctvlp.cli_detect`).

:func:`write_results` writes, into one folder:

* ``results.json`` -- every number (NaN as ``null``), input, checkpoint, model card name, timings;
* ``results.csv`` -- one row per anatomy x abnormality: anatomy, abnormality, probability, std,
  assessable, primary (empty probability when not assessable), and on primary rows the checkpoint's
  operating point and the call (positive/negative) at it (empty when the checkpoint has none);
* ``organs.nii.gz`` (+ JSON sidecar with the label names) on the input grid;
* ``heatmap_<slug>.nii.gz`` per prompt heatmap, on the input grid;
* ``organ_stats.csv`` -- volume (mL), mean HU and "incomplete" per organ and anatomy group.

The set is written whole or not at all: into a temporary folder next to the target, then moved
into place (one folder rename when the target folder is new; otherwise one rename per file,
rolled back on failure; other files in the folder are kept). A lock file next to the target
(``.<name>.lock``, ``flock``) keeps two runs from writing the same folder at once.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
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
            "threshold": result.checkpoint.operating_points.get(ab),
            "call": None if j is None else result.checkpoint.call(ab, float(scores.probability[k, j])),
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


_HELD_LOCKS: dict[str, int] = {}
_HELD_LOCKS_GUARD = threading.Lock()


def result_targets(prompts: Sequence[str] = ()) -> list[str]:
    """File names :func:`write_results` writes for a detection with heatmaps for ``prompts``."""
    taken: set[str] = set()
    for prompt in prompts:
        taken.add(heatmap_filename(prompt, taken))
    return [RESULTS_JSON, RESULTS_CSV, ORGANS_NIFTI, "organs.json", ORGAN_STATS_CSV, *sorted(taken)]


def check_results_target(out_dir: str | Path, names: Sequence[str], *, overwrite: bool = False) -> None:
    """Raise when :func:`write_results` into ``out_dir`` would be refused (a cheap early check).

    Raises:
        ValueError: ``out_dir`` exists and is not a folder.
        FileExistsError: one of ``names`` exists in it and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if not overwrite and out.is_dir():
        existing = [t for t in names if (out / t).exists()]
        if existing:
            raise FileExistsError(f"{out / existing[0]} already exists; pass overwrite=True to replace the results")


@contextlib.contextmanager
def results_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the lock of result folder ``out_dir`` (``<parent>/.<name>.lock``, ``fcntl.flock``).

    Reentrant within one process; released (and the lock file removed) on exit, and by the
    kernel if the process dies. Without ``fcntl`` (Windows) no lock is taken: the final folder
    rename still refuses to replace a result set another run wrote meanwhile.

    Raises:
        FileExistsError: another process holds the lock.
    """
    out = Path(out_dir).absolute()
    key = str(out)
    with _HELD_LOCKS_GUARD:
        if _HELD_LOCKS.get(key):
            _HELD_LOCKS[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _HELD_LOCKS_GUARD:
                _HELD_LOCKS[key] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FileExistsError(
                    f"{out} is being written by another napari-ctvlp run (lock {lock_path}); wait for it or choose another output"
                ) from exc
            raise
        try:  # the file may have been unlinked by its previous holder between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with _HELD_LOCKS_GUARD:
        _HELD_LOCKS[key] = 1
    try:
        yield
    finally:
        with _HELD_LOCKS_GUARD:
            _HELD_LOCKS.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _write_set(result: DetectionResult, folder: Path, heat_names: dict[str, str]) -> None:
    """Write every result file into ``folder`` (a fresh, empty folder)."""
    from napari_ctvlp.io import write_labels, write_volume

    (folder / RESULTS_JSON).write_text(json.dumps(results_summary(result), indent=1, allow_nan=False))

    with (folder / RESULTS_CSV).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["anatomy", "abnormality", "probability", "std", "assessable", "primary", "threshold", "call"])
        ops = result.checkpoint.operating_points
        for row in result.probabilities.rows():
            primary = bool(row["primary"])
            threshold = ops.get(row["abnormality"]) if primary else None
            call = result.checkpoint.call(row["abnormality"], float(row["probability"])) if primary else None
            w.writerow([row["anatomy"], row["abnormality"], _num(row["probability"]), _num(row["std"]),
                        str(row["assessable"]).lower(), str(row["primary"]).lower(),
                        "" if threshold is None else _num(float(threshold)), call or ""])

    seg = result.segmentation
    write_labels(seg.labels, like=result.volume, path=folder / ORGANS_NIFTI, names=seg.names, overwrite=True)

    with (folder / ORGAN_STATS_CSV).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["region", "volume_ml", "mean_hu", "incomplete"])
        for key in sorted(set(seg.volume_ml) | set(seg.mean_hu)):
            w.writerow([key, _num(float(seg.volume_ml.get(key, float("nan")))),
                        _num(float(seg.mean_hu.get(key, float("nan")))), str(bool(seg.incomplete.get(key, False))).lower()])

    for prompt, array in result.heatmaps.items():
        write_volume(np.asarray(array, dtype=np.float32), like=result.volume, path=folder / heat_names[prompt],
                     overwrite=True)


def _publish_new_folder(tmp: Path, out: Path) -> bool:
    """Rename the finished folder ``tmp`` to ``out`` when ``out`` does not exist; False if it does.

    ``os.rename`` refuses to replace a non-empty folder, so a result set another run published
    meanwhile is never replaced by this step.
    """
    if out.exists() or out.is_symlink():
        return False
    try:
        os.rename(tmp, out)
    except OSError:
        if out.exists():
            return False
        raise
    return True


def _publish_files(tmp: Path, out: Path) -> None:
    """Move the files of ``tmp`` into the existing folder ``out``, replacing their namesakes; roll back on failure.

    Each move is one ``os.rename`` (no data is copied, so a full disk cannot stop it half-way);
    on any failure the moved files go back to ``tmp`` and the previous versions are restored.
    """
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    moved: list[tuple[Path, Path | None]] = []  # (target, its previous version in backup)
    try:
        for src in sorted(tmp.iterdir()):
            target = out / src.name
            previous = None
            if target.exists():
                previous = backup / src.name
                os.rename(target, previous)
            moved.append((target, previous))
            os.rename(src, target)
    except BaseException:
        for target, previous in reversed(moved):
            with contextlib.suppress(OSError):
                if target.exists() and not (tmp / target.name).exists():
                    os.rename(target, tmp / target.name)
                if previous is not None:
                    os.rename(previous, target)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def write_results(result: DetectionResult, out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write the result files (see the module doc) into ``out_dir``; returns the written paths.

    The files are written into a temporary folder next to ``out_dir`` and moved into place as a
    whole: on any failure (a full disk, an interrupt) nothing of the new set is left behind and
    a previous set is kept. Files in ``out_dir`` that are not result files are never touched.

    Raises:
        FileExistsError: a target exists and ``overwrite`` is False, or another run holds the
            folder's lock (nothing is written).
        OSError: writing failed (nothing is left of the new set).
    """
    out = Path(out_dir).expanduser()
    taken: set[str] = set()
    heat_names = {}
    for prompt in result.heatmaps:
        heat_names[prompt] = heatmap_filename(prompt, taken)
        taken.add(heat_names[prompt])
    targets = [RESULTS_JSON, RESULTS_CSV, ORGANS_NIFTI, "organs.json", ORGAN_STATS_CSV, *heat_names.values()]
    check_results_target(out, targets, overwrite=overwrite)
    with results_lock(out):
        check_results_target(out, targets, overwrite=overwrite)  # again, now that no other run can write
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            _write_set(result, tmp, heat_names)
            written = sorted(p.name for p in tmp.iterdir())
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the user's usual mode
            if not _publish_new_folder(tmp, out):
                if not out.is_dir():
                    raise ValueError(f"output {out} exists and is not a folder")
                check_results_target(out, written, overwrite=overwrite)
                _publish_files(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d result files to %s", len(written), out)
    order = {name: i for i, name in enumerate(targets)}
    return [out / name for name in sorted(written, key=lambda n: (order.get(n, len(order)), n))]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
