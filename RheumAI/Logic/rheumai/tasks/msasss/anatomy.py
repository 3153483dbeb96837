"""mSASSS anatomy: vertebrae, points, scored corners and disc levels per view; plausibility checks.

Per view (lateral cervical, lateral lumbar) seven vertebrae and 21 landmarks: per vertebra the
anterior-superior corner ("upper"), the anterior-inferior corner ("lower") and the body centre.
The mSASSS scores 12 anterior corners per view (C2 lower .. T1 upper, T12 lower .. S1 upper),
0-3 each, total 0-72; the two corners of a disc level are scored from one crop. Points are (x, y)
pixels of the radiograph (x = column, y = row; superior is up, i.e. smaller y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

VIEWS: dict[str, tuple[str, ...]] = {
    "cervical": ("C2", "C3", "C4", "C5", "C6", "C7", "T1"),
    "lumbar": ("T12", "L1", "L2", "L3", "L4", "L5", "S1"),
}
POINT_KINDS = ("upper", "lower", "centre")
N_POINTS = 21  # per view: 7 vertebrae x (upper, lower, centre)


def point_names(view: str) -> list[str]:
    """The 21 landmark names of a view in network channel order ("C2 upper", "C2 lower", "C2 centre", ...)."""
    return [f"{v} {k}" for v in _vertebrae(view) for k in POINT_KINDS]


def point_index(view: str, vertebra: str, kind: str) -> int:
    return _vertebrae(view).index(vertebra) * 3 + POINT_KINDS.index(kind)


@dataclass(frozen=True)
class DiscLevel:
    """One disc level of a view: the lower corner of ``above`` and the upper corner of ``below``."""

    view: str
    above: str
    below: str

    @property
    def name(self) -> str:
        return f"{self.above}-{self.below}"

    @property
    def corners(self) -> tuple[str, str]:
        """(lower corner of the vertebra above, upper corner of the one below)."""
        return f"{self.above} lower", f"{self.below} upper"


def disc_levels(view: str) -> list[DiscLevel]:
    """The six scored disc levels of a view, top to bottom (C2-C3 .. C7-T1; T12-L1 .. L5-S1)."""
    v = _vertebrae(view)
    return [DiscLevel(view, v[i], v[i + 1]) for i in range(len(v) - 1)]


def scored_corners(view: str) -> list[str]:
    """The 12 mSASSS corners of a view, top to bottom."""
    return [c for lvl in disc_levels(view) for c in lvl.corners]


def _vertebrae(view: str) -> tuple[str, ...]:
    try:
        return VIEWS[view]
    except KeyError:
        raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEWS)}") from None


def check_points(view: str, xy: np.ndarray, shape: tuple[int, int], spacing_mm: tuple[float, float],
                 ratio_limits: tuple[float, float] = (0.5, 2.0)) -> dict[str, Any]:
    """Plausibility of the 21 landmarks of a view: flags, never silent corrections.

    View flags (the level labels are unreliable): points not finite; centres not in cranio-caudal
    order along the spine or their steps outside ``ratio_limits`` of the median; an inner
    vertebra's upper corner not above its lower one, or its corners not on the anterior side.
    Corner flags (12 scored corners): vertebral height or corner-to-centre distance outside
    ``ratio_limits`` of the view's medians, outside the image. The unscored end corners (C2 / T12
    upper, T1 / S1 lower) take part in no check.
    Returns {"view_ok": bool, "view_flags": [str], "corner_flags": {corner: [str]}}.
    """
    xy = np.asarray(xy, float).reshape(N_POINTS, 2)
    names, verts = point_names(view), _vertebrae(view)
    view_flags: list[str] = []
    corner_flags: dict[str, list[str]] = {c: [] for c in scored_corners(view)}
    if not np.isfinite(xy).all():
        bad = [names[i] for i in np.where(~np.isfinite(xy).all(1))[0]]
        return {"view_ok": False, "view_flags": [f"points missing: {', '.join(bad)}"], "corner_flags": corner_flags}
    mm = xy * np.array([spacing_mm[1], spacing_mm[0]], float)  # (x, y) mm per pixel
    up, lo, ce = mm[0::3], mm[1::3], mm[2::3]
    axis = ce[-1] - ce[0]
    if np.linalg.norm(axis) == 0:
        return {"view_ok": False, "view_flags": ["all vertebral centres coincide"], "corner_flags": corner_flags}
    axis /= np.linalg.norm(axis)
    if axis[1] <= 0:
        view_flags.append(f"{verts[0]} is not above {verts[-1]} (image upside down or points swapped)")
    steps = np.diff(ce @ axis)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        view_flags.append(f"vertebrae out of order along the spine at {verts[i]}-{verts[i + 1]}")
    normal = np.array([-axis[1], axis[0]])  # perpendicular to the spine axis (image left when axis points down)
    inner = range(1, len(verts) - 1)
    scored_pts = [up[i] for i in inner] + [lo[i] for i in inner] + [lo[0], up[-1]]
    scored_ce = [ce[i] for i in inner] * 2 + [ce[0], ce[-1]]
    sides = np.sign([(p - c) @ normal for p, c in zip(scored_pts, scored_ce)])
    side = np.sign(np.median(sides))
    for i in inner:
        v = verts[i]
        if (lo[i] - up[i]) @ axis <= 0:
            view_flags.append(f"{v}: upper corner not above the lower corner")
        if np.sign((up[i] - ce[i]) @ normal) != side or np.sign((lo[i] - ce[i]) @ normal) != side:
            view_flags.append(f"{v}: corners not on the anterior side of the centre")
    lo_r, hi_r = ratio_limits
    spacing = np.linalg.norm(np.diff(ce, axis=0), axis=1)
    med = float(np.median(spacing))
    for i, val in enumerate(spacing):
        if med <= 0 or not lo_r <= val / med <= hi_r:
            view_flags.append(f"centre spacing at {verts[i]}-{verts[i + 1]} is {val:.1f} mm, implausible against "
                              f"the median {med:.1f} mm")
    heights = {verts[i]: float(np.linalg.norm(lo[i] - up[i])) for i in inner}
    med_h = float(np.median(list(heights.values())))
    reach = {f"{verts[i]} upper": float(np.linalg.norm(up[i] - ce[i])) for i in inner}
    reach.update({f"{verts[i]} lower": float(np.linalg.norm(lo[i] - ce[i])) for i in inner})
    med_r = float(np.median(list(reach.values())))
    reach[f"{verts[0]} lower"] = float(np.linalg.norm(lo[0] - ce[0]))
    reach[f"{verts[-1]} upper"] = float(np.linalg.norm(up[-1] - ce[-1]))
    for c in corner_flags:
        v = c.split()[0]
        if v in heights and (med_h <= 0 or not lo_r <= heights[v] / med_h <= hi_r):
            corner_flags[c].append(f"{v} height {heights[v]:.1f} mm implausible against the median {med_h:.1f} mm")
        if med_r <= 0 or not lo_r <= reach[c] / med_r <= hi_r:
            corner_flags[c].append(f"corner {reach[c]:.1f} mm from its vertebra's centre, implausible against the "
                                   f"median {med_r:.1f} mm")
        x, y = xy[names.index(c)]
        if not (0 <= x <= shape[1] - 1 and 0 <= y <= shape[0] - 1):
            corner_flags[c].append("outside the image")
    return {"view_ok": not view_flags, "view_flags": view_flags, "corner_flags": corner_flags}
