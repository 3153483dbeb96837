"""Procedural PA hand radiographs with known SvdH truth (per-joint erosion 0-5 and JSN 0-4).

Anatomy is laid out in a hand frame (u, v) in mm: u towards the thumb, v distal, origin at the
radiocarpal joint. Radius (shaft + epiphysis), ulna, eight carpals, five metacarpals and fourteen
phalanges are capsules or ellipses; each projects as a chord-length density with a brighter cortex
(so shafts show cortical lines and medulla). Soft tissue is a union of capsules around the fingers,
palm and forearm. A joint's narrowing grade g sets its gap to ``(1, .78, .55, .3, 0)[g]`` of the
normal width (4 = ankylosis); an erosion grade g cuts ``1 + (g >= 3)`` disc-shaped cortical defects
of radius ``(0.22 + 0.14 g) * bone radius`` at the articular margin(s). Grades follow a per-patient
latent severity (RA is polyarticular and roughly symmetric), so the whole-hand total is learnable.

Images (canonical side: a left hand PA, fingers up, thumb at image right) are drawn with random
size, rotation, shift, finger spread, exposure, gamma, blur, noise and occasional rings, then right
hands are mirrored. Written as DICOM CR (MONOCHROME1 or 2, PixelSpacing or ImagerPixelSpacing,
Laterality) + ``labels.csv`` (per-joint grades, totals, class) + ``landmarks.csv`` (one point per
SvdH area, (x, y) pixels in the written file).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from ...atomic import write_json, write_text
from ...paths import safe_child
from ...radiograph import write_radiograph_dicom
from .scoring import (DEFAULT_CLASS_EDGES, EROSION_MASK, JOINT_NAMES, JOINTS, JSN_MASK, MAX_EROSION, MAX_JSN,
                      severity_class, totals)

GAP_FACTOR = (1.0, 0.78, 0.55, 0.3, 0.0)
JIDX = {n: i for i, n in enumerate(JOINT_NAMES)}
CAP = 0.5  # articular ends of metacarpals and phalanges: half-ellipses half as long as the bone radius
FINGER_ANGLE = {1: 32.0, 2: 11.0, 3: 0.0, 4: -10.0, 5: -20.0}  # phalanx directions (deg from +v towards the thumb)


@dataclass
class SynthParams:
    """Cohort generation parameters. shape: (H, W) pixels; spacing_range_mm: isotropic pixel size."""

    shape: tuple[int, int] = (320, 256)
    spacing_range_mm: tuple[float, float] = (0.78, 0.86)
    size_range: tuple[float, float] = (0.88, 1.04)
    rotation_deg: float = 8.0
    shift_mm: float = 8.0
    healthy_fraction: float = 0.2
    right_fraction: float = 0.5
    ring_fraction: float = 0.15
    monochrome1_fraction: float = 0.5
    noise_range: tuple[float, float] = (0.008, 0.025)


@dataclass
class HandSample:
    """One generated radiograph and its truth. array: (H, W) float32 in [0, 1], bone bright, in the
    written side's frame; points_xy: (n_joints, 2) pixel (x, y); erosion / jsn: (n_joints,) grades
    (0 where the area is not scored for that feature)."""

    array: np.ndarray
    spacing_mm: float
    laterality: str
    points_xy: np.ndarray
    erosion: np.ndarray
    jsn: np.ndarray
    severity: float
    hand_length_mm: float


# ---------------------------------------------------------------- grades

# relative susceptibility per area (MCP 2/3, PIP, ulna and wrist are early RA sites)
_WEIGHT = {"PIP2": .9, "PIP3": .9, "PIP4": .8, "PIP5": .8, "IP1": .6, "MCP1": .6, "MCP2": 1., "MCP3": 1.,
           "MCP4": .8, "MCP5": .9, "CMC1": .6, "CMC3": .7, "CMC4": .7, "CMC5": .7, "trapezium": .6,
           "scaphoid": .8, "lunate": .7, "STT": .7, "CSL": .9, "radiocarpal": .8, "radius": .6, "ulna": .9}


def draw_grades(rng: np.random.Generator, severity: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint erosion (0-5) and JSN (0-4) grades for a latent severity in [0, 1]."""
    w = np.array([_WEIGHT[n] for n in JOINT_NAMES])
    jitter = rng.uniform(0.6, 1.3, size=w.shape)
    ero = np.rint(severity * 6.2 * w * jitter + rng.normal(0, 0.7, w.shape) - 0.6).clip(0, MAX_EROSION)
    jsn = np.rint(severity * 5.0 * w * rng.uniform(0.6, 1.3, size=w.shape) + rng.normal(0, 0.6, w.shape) - 0.6)
    jsn = jsn.clip(0, MAX_JSN)
    return (ero * EROSION_MASK).astype(np.int64), (jsn * JSN_MASK).astype(np.int64)


