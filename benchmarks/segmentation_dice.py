"""Dice per organ of a segmentation backend against TotalSegmentator reference labels.

Usage: python benchmarks/segmentation_dice.py [--backend threshold] [--realdata ../shared/realdata]

Prints one table per case (example_ct NIfTI, the DICOM series, synthetic phantoms against
their generator's labels) with Dice, predicted and reference volumes, and the runtime.
The references are TotalSegmentator outputs (a model, not manual truth).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from napari_ctvlp.engine.anatomy import LEFT_LUNG_LABELS, LUNG_LABELS, RIGHT_LUNG_LABELS
from napari_ctvlp.engine.segmentation import dice, from_label_file, segment
from napari_ctvlp.phantom import make_phantom
from napari_ctvlp.engine.volume import CTVolume
from napari_ctvlp.io import read_ct

GROUPS: dict[str, tuple[int, ...]] = {
    "lungs": LUNG_LABELS,
    "lung_left": LEFT_LUNG_LABELS,
    "lung_right": RIGHT_LUNG_LABELS,
    "trachea": (8,),
    "heart": (10,),
    "mediastinum+heart": (8, 9, 10, 11, 12),
    "spine": (13,),
    "bone": (14,),
    "all bone": (13, 14),
}


def dice_table(pred: np.ndarray, ref: np.ndarray, spacing) -> list[tuple[str, float, float, float]]:
    ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for name, values in GROUPS.items():
        r = np.isin(ref, values)
        if not r.any():
            continue
        p = np.isin(pred, values)
        rows.append((name, dice(p, r), p.sum() * ml, r.sum() * ml))
    return rows


def run_case(title: str, volume: CTVolume, ref: np.ndarray, backend: str) -> dict[str, float]:
    t0 = time.perf_counter()
    seg = segment(volume, backend=backend)
    elapsed = time.perf_counter() - t0
    print(f"\n## {title}  shape={volume.shape} spacing={tuple(round(s, 3) for s in volume.spacing)} "
          f"backend={seg.backend} time={elapsed:.2f}s (backend {seg.timings['backend']:.2f}s)")
    print(f"{'organ':20s} {'dice':>6s} {'pred ml':>9s} {'ref ml':>9s}")
    out = {}
    for name, d, pml, rml in dice_table(seg.labels, ref, volume.spacing):
        print(f"{name:20s} {d:6.3f} {pml:9.1f} {rml:9.1f}")
        out[name] = d
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="threshold")
    parser.add_argument("--realdata", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/realdata")
    parser.add_argument("--phantoms", type=int, default=3, help="number of phantom seeds")
    args = parser.parse_args(argv)
    rd = args.realdata
    if (rd / "example_ct.nii.gz").exists():
        vol = read_ct(rd / "example_ct.nii.gz")
        ref = from_label_file(rd / "example_seg_fast_force_split.nii.gz", like=vol, kind="totalseg")
        run_case("example_ct.nii.gz vs example_seg_fast_force_split", vol, ref.labels, args.backend)
    if (rd / "example_ct_dicom").is_dir():
        vol = read_ct(rd / "example_ct_dicom")
        ref = from_label_file(rd / "example_seg_dicom.nii.gz", like=vol, kind="totalseg")
        run_case("example_ct_dicom vs example_seg_dicom", vol, ref.labels, args.backend)
    for seed in range(args.phantoms):
        ph = make_phantom(seed=seed)
        run_case(f"phantom seed={seed} (reference: the phantom's own organ labels)", ph.volume, ph.organs,
                 args.backend)

if __name__ == "__main__":
    main()
