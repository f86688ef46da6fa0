"""``napari-ctvlp bench``: how fast is detection on this machine?

Times :func:`napari_ctvlp.engine.pipeline.detect` end to end from a file, as a user runs it:
reading the CT, the first call (loads the model), a second call (model cached), re-prompting
with new sentences (text encoder only) and one prompt heatmap on the input grid, plus the peak
resident memory. By default the case is a full-size synthetic chest phantom (512 x 512 x 300 at
0.7 x 0.7 x 1 mm) with its organ labels supplied as the segmentation, so the figure does not
depend on which segmentation backend is installed; ``ct=`` times the user's own scan instead.

The scripts under ``benchmarks/`` in the source tree use the same function.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_ctvlp.engine.volume import ProgressCallback, report

__all__ = ["DetectBenchmark", "TARGETS", "benchmark_checkpoint", "format_benchmark", "run_detect_benchmark"]

logger = logging.getLogger(__name__)

#: Targets on 2 CPU cores (DESIGN): end-to-end seconds, re-prompt seconds, peak RSS in GB.
TARGETS = {"end_to_end_s": 30.0, "reprompt_s": 0.3, "peak_rss_gb": 6.0}

#: New sentences for the re-prompt timing (each is new text: one text-encoder call each).
REPROMPTS: tuple[str, ...] = (
    "There is a spiculated nodule in the right upper lobe.", "Enlarged mediastinal lymph nodes.",
    "Bilateral ground-glass opacities.", "Calcified plaque in the aortic arch.",
    "A small hiatal hernia is seen.", "Pleural thickening on the left.",
)


@dataclass(frozen=True)
class DetectBenchmark:
    """Timings of one :func:`run_detect_benchmark` (seconds unless named otherwise)."""

    case: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    checkpoint: str
    device: str
    threads: int
    read_s: float
    cold_s: float
    warm_s: float
    reprompt_median_s: float
    reprompt_max_s: float
    heatmap_s: float
    peak_rss_gb: float
    stages: dict[str, float] = field(default_factory=dict)

    def meets_targets(self) -> dict[str, bool]:
        """``{target: met}`` for :data:`TARGETS` (the cold run counts for end-to-end)."""
        return {"end_to_end_s": self.cold_s < TARGETS["end_to_end_s"],
                "reprompt_s": self.reprompt_median_s < TARGETS["reprompt_s"],
                "peak_rss_gb": self.peak_rss_gb < TARGETS["peak_rss_gb"]}


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def benchmark_checkpoint(checkpoint: str | Path | None, tmp: Path) -> tuple[Path, str]:
    """``(checkpoint folder, description)``: the given one, the shipped demo model, or a random one.

    Timings do not depend on the weights, so without a demo model a freshly initialised
    ``CTVLPConfig.phantom_cpu()`` (same architecture) is saved under ``tmp`` and the description
    says so.
    """
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path, save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
    from napari_ctvlp.engine.preprocess import PreprocessConfig

    if checkpoint:
        return Path(checkpoint), f"given: {checkpoint}"
    found = default_checkpoint_path()
    if found is not None:
        return found, f"shipped demo model {found}"
    cfg = CTVLPConfig.phantom_cpu()
    path = save_checkpoint(CTVLP(cfg).eval(), tmp / "phantom_cpu_random",
                           preprocessing=PreprocessConfig.for_image_size(cfg.image_size).to_dict())
    return path, "freshly initialised CTVLPConfig.phantom_cpu() (random weights; no demo model installed)"


def _write_phantom(tmp: Path, size: Sequence[int], spacing: Sequence[float], seed: int) -> tuple[Path, Path, str]:
    import nibabel as nib

    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=seed, size=tuple(int(s) for s in size), spacing=tuple(float(s) for s in spacing))
    ct_path, mask_path = tmp / "ct.nii.gz", tmp / "organs.nii.gz"
    nib.Nifti1Image(np.asarray(ph.volume.array, dtype=np.int16).transpose(2, 1, 0), ph.volume.affine).to_filename(ct_path)
    nib.Nifti1Image(np.asarray(ph.organs, dtype=np.uint8).transpose(2, 1, 0), ph.volume.affine).to_filename(mask_path)
    return ct_path, mask_path, f"synthetic chest phantom (seed {seed}) with its organ labels as the mask"


def run_detect_benchmark(
    *,
    ct: str | Path | None = None,
    segmentation: str = "auto",
    size: Sequence[int] = (300, 512, 512),
    spacing: Sequence[float] = (1.0, 0.7, 0.7),
    seed: int = 0,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> DetectBenchmark:
    """Time detection end to end; see the module docstring.

    Args:
        ct: the user's CT (file or DICOM folder); None builds a phantom of ``size`` (slices, rows,
            columns) and ``spacing`` (mm, same order) and uses its organ labels as the mask.
        segmentation: with ``ct``: a backend name or a mask file, as for ``detect``.
        seed: the phantom's seed.
        checkpoint: model folder; default the shipped demo model (else random weights, said so).
        device: ``cpu``, ``cuda`` or ``auto``.
        progress: ``progress(done, total, message)`` after each stage.

    Raises:
        ValueError: a bad size or spacing; the errors of ``read_ct`` and ``detect`` for bad input.
    """
    import torch

    from napari_ctvlp.engine.pipeline import detect
    from napari_ctvlp.io import read_ct

    if ct is None and (len(size) != 3 or min(size) < 16):
        raise ValueError(f"size must be 3 numbers >= 16 (slices rows columns), got {list(size)}")
    if ct is None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {list(spacing)}")
    total = 6
    with tempfile.TemporaryDirectory(prefix="napari_ctvlp_bench_") as tmpdir:
        tmp = Path(tmpdir)
        if ct is None:
            report(progress, 0, total, "building the phantom")
            ct_path, mask_path, case = _write_phantom(tmp, size, spacing, seed)
            seg = str(mask_path)
        else:
            ct_path, seg, case = Path(ct), segmentation, f"{ct} (segmentation: {segmentation})"
        ckpt, ckpt_what = benchmark_checkpoint(checkpoint, tmp)

        report(progress, 1, total, "reading")
        t = time.perf_counter()
        volume = read_ct(ct_path)
        read_s = time.perf_counter() - t
        shape, vox = tuple(int(s) for s in volume.shape), tuple(float(s) for s in volume.spacing)
        del volume
        prompts = ["pleural effusion"]
        report(progress, 2, total, "detect (cold)")
        t = time.perf_counter()
        detect(ct_path, checkpoint=ckpt, segmentation=seg, prompts=prompts, device=device)
        cold_s = time.perf_counter() - t
        report(progress, 3, total, "detect (warm)")
        t = time.perf_counter()
        result = detect(ct_path, checkpoint=ckpt, segmentation=seg, prompts=prompts, device=device)
        warm_s = time.perf_counter() - t
        report(progress, 4, total, "re-prompt")
        times = []
        for text in REPROMPTS:
            t = time.perf_counter()
            result.rescore(text)
            times.append(time.perf_counter() - t)
        report(progress, 5, total, "prompt heatmap")
        t = time.perf_counter()
        result.session.prompt_heatmap(REPROMPTS[0])
        heat_s = time.perf_counter() - t
        report(progress, total, total, "done")
        return DetectBenchmark(
            case=case, shape=shape, spacing=vox, checkpoint=ckpt_what, device=device,
            threads=torch.get_num_threads(), read_s=read_s, cold_s=cold_s, warm_s=warm_s,
            reprompt_median_s=float(np.median(times)), reprompt_max_s=float(max(times)), heatmap_s=heat_s,
            peak_rss_gb=peak_rss_gb(), stages=dict(result.timings),
        )


def format_benchmark(b: DetectBenchmark) -> str:
    """The printout of ``napari-ctvlp bench`` (stage timings of the warm run, then the figures)."""
    met = b.meets_targets()

    def flag(key: str) -> str:
        return "ok" if met[key] else "MISSED"

    lines = [f"case: {b.case}", f"shape {b.shape}, spacing {tuple(round(s, 3) for s in b.spacing)} mm",
             f"checkpoint: {b.checkpoint}", f"device {b.device}, torch threads {b.threads}", "",
             "stage timings of the warm run (s):"]
    lines += [f"  {k:32s} {v:7.2f}" for k, v in b.stages.items()]
    lines += [
        "",
        f"read                                 {b.read_s:7.2f} s",
        f"end-to-end detect, cold (load model) {b.cold_s:7.2f} s   target < {TARGETS['end_to_end_s']:g} s: {flag('end_to_end_s')}",
        f"end-to-end detect, warm              {b.warm_s:7.2f} s",
        f"re-prompt (new sentence), median     {b.reprompt_median_s:7.3f} s   target < {TARGETS['reprompt_s']:g} s: "
        f"{flag('reprompt_s')}   (max of {len(REPROMPTS)}: {b.reprompt_max_s:.3f} s)",
        f"prompt heatmap on the input grid     {b.heatmap_s:7.3f} s",
        f"peak RSS                             {b.peak_rss_gb:7.2f} GB  target < {TARGETS['peak_rss_gb']:g} GB: {flag('peak_rss_gb')}",
        f"end-to-end (warm) / read             {b.warm_s / max(b.read_s, 1e-9):7.2f}",
    ]
    return "\n".join(lines)
