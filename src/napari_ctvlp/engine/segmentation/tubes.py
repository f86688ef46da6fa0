"""Tubular organs of the trunk followed slice by slice: the aorta with and without contrast, the esophagus.

Used by the HU-threshold fallback on its canonical ~3 mm grid (axes x, y, z = patient's right,
anterior, superior). A tube is found the way a reader scrolls through axial slices: in every
slice, round homogeneous disks of the tube's HU and calibre, in the tube's place relative to the
vertebral body, set off from their surroundings (fat or lung around most of the rim); then the
one chain of such disks through consecutive slices that moves smoothly and is long enough
(dynamic programming over the best few candidates per slice).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TubeRule:
    """What a tube's cross-section looks like and where it lies (HU, mm).

    Attributes:
        radii_mm: calibres tried (disk radius).
        inner_hu: allowed mean HU inside the disk.
        max_inner_std: largest HU standard deviation inside the disk (blood is homogeneous).
        dark_hu: rim voxels below this are "set off" (fat, lung, air).
        min_rim_dark: smallest fraction of the rim below ``dark_hu``.
        dx_mm: window of the centre, left-right, from the vertebral body's centre (+x patient right).
        dy_mm: window of the centre, front-back, from the vertebral body's anterior edge (+y anterior).
        max_step_mm: largest in-plane move of the centre between consecutive slices.
        min_length_mm: shortest chain kept.
        grow_hu: HU range of the voxels labelled inside the chosen disk (slightly grown).
        max_drift_mm: the chain is cut where its centre moves farther than this from the median
            centre of the six slices above (None: no cut).
    """

    radii_mm: tuple[float, ...]
    inner_hu: tuple[float, float]
    max_inner_std: float
    dark_hu: float
    min_rim_dark: float
    dx_mm: tuple[float, float]
    dy_mm: tuple[float, float]
    max_step_mm: float
    min_length_mm: float
    grow_hu: tuple[float, float]
    max_drift_mm: float | None = None


#: the aorta without contrast: blood 20-60 HU, 16-32 mm wide, in fat or against the left lower lobe,
#: left of and in front of the vertebral body (descending thoracic and abdominal aorta)
AORTA_PLAIN = TubeRule(radii_mm=(8.0, 10.0, 12.0, 14.0, 16.0), inner_hu=(10.0, 100.0), max_inner_std=30.0,
                       dark_hu=-30.0, min_rim_dark=0.2, dx_mm=(-42.0, 5.0), dy_mm=(-12.0, 42.0),
                       max_step_mm=7.0, min_length_mm=30.0, grow_hu=(-10.0, 130.0), max_drift_mm=10.0)
#: the ascending aorta without contrast: 20-36 mm wide, in front of and right of the spine, searched above
#: the heart (it leaves the heart upwards, in front of the right pulmonary artery)
AORTA_ASCENDING = TubeRule(radii_mm=(10.0, 12.0, 14.0, 16.0, 18.0), inner_hu=(10.0, 100.0), max_inner_std=30.0,
                           dark_hu=-30.0, min_rim_dark=0.2, dx_mm=(-15.0, 45.0), dy_mm=(30.0, 100.0),
                           max_step_mm=7.0, min_length_mm=30.0, grow_hu=(-10.0, 130.0), max_drift_mm=10.0)
#: the same with contrast-enhanced blood
AORTA_ASCENDING_CONTRAST = dataclasses.replace(AORTA_ASCENDING, inner_hu=(120.0, 600.0), max_inner_std=60.0,
                                               grow_hu=(100.0, 700.0))
#: the esophagus: soft tissue 12-22 mm wide, often with an air dot, between the airway / left atrium and
#: the spine, a little left of the midline; only where the lungs flank the mediastinum
ESOPHAGUS = TubeRule(radii_mm=(6.0, 8.0, 10.0), inner_hu=(-250.0, 90.0), max_inner_std=400.0,
                     dark_hu=-30.0, min_rim_dark=0.25, dx_mm=(-30.0, 15.0), dy_mm=(-5.0, 35.0),
                     max_step_mm=6.0, min_length_mm=30.0, grow_hu=(-1024.0, 120.0), max_drift_mm=12.0)


#: slices a chain may skip between two disks, and what each skipped slice costs (in rim-darkness units)
MAX_GAP = 2
GAP_COST = 0.3


def _kernels(r_mm: float, spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised disk (radius ``r``) and rim (``r + 1`` to ``r + 7`` mm) kernels on an in-plane grid."""
    reach = r_mm + 7.0
    hx, hy = int(np.ceil(reach / spacing[0])), int(np.ceil(reach / spacing[1]))
    xx, yy = np.meshgrid(np.arange(-hx, hx + 1) * spacing[0], np.arange(-hy, hy + 1) * spacing[1], indexing="ij")
    d = np.hypot(xx, yy)
    disk = (d <= r_mm).astype(float)
    rim = ((d > r_mm + 1.0) & (d <= reach)).astype(float)
    return disk / disk.sum(), rim / rim.sum()


