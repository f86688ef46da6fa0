"""Latency and memory of ``detect`` on a full-size CT: 512x512x300 at 0.7x0.7x1 mm.

Prints: read time, end-to-end detect time from the NIfTI path (the phantom's organ mask supplied
as segmentation; cold = first call incl. model loading, warm = model cached), the re-prompt time
(text encoder only) and the prompt-heatmap time, peak RSS, and end-to-end / read.
Targets on 2 CPU cores: re-prompt < 0.3 s, end-to-end < 30 s, peak RSS < 6 GB.

Checkpoint: ``--checkpoint``, else the shipped demo model, else a freshly initialised
``CTVLPConfig.phantom_cpu()`` saved to a temporary folder (said in the printout).

Usage: ``python benchmarks/detect_latency.py [--size 300 512 512] [--checkpoint DIR] [--device cpu]``
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _bench_common import benchmark_checkpoint, benchmark_phantom


def _peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024**2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 0.7, 0.7], metavar=("SZ", "SY", "SX"))
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import nibabel as nib
    import torch

    from napari_ctvlp.engine.pipeline import detect
    from napari_ctvlp.io import read_ct

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        t = time.perf_counter()
        volume, organs, what = benchmark_phantom(tuple(args.size), seed=args.seed, spacing=tuple(args.spacing))
        print(f"case: {what}, shape {volume.shape}, spacing {volume.spacing} ({time.perf_counter() - t:.1f} s to build)")
        ct_path, mask_path = tmp / "ct.nii.gz", tmp / "organs.nii.gz"
        nib.Nifti1Image(np.asarray(volume.array, dtype=np.int16).transpose(2, 1, 0), volume.affine).to_filename(ct_path)
        nib.Nifti1Image(organs.transpose(2, 1, 0), volume.affine).to_filename(mask_path)
        del volume, organs
        ckpt, ckpt_what = benchmark_checkpoint(args.checkpoint, tmp)
        print(f"checkpoint: {ckpt_what}")

        t = time.perf_counter()
        read_ct(ct_path)
        read_s = time.perf_counter() - t

        prompts = ["pleural effusion"]
        t = time.perf_counter()
        detect(ct_path, checkpoint=ckpt, segmentation=str(mask_path), prompts=prompts, device=args.device)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        result = detect(ct_path, checkpoint=ckpt, segmentation=str(mask_path), prompts=prompts, device=args.device)
        warm_s = time.perf_counter() - t

        new_prompts = ["There is a spiculated nodule in the right upper lobe.", "Enlarged mediastinal lymph nodes.",
                       "Bilateral ground-glass opacities.", "Calcified plaque in the aortic arch.",
                       "A small hiatal hernia is seen.", "Pleural thickening on the left."]
        times = []
        for text in new_prompts:  # each is new text: one text-encoder call each
            t = time.perf_counter()
            result.rescore(text)
            times.append(time.perf_counter() - t)
        reprompt_s = float(np.median(times))
        t = time.perf_counter()
        result.session.prompt_heatmap("There is a spiculated nodule in the right upper lobe.")
        heat_s = time.perf_counter() - t
        rss = _peak_rss_gb()

        print("\nstage timings of the warm run (s):")
        for k, v in result.timings.items():
            print(f"  {k:32s} {v:7.2f}")
        print()
        print(f"read (read_ct)                      {read_s:7.2f} s")
        print(f"end-to-end detect, cold (load model) {cold_s:7.2f} s   target < 30 s: {'ok' if cold_s < 30 else 'MISSED'}")
        print(f"end-to-end detect, warm              {warm_s:7.2f} s   target < 30 s: {'ok' if warm_s < 30 else 'MISSED'}")
        print(f"re-prompt (new sentence), median     {reprompt_s:7.3f} s   target < 0.3 s: {'ok' if reprompt_s < 0.3 else 'MISSED'}"
              f"   (max of {len(times)}: {max(times):.3f} s)")
        print(f"prompt heatmap on the input grid     {heat_s:7.3f} s")
        print(f"peak RSS                             {rss:7.2f} GB  target < 6 GB: {'ok' if rss < 6 else 'MISSED'}")
        print(f"end-to-end (warm) / read             {warm_s / read_s:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
