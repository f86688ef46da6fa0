"""Synthetic chest-CT phantoms with organ labels, located abnormalities and CT-RATE style reports.

Geometry and orientation
    ``Phantom.volume.array`` is in display order ``(z, y, x)`` = (slice, row, column) of axial
    slices. Columns run towards the patient's **left**, rows towards **posterior**, slices
    towards **superior**: the voxel axes ``(i, j, k)`` are ``L, P, S`` (DICOM's LPS), so the RAS
    affine is ``diag(-sx, -sy, sz)`` and a radiologist viewing a slice (row 0 at the top) sees
    the patient's left lung on the image's right side, anterior at the top.

Intensities (HU)
    air -1000, subcutaneous/mediastinal fat -100..-90, muscle and skin 40-50, lung -860 with a
    smooth texture and a posterior (dependent) gradient, bronchi air with soft-tissue walls,
    rib/sternum/vertebra cortex 800-1000 with marrow 250-350, disc 80, spinal canal 15.
    Blood is 40 HU without contrast; with contrast (half of the phantoms, drawn per patient and
    stated in the technique text) heart chambers, aorta and vessels are 150-250 HU and the
    myocardium ~100 HU. Gaussian noise with sigma 10-20 HU is added last.

Labels
    ``organs`` holds :data:`~napari_ctvlp.engine.anatomy.ORGAN_LABELS` values (lobes 3-7, ...;
    0 outside the body). Lung lobe labels cover the whole pleural cavity, so a pleural effusion
    keeps the label of the lobe it compresses; a pericardial effusion is labelled heart, a
    hiatal hernia esophagus, enlarged lymph nodes mediastinum. ``lesions`` holds ``index + 1``
    of the abnormality (in :data:`~napari_ctvlp.engine.anatomy.ABNORMALITY_NAMES` order) that
    painted each voxel last.

Determinism
    The anatomy, each abnormality and the noise draw from separate random streams derived from
    ``seed``, so forcing one abnormality on or off leaves the rest of the phantom unchanged
    (except where the finding displaces anatomy, e.g. cardiomegaly).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES
from napari_ctvlp.engine.volume import CTVolume

from .context import (
    AORTA, BODY, BONE, ESOPHAGUS, HEART, MEDIASTINUM, SPINE, TRACHEA, PhantomContext, bronchial_tree,
    paint_airways, paint_tube,
)
from .lesions import PAINTERS
from .report import write_report
from .shapes import Canvas, SmoothField, ellipsoid, polyline, rotation_z, segment

logger = logging.getLogger(__name__)

#: Approximate CT-RATE prevalences used when an abnormality is drawn at random.
PREVALENCE: dict[str, float] = {
    "Medical material": 0.10, "Arterial wall calcification": 0.28, "Cardiomegaly": 0.10,
    "Pericardial effusion": 0.07, "Coronary artery wall calcification": 0.25,
    "Hiatal hernia": 0.14, "Lymphadenopathy": 0.25, "Emphysema": 0.20, "Atelectasis": 0.25,
    "Lung nodule": 0.45, "Lung opacity": 0.40, "Pulmonary fibrotic sequela": 0.26,
    "Pleural effusion": 0.12, "Mosaic attenuation pattern": 0.08,
    "Peribronchial thickening": 0.10, "Consolidation": 0.18, "Bronchiectasis": 0.10,
    "Interlobular septal thickening": 0.08,
}
_AGE_DEPENDENT = ("Arterial wall calcification", "Coronary artery wall calcification",
                  "Emphysema", "Pulmonary fibrotic sequela", "Hiatal hernia", "Cardiomegaly")
# (cause, effect, P(effect | cause), P(effect | not cause)): marginals stay near PREVALENCE.
_CONDITIONAL = (
    ("Arterial wall calcification", "Coronary artery wall calcification", 0.60, 0.10),
    ("Cardiomegaly", "Pericardial effusion", 0.30, 0.045),
    ("Cardiomegaly", "Pleural effusion", 0.35, 0.094),
    ("Pleural effusion", "Atelectasis", 0.75, 0.185),
    ("Consolidation", "Lung opacity", 0.80, 0.31),
    ("Peribronchial thickening", "Bronchiectasis", 0.35, 0.072),
)


@dataclass(frozen=True)
class Phantom:
    """One synthetic chest CT.

    Attributes:
        volume: HU volume (``int16``), LPS voxel axes, RAS affine.
        organs: ``uint8`` organ label map, same shape.
        lesions: ``uint8`` map, ``0`` none, ``i + 1`` = ``ABNORMALITY_NAMES[i]``.
        labels: ``{abnormality: 0/1}`` for all 18 CT-RATE labels.
        findings: report findings text.
        impression: report impression text.
        age: patient age in years.
        sex: ``"M"`` or ``"F"``.
        contrast: whether the phantom is contrast-enhanced.
        details: per present abnormality, where and how large it is (drives the report).
    """

    volume: CTVolume
    organs: np.ndarray
    lesions: np.ndarray
    labels: dict[str, int]
    findings: str
    impression: str
    age: int
    sex: str
    contrast: bool
    details: dict[str, dict]


def default_spacing(size: tuple[int, int, int]) -> tuple[float, float, float]:
    """Spacing ``(sz, sy, sx)`` in mm giving a 350 mm in-plane and 300 mm axial field of view."""
    d, h, w = size
    return (300.0 / d, 350.0 / h, 350.0 / w)


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine of voxel axes ``(i, j, k)`` = (column, row, slice) = (L, P, S), centred at 0."""
    d, h, w = shape
    sz, sy, sx = spacing
    aff = np.diag([-sx, -sy, sz, 1.0])
    aff[:3, 3] = [sx * (w - 1) / 2.0, sy * (h - 1) / 2.0, -sz * (d - 1) / 2.0]
    return aff


