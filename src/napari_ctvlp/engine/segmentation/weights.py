"""TotalSegmentator weights: where they are, whether they are complete, import and download.

TotalSegmentator (v2) runs nnU-Net v2 models stored as results folders::

    <weights dir>/Dataset297_TotalSegmentator_total_3mm_1559subj/
        nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
            plans.json  dataset.json  fold_0/checkpoint_final.pth

``<weights dir>`` is ``$TOTALSEG_WEIGHTS_PATH`` if set, else ``$TOTALSEG_HOME_DIR/nnunet/results``,
else ``~/.totalsegmentator/nnunet/results`` (read at every call). This module checks those folders
without loading anything (the checkpoint is only checked to be a torch zip archive: it is never
unpickled here), imports them from a zip or folder copied from another machine (as the 3D Slicer
TotalSegmentator extension's "Import weights" does, but validated first, refusing path traversal
and links, and moved into place atomically), and downloads them with TotalSegmentator's own
downloader when the machine is online.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
FOLD = "fold_0"
CHECKPOINT = "checkpoint_final.pth"
ENV_VARS = ("TOTALSEG_WEIGHTS_PATH", "TOTALSEG_HOME_DIR")
FULL_TASK_IDS: tuple[int, ...] = (291, 292, 293, 294, 295)
FAST_TASK_IDS: tuple[int, ...] = (297,)
CROP_TASK_ID = 298  # TotalSegmentator runs this 6 mm model first whenever roi_subset is given
#: trainer TotalSegmentator 2.x runs for each ``total`` model (``map_tasks_config.TASK_CONFIGS``;
#: the crop model's trainer is fixed in ``python_api.totalsegmentator``)
TRAINERS: dict[int, str] = {
    **{tid: "nnUNetTrainerNoMirroring" for tid in (291, 292, 293, 294, 295)},
    297: "nnUNetTrainer_4000epochs_NoMirroring",
    298: "nnUNetTrainer_4000epochs_NoMirroring",
}
PURPOSES: dict[int, str] = {
    291: "total 1.5 mm, part 1 (organs)", 292: "total 1.5 mm, part 2 (vertebrae)",
    293: "total 1.5 mm, part 3 (cardiac)", 294: "total 1.5 mm, part 4 (muscles)",
    295: "total 1.5 mm, part 5 (ribs)", 297: "total fast 3 mm", 298: "6 mm crop model (roi_subset)",
}
DOWNLOAD_HOST = ("github.com", 443)  # TotalSegmentator's weights are GitHub release assets
MAX_JSON_BYTES = 50 * 1024 * 1024
MAX_ZIP_RATIO = 200.0  # uncompressed / compressed of one large member; more looks like a zip bomb


class WeightsError(ValueError):
    """A weights folder, zip or download that cannot be used; the message says why and how to fix it."""


@dataclass(frozen=True)
class ModelStatus:
    """One TotalSegmentator model (dataset id) in the weights folder.

    Attributes:
        task_id: TotalSegmentator / nnU-Net dataset id (e.g. 297).
        purpose: what our adapter uses it for.
        folder: the model folder TotalSegmentator will read (``<dataset>/<trainer>__nnUNetPlans__3d_fullres``).
        problems: what is missing or broken (empty: ready).
    """

    task_id: int
    purpose: str
    folder: Path
    problems: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        """True when the model folder is complete."""
        return not self.problems


@dataclass(frozen=True)
class WeightsStatus:
    """The weights folder and the models one kind of call needs.

    Attributes:
        weights_dir: where TotalSegmentator looks now.
        source: which setting chose it (``"TOTALSEG_WEIGHTS_PATH"``, ``"TOTALSEG_HOME_DIR"`` or ``"default"``).
        models: one entry per needed dataset id.
    """

    weights_dir: Path
    source: str
    models: tuple[ModelStatus, ...]

    @property
    def ready(self) -> bool:
        """True when every needed model is complete."""
        return all(m.ready for m in self.models)

    @property
    def missing(self) -> tuple[ModelStatus, ...]:
        """The models that are absent or incomplete."""
        return tuple(m for m in self.models if not m.ready)


@dataclass(frozen=True)
class ImportedWeights:
    """What :func:`import_weights` put in place.

    Attributes:
        weights_dir: the destination weights folder.
        folders: the dataset folders now in it (one per imported dataset).
        task_ids: their dataset ids.
        replaced: dataset folders that existed before and were replaced (``overwrite=True``).
    """

    weights_dir: Path
    folders: tuple[Path, ...]
    task_ids: tuple[int, ...]
    replaced: tuple[Path, ...] = ()


def needed_task_ids(*, fast: bool, roi_subset: bool = True) -> tuple[int, ...]:
    """TotalSegmentator dataset ids one call of our adapter needs (``total``: fast 297, else 291-295;
    ``roi_subset``: + the 298 crop model)."""
    ids = FAST_TASK_IDS if fast else FULL_TASK_IDS
    return ids + ((CROP_TASK_ID,) if roi_subset else ())


def weights_dir() -> tuple[Path, str]:
    """``(folder, which setting chose it)``: TotalSegmentator's weights folder, from the environment now."""
    if "TOTALSEG_WEIGHTS_PATH" in os.environ:
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"]), "TOTALSEG_WEIGHTS_PATH"
    if "TOTALSEG_HOME_DIR" in os.environ:
        return Path(os.environ["TOTALSEG_HOME_DIR"]) / "nnunet" / "results", "TOTALSEG_HOME_DIR"
    home = Path("/tmp") if str(Path.home()) == "/" else Path.home()  # as totalsegmentator.config does
    return home / ".totalsegmentator" / "nnunet" / "results", "default"


