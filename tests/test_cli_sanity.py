"""``napari-ctvlp detect`` warns, in one stderr line per input, about volumes that are no usable CT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

CLI = str(Path(sys.executable).with_name("napari-ctvlp"))


def test_detect_warns_once_per_questionable_input(realdata: Path, tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    slab = realdata / "example_ct_sm.nii.gz"  # 30 slices of 3 mm: too little of the body
    img = nib.load(slab)
    raw = tmp_path / "raw_units.nii.gz"  # the same slab in stored units (no intercept): not HU
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16) + 1024, img.affine), raw)
    proc = subprocess.run([CLI, "detect", str(slab), str(raw), "--out", str(tmp_path / "out"), "--checkpoint",
                           str(tiny_checkpoint_dir), "--segmentation", "threshold", "--device", "cpu", "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, proc.stderr
    first, second = lines
    assert first.startswith("napari-ctvlp detect: warning: ") and str(slab) in first
    assert "small" in first and "Hounsfield" not in first
    assert str(raw) in second and "Hounsfield" in second and "small" in second
    assert (tmp_path / "out" / "example_ct_sm" / "results.json").is_file()  # the run went on
    assert (tmp_path / "out" / "raw_units" / "results.json").is_file()