def sample_abnormalities(
    rng: np.random.Generator, *, age: float, forced: Mapping[str, bool] | None = None
) -> dict[str, bool]:
    """Draw the 18 labels with CT-RATE-like prevalence, age effects and co-occurrence.

    Args:
        rng: random generator.
        age: patient age; age-dependent findings scale from 0.4x (25 y) to 1.6x (85 y).
        forced: labels fixed by the caller; the others are drawn conditioned on them.
    """
    forced = dict(forced or {})
    age_factor = 0.4 + 1.2 * float(np.clip((age - 25.0) / 60.0, 0.0, 1.0))
    cond = {effect: (cause, p1, p0) for cause, effect, p1, p0 in _CONDITIONAL}
    out: dict[str, bool] = {}
    u = rng.random(len(ABNORMALITY_NAMES))
    # causes first, so that effects can condition on them
    order = sorted(range(len(ABNORMALITY_NAMES)), key=lambda i: ABNORMALITY_NAMES[i] in cond)
    order = sorted(order, key=lambda i: ABNORMALITY_NAMES[i] == "Atelectasis")
    for i in order:
        name = ABNORMALITY_NAMES[i]
        if name in forced:
            out[name] = bool(forced[name])
            continue
        p = PREVALENCE[name]
        if name in cond:
            cause, p1, p0 = cond[name]
            p = p1 if out.get(cause, False) else p0
        if name in _AGE_DEPENDENT:
            p = min(0.95, p * age_factor)
        out[name] = bool(u[i] < p)
    return {n: out[n] for n in ABNORMALITY_NAMES}


def _superellipse(y, x, a, b_ant, b_post, p=2.4):
    """Super-ellipse level ``q`` (<= 1 inside) with different anterior/posterior semi-axes."""
    b = np.where(y < 0, np.float32(b_ant), np.float32(b_post)).astype(np.float32)
    return (np.abs(x) / a) ** p + (np.abs(y) / b) ** p


