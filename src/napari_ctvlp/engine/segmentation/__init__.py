"""Organ segmentation: one entry point over interchangeable backends.

Backends (registry :data:`BACKENDS`, name -> :class:`Backend`):

* ``"totalsegmentator"`` -- TotalSegmentator ``total`` (fast 3 mm or full 1.5 mm), mapped to our labels;
* ``"builtin"`` -- the project's own model (:mod:`.builtin`);
* ``"threshold"`` -- HU-threshold + geometry fallback that needs no weights.

``backend="auto"`` picks the first available of those, in that order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..anatomy import ORGAN_LABELS, organ_label_names, totalseg_to_organ_lut
from ..volume import CTVolume, ProgressCallback, report
from .stats import ANATOMY_PREFIX, dice, organ_statistics
from .totalseg import SegmentationUnavailable

logger = logging.getLogger(__name__)

__all__ = [
    "ANATOMY_PREFIX",
    "BACKENDS",
    "Backend",
    "BackendReadiness",
    "OrganSegmentation",
    "SegmentationUnavailable",
    "available_backends",
    "backend_readiness",
    "register_default_backends",
    "dice",
    "from_label_file",
    "register_backend",
    "segment",
]

#: ``run(volume, device=, fast=, progress=) -> uint8 organ labels on the input grid``
BackendRun = Callable[..., np.ndarray]
#: ``reason(fast=) -> None if usable, else why not (with the fix)``; must be fast and offline.
BackendCheck = Callable[..., "str | None"]


@dataclass(frozen=True)
class Backend:
    """A registered segmentation backend."""

    name: str
    run: BackendRun
    unavailable_reason: BackendCheck
    description: str = ""
    auto: bool = True  # may backend="auto" pick it (False: only when asked for by name)
    missing: Callable[..., tuple[str, ...]] | None = None  # missing(fast=) -> what is missing, one line each


@dataclass(frozen=True)
class BackendReadiness:
    """Whether a backend can run here, and what is missing (for a picker that says so).

    Attributes:
        name: backend name.
        ready: True when it can run now.
        description: one line on what it is.
        reason: why not (with the fix), None when ready.
        missing: the missing pieces, one line each (for TotalSegmentator: one per model folder).
        auto: whether ``backend="auto"`` may pick it.
    """

    name: str
    ready: bool
    description: str
    reason: str | None = None
    missing: tuple[str, ...] = ()
    auto: bool = True


@dataclass(frozen=True)
class OrganSegmentation:
    """Organ label map on the input grid plus per-organ / per-anatomy statistics.

    Attributes:
        labels: ``uint8`` array, same shape as the input ``volume.array``, values of ``ORGAN_LABELS``.
        names: ``{value: organ name}`` of all organ labels.
        backend: which backend produced it (``"totalsegmentator"``, ``"threshold"``, ``"file"``, ...).
        volume_ml: volume per organ name present, and per anatomy group as ``"anatomy:<name>"``.
        mean_hu: mean HU with the same keys.
        incomplete: same keys; True when the region touches the first/last slice or the FOV edge
            (probably cut off by the scan).
        timings: seconds per step (``"backend"``, ``"statistics"``, ``"total"``).
    """

    labels: np.ndarray
    names: dict[int, str]
    backend: str
    volume_ml: dict[str, float] = field(default_factory=dict)
    mean_hu: dict[str, float] = field(default_factory=dict)
    incomplete: dict[str, bool] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def mask(self, organ: str) -> np.ndarray:
        """Boolean mask of one organ label (by name)."""
        values = [v for v, n in self.names.items() if n == organ]
        if not values:
            raise ValueError(f"unknown organ {organ!r}; known: {', '.join(self.names.values())}")
        return self.labels == values[0]


BACKENDS: dict[str, Backend] = {}
AUTO_ORDER: tuple[str, ...] = ("totalsegmentator", "builtin", "threshold")


def register_backend(
    name: str,
    run: BackendRun,
    unavailable_reason: BackendCheck,
    *,
    description: str = "",
    auto: bool = True,
    missing: Callable[..., tuple[str, ...]] | None = None,
) -> None:
    """Add (or replace) a backend. ``run``, ``unavailable_reason`` and ``missing`` take keyword
    options only; ``auto=False`` keeps it out of ``backend="auto"`` (used only when named);
    ``missing(fast=)`` lists what is missing, one line each (default: the reason)."""
    if not name or name == "auto":
        raise ValueError(f"invalid backend name {name!r}")
    BACKENDS[name] = Backend(name, run, unavailable_reason, description, auto, missing)


def available_backends(*, fast: bool = True) -> dict[str, str | None]:
    """``{backend name: None if usable, else the reason (and the fix)}``; offline and quick."""
    out: dict[str, str | None] = {}
    for name, backend in BACKENDS.items():
        try:
            out[name] = backend.unavailable_reason(fast=fast)
        except Exception as exc:  # a broken optional backend must not break the listing
            out[name] = f"availability check failed: {exc}"
    return out


def backend_readiness(*, fast: bool = True) -> dict[str, BackendReadiness]:
    """``{backend name: BackendReadiness}`` in ``auto`` order first; offline and quick (no weights loaded).

    For TotalSegmentator ``missing`` names each absent or incomplete model folder (see
    :func:`.weights.weights_status`); the fix is ``napari-ctvlp weights download`` (online) or
    ``napari-ctvlp weights import PATH``.
    """
    reasons = available_backends(fast=fast)
    order = [n for n in AUTO_ORDER if n in BACKENDS] + [n for n in BACKENDS if n not in AUTO_ORDER]
    out: dict[str, BackendReadiness] = {}
    for name in order:
        backend, reason = BACKENDS[name], reasons[name]
        missing: tuple[str, ...] = ()
        if reason is not None:
            try:
                missing = tuple(backend.missing(fast=fast)) if backend.missing is not None else ()
            except Exception as exc:  # a broken optional backend must not break the listing
                missing = (f"check failed: {exc}",)
            missing = missing or (reason,)
        out[name] = BackendReadiness(name, reason is None, backend.description, reason, missing, backend.auto)
    return out


def _pick_auto(fast: bool) -> str:
    for name in AUTO_ORDER:
        if name in BACKENDS and BACKENDS[name].auto and BACKENDS[name].unavailable_reason(fast=fast) is None:
            return name
    raise SegmentationUnavailable(f"no segmentation backend is available: {available_backends(fast=fast)}")


def _wrap(volume: CTVolume, labels: np.ndarray, backend: str, timings: dict[str, float]) -> OrganSegmentation:
    t0 = time.perf_counter()
    volume_ml, mean_hu, incomplete = organ_statistics(labels, volume.array, volume.spacing)
    timings = {**timings, "statistics": time.perf_counter() - t0}
    return OrganSegmentation(labels, organ_label_names(), backend, volume_ml, mean_hu, incomplete, timings)


def segment(
    volume: CTVolume,
    *,
    backend: str = "auto",
    device: str = "cpu",
    fast: bool = True,
    progress: ProgressCallback | None = None,
) -> OrganSegmentation:
    """Segment the organs of ``volume`` into our organ labels.

    Args:
        volume: CT in HU.
        backend: ``"auto"``, or a name in :data:`BACKENDS` (see :func:`available_backends`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (model backends only).
        fast: model backends: the faster, coarser model (TotalSegmentator 3 mm instead of 1.5 mm).
        progress: ``progress(done, total, message)``.

    Raises:
        ValueError: unknown backend.
        SegmentationUnavailable: the requested backend cannot run here (message says why and how to fix).
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown segmentation backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    t0 = time.perf_counter()
    name = _pick_auto(fast) if backend == "auto" else backend
    if backend != "auto":
        reason = BACKENDS[name].unavailable_reason(fast=fast)
        if reason is not None:
            raise SegmentationUnavailable(reason)
    logger.info("segmenting %s with backend %s", volume.shape, name)
    report(progress, 0, 1, f"segmentation: {name}")
    labels = BACKENDS[name].run(volume, device=device, fast=fast, progress=progress)
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.shape != volume.shape:
        raise RuntimeError(f"backend {name} returned shape {labels.shape}, expected {volume.shape}")
    result = _wrap(volume, labels, name, {"backend": time.perf_counter() - t0})
    result.timings["total"] = time.perf_counter() - t0
    report(progress, 1, 1, "segmentation: done")
    return result


def _reorient_to(data: np.ndarray, affine: np.ndarray, like: CTVolume, where: str) -> np.ndarray:
    """Voxel-order ``(i, j, k)`` label array with ``affine`` -> display order on ``like``'s grid."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    like_aff = np.asarray(like.affine, dtype=float)
    transform = ornt_transform(io_orientation(affine), io_orientation(like_aff))
    moved = apply_orientation(data, transform)
    moved_aff = affine @ inv_ornt_aff(transform, data.shape)
    if moved.shape != like.shape[::-1]:
        raise ValueError(f"{where}: label grid {data.shape} does not match the CT grid {like.shape[::-1]} (i, j, k)")
    tol = 0.5 * min(like.spacing)
    if not np.allclose(moved_aff, like_aff, atol=tol):
        raise ValueError(f"{where}: label affine differs from the CT affine by more than {tol:.2f} mm")
    return np.ascontiguousarray(moved.transpose(2, 1, 0))


def from_label_file(
    path_or_array: str | Path | np.ndarray,
    *,
    like: CTVolume,
    kind: Literal["organ", "totalseg"] = "organ",
) -> OrganSegmentation:
    """Wrap a user-supplied label map as an :class:`OrganSegmentation` on ``like``'s grid.

    Args:
        path_or_array: a NIfTI label file (reoriented to ``like`` when its axes are permuted or
            flipped, e.g. a TotalSegmentator output for a DICOM series), or an array already in
            ``like.array``'s shape and axis order.
        like: the CT the labels belong to.
        kind: ``"organ"`` (values of ``ORGAN_LABELS``) or ``"totalseg"`` (TotalSegmentator v2
            ``total`` values, mapped with ``totalseg_to_organ_lut``).
    """
    if kind not in ("organ", "totalseg"):
        raise ValueError(f"kind must be 'organ' or 'totalseg', got {kind!r}")
    t0 = time.perf_counter()
    if isinstance(path_or_array, np.ndarray):
        where = "label array"
        data = path_or_array
        if data.shape != like.shape:
            raise ValueError(f"{where}: shape {data.shape} does not match the CT shape {like.shape}")
    else:
        import nibabel as nib

        where = str(path_or_array)
        if not Path(path_or_array).is_file():
            raise ValueError(f"label file {where} does not exist")
        img = nib.load(str(path_or_array))
        raw = np.asarray(img.dataobj)
        if raw.ndim != 3:
            raise ValueError(f"{where}: label image must be 3D, got shape {raw.shape}")
        data = _reorient_to(raw, np.asarray(img.affine, dtype=float), like, where)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{where}: labels must be integers")
        data = rounded
    if data.min() < 0 or data.max() > 255:
        raise ValueError(f"{where}: label values must lie in 0..255, got {data.min()}..{data.max()}")
    data = data.astype(np.uint8)
    if kind == "totalseg":
        labels = totalseg_to_organ_lut()[data]
    else:
        allowed = {0} | {o.value for o in ORGAN_LABELS}
        bad = sorted(set(np.unique(data).tolist()) - allowed)
        if bad:
            raise ValueError(f"{where}: values {bad[:10]} are not organ labels (kind='organ'); use kind='totalseg'?")
        labels = data
    return _wrap(like, labels, "file", {"load": time.perf_counter() - t0})


def register_default_backends() -> None:
    """(Re-)register the shipped backends; ``builtin`` joins ``"auto"`` only when
    ``$NAPARI_CTVLP_BUILTIN_SEG`` is set at this call (see :func:`.builtin.in_auto`)."""
    from . import threshold, totalseg

    register_backend(
        "totalsegmentator",
        lambda volume, *, device="cpu", fast=True, progress=None: totalseg.totalseg_labels(
            volume, device=device, fast=fast, progress=progress
        ),
        lambda *, fast=True: totalseg.unavailable_reason(fast=fast),
        description="TotalSegmentator v2 'total' (fast: 3 mm, else 1.5 mm), mapped to our organ labels",
        missing=lambda *, fast=True: totalseg.missing_pieces(fast=fast),
    )
    register_backend(
        "threshold",
        lambda volume, *, device="cpu", fast=True, progress=None: threshold.threshold_labels(volume, progress=progress),
        lambda *, fast=True: None,
        description="HU thresholds and geometry; no weights; lungs, trachea, bone, spine, contrast aorta, heart, mediastinum, body",
    )
    from . import builtin

    register_backend(
        "builtin",
        lambda volume, *, device="cpu", fast=True, progress=None: builtin.builtin_labels(
            volume, device=device, progress=progress
        ),
        lambda *, fast=True: builtin.unavailable_reason(fast=fast),
        description="the project's small UNETR-style model with MOSMOS pixel-tag maps (phantom-trained weights)",
        auto=builtin.in_auto(),
    )


register_default_backends()