def _candidates(hu: np.ndarray, z: int, spine2d: np.ndarray, allowed2d: np.ndarray, rule: TubeRule,
                spacing, kernels: list[tuple[float, np.ndarray, np.ndarray]], top: int = 6
                ) -> list[tuple[float, float, float, float]]:
    """Best ``(score, cx, cy, r_mm)`` disks of one slice (score: rim darkness); ``kernels``:
    ``(r_mm, disk, rim)`` per radius of the rule (:func:`_kernels`)."""
    from scipy import ndimage as ndi

    sx, sy = float(spacing[0]), float(spacing[1])
    pts = np.argwhere(spine2d)
    spx = pts[:, 0].mean()
    front = pts[:, 1].max()
    x = (np.arange(hu.shape[0]) - spx)[:, None] * sx
    y = (np.arange(hu.shape[1]) - front)[None, :] * sy
    window = (x >= rule.dx_mm[0]) & (x <= rule.dx_mm[1]) & (y >= rule.dy_mm[0]) & (y <= rule.dy_mm[1]) & allowed2d
    if not window.any():
        return []
    sl = hu[:, :, z].astype(np.float64)
    sq = sl * sl
    dark = (sl < rule.dark_hu).astype(np.float64)
    out: list[tuple[float, float, float, float]] = []
    for r, disk, rim in kernels:
        mean = ndi.correlate(sl, disk, mode="nearest")
        std = np.sqrt(np.maximum(ndi.correlate(sq, disk, mode="nearest") - mean * mean, 0.0))
        rim_dark = ndi.correlate(dark, rim, mode="nearest")
        # the whole disk must be allowed tissue (no bone, lung or another tube inside it)
        inside = ndi.correlate((~allowed2d).astype(np.float64), disk, mode="constant") < 0.05
        ok = (window & inside & (mean >= rule.inner_hu[0]) & (mean <= rule.inner_hu[1])
              & (std <= rule.max_inner_std) & (rim_dark >= rule.min_rim_dark))
        if not ok.any():
            continue
        score = np.where(ok, rim_dark, -1.0)
        peaks = ok & (score == ndi.maximum_filter(score, size=3))
        for cx, cy in np.argwhere(peaks):
            out.append((float(score[cx, cy]), float(cx), float(cy), r))
    out.sort(reverse=True)
    return out[:top]


def _straight_run(nodes: list[tuple[int, float, float, float]], rule: TubeRule, spacing
                  ) -> list[tuple[int, float, float, float]]:
    """The longest part of a chain (bottom to top) that runs straight: it is cut where two
    consecutive centres both lie farther than ``max_drift_mm`` from the median centre of the six
    slices above them (a tube that divides, the aortic bifurcation, or a chain that slipped onto a
    neighbour such as the psoas); one stray centre is tolerated."""
    if rule.max_drift_mm is None or len(nodes) < 3:
        return nodes
    sx, sy = float(spacing[0]), float(spacing[1])
    down = nodes[::-1]  # from the top down

    def drift(i: int, ref: list[tuple[int, float, float, float]]) -> float:
        mx, my = np.median([n[1] for n in ref]), np.median([n[2] for n in ref])
        return float(np.hypot((down[i][1] - mx) * sx, (down[i][2] - my) * sy))

    runs, run = [], [down[0]]
    for i in range(1, len(down)):
        ref = run[-6:]
        if i + 1 < len(down) and drift(i, ref) > rule.max_drift_mm and drift(i + 1, ref) > rule.max_drift_mm:
            runs.append(run)
            run = []
        run.append(down[i])
    runs.append(run)
    return sorted(max(runs, key=len))


