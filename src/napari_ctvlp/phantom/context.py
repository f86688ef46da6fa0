"""Shared painting context of the phantom generator: label values, the canvas state, tubes, airways.

The lowest module of :mod:`napari_ctvlp.phantom` besides :mod:`.shapes`: the anatomy canvas
(:mod:`.canvas`) and the lesion painters (:mod:`.lesions`) both build on it, and it imports neither.
"""

from __future__ import annotations

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES, ORGAN_BY_NAME

from .shapes import Canvas, segment

LOBES = {3: ("left", "upper lobe"), 4: ("left", "lower lobe"), 5: ("right", "upper lobe"),
         6: ("right", "middle lobe"), 7: ("right", "lower lobe")}
_LV = {name: o.value for name, o in ORGAN_BY_NAME.items()}
BODY, BONE, SPINE, MEDIASTINUM = _LV["body"], _LV["bone"], _LV["spine"], _LV["mediastinum"]
HEART, AORTA, ESOPHAGUS, TRACHEA = _LV["heart"], _LV["aorta"], _LV["esophagus"], _LV["trachea"]


class PhantomContext:
    """Mutable painting state shared by the anatomy painters (:mod:`.canvas`) and the lesion
    painters (:mod:`.lesions`): HU, organ and lesion arrays, per-stream generators, geometry."""

    def __init__(self, canvas: Canvas, seed: int) -> None:
        self.canvas = canvas
        self.seed = seed
        self.hu = np.full(canvas.shape, -1000.0, dtype=np.float32)
        self.organs = np.zeros(canvas.shape, dtype=np.uint8)
        self.lesions = np.zeros(canvas.shape, dtype=np.uint8)
        self.geo: dict = {}
        self.present: dict[str, bool] = {}
        self._lung_sub: tuple | None = None

    def rng(self, stream: str) -> np.random.Generator:
        """Independent generator per named stream (stable across abnormality choices)."""
        key = [int(b) for b in stream.encode()]
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32, *key])

    def paint(self, sls, mask, *, hu=None, organ: int | None = None, lesion: str | None = None,
              where_lung: bool = False) -> np.ndarray:
        """Paint ``mask`` (bool over ``sls``) with HU/organ/lesion; returns the painted mask."""
        if where_lung:
            mask = mask & is_lung(self.organs[sls])
        if hu is not None:
            sub = self.hu[sls]
            sub[mask] = hu[mask] if isinstance(hu, np.ndarray) else hu
        if organ is not None:
            self.organs[sls][mask] = organ
        if lesion is not None:
            self.lesions[sls][mask] = ABNORMALITY_NAMES.index(lesion) + 1
        return mask

    def lung_sub(self):
        """Subsampled lobe map (~5 mm voxels), its step and depth below the pleura (mm)."""
        if self._lung_sub is None:
            from scipy import ndimage

            step = tuple(max(1, int(round(5.0 / s))) for s in self.canvas.spacing)
            sub = self.organs[:: step[0], :: step[1], :: step[2]].copy()
            sub[~is_lung(sub)] = 0
            depth = ndimage.distance_transform_edt(
                sub > 0, sampling=[st * s for st, s in zip(step, self.canvas.spacing)]
            )
            self._lung_sub = (sub, step, depth)
        return self._lung_sub

    def pick(self, rng: np.random.Generator, *, lobes=(3, 4, 5, 6, 7), depth=(0.0, 1e9),
             where=None) -> tuple[tuple[float, float, float], int] | None:
        """A random lung point (world mm) in ``lobes`` with pleural depth in ``depth`` (mm).

        ``where(z, y, x)`` (world mm grids of the subsampled lattice) can restrict it further.
        """
        sub, step, dep = self.lung_sub()
        ok = np.isin(sub, lobes) & (dep >= depth[0]) & (dep <= depth[1])
        if where is not None:
            z, y, x = (self.canvas.coords(a, slice(None, None, step[a])) for a in range(3))
            ok &= where(z[:, None, None], y[None, :, None], x[None, None, :])
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return None
        k = np.unravel_index(int(idx[rng.integers(idx.size)]), sub.shape)
        full = tuple(int(k[a] * step[a]) for a in range(3))
        jitter = tuple(float(rng.uniform(-0.5, 0.5) * step[a] * self.canvas.spacing[a]) for a in range(3))
        pt = tuple(p + j for p, j in zip(self.canvas.point(full), jitter))
        return pt, int(sub[k])


