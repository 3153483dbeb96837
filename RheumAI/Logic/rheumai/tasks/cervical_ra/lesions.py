"""Planted craniocervical lesions: T2-bright retro-axial pannus and axis (C2) erosion, in the
template's LPS space (mm) before the per-subject deformation (:mod:`.synth` warps image and mask together).

Template landmarks (mid-sagittal PNGs at x = 6.2 mm and intensity profiles along y): the field of
view ends at z = 45.7 mm; ``Testing/Data/sct_t2_crop/labels.nii.gz`` (same subject and space) puts
C3 at z = 24.7 and C5 at -10.3 mm; T2-bright discs lie at z ~ 33, 15, -3, -22 mm, so the body above
the z ~ 33 disc is the axis, whose upper part is the highest bone in the volume (dens tip, atlas and
clivus lie 25-30 mm above it). The lesions sit there with the paper's relations: pannus between the
axis' posterior wall and the thecal sac, erosion of its posterior-superior bone. Midline: CSF and
cord centred at x = 6.0-6.8 mm. At z = 40 mm: C2 marrow y = -27 .. -12, posterior cortex y ~ -10,
anterior CSF y = -8 .. -6, cord y = -4 .. +2, posterior CSF y ~ +4.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ...geometry import Grid, image_from_array

# template landmarks (LPS mm), see the module docstring
TEMPLATE_MIDLINE_X = 6.5
TEMPLATE_TOP_Z = 45.7
C2_C3_DISC_Z = 33.0
C2_POSTERIOR_WALL_Y = -10.0
AXIS_BODY_CENTRE = (6.5, -18.0, 40.0)
# Mean T2 of CSF next to the upper cord in the template (raw template units), used to scale the
# pannus signal (pannus: brighter than marrow and cord, darker than CSF).
CSF_LEVEL = 900.0

# kind: (centre y offset from the C2 posterior wall, centre z range, semi-axis ranges (LR, AP, SI),
# semi-axis factors of the small grade), template LPS mm
SHAPES = {"pannus": (3.5, (32.5, 36.0), ((7.0, 9.0), (3.5, 5.5), (5.5, 8.0)), (0.8, 0.55, 0.6)),
          "erosion": (-3.0, (35.0, 38.0), ((5.0, 6.5), (4.5, 6.0), (4.5, 5.5)), (0.8, 0.6, 0.6))}
LESION_KINDS = tuple(SHAPES)


@dataclass(frozen=True)
class LesionSpec:
    """One planted lesion, in template LPS mm.

    kind: "pannus" (T2-bright soft-tissue mass behind the axis, with mass effect pushing the thecal
    sac posteriorly by ``push_mm``) or "erosion" (darkened notch of the axis' posterior-superior
    bone). centre_lps: ellipsoid centre; semi_axes_mm: (x, y, z) = (LR, AP, SI) half-lengths.
    level: pannus signal as a fraction of :data:`CSF_LEVEL`; erosion: remaining fraction of the
    bone signal (0.1 = 90 % darker). irregularity: relative amplitude of the smooth boundary
    perturbation.
    """

    kind: str
    centre_lps: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    level: float
    push_mm: float = 0.0
    irregularity: float = 0.15


def sample_lesions(rng: np.random.Generator, kinds: tuple[str, ...], small: bool = False, scale: float = 1.0,
                   pannus_level: tuple[float, float] = (0.42, 0.58)) -> list[LesionSpec]:
    """Random lesion(s) of the given kinds around the upper axis (template LPS mm).

    Full grade: pannus 14-18 mm (LR) x 7-11 mm (AP) x 11-16 mm (SI) at ``pannus_level`` x CSF signal
    (brighter than marrow and cord, below CSF so a 99th-percentile window keeps it), erosion
    10-13 x 9-12 x 9-11 mm at 3-12 % of the bone signal; ``small`` (the "intermediate" grade): a
    thin, faint pannus and a shallow erosion, no mass effect. ``scale`` multiplies all semi-axes.
    """
    out: list[LesionSpec] = []
    for kind in kinds:
        if kind not in LESION_KINDS:
            raise ValueError(f"lesion kind must be one of {LESION_KINDS}, not {kind!r}")
        dy, z_range, axis_ranges, small_factors = SHAPES[kind]
        x = TEMPLATE_MIDLINE_X + float(np.clip(rng.normal(0.0, 0.6), -1.2, 1.2))
        centre = (x, C2_POSTERIOR_WALL_Y + dy + rng.uniform(-1.0, 1.0), rng.uniform(*z_range))
        axes = [rng.uniform(*r) for r in axis_ranges]
        level = rng.uniform(*pannus_level) if kind == "pannus" else rng.uniform(0.03, 0.12)
        push = rng.uniform(2.0, 3.5) if kind == "pannus" else 0.0
        if small:  # no mass effect; a fainter pannus, a shallower erosion
            axes, push = [a * f for a, f in zip(axes, small_factors)], 0.0
            level = level * 0.8 if kind == "pannus" else 0.5
        out.append(LesionSpec(kind, tuple(float(c) for c in centre), tuple(float(a) * scale for a in axes),
                              float(level), float(push), float(rng.uniform(0.08, 0.2))))
    return out


def _roi(image: sitk.Image, lesions: list[LesionSpec], margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Index box (numpy (k, j, i) order, start and stop) covering all lesions plus a margin."""
    corners = np.array(list(itertools.product((-1.0, 1.0), repeat=3)))
    ijk = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for les in lesions
                    for p in np.array(les.centre_lps) + (max(les.semi_axes_mm) * 1.4 + margin_mm) * corners])
    size = np.array(image.GetSize())
    lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 1, size)
    return lo[::-1], hi[::-1]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise (organic texture / boundary wobble)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return (n / max(float(n.std()), 1e-6)).astype(np.float32)