def dataset_folder_name(task_id: int) -> str:
    """TotalSegmentator's folder name of a dataset id (``KeyError`` for an id it does not know)."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    info = TASK_ID_WEIGHTS_CONFIGS[task_id]
    rel = info.get("rel_path")
    return str(Path(rel) / info["foldername"]) if rel else info["foldername"]


def known_dataset_folders() -> dict[str, int]:
    """``{dataset folder name: task id}`` of every model TotalSegmentator knows (integer ids)."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    return {info["foldername"]: tid for tid, info in TASK_ID_WEIGHTS_CONFIGS.items()
            if isinstance(tid, int) and not info.get("rel_path")}


def model_folder(root: Path, task_id: int) -> Path:
    """The folder TotalSegmentator reads for ``task_id`` under the weights folder ``root``."""
    trainer = TRAINERS.get(task_id, "nnUNetTrainer")
    return Path(root) / dataset_folder_name(task_id) / f"{trainer}__{PLANS}__{CONFIGURATION}"


def _read_json(path: Path, what: str) -> dict | None:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise WeightsError(f"{path}: {what} is larger than {MAX_JSON_BYTES // 2**20} MB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: {what} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def is_torch_zip(path: Path) -> bool:
    """True for a ``torch.save`` zip archive (``<name>/data.pkl`` inside); reads the zip directory only,
    never the pickle."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(PurePosixPath(n).name == "data.pkl" and len(PurePosixPath(n).parts) == 2 for n in names)


def model_folder_problems(folder: Path) -> tuple[str, ...]:
    """What keeps an nnU-Net v2 results folder from running (empty: complete). Nothing is unpickled."""
    folder = Path(folder)
    if not folder.is_dir():
        return (f"{folder} is missing",)
    problems: list[str] = []
    plans_path, dataset_path = folder / "plans.json", folder / "dataset.json"
    checkpoint = folder / FOLD / CHECKPOINT
    for path, what, key in ((plans_path, "plans.json", "configurations"), (dataset_path, "dataset.json", "labels")):
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            data = _read_json(path, what)
        except WeightsError as exc:
            problems.append(str(exc))
            continue
        if data is None or not isinstance(data.get(key), dict):
            problems.append(f"{path}: no '{key}' table")
        elif what == "plans.json" and CONFIGURATION not in data[key]:
            problems.append(f"{path}: no '{CONFIGURATION}' configuration")
    if not checkpoint.is_file():
        problems.append(f"{checkpoint} is missing")
    elif not is_torch_zip(checkpoint):
        problems.append(f"{checkpoint} is not a torch checkpoint archive (truncated or another format)")
    return tuple(problems)


def weights_status(*, fast: bool = True, roi_subset: bool = True) -> WeightsStatus:
    """Status of the models our TotalSegmentator adapter needs (fast: 297, else 291-295; roi_subset: +298).
    Offline, reads only small files and zip directories."""
    root, source = weights_dir()
    models = tuple(
        ModelStatus(tid, PURPOSES.get(tid, ""), model_folder(root, tid), model_folder_problems(model_folder(root, tid)))
        for tid in needed_task_ids(fast=fast, roi_subset=roi_subset)
    )
    return WeightsStatus(root, source, models)


# --------------------------------------------------------------------------- import


def _safe_member(name: str) -> PurePosixPath:
    """A zip member name as a relative path inside the archive; refuses traversal and absolute paths."""
    if "\\" in name or "\x00" in name:
        raise WeightsError(f"zip member {name!r}: backslashes or NUL in a path are refused")
    path = PurePosixPath(name)
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or any(p == ".." for p in path.parts):
        raise WeightsError(f"zip member {name!r} points outside the archive (path traversal); refused")
    return path


def _extract_zip(archive: Path, into: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise WeightsError(f"{archive} is not a zip file") from None
    with zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            _safe_member(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise WeightsError(f"zip member {info.filename!r} is a symbolic link; refused")
            if info.file_size > 2**20 and info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO:
                raise WeightsError(f"zip member {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                                   f"(a zip bomb?); refused")
            total += info.file_size
        free = shutil.disk_usage(into).free
        if total > free:
            raise WeightsError(f"{archive} needs {total / 2**30:.1f} GB but {into} has {free / 2**30:.1f} GB free")
        root = into.resolve()
        for info in infos:
            target = (into / _safe_member(info.filename)).resolve()
            if root not in target.parents and target != root:
                raise WeightsError(f"zip member {info.filename!r} points outside the archive; refused")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder; refuses links anywhere inside (they could point anywhere)."""
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise WeightsError(f"{p} is a symbolic link; copy the real files")
    shutil.copytree(src, dst, symlinks=True)


def _find_datasets(root: Path, *, max_depth: int = 4) -> list[Path]:
    """``Dataset<ID>_...`` folders under ``root`` (``root`` itself included), not inside one another."""
    found: list[Path] = []
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        if re.match(r"^Dataset\d{3}_", folder.name):
            found.append(folder)
            continue
        if depth < max_depth:
            stack.extend((c, depth + 1) for c in sorted(folder.iterdir()) if c.is_dir() and not c.is_symlink())
    return sorted(found)


def _validate_dataset(folder: Path, known: dict[str, int]) -> int:
    """The task id of a dataset folder whose needed model is complete; WeightsError otherwise."""
    if folder.name not in known:
        raise WeightsError(f"{folder.name} is not a TotalSegmentator model folder this TotalSegmentator knows "
                           f"(e.g. {dataset_folder_name(297)})")
    tid = known[folder.name]
    if tid in TRAINERS:
        problems = model_folder_problems(folder / f"{TRAINERS[tid]}__{PLANS}__{CONFIGURATION}")
    else:
        candidates = [c for c in folder.iterdir() if c.is_dir() and c.name.count("__") == 2]
        problems = model_folder_problems(candidates[0]) if candidates else (f"{folder}: no <trainer>__<plans>__<configuration> folder",)
    if problems:
        raise WeightsError(f"{folder.name} is incomplete: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return tid


def import_weights(source: str | Path, *, dest: str | Path | None = None, overwrite: bool = False) -> ImportedWeights:
    """Import TotalSegmentator model folders from a zip or a folder copied from another machine.

    ``source`` may be a release zip (``Dataset297_....zip``), a zip or folder holding several
    ``Dataset<ID>_...`` folders (e.g. a whole ``~/.totalsegmentator/nnunet/results``), or one
    dataset folder. Everything is unpacked/copied into a temporary folder inside the destination
    first and validated there (plans.json, dataset.json, fold_0/checkpoint_final.pth as a torch
    archive, never unpickled); then each dataset folder is renamed into place, so a failure leaves
    the weights folder as it was.

    Args:
        source: zip file or folder.
        dest: weights folder (default: where TotalSegmentator looks, :func:`weights_dir`).
        overwrite: replace dataset folders that already exist (else refuse).

    Raises:
        WeightsError: bad source (not found, not a zip, path traversal, links, unknown or incomplete
            model folders, already present without ``overwrite``, not enough disk space).
    """
    source = Path(source)
    if not source.exists():
        raise WeightsError(f"{source} does not exist")
    root = Path(dest) if dest is not None else weights_dir()[0]
    root.mkdir(parents=True, exist_ok=True)
    known = known_dataset_folders()
    staging = Path(tempfile.mkdtemp(prefix=".napari-ctvlp-import-", dir=root))
    replaced: list[Path] = []
    placed: list[Path] = []
    try:
        unpacked = staging / "new"
        unpacked.mkdir()
        if source.is_file():
            _extract_zip(source, unpacked)
        elif source.is_dir():
            if source.is_symlink():
                source = source.resolve()
            _copy_tree(source, unpacked / source.name)
        else:
            raise WeightsError(f"{source} is neither a file nor a folder")
        datasets = _find_datasets(unpacked)
        if not datasets:
            raise WeightsError(f"{source} holds no Dataset<ID>_... model folder (expected e.g. {dataset_folder_name(297)})")
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise WeightsError(f"{source} holds the same dataset folder twice: {sorted(names)}")
        ids = [_validate_dataset(d, known) for d in datasets]
        existing = [root / d.name for d in datasets if (root / d.name).exists()]
        if existing and not overwrite:
            raise WeightsError(f"{existing[0]} already exists; use --overwrite to replace it")
        old = staging / "old"
        old.mkdir()
        for d in datasets:
            target = root / d.name
            if target.exists():
                target.rename(old / d.name)
                replaced.append(target)
            d.rename(target)
            placed.append(target)
    except BaseException:
        for target in placed:  # roll back: new folders out, old ones back
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
        for target in replaced:
            backup = staging / "old" / target.name
            if backup.exists() and not target.exists():
                backup.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("imported %s into %s", ", ".join(p.name for p in placed), root)
    return ImportedWeights(root, tuple(placed), tuple(ids), tuple(replaced))


# --------------------------------------------------------------------------- download


def check_online(*, host: tuple[str, int] = DOWNLOAD_HOST, timeout: float = 5.0) -> None:
    """Raise :class:`WeightsError` at once when ``host`` cannot be reached (no network, no DNS)."""
    try:
        with socket.create_connection(host, timeout=timeout):
            return
    except OSError as exc:
        raise WeightsError(
            f"cannot reach {host[0]}:{host[1]} to download TotalSegmentator weights ({exc}); this machine "
            f"seems offline: download them on a machine with network access (`napari-ctvlp weights download` "
            f"or `totalseg_download_weights -t total_fast`) and copy them here with `napari-ctvlp weights import PATH`"
        ) from None


def download_weights(
    *,
    fast: bool = True,
    roi_subset: bool = True,
    timeout: float = 5.0,
    on_task: Callable[[int, int, int], None] | None = None,
) -> WeightsStatus:
    """Download the missing models our adapter needs with TotalSegmentator's own downloader.

    It shows its own progress bar (tqdm, on stderr) per model; ``on_task(index, count, task_id)``
    is called before each. Checks first that the download host answers (fails within ``timeout``
    seconds when offline) and refuses to touch an incomplete existing folder (TotalSegmentator
    would take it for complete).

    Raises:
        WeightsError: offline, an incomplete folder in the way, or a model still incomplete after the download.
    """
    status = weights_status(fast=fast, roi_subset=roi_subset)
    todo = status.missing
    if not todo:
        return status
    for m in todo:
        dataset = m.folder.parent
        if dataset.exists():
            raise WeightsError(f"{dataset} exists but is incomplete ({m.problems[0]}); remove it (or replace it "
                               f"with `napari-ctvlp weights import PATH --overwrite`) and download again")
    check_online(timeout=timeout)
    from totalsegmentator.libs import download_pretrained_weights

    for index, m in enumerate(todo):
        if on_task is not None:
            on_task(index, len(todo), m.task_id)
        logger.info("downloading TotalSegmentator model %d into %s", m.task_id, status.weights_dir)
        download_pretrained_weights(m.task_id)
    after = weights_status(fast=fast, roi_subset=roi_subset)
    if not after.ready:
        bad = after.missing[0]
        raise WeightsError(f"model {bad.task_id} is still incomplete after the download: {bad.problems[0]}")
    return after
