"""TotalSegmentator adapter: in-memory call, no downloads, no usage statistics.

TotalSegmentator 2.x locates its weights under ``get_weights_dir()``: ``$TOTALSEG_WEIGHTS_PATH``
if set, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else ``~/.totalsegmentator/nnunet/results``.
Task ``total`` needs datasets 291-295 (full, 1.5 mm) or 297 (``fast``, 3 mm); a ``roi_subset``
additionally runs the 6 mm model 298 to crop. ``totalseg_download_weights -t total`` fetches
291-295 + 298, ``-t total_fast`` fetches 297 + 298. Its own python API would download missing
weights silently and post usage statistics to stats.totalsegmentator.com; we check the model
folders first (:mod:`.weights`: complete plans, dataset.json and fold checkpoint, nothing
unpickled) and replace its ``send_usage_stats`` with a no-op for the duration of our call.

nnU-Net predicts in worker processes started with ``spawn``: a script that calls this backend
must guard its entry point with ``if __name__ == "__main__":`` (napari, the CLI and pytest do).
The success path is tested end to end with tiny hand-set nnU-Net models in TotalSegmentator's
layout (``tests/engine/test_totalseg_success.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from ..anatomy import ORGAN_BY_NAME, ORGAN_LABELS, totalseg_to_organ_lut
from ..volume import CTVolume, ProgressCallback, report
from .weights import CROP_TASK_ID, ENV_VARS, FAST_TASK_IDS, FULL_TASK_IDS, needed_task_ids

logger = logging.getLogger(__name__)

__all__ = [
    "CROP_TASK_ID", "ENV_VARS", "FAST_TASK_IDS", "FULL_TASK_IDS", "SegmentationUnavailable", "fetch_command",
    "missing_pieces", "missing_weights", "needed_task_ids", "roi_subset_names", "totalseg_labels", "unavailable_reason",
]


class SegmentationUnavailable(RuntimeError):
    """A segmentation backend cannot run here (package or weights missing); the message says how to fix it."""


def fetch_command(fast: bool) -> str:
    """The shell command that downloads the weights the adapter needs."""
    return f"totalseg_download_weights -t {'total_fast' if fast else 'total'}"


def roi_subset_names() -> list[str]:
    """TotalSegmentator ``total`` structure names our organ labels are made of."""
    from totalsegmentator.map_to_binary import class_map

    names = class_map["total"]
    return [names[v] for organ in ORGAN_LABELS for v in organ.totalseg if v in names]


def missing_weights(*, fast: bool, roi_subset: bool = True) -> list[Path]:
    """Model folders that are absent or incomplete (empty list: ready). Raises ImportError without the package.

    A model is complete when the folder TotalSegmentator reads
    (``<dataset>/<trainer>__nnUNetPlans__3d_fullres``) holds plans.json, dataset.json and
    ``fold_0/checkpoint_final.pth`` (see :mod:`.weights`; nothing is unpickled).
    """
    import totalsegmentator.map_tasks_config  # noqa: F401 - ImportError when TotalSegmentator is absent

    from .weights import weights_status

    return [m.folder for m in weights_status(fast=fast, roi_subset=roi_subset).missing]


def missing_pieces(*, fast: bool = True, roi_subset: bool = True) -> tuple[str, ...]:
    """What the backend lacks, one line each (empty: ready): the package, or each model folder and its first problem."""
    try:
        import totalsegmentator.map_tasks_config  # noqa: F401
    except ImportError as exc:
        return (f"the TotalSegmentator package ({exc})",)
    from .weights import weights_status

    return tuple(f"model {m.task_id} ({m.purpose}): {m.problems[0]}"
                 for m in weights_status(fast=fast, roi_subset=roi_subset).missing)


def unavailable_reason(*, fast: bool = True, roi_subset: bool = True) -> str | None:
    """Why the TotalSegmentator backend cannot run (None when it can). Never touches the network."""
    try:
        missing = missing_weights(fast=fast, roi_subset=roi_subset)
    except ImportError as exc:
        return f"TotalSegmentator is not installed ({exc}); install it with `pip install TotalSegmentator`"
    if not missing:
        return None
    return (
        f"TotalSegmentator weights are missing: {', '.join(str(m) for m in missing)}. "
        f"Fetch them once with `{fetch_command(fast)}` or `napari-ctvlp weights download{'' if fast else ' --full'}`, "
        f"or copy them from another machine with `napari-ctvlp weights import PATH` (folder chosen by the "
        f"environment variables TOTALSEG_WEIGHTS_PATH, else TOTALSEG_HOME_DIR/nnunet/results, else "
        f"~/.totalsegmentator/nnunet/results; `napari-ctvlp weights status` shows what is there)."
    )


def _ts_device(device: str) -> str:
    if device == "cpu" or device == "mps":
        return device
    if device in ("cuda", "gpu"):
        return "gpu"
    if device.startswith(("cuda:", "gpu:")):
        return "gpu:" + device.split(":", 1)[1]
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")


@contextlib.contextmanager
def _no_usage_stats():
    """Replace TotalSegmentator's usage-statistics senders with no-ops for the duration."""
    import totalsegmentator.config as ts_config
    import totalsegmentator.python_api as ts_api

    saved = (ts_api.send_usage_stats, ts_config.send_usage_stats, ts_config.send_usage_stats_application)
    ts_api.send_usage_stats = ts_config.send_usage_stats = lambda *a, **k: None
    ts_config.send_usage_stats_application = lambda *a, **k: None
    try:
        yield
    finally:
        ts_api.send_usage_stats, ts_config.send_usage_stats, ts_config.send_usage_stats_application = saved


