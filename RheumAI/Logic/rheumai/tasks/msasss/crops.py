"""Sampling grids on a radiograph: the letterboxed network input and the disc-level crop.

A :class:`Grid` maps output pixels to source pixels affinely, ``src_xy = A @ out_xy + b`` ((x, y)
= (column, row), centres at integers), so points found on a grid map back exactly and corrected
points map forward. The disc-level crop runs along the spine: rows cranio-caudal along the line
between the two vertebral centres, columns anterior (left) to posterior; the lower corner of the
vertebra above on top, the upper corner of the one below at the bottom; side ``side_factor`` x
the centre-to-centre distance (the same anatomical scale at every level and view).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from .anatomy import disc_levels, point_index


@dataclass(frozen=True)
class Grid:
    """Output grid of ``shape`` (H, W) on a source image: ``src_xy = A @ out_xy + b``."""

    A: np.ndarray
    b: np.ndarray
    shape: tuple[int, int]

    def to_source(self, xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy, float) @ self.A.T + self.b

    def from_source(self, xy: np.ndarray) -> np.ndarray:
        return (np.asarray(xy, float) - self.b) @ np.linalg.inv(self.A).T

    def sample(self, array: np.ndarray) -> np.ndarray:
        """Resample ``array`` (H_src, W_src) on this grid (linear; outside -> nearest edge value),
        low-pass filtered first when the grid is coarser than the source."""
        h, w = self.shape
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        src = self.to_source(np.column_stack([xs.ravel(), ys.ravel()]))
        step = np.sqrt(abs(np.linalg.det(self.A)))
        if step > 1.3:
            array = gaussian_filter(array, 0.4 * step)
        out = map_coordinates(array, [src[:, 1], src[:, 0]], order=1, mode="nearest")
        return out.reshape(h, w).astype(np.float32)


def fit_grid(src_shape: tuple[int, int], out_shape: tuple[int, int], rng: np.random.Generator | None = None,
             rotate_deg: float = 0.0, scale: float = 0.0, shift: float = 0.0) -> Grid:
    """Letterbox grid: the whole source fitted into ``out_shape`` (aspect kept, centred); with ``rng``
    a random rotation (+-rotate_deg), zoom (1 +- scale) and shift (+- shift of the size) about the centre."""
    sh, sw = src_shape
    oh, ow = out_shape
    f = max(sh / oh, sw / ow)  # source pixels per output pixel
    A = np.eye(2) * f
    c_out = np.array([(ow - 1) / 2, (oh - 1) / 2])
    c_src = np.array([(sw - 1) / 2, (sh - 1) / 2])
    if rng is not None:
        a = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
        z = rng.uniform(1 - scale, 1 + scale)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) * z
        A = A @ rot
        c_src = c_src + rng.uniform(-shift, shift, 2) * np.array([sw, sh])
    return Grid(A, c_src - A @ c_out, (oh, ow))


def level_grid(points_xy: np.ndarray, view: str, level: int, spacing_mm: tuple[float, float], size: int = 48,
               side_factor: float = 0.9, posterior_shift: float = 0.2, rng: np.random.Generator | None = None,
               jitter_mm: float = 0.0, jitter_deg: float = 0.0, jitter_scale: float = 0.0) -> Grid:
    """Crop grid (size x size) of disc level ``level`` (0 = topmost) from the 21 points of a view;
    spacing_mm (row, col). Centre: the corners' midpoint, shifted posteriorly by ``posterior_shift``
    of the side; with ``rng`` centre, angle and side jittered (+-jitter_mm, +-jitter_deg, 1 +- jitter_scale)."""
    lvl = disc_levels(view)[level]
    pts = np.asarray(points_xy, float)
    sx, sy = float(spacing_mm[1]), float(spacing_mm[0])
    to_mm = np.array([sx, sy])
    qa = pts[point_index(view, lvl.above, "lower")] * to_mm
    qb = pts[point_index(view, lvl.below, "upper")] * to_mm
    ca = pts[point_index(view, lvl.above, "centre")] * to_mm
    cb = pts[point_index(view, lvl.below, "centre")] * to_mm
    axis = cb - ca
    dist = float(np.linalg.norm(axis))
    if not np.isfinite(dist) or dist <= 0:
        raise ValueError(f"{view} {lvl.name}: vertebral centres coincide or are missing")
    t = axis / dist
    n = np.array([-t[1], t[0]])
    if ((qa + qb) / 2 - (ca + cb) / 2) @ n < 0:
        n = -n  # n points anterior (towards the corners)
    side = side_factor * dist
    centre = (qa + qb) / 2 - posterior_shift * side * n
    if rng is not None:
        a = np.deg2rad(rng.uniform(-jitter_deg, jitter_deg))
        t = np.array([np.cos(a) * t[0] - np.sin(a) * t[1], np.sin(a) * t[0] + np.cos(a) * t[1]])
        n = np.array([np.cos(a) * n[0] - np.sin(a) * n[1], np.sin(a) * n[0] + np.cos(a) * n[1]])
        side *= rng.uniform(1 - jitter_scale, 1 + jitter_scale)
        centre = centre + rng.uniform(-jitter_mm, jitter_mm, 2)
    pix = side / size
    cols = -n * pix  # one crop column step, mm (towards posterior)
    rows = t * pix   # one crop row step, mm (caudal)
    d = np.diag([1 / sx, 1 / sy])
    A = d @ np.column_stack([cols, rows])
    c0 = (size - 1) / 2
    b = d @ (centre - c0 * (cols + rows))
    return Grid(A, b, (size, size))