def plant_lesions(template: sitk.Image, lesions: list[LesionSpec],
                  rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """(image with the lesions, soft lesion mask in [0, 1]) on ``template``'s grid; truth = mask >= 0.5.

    Pannus: the tissue behind its centre moves posteriorly (Gaussian-weighted, up to ``push_mm``:
    thecal sac and cord pushed back), then the textured pannus signal is blended in. Erosion: the
    signal inside the notch is scaled down to ``level``.
    """
    if not lesions:
        return template, template * 0
    arr = sitk.GetArrayFromImage(template).astype(np.float32)
    soft = np.zeros(arr.shape, np.float32)
    lo, hi = _roi(template, lesions, margin_mm=8.0)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    roi = arr[box]
    m = np.array(template.GetDirection()).reshape(3, 3) * np.array(template.GetSpacing())
    idx = (np.indices(hi - lo) + lo[:, None, None, None])[::-1].reshape(3, -1).astype(float)  # (i, j, k)
    pts = (m @ idx + np.array(template.GetOrigin())[:, None]).reshape((3, *(hi - lo)))  # LPS mm
    inv = np.linalg.inv(m)
    w_all = np.zeros(roi.shape, np.float32)
    for les in lesions:
        d = pts - np.array(les.centre_lps)[:, None, None, None]
        if les.kind == "pannus" and les.push_mm > 0:
            g = np.exp(-0.5 * ((d[0] / 9.0) ** 2 + (d[1] / 7.0) ** 2 + (d[2] / 9.0) ** 2))
            side = 1.0 / (1.0 + np.exp(-d[1] / 1.5))  # only the posterior side moves
            u_idx = inv[:, 1, None, None, None] * (les.push_mm * g * side)  # +y push, in (i, j, k) voxels
            src = np.indices(roi.shape).astype(np.float32) - u_idx[::-1]  # (k, j, i) voxel coordinates
            roi = ndimage.map_coordinates(roi, src, order=1, mode="nearest").astype(np.float32)
        wobble = _smooth_noise(rng, roi.shape, sigma_vox=2.0)
        q = d / np.array(les.semi_axes_mm)[:, None, None, None]
        r = np.sqrt((q * q).sum(0)) * (1.0 + les.irregularity * wobble)
        w = np.clip((1.0 - r) / 0.2 + 0.5, 0.0, 1.0).astype(np.float32)  # soft ellipsoid: 0.5 on its surface
        if les.kind == "pannus":
            texture = 1.0 + 0.15 * _smooth_noise(rng, roi.shape, sigma_vox=1.0)
            roi = roi * (1.0 - w) + w * (les.level * CSF_LEVEL * texture)
        else:
            roi = roi * (1.0 - w * (1.0 - les.level))
        w_all = np.maximum(w_all, w)
    arr[box] = roi
    soft[box] = w_all
    grid = Grid.of(template)
    return image_from_array(arr, grid), image_from_array(soft, grid)