def _point_nnunet_at(root: Path) -> None:
    """Make nnU-Net look for models in ``root`` now.

    TotalSegmentator sets ``nnUNet_results`` in the environment at every call, but nnU-Net reads it
    once, when ``nnunetv2.paths`` is first imported, into module globals; a second call with
    another weights folder in the same process would look in the first one. Set the environment
    (as TotalSegmentator does) and those globals to ``root``.
    """
    import importlib

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = str(root)
    for name in ("nnunetv2.paths", "nnunetv2.utilities.dataset_name_id_conversion",
                 "nnunetv2.utilities.file_path_utilities"):
        module = importlib.import_module(name)
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            if hasattr(module, key):
                setattr(module, key, str(root))


def totalseg_labels(
    volume: CTVolume,
    *,
    device: str = "cpu",
    fast: bool = True,
    roi_subset: bool = True,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Organ labels (uint8, ``volume.array`` shape) from TotalSegmentator ``total``.

    Raises:
        SegmentationUnavailable: package or weights missing (checked before anything runs; no download).
    """
    ts_device = _ts_device(device)
    reason = unavailable_reason(fast=fast, roi_subset=roi_subset)
    if reason is not None:
        raise SegmentationUnavailable(reason)
    import nibabel as nib
    from totalsegmentator.config import get_totalseg_dir
    from totalsegmentator.python_api import totalsegmentator

    from .weights import weights_dir

    get_totalseg_dir().mkdir(parents=True, exist_ok=True)  # it keeps a config.json there; its mkdir has no parents=
    _point_nnunet_at(weights_dir()[0])
    report(progress, 0, 2, f"TotalSegmentator ({'fast 3 mm' if fast else 'full 1.5 mm'}) on {ts_device}")
    img = nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), np.asarray(volume.affine, float))
    out = io.StringIO()
    with _no_usage_stats(), contextlib.redirect_stdout(out):
        seg = totalsegmentator(
            img, None, ml=True, fast=fast, roi_subset=roi_subset_names() if roi_subset else None,
            quiet=True, skip_saving=True, device=ts_device, nr_thr_saving=1,
        )
    if out.getvalue().strip():
        logger.debug("TotalSegmentator output:\n%s", out.getvalue())
    ts = np.asarray(seg.dataobj).astype(np.uint8).transpose(2, 1, 0)
    if ts.shape != volume.shape:
        raise RuntimeError(f"TotalSegmentator returned shape {ts.shape}, expected {volume.shape}")
    labels = totalseg_to_organ_lut()[ts]
    if roi_subset:  # structures outside the subset come back as 0: the rest of the body is "body"
        from .threshold import body_mask
        from ._grid import block_factors, block_mean, block_upsample, canonical_grid

        grid = canonical_grid(volume)
        factors = block_factors(grid.spacing, 3.0)
        body = block_upsample(body_mask(block_mean(grid.to_canonical(volume.array), factors)), factors, grid.shape)
        body = grid.from_canonical(body)
        labels[(labels == 0) & body] = ORGAN_BY_NAME["body"].value
    report(progress, 2, 2, "TotalSegmentator: done")
    return labels
