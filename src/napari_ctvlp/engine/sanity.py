"""Input sanity: does a volume look like a CT in Hounsfield units that the model can use?

:func:`check_volume` never refuses anything (the reader already refuses what cannot be read: a
zero voxel size, non-finite values); it returns warnings the GUI shows as a notification and
``napari-ctvlp detect`` prints as one stderr line:

* ``not_hu`` -- the values do not look like HU: implausible range, or neither air near
  -1000 HU nor soft tissue near 0-100 HU (raw scanner units, another modality, a normalised or
  label image);
* ``tiny`` -- fewer than 32 voxels or less than 100 mm along an axis (a slab or a crop: the
  anatomy the model pools over is largely missing);
* ``sheared`` -- the voxel axes are not perpendicular (e.g. a gantry tilt kept as shear).

Pure numpy; large volumes are subsampled for the value checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from napari_ctvlp.engine.volume import CTVolume

logger = logging.getLogger(__name__)

#: defaults of :func:`check_volume`
MIN_VOXELS = 32
MIN_EXTENT_MM = 100.0
#: share of voxels near -1000 HU (air) / near 0-100 HU (soft tissue) a CT holds at least
MIN_AIR_FRACTION = 0.001
MIN_SOFT_FRACTION = 0.02
#: largest number of voxels the value checks look at (a strided subsample beyond)
MAX_SAMPLED_VOXELS = 2_000_000
#: voxel axes count as perpendicular within this many degrees
MAX_SHEAR_DEG = 0.5


@dataclass(frozen=True)
class SanityWarning:
    """One problem: a stable ``code`` (``"not_hu"``, ``"tiny"``, ``"sheared"``) and a sentence."""

    code: str
    message: str


@dataclass(frozen=True)
class SanityReport:
    """What :func:`check_volume` found.

    Attributes:
        warnings: the problems, in check order (empty: the volume looks like a usable CT).
        value_range: lowest and highest value (HU) of the checked voxels.
        air_fraction: share of checked voxels in -1100..-900 HU.
        soft_tissue_fraction: share of checked voxels in -100..150 HU.
        extent_mm: field of view along the array axes (mm).
    """

    warnings: tuple[SanityWarning, ...] = ()
    value_range: tuple[float, float] = (float("nan"), float("nan"))
    air_fraction: float = float("nan")
    soft_tissue_fraction: float = float("nan")
    extent_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def ok(self) -> bool:
        """True when there is nothing to warn about."""
        return not self.warnings

    @property
    def codes(self) -> tuple[str, ...]:
        """The warning codes."""
        return tuple(w.code for w in self.warnings)

    def summary(self) -> str:
        """All warnings as one line ('' when ok)."""
        return " ".join(w.message for w in self.warnings)


def _sample(array: np.ndarray, limit: int) -> np.ndarray:
    """A strided subsample of at most about ``limit`` voxels (the array itself when small)."""
    if array.size <= limit:
        return array
    step = int(np.ceil((array.size / limit) ** (1.0 / array.ndim)))
    return array[tuple(slice(None, None, step) for _ in range(array.ndim))]


def _axis_names(volume: CTVolume) -> tuple[str, str, str]:
    """Names of the array axes ``(k, j, i)`` by the anatomical direction they run along."""
    pairs = {"R": "R-L", "L": "R-L", "A": "A-P", "P": "A-P", "S": "S-I", "I": "S-I"}
    codes = tuple(volume.orientation)[::-1]
    return tuple(pairs.get(str(c), f"axis {n}") for n, c in enumerate(codes))  # type: ignore[return-value]


def _shear_deg(affine: np.ndarray) -> float:
    """Largest deviation from 90 degrees between two voxel axes."""
    cols = np.asarray(affine, dtype=float)[:3, :3].T
    norms = np.linalg.norm(cols, axis=1)
    if np.any(norms == 0):
        return 0.0
    unit = cols / norms[:, None]
    worst = 0.0
    for a in range(3):
        for b in range(a + 1, 3):
            cos = float(np.clip(abs(unit[a] @ unit[b]), 0.0, 1.0))
            worst = max(worst, 90.0 - float(np.degrees(np.arccos(cos))))
    return worst


def check_volume(
    volume: CTVolume,
    *,
    min_voxels: int = MIN_VOXELS,
    min_extent_mm: float = MIN_EXTENT_MM,
    max_sampled_voxels: int = MAX_SAMPLED_VOXELS,
) -> SanityReport:
    """Check that ``volume`` looks like a CT in HU of a usable size and geometry.

    Args:
        volume: the CT.
        min_voxels: fewer voxels along an axis is ``tiny``.
        min_extent_mm: a smaller field of view along an axis is ``tiny``.
        max_sampled_voxels: the value checks use a strided subsample of about this many voxels.

    Returns:
        A :class:`SanityReport` (``report.ok`` when nothing is wrong).
    """
    found: list[SanityWarning] = []
    values = np.asarray(_sample(volume.array, max_sampled_voxels))
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    if finite.size == 0:
        found.append(SanityWarning("not_hu", "The volume has no finite values: it is not a CT in HU."))
        lo = hi = air = soft = float("nan")
    else:
        lo, hi = float(finite.min()), float(finite.max())
        air = float(np.count_nonzero((finite >= -1100) & (finite <= -900)) / finite.size)
        soft = float(np.count_nonzero((finite >= -100) & (finite <= 150)) / finite.size)
        reasons = []
        if lo > -500:
            reasons.append(f"its lowest value is {lo:g} (a CT in HU has air near -1000)")
        if hi - lo < 300:
            reasons.append(f"its values span only {lo:g}..{hi:g}")
        if air < MIN_AIR_FRACTION and soft < MIN_SOFT_FRACTION:
            reasons.append("it has neither air near -1000 HU nor soft tissue near 0-100 HU")
        if reasons:
            found.append(SanityWarning(
                "not_hu", "This does not look like a CT in Hounsfield units: " + "; ".join(reasons)
                + " (raw scanner values, another modality or a normalised image?); scores will be unreliable."))
    extent = tuple(float(n * s) for n, s in zip(volume.shape, volume.spacing))
    small = [f"{name} {n} voxels / {e:.0f} mm" for name, n, e in zip(_axis_names(volume), volume.shape, extent)
             if n < min_voxels or e < min_extent_mm]
    if small:
        found.append(SanityWarning(
            "tiny", f"The volume is small ({', '.join(small)}; at least {min_voxels} voxels and "
            f"{min_extent_mm:.0f} mm per axis expected): most of the chest is outside it."))
    shear = _shear_deg(volume.affine)
    if shear > MAX_SHEAR_DEG:
        found.append(SanityWarning(
            "sheared", f"The voxel grid is sheared (axes {90 - shear:.1f} degrees apart instead of 90, e.g. a "
            "gantry tilt): it is resampled to a square grid, check the organ masks."))
    report = SanityReport(tuple(found), (lo, hi), air, soft, extent)  # type: ignore[arg-type]
    if found:
        logger.info("input sanity: %s", report.summary())
    return report
