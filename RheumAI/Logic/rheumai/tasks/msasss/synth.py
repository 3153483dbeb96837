"""Procedural lateral cervical and lumbar radiographs with known mSASSS truth.

Anatomy in mm in the image frame (x right, y down; anterior faces image left). Seven vertebral
bodies per view on a lordotic curve: rectangles (u anterior, v caudal) with a concave anterior
border, soft edges, brighter cortex and trabecular texture; posterior elements behind; soft
tissue, shoulders over C7-T1, exposure, gamma, blur and noise. An implant (plate and two screws
over one disc level) occasionally covers two corners: "not scorable". Lesions per corner: erosion
(a notch), sclerosis (a dense band under the endplate), squaring (a straight anterior border, at
both corners of the vertebra), syndesmophyte (a spur 25-40 % into the disc space; two never meet),
bridging (a bony bar joining the two corners of a disc level). Scores follow :mod:`.scoring`.
Written as DICOM DX (bone bright, PixelSpacing) + ``labels.csv`` (one row per landmark, pixels of
the written file; for the 24 scored corners scorable / score / lesion flags), ``studies.csv`` and
``totals.csv``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from ...atomic import write_json, write_text
from ...paths import safe_child
from ...radiograph import write_radiograph_dicom
from .anatomy import POINT_KINDS, VIEWS, disc_levels, point_names, scored_corners
from .scoring import CORNER_LESIONS, LESIONS, score_view, total_score


@dataclass(frozen=True)
class ViewAnatomy:
    """Size ranges of one view (mm, degrees); heights per vertebra top to bottom."""

    spacing_mm: tuple[float, float]
    heights_mm: tuple[float, ...]
    depth_mm: float
    disc_mm: float
    lordosis_deg: tuple[float, float]
    last_tilt_deg: float
    cortex_mm: float
    tissue_mm: float
    lesion_mm: float  # scale of planted lesions


ANATOMY = {
    "cervical": ViewAnatomy((0.55, 0.65), (19.0, 14.0, 14.0, 14.0, 14.0, 14.5, 16.0), 16.0, 5.0, (15.0, 35.0),
                            0.0, 0.9, 16.0, 1.0),
    "lumbar": ViewAnatomy((0.85, 0.95), (24.0, 25.0, 26.0, 27.0, 27.5, 27.0, 26.0), 34.0, 10.0, (25.0, 45.0),
                          18.0, 1.4, 70.0, 1.8),
}


@dataclass
class SynthParams:
    """Cohort generation parameters. shape: (H, W) pixels of every view."""

    shape: tuple[int, int] = (320, 256)
    healthy_fraction: float = 0.3
    implant_fraction: float = 0.08
    scale_range: tuple[float, float] = (0.9, 1.1)
    noise_range: tuple[float, float] = (0.01, 0.03)
    tilt_deg: float = 6.0
    shift_mm: float = 8.0


@dataclass
class ViewTruth:
    """Truth of one generated view: 21 points (x, y) pixels, corner findings, scores."""

    view: str
    spacing_mm: tuple[float, float]
    points_xy: np.ndarray
    findings: dict[str, dict[str, bool]]
    bridged: dict[str, bool]
    scorable: dict[str, bool]
    scores: dict[str, int | None]
    implant_level: str | None = None


def _soft(z: np.ndarray, e: float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(z / (2.0 * e)))


def _capsule(X: np.ndarray, Y: np.ndarray, a: np.ndarray, b: np.ndarray, r0: float, r1: float, e: float) -> np.ndarray:
    """Soft indicator of a tapered capsule from a (radius r0) to b (radius r1), mm."""
    ab = b - a
    t = np.clip(((X - a[0]) * ab[0] + (Y - a[1]) * ab[1]) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    d = np.hypot(X - (a[0] + t * ab[0]), Y - (a[1] + t * ab[1]))
    return _soft(r0 + (r1 - r0) * t - d, e)


def sample_findings(rng: np.random.Generator, view: str, severity: float) -> tuple[dict, dict, dict]:
    """Random corner findings, bridged levels and squared vertebrae of a view for a severity in [0, 1]."""
    bridged = {lvl.name: bool(rng.random() < 0.35 * severity ** 2) for lvl in disc_levels(view)}
    squared = {v: bool(rng.random() < 0.25 * severity) for v in VIEWS[view]}
    findings: dict[str, dict[str, bool]] = {}
    for lvl in disc_levels(view):
        for c in lvl.corners:
            vert = c.split()[0]
            f = {"erosion": bool(rng.random() < 0.04 + 0.14 * severity),
                 "sclerosis": bool(rng.random() < 0.04 + 0.14 * severity),
                 "squaring": squared[vert],
                 "syndesmophyte": (not bridged[lvl.name]) and bool(rng.random() < 0.35 * severity),
                 "bridging": bridged[lvl.name]}
            if severity == 0:
                f = {k: False for k in f}
            findings[c] = f
    if severity == 0:
        bridged = {k: False for k in bridged}
    return findings, bridged, squared


def render_view(rng: np.random.Generator, view: str, severity: float, params: SynthParams | None = None,
                implant: bool | None = None) -> tuple[np.ndarray, ViewTruth]:
    """One lateral view: a bone-bright float array (H, W) in [0, 1] and its truth."""
    p = params or SynthParams()
    an = ANATOMY[view]
    h_px, w_px = p.shape
    sp = float(rng.uniform(*an.spacing_mm))
    e = 0.4 * sp
    scale = float(rng.uniform(*p.scale_range))
    heights = np.asarray(an.heights_mm) * scale * rng.uniform(0.93, 1.07, 7)
    depth = an.depth_mm * scale * rng.uniform(0.92, 1.08)
    discs = an.disc_mm * scale * rng.uniform(0.75, 1.2, 6)
    findings, bridged, squared = sample_findings(rng, view, severity)
    # centre line: tangent angle linear in arc length (lordosis: anterior convex).
    length = heights.sum() + discs.sum()
    s_top = np.concatenate([[0.0], np.cumsum(heights[:-1] + discs)])
    s_mid = s_top + heights / 2
    kappa = np.deg2rad(rng.uniform(*an.lordosis_deg)) / length
    theta0 = np.deg2rad(rng.uniform(-p.tilt_deg, p.tilt_deg))
    ss = np.linspace(0, length, 2000)
    th = theta0 + kappa * (ss - length / 2)
    path = np.column_stack([np.concatenate([[0], np.cumsum(np.sin(th[1:]) * np.diff(ss))]),
                            np.concatenate([[0], np.cumsum(np.cos(th[1:]) * np.diff(ss))])])
    centres = np.column_stack([np.interp(s_mid, ss, path[:, 0]), np.interp(s_mid, ss, path[:, 1])])
    thetas = theta0 + kappa * (s_mid - length / 2) + np.deg2rad(rng.uniform(-2.5, 2.5, 7))
    if an.last_tilt_deg:
        thetas[-1] += np.deg2rad(an.last_tilt_deg * rng.uniform(0.7, 1.3))
    mid = centres.mean(0)
    target = np.array([w_px * sp * 0.52, h_px * sp * 0.5]) + rng.uniform(-p.shift_mm, p.shift_mm, 2)
    centres += target - mid

    Y, X = np.mgrid[0:h_px, 0:w_px].astype(np.float32) * sp
    atten = np.zeros((h_px, w_px), np.float32)
    texture = gaussian_filter(rng.standard_normal((h_px, w_px)).astype(np.float32), 1.2 / sp * an.cortex_mm)
    texture *= 0.08 / max(float(texture.std()), 1e-6)
    points = np.zeros((21, 2))
    corner_pos: dict[str, np.ndarray] = {}
    normals, tangents = {}, {}
    lm = an.lesion_mm
    for i, vert in enumerate(VIEWS[view]):
        c, t_ = centres[i], thetas[i]
        tan = np.array([np.sin(t_), np.cos(t_)])
        nor = np.array([-np.cos(t_), np.sin(t_)])  # anterior
        normals[vert], tangents[vert] = nor, tan
        h, d = heights[i], depth
        U = (X - c[0]) * nor[0] + (Y - c[1]) * nor[1]
        V = (X - c[0]) * tan[0] + (Y - c[1]) * tan[1]
        conc = -0.015 * d if squared[vert] else 0.085 * d
        ua = d / 2 - conc * (1 - (2 * V / h) ** 2)
        inside = _soft(h / 2 - np.abs(V), e) * _soft(U + d / 2, e) * _soft(ua - U, e)
        dist = np.clip(np.minimum(np.minimum(h / 2 - np.abs(V), U + d / 2), ua - U), 0, None)
        body = inside * (0.5 + texture + 0.5 * np.exp(-dist / an.cortex_mm))
        up = c + d / 2 * nor - h / 2 * tan
        lo = c + d / 2 * nor + h / 2 * tan
        points[3 * i:3 * i + 3] = [up, lo, c]
        corner_pos[f"{vert} upper"], corner_pos[f"{vert} lower"] = up, lo
        for kind, q, sign in (("upper", up, 1.0), ("lower", lo, -1.0)):
            f = findings.get(f"{vert} {kind}")
            if not f:
                continue
            if f["erosion"]:
                r = 1.8 * lm * rng.uniform(0.85, 1.2)
                body *= 1 - 0.92 * _soft(r - np.hypot(X - q[0] + 0.3 * r * nor[0], Y - q[1] + 0.3 * r * nor[1]), e)
            if f["sclerosis"]:
                vq = sign * (-h / 2 + 0.16 * h)
                band = -0.5 * ((U - 0.3 * d) / (0.2 * d)) ** 2 - 0.5 * ((V - vq) / (0.09 * h)) ** 2
                body += 0.55 * inside * np.exp(band)
        atten += body
        # posterior elements: pedicle/lamina block and spinous process.
        for off_u, off_v, ru, rv, dens in ((-0.95 * d, 0.0, 0.42 * d, 0.32 * h, 0.35),
                                          (-1.75 * d, 0.25 * h, 0.45 * d, 0.14 * h, 0.3)):
            cp = c + off_u * nor + off_v * tan
            Up = (X - cp[0]) * nor[0] + (Y - cp[1]) * nor[1]
            Vp = (X - cp[0]) * tan[0] + (Y - cp[1]) * tan[1]
            atten += dens * _soft(1 - (Up / ru) ** 2 - (Vp / rv) ** 2, 0.15)
    # syndesmophytes and bridges (drawn after the bodies, on top).
    for lvl in disc_levels(view):
        a_low, b_up = lvl.corners
        qa, qb = corner_pos[a_low], corner_pos[b_up]
        nor = (normals[lvl.above] + normals[lvl.below]) / 2
        if bridged[lvl.name]:
            m = (qa + qb) / 2 + nor * 1.2 * lm
            th_r = 0.75 * lm
            atten += 0.9 * np.maximum(_capsule(X, Y, qa - nor * 0.3 * lm, m, th_r, th_r, e),
                                      _capsule(X, Y, m, qb - nor * 0.3 * lm, th_r, th_r, e))
            continue
        gap = float(np.linalg.norm(qb - qa))
        for name, q, other in ((a_low, qa, qb), (b_up, qb, qa)):
            if findings[name]["syndesmophyte"]:
                direction = (other - q) / max(gap, 1e-6)
                tip = q + direction * gap * rng.uniform(0.25, 0.4) + nor * 0.7 * lm  # two spurs never meet
                atten += 0.9 * _capsule(X, Y, q - nor * 0.2 * lm, tip, 0.7 * lm, 0.3 * lm, e)
    # soft tissue (anterior of the spine for tissue_mm, everything behind it), shoulders.
    order = np.argsort(centres[:, 1])
    xc = np.interp(Y[:, 0], centres[order, 1], centres[order, 0])[:, None]
    ant = xc - X
    atten += 0.25 * _soft(depth / 2 + an.tissue_mm - ant, 3.0)
    shoulder = np.zeros_like(atten)
    if view == "cervical":
        y_sh = centres[5, 1] + rng.uniform(-10, 6)
        shoulder = 0.45 * _soft(Y - y_sh, 6.0)
        atten += shoulder
    implant_level = None
    scorable = {c: True for c in scored_corners(view)}
    if implant if implant is not None else rng.random() < p.implant_fraction:
        lvl = disc_levels(view)[int(rng.integers(0, 6))]
        implant_level = lvl.name
        ia, ib = VIEWS[view].index(lvl.above), VIEWS[view].index(lvl.below)
        nor = (normals[lvl.above] + normals[lvl.below]) / 2
        pa = centres[ia] + nor * (depth / 2 + 1.5 * lm)
        pb = centres[ib] + nor * (depth / 2 + 1.5 * lm)
        metal = _capsule(X, Y, pa, pb, 1.3 * lm, 1.3 * lm, e)
        for cc in (pa, pb):
            metal = np.maximum(metal, _capsule(X, Y, cc, cc - nor * 0.7 * depth, 0.8 * lm, 0.8 * lm, e))
        atten += 4.0 * metal
        for c in lvl.corners:
            scorable[c] = False
    # exposure, detector blur, noise.
    img = atten * rng.uniform(0.8, 1.2) + rng.uniform(0.0, 0.1)
    img += 0.1 * (X / X.max() - 0.5) * rng.uniform(-1, 1)
    img = gaussian_filter(img, rng.uniform(0.4, 0.8))
    noise = rng.uniform(*p.noise_range)
    img = img + rng.standard_normal(img.shape).astype(np.float32) * noise * (1 + 1.5 * shoulder)
    img = np.clip(img / 1.9, 0, 1) ** rng.uniform(0.85, 1.15)
    points_px = points / sp
    scores = score_view(view, findings, bridged, scorable)
    truth = ViewTruth(view, (sp, sp), points_px, findings, bridged, scorable, scores, implant_level)
    return img.astype(np.float32), truth


def _patient_severity(rng: np.random.Generator, p: SynthParams) -> float:
    return 0.0 if rng.random() < p.healthy_fraction else float(rng.uniform(0.15, 1.0))


def make_cohort(out_dir: str | Path, n: int = 40, seed: int = 0, params: SynthParams | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Write ``n`` patients (a lateral cervical and a lateral lumbar DX each) + label sheets to ``out_dir``.

    Files: ``dicom/<patient>_<view>.dcm``; ``labels.csv`` (patient_id, view, file, point, vertebra,
    kind, x, y [pixels], scored, scorable, score, one column per lesion); ``studies.csv``;
    ``totals.csv`` (cervical, lumbar, total, n_scored); ``synth.json`` (parameters). Returns a summary.
    """
    p = params or SynthParams()
    out = Path(out_dir)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    label_rows: list[dict[str, Any]] = []
    study_rows: list[dict[str, Any]] = []
    total_rows: list[dict[str, Any]] = []
    for k in tqdm(range(n), desc="mSASSS cohort", unit="patient", disable=not progress):
        pid = f"MS{k:04d}"
        sev = _patient_severity(rng, p)
        scores: dict[str, dict[str, int | None]] = {}
        for view in VIEWS:
            arr, truth = render_view(rng, view, sev, p)
            fname = f"dicom/{pid}_{view}.dcm"
            write_radiograph_dicom(safe_child(out / "dicom", pid, f"_{view}.dcm", what="patient ID"), arr,
                                   truth.spacing_mm, modality="DX", patient_id=pid, spacing_tag="PixelSpacing",
                                   BodyPartExamined="CSPINE" if view == "cervical" else "LSPINE",
                                   ViewPosition="LL", SeriesDescription=f"lateral {view} spine")
            scores[view] = truth.scores
            for (x, y), name in zip(truth.points_xy, point_names(view)):
                scored = name in truth.scores
                ok = scored and truth.scorable[name]
                label_rows.append({"patient_id": pid, "view": view, "file": fname, "point": name,
                                   "vertebra": name.split()[0], "kind": name.split()[1], "x": round(float(x), 3),
                                   "y": round(float(y), 3), "scored": int(scored),
                                   "scorable": int(truth.scorable[name]) if scored else "",
                                   "score": "" if not scored or truth.scores[name] is None else truth.scores[name],
                                   **{les: int(truth.findings[name][les]) if ok else "" for les in LESIONS}})
            study_rows.append({"patient_id": pid, "view": view, "file": fname,
                               "spacing_mm": round(truth.spacing_mm[0], 5), "severity": round(sev, 4),
                               "implant_level": truth.implant_level or ""})
        tot = total_score(scores)
        total_rows.append({"patient_id": pid, "cervical": tot["views"]["cervical"]["subtotal"],
                           "lumbar": tot["views"]["lumbar"]["subtotal"], "total": tot["total"],
                           "n_scored": tot["n_scored"]})
    for name, rows in (("labels.csv", label_rows), ("studies.csv", study_rows), ("totals.csv", total_rows)):
        write_text(out / name, pd.DataFrame(rows, dtype=object).to_csv(index=False))
    write_json(out / "synth.json", {"n": n, "seed": seed, "params": asdict(p), "kinds": list(POINT_KINDS),
                                    "lesions": list(LESIONS), "corner_lesions": list(CORNER_LESIONS)})
    return {"out_dir": str(out), "n_patients": n, "n_images": len(study_rows),
            "mean_total": float(np.mean([r["total"] for r in total_rows if r["total"] is not None]))}
