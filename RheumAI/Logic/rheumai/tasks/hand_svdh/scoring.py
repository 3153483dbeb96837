"""The van der Heijde modified Sharp (SvdH) method for one hand and wrist: joints, totals, classes.

Per hand: erosion 0-5 at 16 areas, joint-space narrowing (JSN) 0-4 at 15 areas (van der Heijde,
J Rheumatol 2000). One radiograph shows one hand, so the total here is the one-hand score
(0-140); the hands-and-wrists total of a patient is the sum over both hands' radiographs (0-280).

Each scored area has one landmark (:data:`JOINTS`, in a fixed order): the network predicts one
heatmap per landmark, and the joint crop is taken around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_EROSION = 5
MAX_JSN = 4


@dataclass(frozen=True)
class Joint:
    """One SvdH scoring area. erosion / jsn: whether the area is scored for that feature."""

    name: str
    erosion: bool
    jsn: bool
    description: str


JOINTS: tuple[Joint, ...] = (
    *(Joint(f"PIP{k}", True, True, f"proximal interphalangeal joint, finger {k}") for k in (2, 3, 4, 5)),
    Joint("IP1", True, False, "interphalangeal joint of the thumb"),
    *(Joint(f"MCP{k}", True, True, f"metacarpophalangeal joint {k}") for k in (1, 2, 3, 4, 5)),
    Joint("CMC1", True, False, "first carpometacarpal joint"),
    *(Joint(f"CMC{k}", False, True, f"carpometacarpal joint {k}") for k in (3, 4, 5)),
    Joint("trapezium", True, False, "trapezium and trapezoid (multangular)"),
    Joint("scaphoid", True, False, "scaphoid"),
    Joint("lunate", True, False, "lunate"),
    Joint("STT", False, True, "scaphoid-trapezium-trapezoid joint"),
    Joint("CSL", False, True, "capitate-scaphoid-lunate joint"),
    Joint("radiocarpal", False, True, "radiocarpal joint"),
    Joint("radius", True, False, "distal radius"),
    Joint("ulna", True, False, "distal ulna"),
)
JOINT_NAMES: tuple[str, ...] = tuple(j.name for j in JOINTS)
EROSION_MASK = np.array([j.erosion for j in JOINTS], dtype=bool)
JSN_MASK = np.array([j.jsn for j in JOINTS], dtype=bool)
assert EROSION_MASK.sum() == 16 and JSN_MASK.sum() == 15
MAX_TOTAL = 16 * MAX_EROSION + 15 * MAX_JSN  # 140 per hand

# ASSUMPTION: the paper's severity bins are not available to us. Default classes on the one-hand
# total (0-140): 0 "none" (0-4), 1 "mild" (5-14), 2 "moderate" (15-29), 3 "severe" (30-59),
# 4 "very severe" (>= 60). Change with ``class_edges`` everywhere a class is computed.
DEFAULT_CLASS_EDGES: tuple[float, ...] = (5.0, 15.0, 30.0, 60.0)
DEFAULT_CLASS_NAMES: tuple[str, ...] = ("none", "mild", "moderate", "severe", "very severe")


def severity_class(total: float | np.ndarray, edges: Sequence[float] = DEFAULT_CLASS_EDGES) -> np.ndarray:
    """Class index per total score: number of edges <= total (edges ascending)."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"class edges must be strictly ascending, got {list(edges)}")
    return np.searchsorted(edges, np.asarray(total, dtype=np.float64), side="right")


def totals(erosion: np.ndarray, jsn: np.ndarray) -> dict[str, np.ndarray]:
    """Erosion, JSN and total scores from per-joint grades (..., n_joints); unscored areas ignored."""
    erosion = np.asarray(erosion, dtype=np.float64)
    jsn = np.asarray(jsn, dtype=np.float64)
    e = (erosion * EROSION_MASK).sum(-1)
    j = (jsn * JSN_MASK).sum(-1)
    return {"erosion": e, "jsn": j, "total": e + j}


def joint_table(erosion: Sequence[float], jsn: Sequence[float], points_xy: np.ndarray | None = None,
                points_lps: np.ndarray | None = None) -> list[dict]:
    """Per-joint rows (joint, erosion, jsn, x_px, y_px, L, P, S); unscored features are None."""
    rows = []
    for i, joint in enumerate(JOINTS):
        row: dict = {"joint": joint.name,
                     "erosion": int(erosion[i]) if joint.erosion else None,
                     "jsn": int(jsn[i]) if joint.jsn else None}
        if points_xy is not None:
            row["x_px"], row["y_px"] = float(points_xy[i][0]), float(points_xy[i][1])
        if points_lps is not None:
            row["L"], row["P"], row["S"] = (float(v) for v in points_lps[i])
        rows.append(row)
    return rows
