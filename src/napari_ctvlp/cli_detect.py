"""The batch runner behind ``napari-ctvlp detect``: many inputs, one result folder each.

It sits in the CLI layer, above the engine: it calls :func:`~napari_ctvlp.engine.pipeline.detect`
and :func:`~napari_ctvlp.engine.results_io.write_results`, neither of which imports it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def _input_stem(path: str) -> str:
    p = Path(path)
    name = p.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "input"
    return name or "input"


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
    """
    from tqdm import tqdm

    from napari_ctvlp.engine.pipeline import detect, load_model, resolve_device
    from napari_ctvlp.engine.results_io import write_results

    if not inputs:
        print("napari-ctvlp detect: no input given", file=sys.stderr)
        return 2
    try:
        dev = resolve_device(device)
        load_model(checkpoint, device=dev)  # fail once, early, for a bad checkpoint
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback in the debug log
        logger.debug("checkpoint failed", exc_info=True)
        print(f"napari-ctvlp detect: checkpoint: {_one_line(exc)}", file=sys.stderr)
        return 2
    out_root = Path(out)
    used: set[str] = set()
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
            result = detect(str(item), checkpoint=checkpoint, segmentation=segmentation, prompts=prompts,
                            device=dev, progress=progress)
            write_results(result, out_root / name, overwrite=overwrite)
        except KeyboardInterrupt:
            bar.close()
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
    return 2 if failed else 0