def track_tube(hu: np.ndarray, spine: np.ndarray, allowed: np.ndarray, spacing, rule: TubeRule, *,
               slices: np.ndarray | None = None) -> np.ndarray:
    """Mask of the tube described by ``rule`` (empty when no chain is long enough).

    Args:
        hu: canonical (x, y, z) HU grid.
        spine: the vertebral column (the tube's position is relative to it, per slice).
        allowed: voxels the tube may occupy (body without bone, lungs, airways, other tubes).
        spacing: voxel size in mm.
        rule: the tube's look and place.
        slices: boolean ``(nz,)``: the slices searched (default: every slice with spine).
    """
    nz = hu.shape[2]
    sx, sy = float(spacing[0]), float(spacing[1])
    search = spine.any(axis=(0, 1)) if slices is None else (np.asarray(slices, dtype=bool) & spine.any(axis=(0, 1)))
    kernels = [(r, *_kernels(r, (sx, sy))) for r in rule.radii_mm]
    per_slice = [(_candidates(hu, z, spine[:, :, z], allowed[:, :, z], rule, spacing, kernels) if search[z] else [])
                 for z in range(nz)]
    # best chain through the slices: each disk gains its score, a skipped slice (a disk the rules
    # missed) costs GAP_COST, chains start anywhere
    best: list[list[tuple[float, int, int]]] = []  # per slice, per candidate: (score, parent z, parent index)
    for z, cands in enumerate(per_slice):
        row = []
        for score, cx, cy, _r in cands:
            gain, parent = (score, (-1, -1))
            for gap in range(1, MAX_GAP + 2):
                zp = z - gap
                if zp < 0:
                    break
                for j, (_s, px, py, _pr) in enumerate(per_slice[zp]):
                    g = best[zp][j][0] + score - GAP_COST * (gap - 1)
                    if np.hypot((px - cx) * sx, (py - cy) * sy) <= rule.max_step_mm * gap and g > gain:
                        gain, parent = g, (zp, j)
            row.append((gain, *parent))
        best.append(row)
    end = max(((row[i][0], z, i) for z, row in enumerate(best) for i in range(len(row))), default=None)
    out = np.zeros(hu.shape, dtype=bool)
    if end is None:
        return out
    _, z, i = end
    chain = []
    while i >= 0:
        chain.append((z, i))
        z, i = best[z][i][1], best[z][i][2]
    if (chain[0][0] - chain[-1][0] + 1) * float(spacing[2]) < rule.min_length_mm:
        logger.debug("tube chain of %d slices: too short", len(chain))
        return out
    xs = np.arange(hu.shape[0])[:, None] * sx
    ys = np.arange(hu.shape[1])[None, :] * sy
    nodes = _straight_run([(z, *per_slice[z][i][1:]) for z, i in reversed(chain)], rule, spacing)
    if (nodes[-1][0] - nodes[0][0] + 1) * float(spacing[2]) < rule.min_length_mm:
        return out
    for (z0, x0, y0, r0), (z1, x1, y1, r1) in zip(nodes, nodes[1:] + nodes[-1:]):
        for z in range(z0, max(z0 + 1, z1)):  # skipped slices: the disk in between
            w = 0.0 if z1 == z0 else (z - z0) / (z1 - z0)
            cx, cy, r = x0 + w * (x1 - x0), y0 + w * (y1 - y0), r0 + w * (r1 - r0)
            disk = np.hypot(xs - cx * sx, ys - cy * sy) <= r + 1.5
            sl = hu[:, :, z]
            out[:, :, z] = disk & allowed[:, :, z] & (sl >= rule.grow_hu[0]) & (sl <= rule.grow_hu[1])
    return out


