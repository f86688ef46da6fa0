"""Per-organ and per-anatomy statistics of an organ label map: volume, mean HU, cut-off flags."""

from __future__ import annotations

import numpy as np

from ..anatomy import ANATOMIES, ORGAN_LABELS, anatomy_masks

#: Prefix of anatomy-group keys in the statistics dicts (organ keys are the bare organ names).
ANATOMY_PREFIX = "anatomy:"


def touches_border(mask: np.ndarray) -> bool:
    """True when ``mask`` reaches any face of the array (first/last slice or the in-plane FOV edge)."""
    if not mask.any():
        return False
    for axis in range(mask.ndim):
        if np.take(mask, 0, axis=axis).any() or np.take(mask, -1, axis=axis).any():
            return True
    return False


def _stride(shape: tuple[int, ...], spacing: tuple[float, ...], target_mm: float) -> tuple[int, ...]:
    return tuple(max(1, int(target_mm // s)) for s in spacing)


def _label_counts_and_sums(labels: np.ndarray, hu: np.ndarray, *, chunk_voxels: int = 1 << 22):
    """Voxel count and HU sum per label value, in slabs (cache-sized: ~7x faster than one pass)."""
    counts = np.zeros(256, dtype=np.int64)
    sums = np.zeros(256, dtype=np.float64)
    step = max(1, chunk_voxels // max(1, int(np.prod(labels.shape[1:]))))
    for start in range(0, labels.shape[0], step):
        lab = labels[start:start + step].ravel()
        counts += np.bincount(lab, minlength=256)[:256]
        sums += np.bincount(lab, weights=hu[start:start + step].ravel().astype(np.float64), minlength=256)[:256]
    return counts, sums


def label_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count ``(256,)`` and centre of mass ``(256, ndim)`` in array indices of every label value.

    One pass in slices (a 200 x 384 x 384 map takes well under a second); the centroid of an absent
    value is NaN.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label values must lie in 0..255")
    counts = np.zeros(256, dtype=np.float64)
    sums = np.zeros((256, 3), dtype=np.float64)
    rows = np.repeat(np.arange(labels.shape[1], dtype=np.float64), labels.shape[2])
    cols = np.tile(np.arange(labels.shape[2], dtype=np.float64), labels.shape[1])
    for z in range(labels.shape[0]):
        lab = labels[z].ravel().astype(np.intp, copy=False)
        n = np.bincount(lab, minlength=256)[:256]
        counts += n
        sums[:, 0] += z * n
        sums[:, 1] += np.bincount(lab, weights=rows, minlength=256)[:256]
        sums[:, 2] += np.bincount(lab, weights=cols, minlength=256)[:256]
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = sums / counts[:, None]
    return counts, centroids


def anatomy_centroids(labels: np.ndarray) -> dict[str, np.ndarray | None]:
    """Centre of mass (array indices) of each anatomy group's organ labels; None when it is absent."""
    counts, centroids = label_centroids(labels)
    out: dict[str, np.ndarray | None] = {}
    for anatomy in ANATOMIES:
        values = [v for v in anatomy.organ_labels if 0 <= v < 256 and counts[v] > 0]
        if not values:
            out[anatomy.name] = None
            continue
        w = counts[values]
        out[anatomy.name] = (centroids[values] * w[:, None]).sum(axis=0) / w.sum()
    return out


def organ_statistics(
    labels: np.ndarray,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    anatomy_grid_mm: float = 3.0,
) -> tuple[dict[str, float], dict[str, float], dict[str, bool]]:
    """``(volume_ml, mean_hu, incomplete)`` keyed by organ name and ``"anatomy:<group>"``.

    Organ figures are exact (full grid). Anatomy groups need dilations, so they are computed on a
    strided sub-grid of about ``anatomy_grid_mm`` (volumes scaled back; a few percent accuracy).
    Organs absent from ``labels`` are left out.

    Args:
        labels: organ label map (values of ``ORGAN_LABELS``), same shape as ``hu``.
        hu: CT values.
        spacing: voxel size in mm in array axis order.
        anatomy_grid_mm: sub-grid size for the anatomy groups.
    """
    if labels.shape != hu.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the CT shape {hu.shape}")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts, sums = _label_counts_and_sums(labels, hu)
    on_border: set[int] = set()
    for axis in range(labels.ndim):  # labels present on any face of the array
        for end in (0, -1):
            on_border.update(np.unique(np.take(labels, end, axis=axis)).tolist())
    volume_ml: dict[str, float] = {}
    mean_hu: dict[str, float] = {}
    incomplete: dict[str, bool] = {}
    for organ in ORGAN_LABELS:
        n = int(counts[organ.value])
        if n == 0:
            continue
        volume_ml[organ.name] = n * voxel_ml
        mean_hu[organ.name] = float(sums[organ.value] / n)
        incomplete[organ.name] = organ.value in on_border

    stride = _stride(labels.shape, spacing, anatomy_grid_mm)
    sl = tuple(slice(None, None, s) for s in stride)
    sub_labels = labels[sl]
    sub_hu = hu[sl]
    sub_spacing = tuple(s * k for s, k in zip(spacing, stride))
    sub_ml = float(np.prod(sub_spacing)) / 1000.0
    masks = anatomy_masks(sub_labels, spacing=sub_spacing)  # type: ignore[arg-type]
    for anatomy, mask in zip(ANATOMIES, masks):
        n = int(mask.sum())
        if n == 0:
            continue
        key = ANATOMY_PREFIX + anatomy.name
        volume_ml[key] = n * sub_ml
        mean_hu[key] = float(sub_hu[mask].mean())
        incomplete[key] = touches_border(mask)
    return volume_ml, mean_hu, incomplete


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom
