"""HU-threshold fallback segmentation (no model weights needed).

A geometric heuristic, not a model: body, lungs (left/right), trachea (and bronchi), bone, spine,
the aorta (ascending, descending, abdominal), the esophagus, a mediastinum region and the heart, computed on a
~3 mm block-averaged grid in canonical RAS orientation and brought back to the input grid (nearest
neighbour; the lung border is refined at full resolution). Values are
:data:`napari_ctvlp.engine.anatomy.ORGAN_LABELS`.

Anatomy rules: lungs are thick air regions inside the trunk (not the air between an arm and the
chest wall); the trachea starts where the lungs are narrow, above their widest level (a central
gas bubble at the lung bases is bowel or esophagus), and stops at the carina (the bronchi below
go to their lung); bone has a cortex (contrast-filled heart chambers and vessels away from any
cortical voxel are not bone); the aorta is a round contrast-blood blob in front of / left of the
vertebral body followed from slice to slice, or without contrast a round homogeneous soft-tissue
tube set off by fat or lung in the same place, cut where it divides (:mod:`.tubes`); the ascending
aorta is such a tube in front of the spine above the heart; the esophagus is a smaller tube in
front of the spine, searched only where both lungs flank the mediastinum.
Not found: the arch (it runs across the axial slices), an arterial-phase aorta brighter than
``cortical_hu`` (it reads as bone). There is no real chest-CT reference in ``../shared/realdata``;
the figures of ``benchmarks/segmentation_dice.py`` are on abdominal CTs (lung bases, abdominal
aorta with and without contrast) and synthetic chest phantoms (esophagus, heart).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..anatomy import ORGAN_BY_NAME
from ..volume import CTVolume, ProgressCallback, report
from ._grid import block_factors, block_mean, block_upsample, canonical_grid
from .tubes import (
    AORTA_ASCENDING,
    AORTA_ASCENDING_CONTRAST,
    AORTA_PLAIN,
    ESOPHAGUS,
    find_contrast_aorta,
    track_tube,
)

logger = logging.getLogger(__name__)

L_LEFT = ORGAN_BY_NAME["lung_left"].value
L_RIGHT = ORGAN_BY_NAME["lung_right"].value
TRACHEA = ORGAN_BY_NAME["trachea"].value
HEART = ORGAN_BY_NAME["heart"].value
ESOPHAGUS_LABEL = ORGAN_BY_NAME["esophagus"].value
AORTA = ORGAN_BY_NAME["aorta"].value
MEDIASTINUM = ORGAN_BY_NAME["mediastinum"].value
SPINE = ORGAN_BY_NAME["spine"].value
BONE = ORGAN_BY_NAME["bone"].value
BODY = ORGAN_BY_NAME["body"].value


@dataclass(frozen=True)
class ThresholdParams:
    """Tunable thresholds of the fallback (HU and mm)."""

    target_mm: float = 3.0
    body_hu: float = -500.0
    air_hu: float = -400.0
    airway_hu: float = -950.0
    lung_max_dark_fraction: float = 0.35  # fraction < -950 HU; bowel/stomach gas is mostly pure air
    lung_max_median_hu: float = -550.0  # partial-volume fat/table gaps are around -450 HU
    lung_min_p2_hu: float = -950.0  # 2nd HU percentile: gas pockets have a pure-air core
    lung_min_ml: float = 5.0
    bone_hu: float = 150.0
    bone_min_ml: float = 1.0
    spine_half_width_mm: float = 35.0
    torso_open_mm: float = 9.0  # arms joined to the chest by thinner bridges are not torso
    lung_min_radius_mm: float = 7.0  # thinner air slivers (between an arm and the chest wall) are no lung
    lung_in_torso_fraction: float = 0.5  # air components mostly outside the torso (arm pits) are no lung
    trachea_max_lung_fraction: float = 0.5  # trachea seed only where the lungs are narrow (apex/neck), not at the bases
    cortical_hu: float = 300.0  # bone surface (3 mm blocks); marrow counts as bone only inside or near it
    bone_near_mm: float = 20.0
    blood_hu: tuple[float, float] = (120.0, 600.0)  # contrast-enhanced blood
    aorta_area_mm2: tuple[float, float] = (120.0, 1800.0)  # cross-section of a round aorta
    aorta_min_radius_mm: float = 5.0
    aorta_min_length_mm: float = 15.0


def _components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, np.ndarray]:
    import cc3d

    lab = cc3d.connected_components(mask, connectivity=connectivity)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab, counts


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """2D hole filling in every axial (z) slice."""
    from scipy import ndimage as ndi

    out = np.zeros_like(mask)
    for z in range(mask.shape[2]):
        if mask[:, :, z].any():
            out[:, :, z] = ndi.binary_fill_holes(mask[:, :, z])
    return out


def body_mask(hu: np.ndarray, *, threshold: float = -500.0) -> np.ndarray:
    """Body on a canonical (x, y, z) grid: largest component above ``threshold`` after a thin
    in-plane opening (detaches the table), holes filled per axial slice."""
    from scipy import ndimage as ndi

    mask = hu > threshold
    cross = ndi.generate_binary_structure(2, 1)[:, :, None]
    mask = ndi.binary_opening(mask, structure=cross)
    lab, counts = _components(mask, connectivity=6)
    if counts.max() == 0:
        return np.zeros(hu.shape, dtype=bool)
    return _fill_slices(lab == counts.argmax())


def torso_mask(hu: np.ndarray, body: np.ndarray, spacing, *, threshold: float = -500.0, open_mm: float = 9.0) -> np.ndarray:
    """The trunk without the arms, per axial slice: the largest part of the tissue mask after an
    in-plane opening (arms touching the chest through thin bridges fall off), grown back, holes filled.
    Air between an arm and the chest wall is outside it; the lungs are inside."""
    from scipy import ndimage as ndi

    r = max(1, int(round(open_mm / min(spacing[0], spacing[1]))))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (xx**2 + yy**2) <= r * r
    tissue = (hu > threshold) & body
    out = np.zeros(hu.shape, dtype=bool)
    for z in range(hu.shape[2]):
        sl = tissue[:, :, z]
        if not sl.any():
            continue
        core = ndi.binary_opening(sl, structure=disk)
        lab, n = ndi.label(core)
        if n == 0:
            out[:, :, z] = ndi.binary_fill_holes(sl)
            continue
        largest = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
        out[:, :, z] = ndi.binary_fill_holes(ndi.binary_dilation(largest, structure=disk) & sl)
    return out


def _find_airways(hu: np.ndarray, body: np.ndarray, spacing, p: ThresholdParams) -> np.ndarray:
    """Trachea + main bronchi: pure-air region grown from a central air seed in the upper slices."""
    from scipy import ndimage as ndi

    zs = np.nonzero(body.any(axis=(0, 1)))[0]
    if zs.size == 0:
        return np.zeros(hu.shape, dtype=bool)
    voxel_area = spacing[0] * spacing[1]
    dark = (hu < p.airway_hu) & body
    seed = None
    z_stop = zs[-1] - int(0.4 * (zs[-1] - zs[0] + 1))
    for z in range(zs[-1], z_stop, -1):  # from the top slice down
        xs = np.nonzero(body[:, :, z].any(axis=1))[0]
        if xs.size == 0:
            continue
        mid, half = (xs[0] + xs[-1]) / 2.0, (xs[-1] - xs[0]) / 2.0
        lab, n = ndi.label(dark[:, :, z])
        for i in range(1, n + 1):
            cx, _cy = np.argwhere(lab == i).mean(axis=0)
            area = (lab == i).sum() * voxel_area
            if 80.0 <= area <= 700.0 and abs(cx - mid) < 0.25 * half:
                seed = (lab == i, z)
                break
        if seed is not None:
            break
    if seed is None:
        return np.zeros(hu.shape, dtype=bool)
    for thr in (p.airway_hu, -975.0, -990.0):
        lab, _ = _components((hu < thr) & body, connectivity=6)
        ids = np.unique(lab[:, :, seed[1]][seed[0]])
        ids = ids[ids > 0]
        if ids.size == 0:
            return np.zeros(hu.shape, dtype=bool)
        airway = np.isin(lab, ids)
        if airway.sum() * np.prod(spacing) / 1000.0 < 250.0:  # no leak into the parenchyma
            return ndi.binary_dilation(airway) & (hu < p.air_hu)
    return np.zeros(hu.shape, dtype=bool)


def _check_trachea(airways: np.ndarray, lungs: np.ndarray, p: ThresholdParams) -> tuple[np.ndarray, np.ndarray]:
    """``(trachea, bronchi)`` of an airway tree, or empty masks when it cannot be the trachea.

    The trachea starts where the lungs are narrow (apex, neck) above their widest level: at the
    lung bases of an abdominal scan a central gas bubble is bowel or esophagus, not trachea. Below
    the carina (the highest slice from which the airway is two separate parts) it is bronchi.
    """
    from scipy import ndimage as ndi

    empty = np.zeros(airways.shape, dtype=bool)
    zs = np.nonzero(airways.any(axis=(0, 1)))[0]
    if zs.size == 0:
        return empty, empty
    area = lungs.sum(axis=(0, 1)).astype(float)
    if area.max() > 0:
        z_top = zs[-1]
        z_widest = int(area.argmax())
        if z_top <= z_widest or area[z_top] > p.trachea_max_lung_fraction * area.max():
            logger.debug("airway candidate rejected: top slice %d at %.0f%% of the widest lung slice %d",
                         z_top, 100 * area[z_top] / area.max(), z_widest)
            return empty, empty
    carina = None
    for z in range(zs[-1], zs[0] - 1, -1):  # the first slice (from the top) where two parts run on down
        lab, n = ndi.label(airways[:, :, z])
        if n >= 2 and np.sort(np.bincount(lab.ravel())[1:])[-2] >= 2:
            carina = z
            break
    if carina is None:
        return airways, empty
    trachea = airways.copy()
    trachea[:, :, : carina + 1] = False
    bronchi = airways & ~trachea
    return trachea, bronchi


def _split_lungs(lung: np.ndarray, midline_x: float) -> np.ndarray:
    """Label lung voxels 1 (left) / 2 (right); canonical +x is the patient's right."""
    from scipy import ndimage as ndi

    out = np.zeros(lung.shape, dtype=np.uint8)
    lab, counts = _components(lung)
    total = counts.sum()
    if total == 0:
        return out
    for comp in np.nonzero(counts)[0]:
        m = lab == comp
        xs = np.nonzero(m)[0]
        spans = xs.min() < midline_x - 3 and xs.max() > midline_x + 3 and counts[comp] > 0.3 * total
        if not spans:
            out[m] = L_RIGHT if xs.mean() > midline_x else L_LEFT
            continue
        # fused lungs: erode until two large parts appear, then grow them back (nearest part)
        seeds = None
        eroded = m
        for _ in range(6):
            eroded = ndi.binary_erosion(eroded)
            elab, ecounts = _components(eroded)
            order = np.argsort(ecounts)[::-1]
            if len(order) > 2 and ecounts[order[1]] > 0.15 * ecounts[order[0]]:
                seeds = (elab == order[0]) | (elab == order[1])
                seeds = np.where(seeds, elab, 0)
                break
        if seeds is None:  # cut at the midline
            side = np.arange(m.shape[0])[:, None, None] > midline_x
            out[m & side] = L_RIGHT
            out[m & ~side] = L_LEFT
            continue
        _, idx = ndi.distance_transform_edt(seeds == 0, return_indices=True)
        nearest = seeds[tuple(idx)]
        ids = [i for i in np.unique(seeds) if i > 0]
        cx = {i: np.nonzero(seeds == i)[0].mean() for i in ids}
        right_id = max(ids, key=lambda i: cx[i])
        out[m & (nearest == right_id)] = L_RIGHT
        out[m & (nearest != right_id)] = L_LEFT
    return out


