"""The batch runner behind ``napari-ctvlp detect``: many inputs, one result folder each.

It sits in the CLI layer, above the engine: it calls :func:`~napari_ctvlp.engine.pipeline.detect`
and :func:`~napari_ctvlp.engine.results_io.write_results`, neither of which imports it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def _input_stem(path: str) -> str:
    """The result-folder name of an input: its file or folder name without the image suffix.

    The path is resolved first, so ``series/x/..`` is named ``series`` (not ``..``); a name that
    would be empty, ``.`` or ``..`` becomes ``input``. The name never holds a path separator.
    """
    p = Path(path).expanduser()
    try:
        p = p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: fall back to the path as given
        p = Path(os.path.abspath(p))
    name = p.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = name.replace(os.sep, "_").replace("/", "_").strip()
    return "input" if name in ("", ".", "..") else name


def _result_dir(out_root: Path, name: str) -> Path:
    """``out_root / name``, refused when it would not be a folder directly inside ``out_root``."""
    target = out_root / name
    if target.is_symlink():
        raise ValueError(f"output {target} is a symbolic link; refusing to write through it (outside --out)")
    root = out_root.resolve()
    if target.resolve().parent != root:
        raise ValueError(f"output {target} is not inside --out {out_root}")
    return target


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def run_detect_cli(
    inputs: Sequence[str],
    *,
    out: str,
    prompts: Sequence[str] = (),
    checkpoint: str | None = None,
    segmentation: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
) -> int:
    """Run :func:`~napari_ctvlp.engine.pipeline.detect` on many inputs, writing ``out/<input stem>/``; returns the exit code.

    A bad input (or checkpoint) prints one line ``napari-ctvlp detect: <input>: <problem>`` on
    stderr (no traceback; ``-v`` logs it) and the exit code is 2; the other inputs still run.
    Each input's folder is written whole or not at all (:func:`~napari_ctvlp.engine.results_io.write_results`);
    existing results are refused before the work unless ``overwrite``, and a folder another run
    is writing (its lock is held) is refused too. Nothing is written outside ``out``; an ``out``
    this run created is removed again when every input failed.
    """
    from tqdm import tqdm

    from napari_ctvlp.engine.pipeline import detect, load_model, resolve_device
    from napari_ctvlp.engine.results_io import check_results_target, result_targets, results_lock, write_results
    from napari_ctvlp.engine.sanity import check_volume
    from napari_ctvlp.io import read_ct

    if not inputs:
        print("napari-ctvlp detect: no input given", file=sys.stderr)
        return 2
    out_root = Path(out).expanduser()
    if out_root.exists() and not out_root.is_dir():
        print(f"napari-ctvlp detect: --out {out_root} exists and is not a folder", file=sys.stderr)
        return 2
    created_root = [d for d in (out_root, *out_root.absolute().parents) if not d.exists()]  # leaf first
    try:
        dev = resolve_device(device)
        load_model(checkpoint, device=dev)  # fail once, early, for a bad checkpoint
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback in the debug log
        logger.debug("checkpoint failed", exc_info=True)
        print(f"napari-ctvlp detect: checkpoint: {_one_line(exc)}", file=sys.stderr)
        return 2
    used: set[str] = set()
    targets = result_targets(prompts)
    failed = 0
    bar = tqdm(total=len(inputs), file=sys.stderr, unit="scan", desc="detect",
               disable=True if quiet else None)  # None: no bar when stderr is not a terminal
    for item in inputs:
        stem, i = _input_stem(str(item)), 2
        name = stem
        while name in used:
            name, i = f"{stem}_{i}", i + 1
        used.add(name)
        bar.set_postfix_str(name[:30])

        def progress(done: int, total: int, message: str) -> None:
            bar.set_postfix_str(f"{name[:20]}: {message}"[:50])

        try:
            target = _result_dir(out_root, name)
            check_results_target(target, targets, overwrite=overwrite)  # before the work, not after
            with results_lock(target):  # a second run into the same folder refuses here
                check_results_target(target, targets, overwrite=overwrite)
                volume = read_ct(str(item))
                sanity = check_volume(volume)
                if not sanity.ok:  # one warning line per input; the run goes on
                    bar.write(f"napari-ctvlp detect: warning: {item}: {sanity.summary()}", file=sys.stderr)
                result = detect(volume, checkpoint=checkpoint, segmentation=segmentation, prompts=prompts,
                                device=dev, progress=progress)
                write_results(result, target, overwrite=overwrite)
        except KeyboardInterrupt:
            bar.close()
            _remove_created_if_empty(created_root)
            print("napari-ctvlp detect: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - per-input failure: one line, go on with the rest
            logger.debug("detect failed for %s", item, exc_info=True)
            message = _one_line(exc)
            if str(item) not in message:
                message = f"{item}: {message}"
            bar.write(f"napari-ctvlp detect: {message}", file=sys.stderr)
            failed += 1
        bar.update(1)
    bar.close()
    _remove_created_if_empty(created_root)
    return 2 if failed else 0


def _remove_created_if_empty(created: list[Path]) -> None:
    """Remove the --out folders this run created (``created``, leaf first) that stayed empty (every input failed)."""
    for d in created:
        try:
            d.rmdir()
        except OSError:  # not empty (results were written) or already gone
            return
