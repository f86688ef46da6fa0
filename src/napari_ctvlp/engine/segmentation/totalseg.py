"""TotalSegmentator adapter: in-memory call, no downloads, no usage statistics.

TotalSegmentator 2.x locates its weights under ``get_weights_dir()``: ``$TOTALSEG_WEIGHTS_PATH``
if set, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else ``~/.totalsegmentator/nnunet/results``.
Task ``total`` needs datasets 291-295 (full, 1.5 mm) or 297 (``fast``, 3 mm); a ``roi_subset``
additionally runs the 6 mm model 298 to crop. ``totalseg_download_weights -t total`` fetches
291-295 + 298, ``-t total_fast`` fetches 297 + 298. Its own python API would download missing
weights silently and post usage statistics to stats.totalsegmentator.com; we check the weight
folders first and replace its ``send_usage_stats`` with a no-op for the duration of our call.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from ..anatomy import ORGAN_BY_NAME, ORGAN_LABELS, totalseg_to_organ_lut
from ..volume import CTVolume, ProgressCallback, report

logger = logging.getLogger(__name__)

FULL_TASK_IDS: tuple[int, ...] = (291, 292, 293, 294, 295)
FAST_TASK_IDS: tuple[int, ...] = (297,)
CROP_TASK_ID = 298  # TotalSegmentator runs this 6 mm model first whenever roi_subset is given
ENV_VARS = ("TOTALSEG_WEIGHTS_PATH", "TOTALSEG_HOME_DIR")


class SegmentationUnavailable(RuntimeError):
    """A segmentation backend cannot run here (package or weights missing); the message says how to fix it."""


def fetch_command(fast: bool) -> str:
    """The shell command that downloads the weights the adapter needs."""
    return f"totalseg_download_weights -t {'total_fast' if fast else 'total'}"


def needed_task_ids(*, fast: bool, roi_subset: bool = True) -> tuple[int, ...]:
    """TotalSegmentator dataset ids one call needs."""
    ids = FAST_TASK_IDS if fast else FULL_TASK_IDS
    return ids + ((CROP_TASK_ID,) if roi_subset else ())


def roi_subset_names() -> list[str]:
    """TotalSegmentator ``total`` structure names our organ labels are made of."""
    from totalsegmentator.map_to_binary import class_map

    names = class_map["total"]
    return [names[v] for organ in ORGAN_LABELS for v in organ.totalseg if v in names]


def missing_weights(*, fast: bool, roi_subset: bool = True) -> list[Path]:
    """Weight folders that are absent (empty list: ready). Raises ImportError without the package."""
    from totalsegmentator.config import get_weights_dir
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    root = Path(get_weights_dir())
    missing = []
    for task_id in needed_task_ids(fast=fast, roi_subset=roi_subset):
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = root / Path(info.get("rel_path") or "") / info["foldername"]
        if not folder.is_dir() or not any(folder.rglob("checkpoint_final.pth")):
            missing.append(folder)
    return missing


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
        f"Fetch them once with `{fetch_command(fast)}` (folder chosen by the environment variables "
        f"TOTALSEG_WEIGHTS_PATH, else TOTALSEG_HOME_DIR/nnunet/results, else ~/.totalsegmentator/nnunet/results)."
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
    from totalsegmentator.python_api import totalsegmentator

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
