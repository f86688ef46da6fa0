"""Dice and HD95 per organ and backend on every real reference in ../shared/realdata and on phantoms.

Usage: python benchmarks/segmentation_dice.py [--backend threshold --backend builtin ...]
       [--realdata ../shared/realdata] [--phantoms 2]

Cases (each skipped with a line saying why when its files are absent):

* ``example_ct.nii.gz`` (abdomen-pelvis with lung bases, 3 mm) vs ``example_seg_fast_force_split``;
* ``example_ct_sm.nii.gz`` (its slices 82..111) vs ``example_seg`` and vs ``example_seg_fast``;
* ``example_ct_dicom/`` (20-slice DICOM series) vs ``example_seg_dicom``;
* synthetic phantoms vs their generator's organ labels.

The real references are TotalSegmentator outputs (a model, not manual truth), mapped to our organ
labels. Dice from :func:`napari_ctvlp.engine.segmentation.dice`; HD95 (95th-percentile symmetric
Hausdorff distance, mm, with the voxel spacing) from MONAI's ``compute_hausdorff_distance``;
"-" where the prediction is empty (Dice 0). Backends that cannot run here say why and are left
out. There is no real chest-CT reference in ../shared/realdata: heart, esophagus and most of the
mediastinum are outside these abdominal scans, so those rows appear only for the phantoms.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_ctvlp.engine.anatomy import LEFT_LUNG_LABELS, LUNG_LABELS, RIGHT_LUNG_LABELS
from napari_ctvlp.engine.segmentation import available_backends, dice, from_label_file, segment
from napari_ctvlp.engine.volume import CTVolume

GROUPS: dict[str, tuple[int, ...]] = {
    "lungs": LUNG_LABELS,
    "lung_left": LEFT_LUNG_LABELS,
    "lung_right": RIGHT_LUNG_LABELS,
    "trachea": (8,),
    "esophagus": (9,),
    "heart": (10,),
    "aorta": (11,),
    "mediastinum+heart": (8, 9, 10, 11, 12),
    "spine": (13,),
    "bone": (14,),
    "all bone": (13, 14),
}
MIN_REF_ML = 0.5  # organs with less reference volume are not reported


@dataclass(frozen=True)
class Case:
    title: str
    load: object  # () -> (CTVolume, reference organ labels)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI); nan when either mask is empty."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)

    if not pred.any() or not ref.any():
        return float("nan")
    # crop to the union's bounding box (+1 voxel) so the distance transforms stay small
    idx = np.argwhere(pred | ref)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None]
    value = compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                       spacing=[float(s) for s in spacing])
    return float(value.reshape(-1)[0])


def organ_rows(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, tuple[float, float, float, float]]:
    """``{organ: (dice, hd95 mm, predicted ml, reference ml)}`` for organs present in the reference."""
    ml = float(np.prod(spacing)) / 1000.0
    rows = {}
    for name, values in GROUPS.items():
        r = np.isin(ref, values)
        if r.sum() * ml < MIN_REF_ML:
            continue
        p = np.isin(pred, values)
        rows[name] = (dice(p, r), hd95(p, r, spacing), p.sum() * ml, r.sum() * ml)
    return rows


def _real_cases(rd: Path) -> tuple[list[Case], list[str]]:
    from napari_ctvlp.io import read_ct

    cases, skipped = [], []

    def nifti(ct_name: str, ref_name: str) -> None:
        ct, ref = rd / ct_name, rd / ref_name
        if not (ct.exists() and ref.exists()):
            skipped.append(f"{ct_name} vs {ref_name}: file(s) absent in {rd}")
            return

        def load():
            vol = read_ct(ct)
            return vol, from_label_file(ref, like=vol, kind="totalseg").labels

        cases.append(Case(f"{ct_name} vs {ref_name}", load))

    nifti("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")
    nifti("example_ct_sm.nii.gz", "example_seg.nii.gz")
    nifti("example_ct_sm.nii.gz", "example_seg_fast.nii.gz")
    nifti("example_ct_dicom", "example_seg_dicom.nii.gz")
    return cases, skipped


def _phantom_cases(n: int) -> list[Case]:
    from napari_ctvlp.phantom import make_phantom

    def loader(seed: int):
        def load():
            ph = make_phantom(seed=seed)
            return ph.volume, np.asarray(ph.organs, dtype=np.uint8)
        return load

    return [Case(f"phantom seed={seed} (reference: the generator's organ labels)", loader(seed)) for seed in range(n)]


def _fmt(value: float, pattern: str) -> str:
    return "-" if not np.isfinite(value) else format(value, pattern)


def run(cases: list[Case], backends: list[str]) -> dict[str, dict[str, dict[str, tuple[float, float, float, float]]]]:
    """Print one table per case; returns ``{case: {backend: {organ: (dice, hd95, pred ml, ref ml)}}}``."""
    results: dict[str, dict[str, dict[str, tuple[float, float, float, float]]]] = {}
    cache: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
    for case in cases:
        volume, ref = case.load()
        assert isinstance(volume, CTVolume)
        key_ct = case.title.split(" vs ")[0]
        per_backend: dict[str, dict[str, tuple[float, float, float, float]]] = {}
        times: dict[str, float] = {}
        for backend in backends:
            key = (key_ct, backend)
            if key not in cache:
                t0 = time.perf_counter()
                cache[key] = (segment(volume, backend=backend).labels, time.perf_counter() - t0)
            labels, times[backend] = cache[key]
            per_backend[backend] = organ_rows(labels, ref, volume.spacing)
        results[case.title] = per_backend
        print(f"\n## {case.title}\nshape={volume.shape} spacing={tuple(round(s, 3) for s in volume.spacing)} "
              + " ".join(f"{b}={times[b]:.1f}s" for b in backends))
        head = f"{'organ':18s} {'ref ml':>8s}" + "".join(f" | {b[:12]:>12s} dice  HD95mm  pred ml" for b in backends)
        print(head)
        organs = [o for o in GROUPS if any(o in per_backend[b] for b in backends)]
        for organ in organs:
            ref_ml = next(per_backend[b][organ][3] for b in backends if organ in per_backend[b])
            line = f"{organ:18s} {ref_ml:8.1f}"
            for b in backends:
                d, h, pml, _ = per_backend[b][organ]
                line += f" | {'':12s} {d:4.2f} {_fmt(h, '7.1f'):>7s} {pml:8.1f}"
            print(line)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", default=None,
                        help="backend to measure (repeatable; default: every registered one that can run)")
    parser.add_argument("--realdata", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/realdata")
    parser.add_argument("--phantoms", type=int, default=2, help="number of phantom seeds (default 2)")
    args = parser.parse_args(argv)
    reasons = available_backends()
    wanted = args.backend or list(reasons)
    backends = []
    for name in wanted:
        reason = reasons.get(name, f"unknown backend (registered: {', '.join(reasons)})")
        if reason is None:
            backends.append(name)
        else:
            print(f"backend {name}: cannot run here: {reason}")
    if not backends:
        raise SystemExit("no backend can run")
    cases, skipped = _real_cases(args.realdata.resolve()) if args.realdata.is_dir() else ([], [
        f"real data folder {args.realdata} is absent"])
    for line in skipped:
        print(f"skipped: {line}")
    run(cases + _phantom_cases(args.phantoms), backends)


if __name__ == "__main__":
    main()
