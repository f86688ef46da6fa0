"""Dice per organ of a segmentation backend against TotalSegmentator reference labels.

Usage: python benchmarks/segmentation_dice.py [--backend threshold] [--realdata ../shared/realdata]

Prints one table per case (example_ct NIfTI, the DICOM series, synthetic phantoms when
``napari_ctvlp.engine.phantom`` exists) with Dice, predicted and reference volumes, and the runtime.
The references are TotalSegmentator outputs (a model, not manual truth).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from napari_ctvlp.engine.anatomy import LEFT_LUNG_LABELS, LUNG_LABELS, RIGHT_LUNG_LABELS
from napari_ctvlp.engine.segmentation import dice, from_label_file, segment
from napari_ctvlp.engine.volume import CTVolume

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


def read_ct(path: Path) -> CTVolume:
    """napari_ctvlp.io.read_ct when present, else nibabel (NIfTI) / SimpleITK (DICOM folder)."""
    try:
        from napari_ctvlp.io import read_ct as project_read_ct

        return project_read_ct(path)
    except ImportError:
        pass
    if path.is_dir():
        import SimpleITK as sitk

        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        img = reader.Execute()
        direction = np.array(img.GetDirection()).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = direction * np.array(img.GetSpacing())[None, :]
        lps[:3, 3] = img.GetOrigin()
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        return CTVolume(sitk.GetArrayFromImage(img), tuple(img.GetSpacing()[::-1]), affine, meta={"path": str(path)})
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asarray(img.dataobj).transpose(2, 1, 0)
    return CTVolume(arr, tuple(float(z) for z in img.header.get_zooms()[:3][::-1]), img.affine, meta={"path": str(path)})


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
    try:
        from napari_ctvlp.engine.phantom import make_phantom
    except ImportError:
        print("\n(no napari_ctvlp.engine.phantom yet: phantom cases skipped)")
        return
    for seed in range(args.phantoms):
        ph = make_phantom(seed=seed)
        vol = getattr(ph, "volume", ph)
        labels = getattr(ph, "labels", None)
        if labels is None:
            print(f"\n(phantom seed {seed}: no .labels attribute; skipped)")
            continue
        run_case(f"phantom seed={seed}", vol, np.asarray(labels), args.backend)


if __name__ == "__main__":
    main()
