"""Geometry helpers for the synthetic chest-CT phantom (:mod:`napari_ctvlp.phantom`).

World coordinates are millimetres in the patient frame, ordered like the array axes
``(z, y, x)``: ``z`` = superior, ``y`` = posterior, ``x`` = patient left, all relative to the
volume centre. Every shape is evaluated only inside its bounding box, on open coordinate grids,
so that large volumes (512x512x300) stay fast and small in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Vec = tuple[float, float, float]


@dataclass(frozen=True)
class Canvas:
    """A voxel grid (display order ``(z, y, x)``) with millimetre coordinates.

    Attributes:
        shape: array shape ``(D, H, W)``.
        spacing: voxel size in mm ``(sz, sy, sx)``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def coords(self, axis: int, sl: slice | None = None) -> np.ndarray:
        """1-D world coordinates (mm, float32) of ``axis`` (0=z, 1=y, 2=x) over ``sl``."""
        n = self.shape[axis]
        idx = np.arange(n, dtype=np.float32)[sl if sl is not None else slice(None)]
        return (idx - (n - 1) / 2.0) * np.float32(self.spacing[axis])

    def grid(self, sls: tuple[slice, slice, slice] | None = None) -> tuple[np.ndarray, ...]:
        """Open (broadcastable) grids ``Z, Y, X`` in mm over the slices ``sls``."""
        sls = sls or (slice(None),) * 3
        z = self.coords(0, sls[0])[:, None, None]
        y = self.coords(1, sls[1])[None, :, None]
        x = self.coords(2, sls[2])[None, None, :]
        return z, y, x

    def index(self, point: Vec) -> tuple[int, int, int]:
        """Nearest voxel index of a world point, clipped to the grid."""
        out = []
        for ax, p in enumerate(point):
            n = self.shape[ax]
            i = int(round(p / self.spacing[ax] + (n - 1) / 2.0))
            out.append(min(max(i, 0), n - 1))
        return tuple(out)  # type: ignore[return-value]

    def point(self, index: tuple[int, int, int] | np.ndarray) -> Vec:
        """World mm of a voxel index."""
        return tuple(
            float((index[ax] - (self.shape[ax] - 1) / 2.0) * self.spacing[ax]) for ax in range(3)
        )  # type: ignore[return-value]

    def box(self, lo: Vec, hi: Vec) -> tuple[slice, slice, slice] | None:
        """Index slices covering the world box ``[lo, hi]`` (``None`` if outside the grid)."""
        sls = []
        for ax in range(3):
            n, s = self.shape[ax], self.spacing[ax]
            a = int(np.floor(lo[ax] / s + (n - 1) / 2.0))
            b = int(np.ceil(hi[ax] / s + (n - 1) / 2.0)) + 1
            a, b = max(a, 0), min(b, n)
            if a >= b:
                return None
            sls.append(slice(a, b))
        return tuple(sls)  # type: ignore[return-value]


def rotation_z(angle: float) -> np.ndarray:
    """3x3 rotation (in ``(z, y, x)`` order) by ``angle`` radians about the z axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)


def ellipsoid(
    canvas: Canvas,
    center: Vec,
    radii: Vec,
    *,
    rotation: np.ndarray | None = None,
    box: tuple[slice, slice, slice] | None = None,
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Normalised squared radius ``q`` (``q <= 1`` inside) of an ellipsoid, in its bounding box.

    Args:
        canvas: the voxel grid.
        center: centre in world mm ``(z, y, x)``.
        radii: semi-axes in mm along the (rotated) ``(z, y, x)`` axes.
        rotation: optional 3x3 matrix whose columns are the ellipsoid axes in world space.
        box: evaluate on these index slices instead of the ellipsoid's own bounding box.
    """
    r = float(max(radii))
    sls = box or canvas.box(tuple(c - r for c in center), tuple(c + r for c in center))
    if sls is None:
        return None
    z, y, x = canvas.grid(sls)
    d = (z - np.float32(center[0]), y - np.float32(center[1]), x - np.float32(center[2]))
    if rotation is None:
        q = sum((di / np.float32(ri)) ** 2 for di, ri in zip(d, radii))
    else:
        q = np.zeros(np.broadcast_shapes(*(di.shape for di in d)), dtype=np.float32)
        for a in range(3):
            u = d[0] * rotation[0, a] + d[1] * rotation[1, a] + d[2] * rotation[2, a]
            q += (u / np.float32(radii[a])) ** 2
    return sls, np.broadcast_to(q, tuple(s.stop - s.start for s in sls)).astype(np.float32)


