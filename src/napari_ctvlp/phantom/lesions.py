"""Painters for the 18 CT-RATE abnormalities of the synthetic chest CT phantom.

Each painter draws a located, clearly visible signature (several voxels at 128^3, still
visible after downsampling to 64^3) into the phantom's HU, organ and lesion maps and returns
``details`` for the report: where (side/lobe) and how large. Sizes are in mm.
Used by :func:`napari_ctvlp.phantom.canvas.make_phantom` through :data:`PAINTERS`.
"""

from __future__ import annotations

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES, LEFT_LUNG_LABELS

from .context import AORTA, BONE, ESOPHAGUS, HEART, LOBES, MEDIASTINUM, SPINE, PhantomContext, paint_airways, paint_tube
from .shapes import SmoothField, ellipsoid, polyline, segment

_LOWER, _UPPER = (4, 7, 6), (3, 5)
_ALL = (3, 4, 5, 6, 7)


def _lobes_of(side: str) -> tuple[int, ...]:
    return (3, 4) if side == "left" else (5, 6, 7)


def _thin(ctx: PhantomContext, r: float) -> float:
    """Radius no thinner than ~0.6 in-plane voxels, so thin structures stay connected."""
    return max(r, 0.6 * max(ctx.canvas.spacing[1:]))


def _loc(lobe: int) -> tuple[str, str]:

    return LOBES[lobe]