def is_lung(organs: np.ndarray) -> np.ndarray:
    """Boolean mask of lung lobe labels (3-7)."""
    return (organs >= 3) & (organs <= 7)


def paint_tube(ctx: PhantomContext, segs, *, hu, organ=None, wall: float = 0.0, wall_hu=None, lesion=None,
          where_lung=False, within=None) -> None:
    """Paint tubes (walls first, then lumens, so joints stay open)."""
    passes = ([(wall, wall_hu)] if wall > 0 else []) + [(0.0, hu)]
    for off, val in passes:
        for p0, p1, r0, r1 in segs:
            t = segment(ctx.canvas, p0, p1, r0, r1, margin=off)
            if t is None:
                continue
            m = t[1] <= off
            if within is not None:
                m &= within(t[0])
            ctx.paint(t[0], m, hu=val, organ=organ, lesion=lesion, where_lung=where_lung)


_TARGETS = {  # lobar bronchus end points (z, y, x/|x|) in mm, mirrored for the left lung
    "right": [(90, 0, 55), (60, -45, 70), (-15, -55, 70), (10, 50, 75), (-60, 30, 80), (-55, -10, 95), (-70, 55, 55)],
    "left": [(90, 5, 50), (60, -45, 70), (-20, -50, 75), (10, 50, 75), (-70, 30, 80), (-60, -5, 95), (-75, 55, 55)],
}


def bronchial_tree(ctx: PhantomContext, rng: np.random.Generator) -> list[dict]:
    """Lobar and segmental bronchi (with their companion arteries) from each hilum."""
    g = ctx.geo
    branches = []
    for side, sign in (("left", 1.0), ("right", -1.0)):
        hz, hy, hx = g["hilum"][side]
        for tz, ty, tx in _TARGETS[side]:
            tgt = np.array([tz, ty * g["s"], sign * tx * g["s"]]) + rng.uniform(-8, 8, 3)
            p0 = np.array([hz, hy, hx])
            mid = p0 + 0.55 * (tgt - p0)
            branches.append(dict(side=side, p0=tuple(p0), p1=tuple(mid), r0=4.0, r1=3.2))
            for _ in range(2):
                end = tgt + rng.uniform(-22, 22, 3)
                branches.append(dict(side=side, p0=tuple(mid), p1=tuple(end), r0=3.0, r1=1.8))
    for b in branches:  # companion artery: parallel, offset sideways
        d = np.subtract(b["p1"], b["p0"])
        perp = np.cross(d, [1.0, 0.0, 0.0]) + 1e-3
        perp /= np.linalg.norm(perp)
        b["offset"] = tuple(perp)
    return branches


def paint_airways(ctx: PhantomContext, branches: list[dict], *, lumen_scale: float = 1.0, wall: float = 1.2,
                  wall_hu: float = 20.0, vessels: bool = True, lesion: str | None = None) -> None:
    """Paint intrapulmonary bronchi (and their arteries) inside the lungs."""
    segs = [(b["p0"], b["p1"], b["r0"] * lumen_scale, b["r1"] * lumen_scale) for b in branches]
    if vessels:
        vsegs = []
        for b in branches:
            off = np.asarray(b["offset"]) * (b["r0"] * lumen_scale + wall + b["r0"] + 1.0)
            vsegs.append((tuple(np.add(b["p0"], off)), tuple(np.add(b["p1"], off)), b["r0"] * 1.05, b["r1"]))
        paint_tube(ctx, vsegs, hu=ctx.geo["blood"], where_lung=True)
    paint_tube(ctx, segs, hu=-990.0, wall=wall, wall_hu=wall_hu, lesion=lesion, where_lung=True)