def segment(
    canvas: Canvas, p0: Vec, p1: Vec, r0: float, r1: float, *, margin: float = 0.0
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Signed distance (mm) to a tapered capsule from ``p0`` (radius ``r0``) to ``p1`` (``r1``).

    Returns the bounding-box slices (grown by ``margin``) and ``distance - radius`` there, so
    ``s <= 0`` is inside the tube and ``s <= w`` includes a wall of thickness ``w``.
    """
    a = np.asarray(p0, dtype=np.float32)
    b = np.asarray(p1, dtype=np.float32)
    pad = max(r0, r1) + margin
    sls = canvas.box(tuple(np.minimum(a, b) - pad), tuple(np.maximum(a, b) + pad))
    if sls is None:
        return None
    z, y, x = canvas.grid(sls)
    ab = b - a
    L2 = float(ab @ ab) or 1e-6
    dz, dy, dx = z - a[0], y - a[1], x - a[2]
    t = np.clip((dz * ab[0] + dy * ab[1] + dx * ab[2]) / np.float32(L2), 0.0, 1.0)
    d2 = (dz - t * ab[0]) ** 2 + (dy - t * ab[1]) ** 2 + (dx - t * ab[2]) ** 2
    s = np.sqrt(d2) - (np.float32(r0) + t * np.float32(r1 - r0))
    return sls, s.astype(np.float32, copy=False)


def polyline(points: list[Vec] | np.ndarray, radii: list[float] | np.ndarray):
    """Consecutive ``(p0, p1, r0, r1)`` pairs of a polyline (for :func:`segment`)."""
    pts = np.asarray(points, dtype=float)
    rad = np.broadcast_to(np.asarray(radii, dtype=float), (len(pts),))
    return [
        (tuple(pts[i]), tuple(pts[i + 1]), float(rad[i]), float(rad[i + 1]))
        for i in range(len(pts) - 1)
    ]


class SmoothField:
    """Smooth random field (float32, std ~0.6): coarse Gaussian noise, linearly upsampled.

    Evaluated slab by slab (:meth:`slab`) so a large volume never needs the whole field.

    Args:
        rng: random generator (drawn once, at construction).
        shape: output shape ``(D, H, W)``.
        cell: coarse cell size in voxels per axis (feature size of the field).
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], cell: tuple[int, int, int]) -> None:
        self.shape = shape
        self.cell = tuple(max(1, int(c)) for c in cell)
        coarse_shape = tuple(int(np.ceil(n / c)) + 2 for n, c in zip(shape, self.cell))
        self.coarse = rng.standard_normal(coarse_shape, dtype=np.float32)

    @staticmethod
    def _lerp(arr: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
        i0 = np.floor(pos).astype(np.intp)
        wshape = [1] * arr.ndim
        wshape[axis] = -1
        w = (pos - i0).astype(np.float32).reshape(wshape)
        a = np.take(arr, i0, axis=axis)
        b = np.take(arr, np.minimum(i0 + 1, arr.shape[axis] - 1), axis=axis)
        return a + (b - a) * w

    def slab(self, sl: slice) -> np.ndarray:
        """The field on slices ``sl`` of axis 0, shape ``(n, H, W)``."""
        out = self.coarse
        for ax in range(3):
            idx = np.arange(self.shape[ax], dtype=np.float32)
            if ax == 0:
                idx = idx[sl]
            out = self._lerp(out, idx / np.float32(self.cell[ax]), ax)
        return out
