"""Anatomical frames and sampling grids in LPS physical space (mm).

A *grid* is (origin, direction, spacing, size) as in ITK: index (i, j, k) lies at
``origin + direction @ (spacing * (i, j, k))``, ``direction`` columns being the i, j, k axes in
LPS; arrays on a grid are indexed (k, j, i). The sagittal *selection frame* has i (columns)
anterior -> posterior (+y), j (rows) superior -> inferior (-z), k (slices) right -> left (+x): a
slice shows the profile facing left, head up, whatever the acquisition or patient position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

# Columns: the i, j, k axes of the sagittal selection frame in LPS.
SAGITTAL_FRAME = np.array(
    [[0.0, 0.0, 1.0],
     [1.0, 0.0, 0.0],
     [0.0, -1.0, 0.0]]
)


@dataclass(frozen=True)
class Grid:
    """A regular sampling grid in LPS mm. size and spacing are in (i, j, k) order."""

    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]  # 3x3, row-major, columns = axes
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float)

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """(..., 3) continuous indices (i, j, k) -> (..., 3) LPS points in mm."""
        return np.asarray(ijk, dtype=float) @ (self.direction_matrix * self.spacing).T + self.origin

    def physical_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(..., 3) LPS points in mm -> (..., 3) continuous indices (i, j, k)."""
        m = self.direction_matrix * self.spacing
        return (np.asarray(xyz, dtype=float) - self.origin) @ np.linalg.inv(m).T

    def reference_image(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        return apply_grid(sitk.Image([int(s) for s in self.size], pixel_type), self)

    def to_dict(self) -> dict:
        return {"origin": list(self.origin), "direction": [list(r) for r in self.direction],
                "spacing": list(self.spacing), "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(origin=tuple(map(float, d["origin"])),
                   direction=tuple(tuple(map(float, r)) for r in d["direction"]),
                   spacing=tuple(map(float, d["spacing"])), size=tuple(map(int, d["size"])))

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        """The grid of a 3D SimpleITK image."""
        return cls.from_dict({"origin": image.GetOrigin(), "direction": np.reshape(image.GetDirection(), (3, 3)),
                              "spacing": image.GetSpacing(), "size": image.GetSize()})


def apply_grid(image: sitk.Image, grid: Grid) -> sitk.Image:
    """Set origin / spacing / direction of ``image`` (in place) from ``grid``; returns it."""
    image.SetOrigin([float(v) for v in grid.origin])
    image.SetSpacing([float(v) for v in grid.spacing])
    image.SetDirection([float(v) for v in grid.direction_matrix.ravel()])
    return image


def image_from_array(array: np.ndarray, grid: Grid) -> sitk.Image:
    """A SimpleITK image from a (k, j, i) array on ``grid``."""
    array = np.asarray(array)
    if tuple(array.shape[::-1]) != tuple(grid.size):
        raise ValueError(f"array shape {array.shape} (k, j, i) does not match grid size {grid.size} (i, j, k)")
    return apply_grid(sitk.GetImageFromArray(array), grid)


def voxel_center(image: sitk.Image) -> np.ndarray:
    """Physical centre (LPS mm) of the box spanned by the voxel centres."""
    size = np.asarray(image.GetSize(), dtype=float)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))


def corners(image: sitk.Image) -> np.ndarray:
    """(8, 3) LPS points of the outer voxel edges (half a voxel beyond the corner centres)."""
    size = np.asarray(image.GetSize(), dtype=float)
    return np.array([image.TransformContinuousIndexToPhysicalPoint((np.array(c) * size - 0.5).tolist())
                     for c in itertools.product((0, 1), repeat=3)])


def snap_frame(direction: np.ndarray, target: np.ndarray = SAGITTAL_FRAME) -> np.ndarray:
    """The image's own axes (3x3, columns, LPS), permuted and sign-flipped to be closest to ``target``:
    ``target`` exactly for a non-oblique image, else the acquisition's obliquity is kept (slices stay
    parallel to the acquired planes)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    dots = direction.T @ target  # [image axis a, target axis b]
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(dots[p[b], b]) for b in range(3)))
    frame = np.stack([direction[:, best[b]] * np.sign(dots[best[b], b] or 1.0) for b in range(3)], axis=1)
    # Exact target when the image axes are the anatomical axes up to rounding (avoid 1e-7 noise).
    if np.abs(frame - target).max() < 1e-6:
        return target.copy()
    return frame