def _select_lungs(hu, air, p: ThresholdParams, voxel_ml: float, torso: np.ndarray | None = None,
                  spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    from scipy import ndimage as ndi

    lab, counts = _components(air, connectivity=6)  # 6: no leaks across a thin diaphragm
    candidates = np.nonzero(counts * voxel_ml >= p.lung_min_ml)[0]
    if candidates.size == 0:
        return np.zeros(air.shape, dtype=bool)
    radius = ndi.maximum(ndi.distance_transform_edt(air, sampling=spacing), lab, candidates)
    keep = []
    for comp, r in zip(candidates, np.atleast_1d(radius)):
        if torso is not None and torso[lab == comp].mean() < p.lung_in_torso_fraction:
            logger.debug("air component %d: %.1f ml, outside the trunk (arm pit?)", comp, counts[comp] * voxel_ml)
            continue
        if r < p.lung_min_radius_mm:
            logger.debug("air component %d: %.1f ml, a sliver (%.1f mm thick)", comp, counts[comp] * voxel_ml, 2 * r)
            continue
        vals = hu[lab == comp]
        dark = float((vals < -950.0).mean())
        med = float(np.median(vals))
        big = counts[comp] * voxel_ml > 500.0  # a lung, whatever its texture (emphysema)
        p2 = float(np.percentile(vals, 2))
        textured = dark < p.lung_max_dark_fraction and med < p.lung_max_median_hu and p2 > p.lung_min_p2_hu
        if big or textured:
            keep.append(comp)
        logger.debug("air component %d: %.1f ml, dark %.2f, median %.0f, p2 %.0f HU", comp, counts[comp] * voxel_ml, dark, med, p2)
    return np.isin(lab, keep) if keep else np.zeros(air.shape, dtype=bool)


def _cortical_core(hu: np.ndarray, p: ThresholdParams) -> np.ndarray:
    """Bone interiors: voxels above the cortical threshold with the marrow they enclose (per axial slice)."""
    from scipy import ndimage as ndi

    cortical = hu > p.cortical_hu
    return _fill_slices(ndi.binary_closing(cortical, iterations=1) | cortical)


def _mediastinum_and_heart(hu, body, lungs, excluded, spine, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Mediastinum: per axial row, the tissue between the left lung's medial edge and the right
    lung's (canonical +x = patient right), anterior to the spine; heart: its largest soft blob."""
    from scipy import ndimage as ndi

    region = np.zeros(hu.shape, dtype=bool)
    nx = hu.shape[0]
    x = np.arange(nx)[:, None, None]
    left, right = lungs == L_LEFT, lungs == L_RIGHT
    if not (left.any() and right.any()):
        return region, region
    left_edge = np.where(left, x, -1).max(axis=0)  # (y, z): most medial left-lung voxel
    right_edge = np.where(right, x, nx).min(axis=0)  # (y, z): most medial right-lung voxel
    ok = (left_edge >= 0) & (right_edge < nx) & (right_edge > left_edge)
    region = (x > left_edge[None]) & (x < right_edge[None]) & ok[None]
    spine_y = np.nonzero(spine.any(axis=(0, 2)))[0]
    y_back = int(spine_y.mean()) if spine_y.size else 0
    region[:, :y_back, :] = False
    region &= body & ~excluded & (hu > -200.0) & (hu < 400.0)
    # only slices at heart level, where the lungs fill a good part of the chest (not the lung bases)
    lung_frac = (lungs > 0).sum(axis=(0, 1)) / np.maximum(body.sum(axis=(0, 1)), 1)
    region[:, :, lung_frac < 0.15] = False
    both = np.nonzero(region.any(axis=(0, 1)))[0]
    if both.size == 0:
        return region, region
    # heart: largest soft-tissue / blood blob in the lower two thirds of the lungs' extent
    z0, z1 = both[0], both[-1]
    upper = z0 + int(0.66 * (z1 - z0 + 1))
    soft = region & (hu > -20.0)
    soft[:, :, upper:] = False
    r = max(1, int(round(4.0 / min(spacing))))
    soft = ndi.binary_opening(soft, structure=np.ones((2 * r + 1,) * 2 + (1,), dtype=bool))
    lab, counts = _components(soft, connectivity=6)
    heart = lab == counts.argmax() if counts.max() > 0 else np.zeros(hu.shape, dtype=bool)
    if heart.sum() * np.prod(spacing) / 1000.0 < 50.0:  # too small to be a heart
        heart[:] = False
    return region, heart


def threshold_labels(
    volume: CTVolume, *, params: ThresholdParams | None = None, progress: ProgressCallback | None = None
) -> np.ndarray:
    """Organ labels (uint8, ``volume.array`` shape) from HU thresholds and geometry.

    Args:
        volume: CT in HU.
        params: thresholds; defaults to :class:`ThresholdParams`.
        progress: ``progress(done, total, message)``.
    """
    p = params or ThresholdParams()
    grid = canonical_grid(volume)
    total = 6
    report(progress, 0, total, "threshold: resampling")
    full = grid.to_canonical(volume.array)
    factors = block_factors(grid.spacing, p.target_mm)
    hu = block_mean(full, factors)
    spacing = tuple(s * f for s, f in zip(grid.spacing, factors))
    voxel_ml = float(np.prod(spacing)) / 1000.0

    report(progress, 1, total, "threshold: body")
    body = body_mask(hu, threshold=p.body_hu)
    labels = np.where(body, BODY, 0).astype(np.uint8)

    report(progress, 2, total, "threshold: airways and lungs")
    torso = torso_mask(hu, body, spacing, threshold=p.body_hu, open_mm=p.torso_open_mm)
    airways = _find_airways(hu, body, spacing, p)
    air = (hu < p.air_hu) & body & ~airways
    lung = _select_lungs(hu, air, p, voxel_ml, torso, spacing)
    trachea, bronchi = _check_trachea(airways, lung, p)  # gas that cannot be trachea stays body
    airways = trachea | bronchi
    xs = np.nonzero(body.any(axis=(1, 2)))[0]
    midline = (xs[0] + xs[-1]) / 2.0 if xs.size else hu.shape[0] / 2.0

    report(progress, 3, total, "threshold: bone and spine")
    from scipy import ndimage as ndi

    bone_lab, bone_counts = _components((hu > p.bone_hu) & body)
    bone = np.isin(bone_lab, np.nonzero(bone_counts * voxel_ml >= p.bone_min_ml)[0]) & (bone_lab > 0)
    # bone has a cortex: contrast-filled blood (heart chambers, aorta) above bone_hu but away from
    # any cortical voxel is not bone; marrow enclosed by the cortex or within bone_near_mm of it is
    cortical = hu > p.cortical_hu
    bone_core = _cortical_core(hu, p)
    if cortical.any():
        near = ndi.distance_transform_edt(~cortical, sampling=spacing) <= p.bone_near_mm
        bone &= near | bone_core
    else:
        bone[:] = False
    bone = _fill_slices(ndi.binary_closing(bone, iterations=1) | bone)  # marrow inside the cortex (and the spinal canal inside the arch)
    bone_lab, bone_counts = _components(bone)
    spine = np.zeros(hu.shape, dtype=bool)
    if bone.any():
        # spine: the bone component with most voxels near the posterior midline
        ys = np.nonzero(body.any(axis=(0, 2)))[0]
        half = p.spine_half_width_mm / spacing[0]
        near = np.zeros(hu.shape, dtype=bool)
        near[int(max(0, midline - half)) : int(midline + half) + 1, : ys[0] + int(0.5 * (ys[-1] - ys[0])), :] = True
        hits = np.bincount(bone_lab[bone & near], minlength=bone_counts.size)
        if hits.max() > 0:
            spine = (bone_lab == hits.argmax()) & near

    aorta = find_contrast_aorta(hu, body, bone_core, spine, spacing, p)
    if not aorta.any():  # no contrast: the aorta is a round soft-tissue tube in fat / against the lung
        aorta = track_tube(hu, spine, body & ~bone & ~lung & ~airways, spacing, AORTA_PLAIN)
    bone &= ~aorta
    spine &= ~aorta

    if lung.any():
        split = _split_lungs(lung | bronchi, midline)
        lung_full = np.zeros(hu.shape, dtype=np.uint8)
        for value in (L_LEFT, L_RIGHT):  # fill vessels per slice, per lung
            lung_full[_fill_slices(split == value) & ~bone] = value
    else:
        lung_full = np.zeros(hu.shape, dtype=np.uint8)

    report(progress, 4, total, "threshold: mediastinum and heart")
    excluded = (lung_full > 0) | bone | airways | aorta
    mediastinum, heart = _mediastinum_and_heart(hu, body, lung_full, excluded, spine, spacing)
    # the esophagus: only at chest levels (lungs beside the mediastinum), never below the hiatus
    chest = ((lung_full == L_LEFT).any(axis=(0, 1)) & (lung_full == L_RIGHT).any(axis=(0, 1))
             & ((lung_full > 0).sum(axis=(0, 1)) >= 0.15 * np.maximum(body.sum(axis=(0, 1)), 1)))
    esophagus = track_tube(hu, spine, body & ~excluded, spacing, ESOPHAGUS, slices=chest)
    heart &= ~aorta & ~esophagus
    if aorta.any() and heart.any():  # the ascending aorta: a tube above the heart, in front of the spine
        contrast = float(np.median(hu[aorta])) > p.blood_hu[0]
        above = np.arange(hu.shape[2]) > np.nonzero(heart.any(axis=(0, 1)))[0].max()
        rule = AORTA_ASCENDING_CONTRAST if contrast else AORTA_ASCENDING
        aorta = aorta | track_tube(hu, spine, body & ~excluded & ~heart & ~esophagus, spacing, rule,
                                   slices=chest & above)

    labels[bone] = BONE
    labels[spine] = SPINE
    labels[mediastinum] = MEDIASTINUM
    labels[heart] = HEART
    labels[aorta] = AORTA
    labels[esophagus] = ESOPHAGUS_LABEL
    labels[trachea] = TRACHEA
    labels[lung_full > 0] = lung_full[lung_full > 0]

    report(progress, 5, total, "threshold: back to the input grid")
    out = block_upsample(labels, factors, grid.shape)
    if factors != (1, 1, 1):
        out = _refine_lung_border(out, labels, full, factors, grid.shape, p)
    report(progress, total, total, "threshold: done")
    return grid.from_canonical(out)


def _refine_lung_border(out, small, full_hu, factors, shape, p: ThresholdParams) -> np.ndarray:
    """At full resolution, the lung border follows the HU threshold instead of the block edges.

    Only the voxels of blocks on the lung surface are visited (sparse: fast on 512x512x300).
    """
    from scipy import ndimage as ndi

    lung_small = np.isin(small, (L_LEFT, L_RIGHT))
    if not lung_small.any():
        return out
    border = ndi.binary_dilation(lung_small) & ~ndi.binary_erosion(lung_small)
    border &= np.isin(small, (L_LEFT, L_RIGHT, BODY))  # never bone/heart/airways/outside
    side_small = np.where(lung_small, small, ndi.grey_dilation(np.where(lung_small, small, 0), size=3))
    blocks = np.argwhere(border & (side_small > 0))
    if blocks.size == 0:
        return out
    offsets = np.stack(np.meshgrid(*[np.arange(f) for f in factors], indexing="ij"), -1).reshape(-1, 3)
    coords = (blocks[:, None, :] * np.asarray(factors) + offsets[None]).reshape(-1, 3)
    side = np.repeat(side_small[tuple(blocks.T)], len(offsets))
    inside = (coords < np.asarray(shape)).all(axis=1)
    coords, side = coords[inside], side[inside]
    idx = tuple(coords.T)
    is_air = full_hu[idx] < p.air_hu
    current = out[idx]
    new = np.where(is_air, side, np.where(np.isin(current, (L_LEFT, L_RIGHT)), BODY, current)).astype(np.uint8)
    out[idx] = new
    return out