def _geometry(ctx: PhantomContext, rng: np.random.Generator, present: Mapping[str, bool]) -> dict:
    """Random patient geometry (mm) and the mediastinal structures' centrelines."""
    s = float(rng.uniform(0.9, 1.04))
    g: dict = {}
    g["A"] = 150.0 * s * rng.uniform(0.95, 1.05)
    g["B"] = 118.0 * s * rng.uniform(0.95, 1.05)
    g["fat"] = float(rng.uniform(6.0, 26.0))
    g["a_c"] = g["A"] - 2 - g["fat"] - 22
    g["b_ant"] = g["B"] - 2 - g["fat"] - 22
    g["b_post"] = g["B"] - 2 - g["fat"] - 40
    g["z_apex"] = 135.0 + rng.uniform(-8, 5)
    g["dia_r"], g["dia_l"] = -45.0 + rng.uniform(-10, 10), -55.0 + rng.uniform(-10, 10)
    g["fissure"] = (5.0 + rng.uniform(-10, 10), 0.0 + rng.uniform(-10, 10), 15 + rng.uniform(-8, 8))
    g["yv"] = g["b_post"] - 8.0
    cardio = present.get("Cardiomegaly", False)
    k = float(rng.uniform(1.2, 1.32)) if cardio else 1.0
    g["heart_c"] = (-15.0 + rng.uniform(-5, 5) - (8 if cardio else 0), -28.0 * s, 18.0 * s + (12 if cardio else 0))
    g["heart_r"] = (45.0 * s * (1 + (k - 1) * 0.5), 40.0 * s * k, 55.0 * s * k)
    g["heart_rot"] = rotation_z(np.deg2rad(-40.0 + rng.uniform(-8, 8)))
    g["effusion_mm"] = float(rng.uniform(7, 14)) if present.get("Pericardial effusion") else 0.0
    g["aorta"] = [(-10, -14, 4), (20, -22, -8), (55, -22, -8), (70, -20, 0), (78, -4, 18),
                  (74, 16, 26), (60, 30, 26), (20, 34, 25), (-40, 32, 26), (-90, 28, 20), (-160, 22, 10)]
    g["aorta_r"] = [14, 15, 15, 14, 13, 12.5, 12, 12, 11.5, 11, 10.5]
    g["esophagus"] = [(160, 28, 2), (40, 30, 2), (-10, 24, 8), (-40, 20, 10), (-70, 10, 22), (-90, -2, 40)]
    g["trachea"] = [(160, 5, -3), (35, 12, -3)]
    g["hilum"] = {"left": (15.0, 15.0, 50.0 * s), "right": (20.0, 12.0, -45.0 * s)}
    g["svc"] = [(160, -12, -30), (5, -18, -28)]
    g["pa"] = [((5, -32, 14), (30, -10, 12)), ((30, -10, 12), (15, 12, 50 * s)), ((30, -10, 12), (20, 2, -45 * s))]
    return g


def _keepout(ctx: PhantomContext) -> np.ndarray:
    """Mediastinal structures grown by a margin: the lungs are carved around them."""
    g, cv = ctx.geo, ctx.canvas
    keep = np.zeros(cv.shape, dtype=bool)
    hr = tuple(r + g["effusion_mm"] + 5 for r in g["heart_r"])
    e = ellipsoid(cv, g["heart_c"], hr, rotation=g["heart_rot"])
    if e:
        keep[e[0]] |= e[1] <= 1
    tubes = [(g["aorta"], [r + 4 for r in g["aorta_r"]]), (g["esophagus"], 12.0),
             (g["trachea"], 15.0), (g["svc"], 13.0)]
    segs = [seg for pts, rad in tubes for seg in polyline(pts, rad)]
    segs += [(a, b, 14.0, 14.0) for a, b in g["pa"]]
    segs += [(g["trachea"][-1], g["hilum"][side], 11.0, 9.0) for side in ("left", "right")]
    for p0, p1, r0, r1 in segs:
        t = segment(cv, p0, p1, r0, r1)
        if t:
            keep[t[0]] |= t[1] <= 0
    for c, r in g.get("extra_keepout", []):
        e = ellipsoid(cv, c, r)
        if e:
            keep[e[0]] |= e[1] <= 1
    return keep