def find_contrast_aorta(hu: np.ndarray, body: np.ndarray, bone_core: np.ndarray, spine: np.ndarray, spacing,
                        p: Any) -> np.ndarray:
    """Contrast-filled descending / abdominal aorta: a round blood blob (``blood_hu``) in front of or
    to the left of the vertebral body, followed from slice to slice (centre moving < 10 mm).

    Needs contrast: without it the aorta's blood is soft tissue by HU and nothing is returned
    (:data:`AORTA_PLAIN` finds it then). ``p``: the fallback's ``ThresholdParams`` (``blood_hu``,
    ``cortical_hu``, ``aorta_area_mm2``, ``aorta_min_radius_mm``, ``aorta_min_length_mm``).
    """
    from scipy import ndimage as ndi

    empty = np.zeros(hu.shape, dtype=bool)
    if not spine.any():
        return empty
    sx, sy = float(spacing[0]), float(spacing[1])
    blood = body & ~bone_core & (hu > p.blood_hu[0]) & (hu < p.blood_hu[1])
    cortical = hu > p.cortical_hu
    r = max(1, int(round(p.aorta_min_radius_mm / min(sx, sy) / 2)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (xx**2 + yy**2) <= r * r
    x = np.arange(hu.shape[0])[:, None]
    y = np.arange(hu.shape[1])[None, :]
    per_slice: list[list[tuple[float, float, np.ndarray]]] = []
    for z in range(hu.shape[2]):
        cands: list[tuple[float, float, np.ndarray]] = []
        sp = spine[:, :, z]
        if sp.any() and blood[:, :, z].any():
            spx, spy = np.argwhere(sp).mean(axis=0)
            front = np.argwhere(sp)[:, 1].max()  # anterior edge of the spine (+y anterior)
            opened = ndi.binary_opening(blood[:, :, z], structure=disk)
            lab, n = ndi.label(opened)
            for i in range(1, n + 1):
                m = lab == i
                area = m.sum() * sx * sy
                if not p.aorta_area_mm2[0] <= area <= p.aorta_area_mm2[1]:
                    continue
                radius = ndi.distance_transform_edt(m, sampling=(sx, sy)).max()
                if radius < p.aorta_min_radius_mm or area > 2.2 * np.pi * radius**2:  # round, not a chamber
                    continue
                ring = ndi.binary_dilation(m, iterations=2) & ~m
                if (cortical[:, :, z][ring]).mean() > 0.25:  # mostly walled in by cortex: marrow
                    continue
                cx, cy = float((x * m).sum() / m.sum()), float((y * m).sum() / m.sum())
                dx_mm, dy_mm = (cx - spx) * sx, (cy - front) * sy
                if -60.0 <= dx_mm <= 25.0 and -35.0 <= dy_mm <= 45.0:  # left/front of the vertebral body
                    cands.append((cx, cy, m))
        per_slice.append(cands)
    # longest chain of candidates with centres < 10 mm apart in consecutive slices
    best: list[tuple[int, np.ndarray]] = []
    chains: list[list[tuple[int, float, float, np.ndarray]]] = []
    for z, cands in enumerate(per_slice):
        grown = []
        for cx, cy, m in cands:
            prev = [c for c in chains if c[-1][0] == z - 1
                    and np.hypot((c[-1][1] - cx) * sx, (c[-1][2] - cy) * sy) < 10.0]
            chain = (max(prev, key=len) if prev else []) + [(z, cx, cy, m)]
            grown.append(chain)
        chains = [c for c in chains if c[-1][0] >= z - 1] + grown
        for c in grown:
            if len(c) > len(best):
                best = [(zz, mm) for zz, _, _, mm in c]
    if len(best) * spacing[2] < p.aorta_min_length_mm:
        return empty
    out = np.zeros(hu.shape, dtype=bool)
    for z, m in best:
        out[:, :, z] = ndi.binary_dilation(m, structure=disk) & blood[:, :, z]
    return out
