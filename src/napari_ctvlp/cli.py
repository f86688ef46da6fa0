"""Command line: ``napari-ctvlp detect|segment|phantom|bench|weights ...``.

Every sub-command turns bad input, and any other failure, into a one-line message on stderr and
exit code 2, never a traceback (``-v`` logs the traceback).
Heavy modules are imported inside the sub-commands so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_ctvlp import __version__

EXIT_BAD_INPUT = 2


def _cmd_phantom(args: argparse.Namespace) -> int:
    from napari_ctvlp.phantom import write_phantom_dataset

    info = write_phantom_dataset(
        Path(args.out),
        n=args.n,
        seed=args.seed,
        size=tuple(args.size),
        split=args.split,
        progress=_stderr_progress(args.quiet),
    )
    if not args.quiet:
        print(f"wrote {args.n} phantom(s) to {args.out}", file=sys.stderr)
    del info
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from napari_ctvlp.cli_detect import run_detect_cli

    return run_detect_cli(
        args.inputs,
        out=args.out,
        prompts=args.prompt or (),
        checkpoint=args.checkpoint,
        segmentation=args.segmentation,
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


def _check_segment_device(device: str, backend: str) -> str:
    """The device ``segment`` runs on; refuses an unavailable one (as ``detect`` does), whatever the backend."""
    if device == "cpu":
        return device  # no torch import needed
    from napari_ctvlp.engine.pipeline import resolve_device

    dev = resolve_device(device)  # ValueError: "device 'cuda' requested but CUDA is not available ..."
    if backend == "threshold" and dev != "cpu":
        logging.getLogger(__name__).info("the threshold backend runs on the CPU (device %s is not used)", dev)
    return dev


def _cmd_segment(args: argparse.Namespace) -> int:
    from napari_ctvlp.engine.segmentation import segment
    from napari_ctvlp.io import read_ct, write_labels

    device = _check_segment_device(args.device, args.backend)
    volume = read_ct(args.input)
    result = segment(volume, backend=args.backend, device=device, fast=not args.full)
    paths = write_labels(result.labels, like=volume, path=args.out, names=result.names, overwrite=args.overwrite)
    for p in paths:
        print(p)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from napari_ctvlp.bench import format_benchmark, run_detect_benchmark

    result = run_detect_benchmark(
        ct=args.ct, segmentation=args.segmentation, size=args.size, spacing=args.spacing, seed=args.seed,
        checkpoint=args.checkpoint, device=args.device, progress=_stderr_progress(args.quiet),
    )
    print(format_benchmark(result))
    return 0


def _cmd_weights_status(args: argparse.Namespace) -> int:
    import os

    from napari_ctvlp.engine.segmentation.weights import needed_task_ids, weights_status

    status = weights_status(fast=True, roi_subset=True)
    full = weights_status(fast=False, roi_subset=True)
    env = ", ".join(f"{k}={os.environ[k]!r}" if k in os.environ else f"{k} unset"
                    for k in ("TOTALSEG_WEIGHTS_PATH", "TOTALSEG_HOME_DIR"))
    print(f"TotalSegmentator weights folder: {status.weights_dir} (chosen by {status.source}; {env})")
    seen: set[int] = set()
    for m in status.models + full.models:
        if m.task_id in seen:
            continue
        seen.add(m.task_id)
        state = "ready" if m.ready else "missing" if not m.folder.parent.exists() else "incomplete"
        print(f"  {m.task_id}  {state:10s} {m.purpose:34s} {m.folder}")
        for problem in m.problems[:3] if state == "incomplete" else ():
            print(f"        {problem}")
    for name, st, fast in (("fast (3 mm, the default)", status, True), ("full (1.5 mm, --full)", full, False)):
        ids = " + ".join(str(i) for i in needed_task_ids(fast=fast, roi_subset=True))
        print(f"{name}: {'ready' if st.ready else 'not ready'} (needs {ids})")
    wanted = full if args.full else status
    if not wanted.ready:
        print("get them with `napari-ctvlp weights download" + (" --full" if args.full else "")
              + "` (online) or copy them from another machine with `napari-ctvlp weights import PATH`")
    return 0 if wanted.ready else 1


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from napari_ctvlp.engine.segmentation.weights import import_weights

    result = import_weights(args.path, dest=args.dest, overwrite=args.overwrite)
    for folder, tid in zip(result.folders, result.task_ids):
        print(f"imported model {tid}: {folder}" + (" (replaced)" if folder in result.replaced else ""))
    return 0


def _cmd_weights_download(args: argparse.Namespace) -> int:
    import contextlib

    from napari_ctvlp.engine.segmentation.weights import download_weights

    def on_task(index: int, count: int, task_id: int) -> None:
        print(f"[{index + 1}/{count}] TotalSegmentator model {task_id}", file=sys.stderr)

    with contextlib.redirect_stdout(sys.stderr):  # TotalSegmentator's own messages; tqdm bars are on stderr
        status = download_weights(fast=not args.full, timeout=args.timeout, on_task=on_task)
    print(f"TotalSegmentator weights ready in {status.weights_dir}: "
          + ", ".join(str(m.task_id) for m in status.models))
    return 0


def _stderr_progress(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def progress(done: int, total: int, message: str) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, file=sys.stderr, leave=False)
        b = bar["bar"]
        b.total = total
        b.n = done
        b.set_description_str(message[:40])
        b.refresh()
        if done >= total:
            b.close()
            bar.clear()

    return progress


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="napari-ctvlp",
        description="Fine-grained CT vision-language abnormality detection (CA-GCL + MOSMOS).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write synthetic chest-CT phantoms in the CT-RATE layout")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=4, help="number of phantoms (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, nargs=3, default=[128, 128, 128], metavar=("D", "H", "W"),
                   help="volume size in voxels, slices rows columns (default 128 128 128)")
    p.add_argument("--split", default="train", choices=["train", "valid"], help="CT-RATE split name")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_phantom)

    d = sub.add_parser("detect", help="zero-shot abnormality detection on CT volumes")
    d.add_argument("inputs", nargs="+", help="NIfTI/NRRD/MHA files or DICOM series folders")
    d.add_argument("--out", required=True, help="output folder (one subfolder per input)")
    d.add_argument("--prompt", action="append", help="free-text finding to score (repeatable)")
    d.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped demo model)")
    d.add_argument("--segmentation", default="auto",
                   help="auto|totalsegmentator|builtin|threshold or a MASK.nii.gz (default auto)")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    d.add_argument("--overwrite", action="store_true", help="replace existing result files")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_detect)

    s = sub.add_parser("segment", help="organ masks only")
    s.add_argument("input", help="CT file or DICOM series folder")
    s.add_argument("--out", required=True, help="output labels .nii.gz (or .dcm for DICOM-SEG)")
    s.add_argument("--backend", default="auto", help="auto|totalsegmentator|builtin|threshold")
    s.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    s.add_argument("--full", action="store_true", help="TotalSegmentator full resolution (default fast)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=_cmd_segment)

    b = sub.add_parser("bench", help="time detection on this machine (read, detect cold/warm, re-prompt, memory)")
    b.add_argument("--ct", default=None, help="time this CT instead of a synthetic phantom")
    b.add_argument("--segmentation", default="auto",
                   help="with --ct: auto|totalsegmentator|builtin|threshold or a MASK.nii.gz (default auto)")
    b.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"),
                   help="phantom size, slices rows columns (default 300 512 512)")
    b.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.7, 0.7], metavar=("SZ", "SY", "SX"),
                   help="phantom voxel spacing in mm, same order (default 1.0 0.7 0.7)")
    b.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    b.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped demo model)")
    b.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default cpu")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)

    w = sub.add_parser("weights", help="TotalSegmentator weights: status, import from a zip/folder, download")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    ws = wsub.add_parser("status", help="which models are there, where it looks and which variables choose it "
                                        "(exit 1 when the needed ones are missing)")
    ws.add_argument("--full", action="store_true", help="exit code for the full 1.5 mm models (default fast)")
    ws.set_defaults(func=_cmd_weights_status)
    wi = wsub.add_parser("import", help="copy models from a zip or folder (e.g. from another machine) into "
                                        "the weights folder, validated first")
    wi.add_argument("path", help="a TotalSegmentator weights zip (Dataset297_....zip) or folder")
    wi.add_argument("--dest", default=None, help="weights folder (default: where TotalSegmentator looks)")
    wi.add_argument("--overwrite", action="store_true", help="replace models that are already there")
    wi.set_defaults(func=_cmd_weights_import)
    wd = wsub.add_parser("download", help="download the missing models with TotalSegmentator's downloader "
                                          "(needs network access)")
    wd.add_argument("--full", action="store_true", help="the full 1.5 mm models (default: fast 3 mm)")
    wd.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server (default 5)")
    wd.set_defaults(func=_cmd_weights_download)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-ctvlp`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"napari-ctvlp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback: one line, exit 2 (-v logs the traceback)
        logging.getLogger(__name__).debug("napari-ctvlp %s failed", args.command, exc_info=True)
        print(f"napari-ctvlp {args.command}: error: {_exception_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _exception_line(exc: BaseException, limit: int = 500) -> str:
    """One line for the user: the message, prefixed by the type for unexpected (non input/OS) errors."""
    message = " ".join(str(exc).split())
    if not isinstance(exc, (ValueError, OSError, RuntimeError)):
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    message = message or type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