def _base(ctx: PhantomContext, rng: np.random.Generator, keep: np.ndarray) -> None:
    """Body wall, ribs, sternum, spine, abdomen, lungs (lobes) and mediastinal fat, slab by slab."""
    g, cv = ctx.geo, ctx.canvas
    d, h, w = cv.shape
    texture = SmoothField(rng, cv.shape, tuple(max(1, int(round(8.0 / s))) for s in cv.spacing))
    _, y, x = cv.grid()
    y2, x2 = y[0], x[0]
    body_q = _superellipse(y2, x2, g["A"], g["B"], g["B"])
    skin_q = _superellipse(y2, x2, g["A"] - 2, g["B"] - 2, g["B"] - 2)
    fat_q = _superellipse(y2, x2, g["A"] - 2 - g["fat"], g["B"] - 2 - g["fat"], g["B"] - 2 - g["fat"])
    ring = np.full((h, w), 0, dtype=np.uint8)
    ring[body_q <= 1] = 1
    ring[skin_q <= 1] = 2
    ring[fat_q <= 1] = 3
    wall_hu = np.array([-1000, 40, -100, 45], dtype=np.float32)[ring]
    theta_y = y2 / np.float32(g["B"])
    fz, fy, fl = g["fissure"]
    zs_all = cv.coords(0)
    chunk = max(1, int(4_000_000 // (h * w)))
    for z0 in range(0, d, chunk):
        sl = slice(z0, min(d, z0 + chunk))
        z = zs_all[sl][:, None, None]
        n = z.shape[0]
        hu = np.broadcast_to(wall_hu, (n, h, w)).copy()
        org = np.broadcast_to(np.where(ring > 0, BODY, 0).astype(np.uint8), (n, h, w)).copy()
        # thoracic cavity, tapering to the apex
        taper = np.sqrt(np.clip(1 - ((z - 70.0) / (g["z_apex"] - 70.0)) ** 2, 0, 1))
        taper = np.where(z < 70.0, 1.0, taper).astype(np.float32) + 1e-3
        a_c, b_a, b_p = g["a_c"] * taper, g["b_ant"] * taper, g["b_post"] * taper
        cav_q = _superellipse(y2, x2, a_c, b_a, b_p, 2.2)
        cavity = cav_q <= 1
        shell = (_superellipse(y2, x2, a_c + 11, b_a + 11, b_p + 11, 2.2) <= 1) & ~cavity
        # ribs: bands sloping down anteriorly, cortex brighter than marrow
        phase = ((z - 0.35 * y2) / 27.0) % 1.0
        rib = shell & (phase < 0.42) & ~((np.abs(x2) < 28) & (y2 < 0)) & (z > -120) & (z < g["z_apex"] - 5)
        cortex = (phase < 0.1) | (phase > 0.32)
        hu[rib] = np.broadcast_to(np.where(cortex, 850.0, 300.0), rib.shape)[rib]
        org[rib] = BONE
        # diaphragm domes: abdomen below
        dome_x = np.where(x2 < 0, -55.0, 55.0).astype(np.float32)
        dome_top = np.where(x2 < 0, g["dia_r"], g["dia_l"]).astype(np.float32)
        zd = dome_top - 0.008 * ((x2 - dome_x) ** 2 + y2 ** 2)
        below = z < zd
        inner = (_superellipse(y2, x2, g["a_c"] + 11, g["b_ant"] + 11, g["b_post"] + 11, 2.2) <= 1) & below & ~rib
        hu[inner] = np.broadcast_to(np.where(x2 < 25, 58.0, 38.0), inner.shape)[inner]  # liver right
        # lungs and mediastinum inside the cavity above the diaphragm
        thorax = cavity & ~below
        lung = thorax & ~keep[sl] & (np.abs(x2) > 2.0)
        hu[thorax] = -95.0
        org[thorax] = MEDIASTINUM
        lower = z < (np.where(x2 < 0, fz, fy) + 0.9 * y2)
        lobe = np.where(x2 > 0, np.where(lower, 4, 3), np.where(lower, 7, np.where(z > fl, 5, 6)))
        org[lung] = np.broadcast_to(lobe, lung.shape).astype(np.uint8)[lung]
        tex = texture.slab(sl)
        lung_hu = -865.0 + 22.0 * tex + 0.35 * y2 - 0.08 * z
        hu[lung] = np.broadcast_to(lung_hu, lung.shape)[lung]
        ctx.hu[sl] = hu
        ctx.organs[sl] = org
    _spine_sternum(ctx)


def _spine_sternum(ctx: PhantomContext) -> None:
    """Vertebrae (body, discs, arch, spinous process, canal) and the sternum."""
    g, cv = ctx.geo, ctx.canvas
    sls = cv.box((-400.0, g["yv"] - 22, -40.0), (400.0, g["yv"] + 62, 40.0))
    z, y, x = cv.grid(sls)
    shp = ctx.hu[sls].shape
    r_body = np.sqrt((y - g["yv"]) ** 2 + x ** 2)
    canal_y = g["yv"] + 27.0
    r_canal = np.sqrt((y - canal_y) ** 2 + x ** 2)
    vb = r_body <= 17.0
    arch = (r_canal <= 15.0) & (r_canal > 8.0) & (y > g["yv"] + 12)
    spinous = (np.abs(x) < 4.5) & (y > canal_y) & (y < canal_y + 30.0)
    cortex = (r_body > 14.5) | arch | spinous
    val = np.where(cortex, 900.0, 280.0).astype(np.float32)
    val = np.where(((z % 28.0) < 5.0) & vb, np.float32(80.0), val)  # discs
    ctx.paint(sls, np.broadcast_to(vb | arch | spinous, shp), hu=np.broadcast_to(val, shp), organ=SPINE)
    ctx.paint(sls, np.broadcast_to(r_canal <= 8.0, shp), hu=15.0, organ=SPINE)
    ya = -(g["b_ant"] + 2)
    sls = cv.box((-85.0, ya - 12, -16.0), (95.0, ya + 2, 16.0))
    if sls:
        z, y, x = cv.grid(sls)
        shp = ctx.hu[sls].shape
        plate = (np.abs(x) < 14) & (y > ya - 11) & (y < ya + 1)
        cort = (np.abs(x) > 11) | (y < ya - 8.5) | (y > ya - 1.5)
        val = np.broadcast_to(np.where(cort, 800.0, 260.0).astype(np.float32), shp)
        ctx.paint(sls, np.broadcast_to(plate, shp), hu=val, organ=BONE)


def _organs(ctx: PhantomContext, rng: np.random.Generator) -> None:
    """Abdomen, heart, great vessels, esophagus, airways and lung vessels."""
    g, cv = ctx.geo, ctx.canvas
    blood, myo = g["blood"], g["myocardium"]
    # upper abdomen below the diaphragm: stomach (air-fluid) on the left, spleen posterolateral
    st = ellipsoid(cv, (-100.0, -10.0, 55.0 * g["s"]), (35.0, 38.0, 32.0))
    if st:
        z, _, _ = cv.grid(st[0])
        below = ctx.organs[st[0]] == BODY
        ctx.paint(st[0], (st[1] <= 1) & below, hu=40.0)
        inner = (st[1] <= 0.75) & below
        ctx.paint(st[0], inner, hu=np.broadcast_to(np.where(z > -95, -1000.0, 15.0).astype(np.float32), inner.shape))
    sp = ellipsoid(cv, (-95.0, 55.0 * g["s"], 80.0 * g["s"]), (40.0, 28.0, 18.0))
    if sp:
        ctx.paint(sp[0], (sp[1] <= 1) & (ctx.organs[sp[0]] == BODY), hu=50.0)
    # heart: myocardium shell around the blood pool, pericardial fluid, epicardial fat
    hc, hr, rot = g["heart_c"], g["heart_r"], g["heart_rot"]
    eff = g["effusion_mm"]
    grow = tuple(r + max(eff, 0.0) + 4.0 for r in hr)
    e = ellipsoid(cv, hc, grow, rotation=rot)
    if e:
        sls, q_out = e
        q = ellipsoid(cv, hc, hr, rotation=rot, box=sls)[1]
        ctx.paint(sls, q_out <= 1, hu=-90.0, organ=MEDIASTINUM)
        if eff > 0:
            fluid = (q <= ((hr[2] + eff) / hr[2]) ** 2) & (q > 1)
            ctx.paint(sls, fluid, hu=10.0, organ=HEART, lesion="Pericardial effusion")
        ctx.paint(sls, q <= 1, hu=myo, organ=HEART, lesion="Cardiomegaly" if ctx.present.get("Cardiomegaly") else None)
        ctx.paint(sls, q <= 0.62, hu=blood)
        ctx.geo["heart_box"] = sls
    # great vessels (mediastinum) and the aorta
    paint_tube(ctx, [(a, b, 11.0, 10.0) for a, b in g["pa"]], hu=blood, organ=MEDIASTINUM)
    paint_tube(ctx, polyline(g["svc"], 9.0), hu=blood, organ=MEDIASTINUM)
    paint_tube(ctx, polyline(g["aorta"], g["aorta_r"]), hu=blood, organ=AORTA, wall=1.5, wall_hu=45.0)
    # esophagus with a collapsed air lumen; trachea and main bronchi
    paint_tube(ctx, polyline(g["esophagus"], 8.0), hu=40.0, organ=ESOPHAGUS)
    paint_tube(ctx, polyline(g["esophagus"][:-2], 1.8), hu=-900.0, organ=ESOPHAGUS)
    main = [(g["trachea"][-1], g["hilum"][s], 6.5, 5.0) for s in ("left", "right")]
    paint_tube(ctx, polyline(g["trachea"], 9.0) + main, hu=-1000.0, organ=TRACHEA, wall=2.5, wall_hu=50.0)
    # normal small lymph nodes
    for c in ((30.0, 25.0, 0.0), (60.0, 0.0, -20.0)):
        e = ellipsoid(cv, c, (3.5, 3.5, 3.5))
        if e:
            ctx.paint(e[0], (e[1] <= 1) & (ctx.organs[e[0]] == MEDIASTINUM), hu=40.0)
    ctx.geo["bronchi"] = bronchial_tree(ctx, rng)
    paint_airways(ctx, ctx.geo["bronchi"])


def make_phantom(
    *,
    seed: int,
    size: tuple[int, int, int] = (128, 128, 128),
    spacing: tuple[float, float, float] | None = None,
    abnormalities: Mapping[str, bool] | None = None,
    noise: bool = True,
) -> Phantom:
    """Build one synthetic chest CT with organ labels, abnormalities and a report.

    Args:
        seed: random seed; the same seed (and options) gives identical bytes.
        size: array shape ``(D, H, W)`` = (slices, rows, columns).
        spacing: voxel size ``(sz, sy, sx)`` mm; default :func:`default_spacing` (350 mm
            in-plane, 300 mm axial field of view).
        abnormalities: ``{name: present}`` forcing some of the 18 CT-RATE labels; the others
            are drawn with CT-RATE-like prevalence and co-occurrence.
        noise: add Gaussian noise (sigma 10-20 HU).

    Returns:
        A :class:`Phantom`; ``volume.array`` is ``int16`` HU with LPS voxel axes.
    """
    if len(size) != 3 or min(int(n) for n in size) < 16:
        raise ValueError(f"size must be 3 integers >= 16 (D, H, W), got {size!r}")
    size = tuple(int(n) for n in size)  # type: ignore[assignment]
    spacing = tuple(float(s) for s in (spacing or default_spacing(size)))  # type: ignore[assignment]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (sz, sy, sx) in mm, got {spacing!r}")
    fov = tuple(n * s for n, s in zip(size, spacing))
    if fov[1] < 300 or fov[2] < 300 or fov[0] < 200:
        raise ValueError(f"field of view {fov} mm is too small for the chest (need >= 200 x 300 x 300 mm)")
    unknown = set(abnormalities or {}) - set(ABNORMALITY_NAMES)
    if unknown:
        raise ValueError(f"abnormalities: unknown names {sorted(unknown)}; known: {', '.join(ABNORMALITY_NAMES)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")

    ctx = PhantomContext(Canvas(size, spacing), int(seed))  # type: ignore[arg-type]
    prng = ctx.rng("patient")
    age = int(prng.integers(25, 86))
    sex = "M" if prng.random() < 0.55 else "F"
    contrast = bool(prng.random() < 0.5)
    present = sample_abnormalities(ctx.rng("labels"), age=age, forced=abnormalities)
    ctx.present = present
    arng = ctx.rng("anatomy")
    ctx.geo = _geometry(ctx, arng, present)
    ctx.geo["s"] = ctx.geo["A"] / 150.0
    ctx.geo["contrast"] = contrast
    ctx.geo["blood"] = float(arng.uniform(150, 250)) if contrast else 40.0
    ctx.geo["myocardium"] = 100.0 if contrast else 45.0
    lesion_rngs = {name: ctx.rng("lesion:" + name) for name, _, _ in PAINTERS}
    for name, prepare, _ in PAINTERS:
        if prepare is not None and present[name]:
            prepare(ctx, lesion_rngs[name])
    _base(ctx, arng, _keepout(ctx))
    _organs(ctx, arng)
    details: dict[str, dict] = {}
    for name, _, paint in PAINTERS:
        if present[name]:
            details[name] = paint(ctx, lesion_rngs[name])
    # noise and int16, slab by slab
    nrng = ctx.rng("noise")
    sigma = float(nrng.uniform(10.0, 20.0))
    out = np.empty(size, dtype=np.int16)
    d, h, w = size
    chunk = max(1, int(4_000_000 // (h * w)))
    for z0 in range(0, d, chunk):
        sl = slice(z0, min(d, z0 + chunk))
        slab = ctx.hu[sl]
        if noise:
            slab = slab + nrng.standard_normal(slab.shape, dtype=np.float32) * np.float32(sigma)
        out[sl] = np.clip(np.rint(slab), -1024, 3071).astype(np.int16)
    del ctx.hu
    labels = {n: int(present[n]) for n in ABNORMALITY_NAMES}
    findings, impression = write_report(labels, details, ctx.rng("report"))
    volume = CTVolume(
        out, spacing, phantom_affine(size, spacing), ("L", "P", "S"),  # type: ignore[arg-type]
        {"format": "phantom", "seed": int(seed), "contrast": contrast, "noise_sigma": sigma if noise else 0.0},
    )
    return Phantom(volume, ctx.organs, ctx.lesions, labels, findings, impression, age, sex, contrast, details)