# ---------------------------------------------------------------- anatomy (hand frame, mm)

def _rot(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([np.sin(t), np.cos(t)])  # unit direction: angle from +v towards +u


class _Anatomy:
    """Bones, soft tissue and landmarks of one hand in the hand frame (mm)."""

    def __init__(self) -> None:
        self.bones: list[dict] = []  # {"kind": "capsule"|"ellipse", geometry..., "bites": [(c, r)]}
        self.soft: list[tuple[np.ndarray, np.ndarray, float]] = []  # capsules (p0, p1, r)
        self.points: dict[str, np.ndarray] = {}
        self.rings: list[tuple[np.ndarray, np.ndarray, float]] = []

    def capsule(self, p0, p1, r, name="", cap=1.0) -> dict:
        """Bone between segment ends p0, p1 (mm), radius r; its ends are half-ellipses reaching
        ``cap * r`` beyond the segment (cap < 1: flatter articular ends)."""
        b = {"kind": "capsule", "p0": np.asarray(p0, float), "p1": np.asarray(p1, float), "r": float(r),
             "cap": float(cap), "bites": [], "name": name}
        self.bones.append(b)
        return b

    def ellipse(self, c, a, b, angle=0.0, name="") -> dict:
        e = {"kind": "ellipse", "c": np.asarray(c, float), "a": float(a), "b": float(b), "angle": float(angle),
             "bites": [], "name": name}
        self.bones.append(e)
        return e


def _bite_capsule(rng, bone: dict, end: str, grade: int) -> None:
    """Cortical defects at one end ("p0" base / "p1" head) of a capsule bone for erosion ``grade``."""
    if grade <= 0:
        return
    p0, p1, r = bone["p0"], bone["p1"], bone["r"]
    axis = (p1 - p0) / max(np.linalg.norm(p1 - p0), 1e-6)
    normal = np.array([-axis[1], axis[0]])
    tip = p1 if end == "p1" else p0
    inward = -axis if end == "p1" else axis
    radius = (0.22 + 0.14 * grade) * r
    sides = rng.permutation([-1.0, 1.0])
    for k in range(1 + int(grade >= 3)):
        c = tip + inward * rng.uniform(0.0, 0.5) * r + normal * sides[k % 2] * r * rng.uniform(0.75, 1.0)
        bone["bites"].append((c, radius * rng.uniform(0.9, 1.1)))


def _bite_ellipse(rng, bone: dict, grade: int, toward: np.ndarray | None = None) -> None:
    if grade <= 0:
        return
    a, b = bone["a"], bone["b"]
    radius = (0.22 + 0.14 * grade) * min(a, b) * 1.1
    for _ in range(1 + int(grade >= 3)):
        if toward is not None:
            ang = np.arctan2(toward[1], toward[0]) + rng.uniform(-0.8, 0.8)
        else:
            ang = rng.uniform(0, 2 * np.pi)
        c = bone["c"] + np.array([a * np.cos(ang), b * np.sin(ang)]) * 0.95
        bone["bites"].append((c, radius * rng.uniform(0.9, 1.1)))


def build_anatomy(rng: np.random.Generator, ero: np.ndarray, jsn: np.ndarray, ring: bool) -> _Anatomy:
    """Lay out one left hand (hand frame, mm, unit size) with the given per-joint grades."""
    A = _Anatomy()
    g = lambda name, w0: w0 * GAP_FACTOR[int(jsn[JIDX[name]])]  # noqa: E731 - gap of a scored joint
    e = lambda name: int(ero[JIDX[name]])  # noqa: E731
    # forearm and wrist
    g_rc = g("radiocarpal", 2.8)
    radius = A.capsule((3.0, -95.0), (3.0, -12.0 - g_rc), 9.5, "radius")
    rad_epi = A.ellipse((3.5, -7.5 - g_rc), 13.0, 7.5, 0.0, "radius_epiphysis")
    ulna = A.capsule((-17.5, -95.0), (-17.0, -9.0), 6.3, "ulna")
    ulna_head = A.ellipse((-16.5, -6.5), 6.5, 4.5, 0.0, "ulna_head")
    _bite_ellipse(rng, rad_epi, e("radius"), toward=np.array([1.0, 0.6]))
    _bite_ellipse(rng, ulna_head, e("ulna"), toward=np.array([-1.0, 0.8]))
    if e("radius") >= 4:
        _bite_capsule(rng, radius, "p1", e("radius") - 3)
    if e("ulna") >= 4:
        _bite_capsule(rng, ulna, "p1", e("ulna") - 3)
    A.points["radius"] = np.array([10.0, -7.5 - g_rc])
    A.points["ulna"] = np.array([-16.5, -6.5])
    A.points["radiocarpal"] = np.array([2.0, -g_rc / 2.0])
    # proximal carpal row (bottom at v = 0)
    scaphoid = A.ellipse((10.0, 8.5), 6.5, 8.5, 0.0, "scaphoid")
    lunate = A.ellipse((-1.5, 6.5), 6.0, 6.5, 0.0, "lunate")
    A.ellipse((-11.5, 8.0), 5.0, 5.5, 0.0, "triquetrum")
    A.ellipse((-13.5, 11.0), 3.5, 3.5, 0.0, "pisiform")
    _bite_ellipse(rng, scaphoid, e("scaphoid"))
    _bite_ellipse(rng, lunate, e("lunate"))
    A.points["scaphoid"], A.points["lunate"] = scaphoid["c"].copy(), lunate["c"].copy()
    # distal carpal row
    g_csl, g_stt = g("CSL", 2.4), g("STT", 2.4)
    capitate = A.ellipse((0.5, 13.0 + g_csl + 9.5), 5.5, 9.5, 0.0, "capitate")
    hamate = A.ellipse((-10.0, 13.5 + g_csl + 8.0), 5.5, 8.0, 0.0, "hamate")
    trapezoid = A.ellipse((8.5, 17.0 + g_stt + 5.0), 4.3, 5.0, 0.0, "trapezoid")
    trapezium = A.ellipse((16.5, 15.0 + g_stt + 6.0), 5.8, 6.0, 20.0, "trapezium")
    _bite_ellipse(rng, trapezium, e("trapezium"))
    A.points["trapezium"] = trapezium["c"].copy()
    A.points["STT"] = np.array([12.5, 16.0 + g_stt / 2.0])
    A.points["CSL"] = np.array([0.0, 13.0 + g_csl / 2.0])
    # metacarpals: (base u, base v, angle, length, radius, cmc gap)
    cap_top, ham_top = capitate["c"][1] + 9.5, hamate["c"][1] + 8.0
    mcs = {
        1: (18.5, trapezium["c"][1] + 6.0 + 2.4, 34.0, 44.0, 4.6, 2.4),
        2: (8.5, trapezoid["c"][1] + 5.0 + 2.2, 7.0, 64.0, 4.2, 2.2),
        3: (0.5, cap_top + g("CMC3", 2.2), 0.0, 62.0, 4.2, None),
        4: (-8.5, ham_top + g("CMC4", 2.2), -7.0, 56.0, 3.9, None),
        5: (-16.0, ham_top - 2.0 + g("CMC5", 2.2), -14.0, 51.0, 3.8, None),
    }
    for k, (bu, bv, ang, length, r, _) in mcs.items():
        if k in (3, 4, 5):
            gap = bv - (cap_top if k == 3 else (ham_top if k == 4 else ham_top - 2.0))
            A.points[f"CMC{k}"] = np.array([bu, bv - gap / 2.0])
    A.points["CMC1"] = np.array([18.5, trapezium["c"][1] + 6.0 + 1.2])
    # fingers: phalanx lengths and radii
    phal = {1: ((31.0, 4.3), (24.0, 3.6)), 2: ((40.0, 3.9), (24.0, 3.3), (17.0, 2.8)),
            3: ((45.0, 4.0), (28.0, 3.4), (18.0, 2.9)), 4: ((42.0, 3.8), (27.0, 3.2), (18.0, 2.8)),
            5: ((33.0, 3.4), (19.0, 2.9), (16.0, 2.5))}
    spread = rng.normal(0, 4.0)
    for k, (bu, bv, ang, length, r, _) in mcs.items():
        ang = ang + spread * (k - 3) / 6.0 + rng.normal(0, 1.5)
        d = _rot(ang)
        base = np.array([bu, bv])
        mc = A.capsule(base + d * r * CAP, base + d * (length - r * CAP), r, f"MC{k}", cap=CAP)
        if k == 1:
            _bite_capsule(rng, mc, "p0", e("CMC1"))
        pos = base + d * length
        chain = phal[k]
        gaps = [g(f"MCP{k}", 3.0)] + ([g("IP1", 2.4) if k == 1 else g(f"PIP{k}", 2.6)]) + ([1.8] if k > 1 else [])
        names = [f"MCP{k}", "IP1" if k == 1 else f"PIP{k}", None]
        prev = mc
        finger_dir = d
        for idx, (plen, pr) in enumerate(chain):
            gap = gaps[idx]
            if names[idx] is not None:
                A.points[names[idx]] = pos + finger_dir * gap / 2.0
                grade = e(names[idx])
                if grade:
                    which = rng.random()
                    if which < 0.6:
                        _bite_capsule(rng, prev, "p1", grade)
                    pending = grade if which >= 0.3 else 0
                else:
                    pending = 0
            else:
                pending = 0
            finger_dir = _rot(FINGER_ANGLE[k] + spread * (k - 3) / 3.0 + rng.normal(0, 1.5))
            start = pos + finger_dir * gap
            bone = A.capsule(start + finger_dir * pr * CAP, start + finger_dir * (plen - pr * CAP), pr, f"P{k}{idx}",
                             cap=CAP)
            if names[idx] is not None and int(jsn[JIDX[names[idx]]]) >= 4:  # ankylosis: bony bridge
                A.capsule(pos - finger_dir * pr * 0.3, start + finger_dir * pr * 0.3, pr * 0.75,
                          f"bridge_{names[idx]}")
            if pending:
                _bite_capsule(rng, bone, "p0", pending)
            if ring and k == 4 and idx == 0:
                A.rings.append((start + finger_dir * plen * 0.45, finger_dir, pr + 3.2))
            prev = bone
            pos = start + finger_dir * plen
        A.soft.append((base + d * length * 0.9, pos - finger_dir * 2.0, r + 3.8))
    # palm, wrist and forearm soft tissue
    for k, (bu, bv, ang, length, r, _) in mcs.items():
        if k > 1:
            A.soft.append((np.array([bu * 0.8, 10.0]), np.array([bu, bv]) + _rot(ang) * length * 0.85, 10.0))
    A.soft.append((np.array([12.0, 20.0]), np.array([18.0, 45.0]), 11.0))
    A.soft.append((np.array([-3.0, 0.0]), np.array([-3.0, 30.0]), 25.0))
    A.soft.append((np.array([-6.0, -110.0]), np.array([-4.0, -5.0]), 29.0))
    return A


# ---------------------------------------------------------------- rendering

def _capsule_q(U, V, p0, p1, r, cap=1.0):
    """Normalised distance (1 on the surface) to a capsule whose end caps reach ``cap * r``."""
    d = p1 - p0
    L = float(np.sqrt(d @ d)) or 1e-9
    a = d / L
    s = (U - p0[0]) * a[0] + (V - p0[1]) * a[1]  # mm along the axis from p0
    perp = np.abs(-(U - p0[0]) * a[1] + (V - p0[1]) * a[0]) / r
    beyond = (np.clip(-s, 0.0, None) + np.clip(s - L, 0.0, None)) / (cap * r)
    return np.sqrt(perp * perp + beyond * beyond)


def _ellipse_q(U, V, c, a, b, angle):
    t = np.deg2rad(angle)
    du, dv = U - c[0], V - c[1]
    x = du * np.cos(t) + dv * np.sin(t)
    y = -du * np.sin(t) + dv * np.cos(t)
    return np.sqrt((x / a) ** 2 + (y / b) ** 2)


def _chord(q):
    return np.sqrt(np.clip(1.0 - q * q, 0.0, None))


def _extent(b: dict) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned (u, v) bounds of a bone (mm)."""
    if b["kind"] == "capsule":
        reach = b["r"] * max(1.0, b["cap"])
        pts = np.stack([b["p0"], b["p1"]])
    else:
        reach = max(b["a"], b["b"])
        pts = b["c"][None]
    return pts.min(0) - reach, pts.max(0) + reach


def render(A: _Anatomy, U: np.ndarray, V: np.ndarray, rng: np.random.Generator, osteopenia: float) -> np.ndarray:
    """Attenuation line integral (arbitrary units) on the grid (U, V) of hand-frame mm.

    Each shape is evaluated only at the grid points inside its bounding box (vectorised)."""
    u, v = U.ravel(), V.ravel()
    soft = np.zeros(u.shape)
    for p0, p1, r in A.soft:
        lo, hi = np.minimum(p0, p1) - r, np.maximum(p0, p1) + r
        i = np.flatnonzero((u >= lo[0]) & (u <= hi[0]) & (v >= lo[1]) & (v <= hi[1]))
        soft[i] = np.maximum(soft[i], _chord(_capsule_q(u[i], v[i], p0, p1, r)) * r)
    bone = np.zeros(u.shape)
    for b in A.bones:
        lo, hi = _extent(b)
        i = np.flatnonzero((u >= lo[0]) & (u <= hi[0]) & (v >= lo[1]) & (v <= hi[1]))
        ui, vi = u[i], v[i]
        if b["kind"] == "capsule":
            q = _capsule_q(ui, vi, b["p0"], b["p1"], b["r"], b["cap"])
            size, inner = b["r"], 0.62
        else:
            q = _ellipse_q(ui, vi, b["c"], b["a"], b["b"], b["angle"])
            size, inner = min(b["a"], b["b"]), 0.8
        dens = size * (_chord(q) - (0.55 if b["kind"] == "capsule" else 0.35) * _chord(q / inner))
        for c, rad in b["bites"]:
            dist = np.sqrt((ui - c[0]) ** 2 + (vi - c[1]) ** 2)
            dens = dens * np.clip((dist - rad) / 0.6 + 0.5, 0.0, 1.0)
        bone[i] += dens
    metal = np.zeros(u.shape)
    for c, d, half in A.rings:
        along = (u - c[0]) * d[0] + (v - c[1]) * d[1]
        across = np.abs(-(u - c[0]) * d[1] + (v - c[1]) * d[0])
        metal += ((np.abs(along) < 1.6) & (across < half)).astype(float) * 6.0
    return (0.022 * soft + 0.2 * (1.0 - osteopenia) * bone + metal).reshape(U.shape)


def make_hand(rng: np.random.Generator, params: SynthParams, severity: float | None = None,
              laterality: str | None = None) -> HandSample:
    """One radiograph with its truth (see module docstring)."""
    if severity is None:
        severity = 0.0 if rng.random() < params.healthy_fraction else float(rng.uniform(0, 1) ** 1.2)
    ero, jsn = draw_grades(rng, severity)
    ring = bool(rng.random() < params.ring_fraction)
    A = build_anatomy(rng, ero, jsn, ring)
    H, W = params.shape
    sp = float(rng.uniform(*params.spacing_range_mm))
    scale = float(rng.uniform(*params.size_range))
    rot = np.deg2rad(rng.uniform(-params.rotation_deg, params.rotation_deg))
    shift = rng.uniform(-params.shift_mm, params.shift_mm, 2)
    # pixel grid -> hand frame: image centre maps to hand point (18, 78) mm (mid hand)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    X = (xx - (W - 1) / 2.0) * sp - shift[0]
    Y = -((yy - (H - 1) / 2.0) * sp - shift[1])
    cr, sr = np.cos(rot), np.sin(rot)
    U = (cr * X + sr * Y) / scale + 18.0
    V = (-sr * X + cr * Y) / scale + 78.0
    osteo = 0.25 * severity * rng.uniform(0.5, 1.0)
    L = render(A, U, V, rng, osteo) * scale
    gain = rng.uniform(0.8, 1.25)
    img = 1.0 - np.exp(-gain * L)
    img = gaussian_filter(img, rng.uniform(0.4, 0.9))
    img = img ** rng.uniform(0.8, 1.25)
    img = 0.04 + 0.9 * img + rng.normal(0, rng.uniform(*params.noise_range), img.shape)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    # landmarks: hand frame -> pixels (inverse of the mapping above)
    names = list(JOINT_NAMES)
    P = np.array([A.points[n] for n in names])
    Uc, Vc = (P[:, 0] - 18.0) * scale, (P[:, 1] - 78.0) * scale
    Xp, Yp = cr * Uc - sr * Vc, sr * Uc + cr * Vc
    x = (Xp + shift[0]) / sp + (W - 1) / 2.0
    y = (-Yp + shift[1]) / sp + (H - 1) / 2.0
    pts = np.stack([x, y], axis=1)
    if laterality is None:
        laterality = "R" if rng.random() < params.right_fraction else "L"
    if laterality == "R":
        img = np.ascontiguousarray(img[:, ::-1])
        pts[:, 0] = (W - 1) - pts[:, 0]
    tip_v = max(float(b["p1"][1]) + b["r"] * b["cap"] for b in A.bones if b["kind"] == "capsule")
    return HandSample(array=img, spacing_mm=sp, laterality=laterality, points_xy=pts, erosion=ero, jsn=jsn,
                      severity=float(severity), hand_length_mm=float((tip_v + 10.0) * scale))


def make_cohort(out_dir: str | Path, n: int = 200, seed: int = 0, params: SynthParams | None = None,
                class_edges: tuple[float, ...] = DEFAULT_CLASS_EDGES, progress: bool = False) -> Path:
    """Write ``n`` generated patients (one hand radiograph each) as DICOM CR + label sheets.

    Files: ``dicom/<patient_id>.dcm``, ``labels.csv`` (patient_id, file, laterality, spacing_mm,
    total, erosion, jsn, class, severity, hand_length_mm, ero_<joint>, jsn_<joint> per area; unscored
    features left empty), ``landmarks.csv`` (patient_id, joint, x, y in pixels of the DICOM file),
    ``cohort.json`` (parameters). Returns the path of ``labels.csv``.
    """
    params = params or SynthParams()
    out = Path(out_dir)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    label_rows, lm_rows = [], []
    for i in tqdm(range(n), desc="hand radiographs", unit="img", disable=not progress):
        pid = f"HND{i:04d}"
        s = make_hand(rng, params)
        mono1 = bool(rng.random() < params.monochrome1_fraction)
        rel = f"dicom/{pid}.dcm"
        write_radiograph_dicom(safe_child(out / "dicom", f"{pid}.dcm"), s.array, (s.spacing_mm, s.spacing_mm),
                               modality="CR", laterality=s.laterality,
                               photometric="MONOCHROME1" if mono1 else "MONOCHROME2", patient_id=pid,
                               spacing_tag="PixelSpacing" if rng.random() < 0.7 else "ImagerPixelSpacing",
                               BodyPartExamined="HAND", ViewPosition="PA", SeriesDescription="Hand PA")
        t = totals(s.erosion, s.jsn)
        row = {"patient_id": pid, "file": rel, "laterality": s.laterality, "spacing_mm": round(s.spacing_mm, 5),
               "total": int(t["total"]), "erosion": int(t["erosion"]), "jsn": int(t["jsn"]),
               "class": int(severity_class(t["total"], class_edges)), "severity": round(s.severity, 4),
               "hand_length_mm": round(s.hand_length_mm, 2)}
        for j, joint in enumerate(JOINTS):
            row[f"ero_{joint.name}"] = int(s.erosion[j]) if joint.erosion else ""
            row[f"jsn_{joint.name}"] = int(s.jsn[j]) if joint.jsn else ""
        label_rows.append(row)
        for j, name in enumerate(JOINT_NAMES):
            lm_rows.append({"patient_id": pid, "joint": name, "x": round(float(s.points_xy[j, 0]), 3),
                            "y": round(float(s.points_xy[j, 1]), 3)})
    write_text(out / "labels.csv", pd.DataFrame(label_rows).to_csv(index=False))
    write_text(out / "landmarks.csv", pd.DataFrame(lm_rows).to_csv(index=False))
    write_json(out / "cohort.json", {"n": n, "seed": seed, "params": asdict(params),
                                    "class_edges": list(class_edges), "joints": list(JOINT_NAMES)})
    return out / "labels.csv"