def _rand_rot(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    return q.astype(np.float32)


def _blobs(ctx: PhantomContext, rng, name, *, n, radius, lobes, depth, hu, cond=None, same_lobe=False,
           aniso=(1.0, 1.0, 1.0), mode="set"):
    """Paint ``n`` random ellipsoids in the lungs; returns their (side, lobe) and diameters."""
    locs, sizes = [], []
    for _ in range(n):
        r = float(rng.uniform(*radius))
        got = ctx.pick(rng, lobes=lobes, depth=(depth[0] if depth[0] >= 0 else r * -depth[0], depth[1]))
        if got is None:
            continue
        c, lobe = got
        radii = tuple(r * a * rng.uniform(0.85, 1.15) for a in aniso)
        e = ellipsoid(ctx.canvas, c, radii, rotation=_rand_rot(rng))
        if e is None:
            continue
        sls, q = e
        m = q <= 1
        org = ctx.organs[sls]
        m &= (org == lobe) if same_lobe else ((org >= 3) & (org <= 7))
        if cond is not None:
            m &= cond(ctx.hu[sls])
        if mode == "max":  # soft-edged density increase that keeps vessels visible
            val = np.maximum(ctx.hu[sls], np.float32(hu) - 250.0 * np.clip((q - 0.6) / 0.4, 0, 1))
            ctx.paint(sls, m, hu=val, lesion=name)
        else:
            ctx.paint(sls, m, hu=hu, lesion=name)
        if m.any():
            locs.append(_loc(lobe))
            sizes.append(round(2 * r))
    return {"locations": locs, "sizes_mm": sizes}


# --- mediastinum, heart, vessels, esophagus, body ---------------------------------------------

def prepare_lymphadenopathy(ctx: PhantomContext, rng) -> None:
    s = ctx.geo["s"]
    stations = {
        "right paratracheal": (60.0, 2.0, -22.0), "subcarinal": (18.0, 26.0, 0.0),
        "prevascular": (55.0, -42.0, 2.0), "aortopulmonary window": (45.0, 0.0, 22.0),
        "right hilar": (15.0, 0.0, -42.0 * s), "left hilar": (10.0, 2.0, 44.0 * s),
    }
    names = list(stations)
    chosen = rng.choice(len(names), size=int(rng.integers(2, 5)), replace=False)
    nodes = [(names[i], stations[names[i]], float(rng.uniform(8.0, 13.0))) for i in sorted(chosen)]
    ctx.geo["nodes"] = nodes
    ctx.geo.setdefault("extra_keepout", []).extend((c, (r + 3,) * 3) for _, c, r in nodes)


def lymphadenopathy(ctx: PhantomContext, rng) -> dict:

    for _, c, r in ctx.geo["nodes"]:
        e = ellipsoid(ctx.canvas, c, (r, r * 0.9, r * 1.1))
        if e:
            org = ctx.organs[e[0]]
            m = (e[1] <= 1) & ((org == MEDIASTINUM) | ((org >= 3) & (org <= 7)))
            ctx.paint(e[0], m, hu=45.0 + (25.0 if ctx.geo["contrast"] else 0.0), organ=MEDIASTINUM,
                      lesion="Lymphadenopathy")
    return {"stations": [n for n, _, _ in ctx.geo["nodes"]],
            "sizes_mm": [round(2 * r) for _, _, r in ctx.geo["nodes"]]}


def prepare_hiatal_hernia(ctx: PhantomContext, rng) -> None:
    g = ctx.geo
    c = (g["dia_l"] + float(rng.uniform(0, 12)), 14.0, 18.0)
    r = (float(rng.uniform(20, 30)), float(rng.uniform(18, 24)), float(rng.uniform(20, 28)))
    g["hernia"] = (c, r)
    g.setdefault("extra_keepout", []).append((c, tuple(x + 4 for x in r)))


def hiatal_hernia(ctx: PhantomContext, rng) -> dict:

    c, r = ctx.geo["hernia"]
    e = ellipsoid(ctx.canvas, c, r)
    if e:
        sls, q = e
        z, _, _ = ctx.canvas.grid(sls)
        free = ~np.isin(ctx.organs[sls], (SPINE, AORTA, BONE))
        ctx.paint(sls, (q <= 1) & free, hu=40.0, organ=ESOPHAGUS, lesion="Hiatal hernia")
        inner = (q <= 0.7) & free
        content = np.broadcast_to(np.where(z > c[0] - 0.15 * r[0], -1000.0, 20.0).astype(np.float32), q.shape)
        ctx.paint(sls, inner, hu=content)
    return {"size_mm": round(2 * max(r))}


def cardiomegaly(ctx: PhantomContext, rng) -> dict:  # the heart's size is set in the geometry
    return {"scale": round(ctx.geo["heart_r"][2] / (55.0 * ctx.geo["s"]), 2)}


def pericardial_effusion(ctx: PhantomContext, rng) -> dict:  # painted with the heart
    return {"thickness_mm": round(ctx.geo["effusion_mm"])}


def arterial_wall_calcification(ctx: PhantomContext, rng) -> dict:

    segs = polyline(ctx.geo["aorta"], ctx.geo["aorta_r"])[2:9]
    for _ in range(int(rng.integers(8, 16))):
        p0, p1, r0, r1 = segs[int(rng.integers(len(segs)))]
        t = float(rng.uniform(0, 1))
        a, b = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        axis = (b - a) / (np.linalg.norm(b - a) + 1e-6)
        c, R = a + t * (b - a), r0 + t * (r1 - r0)
        u = np.cross(axis, rng.standard_normal(3))
        u /= np.linalg.norm(u) + 1e-6
        w = c + R * u
        rp = float(rng.uniform(5.0, 8.0))
        e = ellipsoid(ctx.canvas, tuple(w), (rp, rp, rp))
        if e is None:
            continue
        z, y, x = ctx.canvas.grid(e[0])
        d = (z - c[0], y - c[1], x - c[2])
        along = d[0] * axis[0] + d[1] * axis[1] + d[2] * axis[2]
        rad = np.sqrt(np.maximum(d[0] ** 2 + d[1] ** 2 + d[2] ** 2 - along ** 2, 0))
        m = (e[1] <= 1) & (rad >= R - 2.5) & (rad <= R + max(1.0, 0.5 * min(ctx.canvas.spacing)))
        ctx.paint(e[0], m, hu=float(rng.uniform(700, 1100)), organ=AORTA, lesion="Arterial wall calcification")
    return {}


def coronary_calcification(ctx: PhantomContext, rng) -> dict:

    hc, hr, rot = ctx.geo["heart_c"], np.asarray(ctx.geo["heart_r"]), ctx.geo["heart_rot"]
    vessels = []
    for _ in range(int(rng.integers(2, 6))):
        vz = float(rng.uniform(0.0, 0.6))
        phi = float(rng.uniform(0, 2 * np.pi))
        pts = []
        for dphi in (0.0, 0.3):
            v = np.array([vz, np.sqrt(1 - vz ** 2) * np.sin(phi + dphi), np.sqrt(1 - vz ** 2) * np.cos(phi + dphi)])
            local = v * (hr + 2.0)
            pts.append(tuple(np.asarray(hc) + rot @ local))
        r = _thin(ctx, float(rng.uniform(2.5, 3.5)))
        for p0, p1, r0, r1 in [(pts[0], pts[1], r, r)]:
            t = segment(ctx.canvas, p0, p1, r0, r1)
            if t:
                ctx.paint(t[0], t[1] <= 0, hu=float(rng.uniform(600, 1000)), organ=HEART,
                          lesion="Coronary artery wall calcification")
        vessels.append(("LAD", "circumflex", "right coronary")[int(rng.integers(3))])
    return {"vessels": sorted(set(vessels))}


def medical_material(ctx: PhantomContext, rng) -> dict:
    g, cv = ctx.geo, ctx.canvas
    kind = ("pacemaker", "port catheter", "sternotomy wires")[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
    side = "left" if (rng.random() < 0.75) == (kind == "pacemaker") else "right"
    sign = 1.0 if side == "left" else -1.0
    name = "Medical material"
    metal = 3000.0
    if kind == "sternotomy wires":
        ya = -(g["b_ant"] + 2) - 5.0
        for zk in np.linspace(-50, 60, int(rng.integers(4, 7))):
            e = ellipsoid(cv, (float(zk), ya, 0.0), (_thin(ctx, 1.5), 10.0, 19.0))
            if e:
                ctx.paint(e[0], (e[1] <= 1) & (e[1] >= 0.5), hu=metal, lesion=name)
        return {"kind": kind, "side": "midline"}
    x = sign * 0.55 * g["A"]
    y_s = -(g["B"] - 2) * (1 - abs(x / g["A"]) ** 2.4) ** (1 / 2.4)
    c = (float(rng.uniform(70, 95)), y_s + 9.0, x)
    size = (20.0, 5.0, 24.0) if kind == "pacemaker" else (11.0, 6.0, 12.0)
    e = ellipsoid(cv, c, size)
    if e:
        ctx.paint(e[0], e[1] <= 1, hu=metal, lesion=name)
    path = [c, (c[0] + 18, c[1] + 22, sign * 45.0), (75.0, -15.0, -30.0), (10.0, -18.0, -28.0)]
    if kind == "pacemaker":
        path += [(-8.0, -24.0, -12.0), (-32.0, -52.0, 10.0)]
    r = _thin(ctx, 1.5)
    for p0, p1, _, _ in polyline(path, r):
        t = segment(cv, p0, p1, r, r)
        if t:
            ctx.paint(t[0], t[1] <= 0, hu=metal, lesion=name)
    return {"kind": kind, "side": side}


# --- lungs ------------------------------------------------------------------------------------

def mosaic_attenuation(ctx: PhantomContext, rng) -> dict:
    cv = ctx.canvas
    sides = ("left", "right") if rng.random() < 0.6 else (("left",), ("right",))[int(rng.integers(2))]
    lobes = tuple(lb for s in sides for lb in _lobes_of(s))
    field = SmoothField(rng, cv.shape, tuple(max(1, int(round(22.0 / s))) for s in cv.spacing))
    d, h, w = cv.shape
    chunk = max(1, int(4_000_000 // (h * w)))
    idx = ABNORMALITY_NAMES.index("Mosaic attenuation pattern") + 1
    for z0 in range(0, d, chunk):
        sl = slice(z0, min(d, z0 + chunk))
        m = np.isin(ctx.organs[sl], lobes) & (ctx.hu[sl] < -600)
        if not m.any():
            continue
        f = field.slab(sl)
        hu = ctx.hu[sl]
        hu[m] = (hu + np.where(f > 0, 110.0, -70.0).astype(np.float32))[m]
        ctx.lesions[sl][m] = idx
    return {"locations": [(s, "") for s in sides]}


def emphysema(ctx: PhantomContext, rng) -> dict:
    lobes = _UPPER if rng.random() < 0.75 else _ALL
    return _blobs(ctx, rng, "Emphysema", n=int(rng.integers(6, 12)), radius=(10.0, 20.0), lobes=lobes,
                  depth=(4.0, 1e9), hu=-980.0, cond=lambda h: h < -600)


def septal_thickening(ctx: PhantomContext, rng) -> dict:
    cv = ctx.canvas
    out = {"locations": [], "sizes_mm": []}
    period = float(rng.uniform(13.0, 18.0))
    thick = max(2.2, 0.8 * max(cv.spacing))
    phase = rng.uniform(0, period, 3)
    for _ in range(int(rng.integers(1, 3))):
        got = ctx.pick(rng, lobes=_LOWER if rng.random() < 0.7 else _ALL, depth=(0.0, 6.0))
        if got is None:
            continue
        c, lobe = got
        r = float(rng.uniform(35.0, 55.0))
        e = ellipsoid(cv, c, (r, r, r))
        if e is None:
            continue
        sls, q = e
        z, y, x = cv.grid(sls)
        wz, wy, wx = z + 3 * np.sin(y / 9.0), y + 3 * np.sin(x / 11.0), x + 3 * np.sin(z / 10.0)
        net = np.zeros(q.shape, dtype=bool)
        for a, ph in zip((wz, wy, wx), phase):
            f = ((a + ph) / period) % 1.0
            net |= np.broadcast_to(np.minimum(f, 1 - f) * period < thick / 2, q.shape)
        m = (q <= 1) & net & ((ctx.organs[sls] >= 3) & (ctx.organs[sls] <= 7)) & (ctx.hu[sls] < -500)
        ctx.paint(sls, m, hu=-60.0, lesion="Interlobular septal thickening")
        out["locations"].append(_loc(lobe))
    return out


def fibrotic_sequela(ctx: PhantomContext, rng) -> dict:
    apical = rng.random() < 0.5
    got = ctx.pick(rng, lobes=_UPPER if apical else _LOWER, depth=(0.0, 15.0),
                   where=(lambda z, y, x: z > 40) if apical else None)
    if got is None:
        return {"locations": []}
    c, lobe = got
    segs = []
    for _ in range(int(rng.integers(14, 24))):
        p0 = np.asarray(c) + rng.uniform(-18, 18, 3)
        d = rng.standard_normal(3)
        p1 = p0 + d / np.linalg.norm(d) * rng.uniform(20, 45)
        r = _thin(ctx, float(rng.uniform(1.8, 2.6)))
        segs.append((tuple(p0), tuple(p1), r, r))

    paint_tube(ctx, segs, hu=20.0, lesion="Pulmonary fibrotic sequela", where_lung=True)
    return {"locations": [_loc(lobe)], "apical": apical}


def lung_opacity(ctx: PhantomContext, rng) -> dict:
    return _blobs(ctx, rng, "Lung opacity", n=int(rng.integers(1, 4)), radius=(16.0, 36.0), lobes=_ALL,
                  depth=(0.0, 1e9), hu=-420.0, mode="max")


def consolidation(ctx: PhantomContext, rng) -> dict:

    out = _blobs(ctx, rng, "Consolidation", n=int(rng.integers(1, 3)), radius=(24.0, 42.0), lobes=_ALL,
                 depth=(8.0, 1e9), hu=35.0, same_lobe=True)
    idx = ABNORMALITY_NAMES.index("Consolidation") + 1
    # air bronchograms: branching air tubes inside the consolidated region
    sub = ctx.lesions[:: 2, :: 2, :: 2] == idx
    pts = np.argwhere(sub)
    segs = []
    if pts.size:
        for _ in range(int(rng.integers(4, 8))):
            k = pts[int(rng.integers(len(pts)))] * 2
            p0 = np.asarray(ctx.canvas.point(tuple(k)))
            d = rng.standard_normal(3)
            p1 = p0 + d / np.linalg.norm(d) * rng.uniform(18, 35)
            r = _thin(ctx, float(rng.uniform(2.0, 2.8)))
            segs.append((tuple(p0), tuple(p1), r, r * 0.8))
    paint_tube(ctx, segs, hu=-950.0, within=lambda sls: ctx.lesions[sls] == idx)
    return out


def bronchiectasis(ctx: PhantomContext, rng) -> dict:

    cand = [b for b in ctx.geo["bronchi"] if b["r0"] < 3.5 and b["p1"][0] < 0]
    pick = [cand[i] for i in rng.choice(len(cand), size=min(len(cand), int(rng.integers(3, 7))), replace=False)]
    paint_airways(ctx, pick, lumen_scale=float(rng.uniform(2.2, 2.8)), wall=1.8, wall_hu=30.0,
                  lesion="Bronchiectasis")
    return {"locations": sorted({(b["side"], "lower lobe") for b in pick})}


def peribronchial_thickening(ctx: PhantomContext, rng) -> dict:

    sides = ("left", "right") if rng.random() < 0.6 else (("left",), ("right",))[int(rng.integers(2))]
    cand = [b for b in ctx.geo["bronchi"] if b["side"] in sides]
    pick = [cand[i] for i in rng.choice(len(cand), size=min(len(cand), int(rng.integers(8, 14))), replace=False)]
    paint_airways(ctx, pick, lumen_scale=1.0, wall=_thin(ctx, 4.5), wall_hu=35.0, vessels=False,
                  lesion="Peribronchial thickening")
    return {"locations": [(s, "") for s in sides]}


def lung_nodule(ctx: PhantomContext, rng) -> dict:
    return _blobs(ctx, rng, "Lung nodule", n=int(rng.integers(1, 4)), radius=(6.0, 12.0), lobes=_ALL,
                  depth=(-1.0, 1e9), hu=40.0)


def atelectasis(ctx: PhantomContext, rng) -> dict:
    eff = ctx.present.get("Pleural effusion", False)
    lobes = _LOWER if (eff or rng.random() < 0.7) else _ALL
    return _blobs(ctx, rng, "Atelectasis", n=int(rng.integers(1, 3)), radius=(14.0, 24.0), lobes=lobes,
                  depth=(0.0, 5.0), hu=30.0, same_lobe=True, aniso=(1.0, 0.45, 1.0))


def pleural_effusion(ctx: PhantomContext, rng) -> dict:
    cv = ctx.canvas
    r = rng.random()
    sides = ("left", "right") if r < 0.45 else ("left",) if r < 0.7 else ("right",)
    out = {"locations": [], "thickness_mm": []}
    ycoord = cv.coords(1)
    for side in sides:
        t_max = float(rng.uniform(18.0, 45.0))
        labs = (LEFT_LUNG_LABELS[1:] if side == "left" else (5, 6, 7))
        m = np.isin(ctx.organs, labs)
        zs, ys, xs = (np.flatnonzero(m.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1)))
        if zs.size == 0:
            continue
        sls = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        mm = m[sls]
        has = mm.any(axis=1)
        last = mm.shape[1] - 1 - np.argmax(mm[:, ::-1, :], axis=1)
        y_last = ycoord[sls[1]][last]  # posterior-most lung row per (z, x), mm
        z = cv.coords(0, sls[0])[:, None]
        z_base = float(z.min())
        thick = np.float32(t_max) * np.clip(1.0 - (z - z_base) / 130.0, 0.15, 1.0)
        level = (y_last - thick)[:, None, :]
        y = ycoord[sls[1]][None, :, None]
        fluid = mm & (y >= level) & has[:, None, :]
        band = mm & (y >= level - 8.0) & ~fluid & has[:, None, :]
        ctx.paint(sls, band, hu=np.maximum(ctx.hu[sls], np.float32(-550.0)))
        ctx.paint(sls, fluid, hu=12.0, lesion="Pleural effusion")
        out["locations"].append((side, ""))
        out["thickness_mm"].append(round(t_max))
    return out


#: Painting order; later findings paint over earlier ones. ``(name, prepare, paint)``.
PAINTERS = (
    ("Lymphadenopathy", prepare_lymphadenopathy, lymphadenopathy),
    ("Hiatal hernia", prepare_hiatal_hernia, hiatal_hernia),
    ("Cardiomegaly", None, cardiomegaly),
    ("Pericardial effusion", None, pericardial_effusion),
    ("Arterial wall calcification", None, arterial_wall_calcification),
    ("Coronary artery wall calcification", None, coronary_calcification),
    ("Mosaic attenuation pattern", None, mosaic_attenuation),
    ("Emphysema", None, emphysema),
    ("Interlobular septal thickening", None, septal_thickening),
    ("Pulmonary fibrotic sequela", None, fibrotic_sequela),
    ("Lung opacity", None, lung_opacity),
    ("Consolidation", None, consolidation),
    ("Bronchiectasis", None, bronchiectasis),
    ("Peribronchial thickening", None, peribronchial_thickening),
    ("Lung nodule", None, lung_nodule),
    ("Atelectasis", None, atelectasis),
    ("Pleural effusion", None, pleural_effusion),
    ("Medical material", None, medical_material),
)
