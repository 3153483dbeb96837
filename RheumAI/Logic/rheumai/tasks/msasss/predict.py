"""mSASSS on one study: landmarks -> plausibility -> disc-level crops -> lesions -> corner scores -> total.

MRML-free. :class:`MsasssSystem` holds the four networks of a checkpoint (coarse landmarks on the
letterboxed view, corner refinement on disc-level crops, per-lesion classifiers, the ordinal
alternative). :func:`analyse_view` runs one lateral view; :func:`analyse_study` both views and
the total; :func:`rescore` re-runs the crops and scores from user-corrected points (pixels, or
LPS mm through :func:`rescore_lps`), skipping the landmark model.

Points are (x, y) pixels of the radiograph; LPS mm via :func:`rheumai.landmarks.points_to_lps`.
A corner is "not scorable" (score None, with the reason) when the view's landmarks fail the
anatomy checks, the corner lies outside the image, the user marked it missing, or the
classifier's ``not_scorable`` output is 0.5 or more (implant, not visible).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ...landmarks import points_to_lps, soft_argmax
from .anatomy import VIEWS, check_points, disc_levels, point_names, scored_corners
from .crops import fit_grid, level_grid, normalise_crop, normalise_image
from .model import build_model
from .scoring import CORNER_LESIONS, SQUARING_NOT_SCORED, score_view, total_score


def refine_architecture(**kw: Any) -> dict[str, Any]:
    arch = {"kind": "refine", "n_points": 2, "channels": [16, 32, 64], "out_stride": 2, "crop_size": 48,
            "sigma": 1.0, "side_factor": 1.1}
    arch.update(kw)
    return arch


class MsasssSystem(nn.Module):
    """The networks of one mSASSS checkpoint; ``arch`` = {"kind": "system", "landmarks": ...,
    "refine": ..., "lesions": ..., "ordinal": ... | None, "separate_views": bool}. With
    ``separate_views`` the crop models exist once per view (cervical, lumbar)."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = arch
        self.landmarks = build_model(arch["landmarks"])
        self.refine = build_model({**arch["refine"], "kind": "landmarks"})
        self.separate_views = bool(arch.get("separate_views", False))

        def crop_model(a: dict[str, Any]) -> nn.Module:
            return nn.ModuleDict({v: build_model(a) for v in VIEWS}) if self.separate_views else build_model(a)

        self.lesions = crop_model(arch["lesions"])
        self.ordinal = crop_model(arch["ordinal"]) if arch.get("ordinal") else None

    def lesion_net(self, view: str) -> nn.Module:
        return self.lesions[view] if self.separate_views else self.lesions

    def ordinal_net(self, view: str) -> nn.Module | None:
        if self.ordinal is None:
            return None
        return self.ordinal[view] if self.separate_views else self.ordinal


def _run(net: nn.Module, x: np.ndarray) -> dict[str, torch.Tensor]:
    net.eval()
    with torch.inference_mode():
        return net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))


def locate(system: MsasssSystem, array: np.ndarray, spacing_mm: tuple[float, float], view: str,
           refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The 21 landmarks (x, y) pixels of a view and a confidence per point in [0, 1].

    Coarse: soft-argmax of the landmark heatmaps on the letterboxed view. Refined: the two corners
    of each disc level re-found on its crop (cut from the coarse points). Confidence: the softmax
    mass of the coarse heatmap within 2 heatmap pixels of its peak.
    """
    la = system.arch["landmarks"]
    grid = fit_grid(array.shape, tuple(la["input_size"]))
    x = grid.sample(normalise_image(array))[None, None]
    heat = _run(system.landmarks, x)["keypoints"].float()
    stride = int(la["out_stride"])
    pts = grid.to_source(soft_argmax(heat, stride)[0].numpy().astype(float))
    b, k, h, w = heat.shape
    prob = torch.softmax(heat.reshape(k, h * w), -1).reshape(k, h, w)
    peak = prob.reshape(k, -1).argmax(-1)
    py, px = peak // w, peak % w
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    near = ((yy[None] - py[:, None, None]) ** 2 + (xx[None] - px[:, None, None]) ** 2) <= 4
    conf = (prob * near).sum((1, 2)).numpy()
    if refine:
        pts = refine_corners(system, array, spacing_mm, view, pts)
    return pts, conf


def refine_corners(system: MsasssSystem, array: np.ndarray, spacing_mm: tuple[float, float], view: str,
                   points_xy: np.ndarray) -> np.ndarray:
    """The 12 scored corners re-found on their disc-level crops; the other points unchanged."""
    ra = system.arch["refine"]
    size, stride = int(ra["crop_size"]), int(ra["out_stride"])
    names = point_names(view)
    grids = [level_grid(points_xy, view, i, spacing_mm, size, side_factor=float(ra["side_factor"]))
             for i in range(len(disc_levels(view)))]
    crops = np.stack([normalise_crop(g.sample(array)) for g in grids])[:, None]
    heat = _run(system.refine, crops)["keypoints"].float()
    local = soft_argmax(heat, stride).numpy().astype(float)  # (6, 2, 2)
    out = np.array(points_xy, float, copy=True)
    for g, lvl, xy in zip(grids, disc_levels(view), local):
        for c, p in zip(lvl.corners, g.to_source(xy)):
            out[names.index(c)] = p
    return out


def classify_levels(system: MsasssSystem, array: np.ndarray, spacing_mm: tuple[float, float], view: str,
                    points_xy: np.ndarray) -> list[dict[str, Any]]:
    """Per disc level: lesion probabilities per corner slot, bridging, scorable, ordinal scores."""
    arch = system.arch["lesions"]
    size = int(arch["crop_size"])
    grids = [level_grid(points_xy, view, i, spacing_mm, size) for i in range(len(disc_levels(view)))]
    crops = np.stack([normalise_crop(g.sample(array)) for g in grids])[:, None]
    out = {k: torch.sigmoid(v.float()).numpy() for k, v in _run(system.lesion_net(view), crops).items()}
    out["scorable"] = 1.0 - out.pop("not_scorable")
    ordinal = None
    if system.ordinal is not None:
        if int(system.arch["ordinal"]["crop_size"]) != size:
            osize = int(system.arch["ordinal"]["crop_size"])
            crops = np.stack([normalise_crop(level_grid(points_xy, view, i, spacing_mm, osize).sample(array))
                              for i in range(len(grids))])[:, None]
        o = _run(system.ordinal_net(view), crops)
        gt = torch.sigmoid(o["ordinal"].float()).numpy()  # (6, 2, 3): P(score > k)
        ordinal = {"score": (gt >= 0.5).sum(-1), "expected": gt.sum(-1),
                   "scorable": 1.0 - torch.sigmoid(o["not_scorable"].float()).numpy()}
    levels = []
    for i, lvl in enumerate(disc_levels(view)):
        d = {"level": lvl.name, "corners": list(lvl.corners),
             "lesions": {les: out[les][i].tolist() for les in CORNER_LESIONS},
             "bridging": float(out["bridging"][i, 0]), "scorable": out["scorable"][i].tolist()}
        if ordinal is not None:
            d["ordinal"] = {"score": ordinal["score"][i].tolist(), "expected": ordinal["expected"][i].tolist(),
                            "scorable": ordinal["scorable"][i].tolist()}
        levels.append(d)
    return levels


def score_levels(view: str, levels: list[dict[str, Any]], check: dict[str, Any], missing: set[str] | None = None,
                 threshold: float = 0.5, squaring_not_scored: frozenset[str] = SQUARING_NOT_SCORED) -> dict[str, Any]:
    """Corner findings, scores (None = not scorable, with reasons) for the classifier and the ordinal model."""
    findings: dict[str, dict[str, bool]] = {}
    bridged: dict[str, bool] = {}
    scorable: dict[str, bool] = {}
    reasons: dict[str, list[str]] = {c: [] for c in scored_corners(view)}
    ordinal_scores: dict[str, int | None] = {}
    for lv in levels:
        bridged[lv["level"]] = lv["bridging"] >= threshold
        for slot, c in enumerate(lv["corners"]):
            findings[c] = {les: lv["lesions"][les][slot] >= threshold for les in CORNER_LESIONS}
            if lv["scorable"][slot] < threshold:
                reasons[c].append(f"not visible or covered (classifier p_scorable {lv['scorable'][slot]:.2f})")
            if "ordinal" in lv:
                ordinal_scores[c] = int(lv["ordinal"]["score"][slot])
    if not check["view_ok"]:
        for c in reasons:
            reasons[c].append("implausible landmarks: " + "; ".join(check["view_flags"]))
    for c, flags in check["corner_flags"].items():
        reasons[c].extend(flags)
    for c in missing or ():
        if c in reasons:
            reasons[c].append("marked missing")
    for c in reasons:
        scorable[c] = not reasons[c]
    scores = score_view(view, findings, bridged, scorable, squaring_not_scored)
    ordinal = {c: (v if scorable[c] else None) for c, v in ordinal_scores.items()} if ordinal_scores else None
    return {"scores": scores, "findings": findings, "bridged": bridged,
            "not_scorable": {c: r for c, r in reasons.items() if r},
            "ordinal_scores": ordinal}


def analyse_view(system: MsasssSystem, array: np.ndarray, spacing_mm: tuple[float, float], view: str,
                 points_xy: np.ndarray | None = None, missing: set[str] | None = None,
                 threshold: float = 0.5) -> dict[str, Any]:
    """One lateral view: points (found, or given for re-scoring), anatomy checks, level outputs, scores."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
    array = np.asarray(array, np.float32)
    if points_xy is None:
        pts, conf = locate(system, array, spacing_mm, view)
    else:
        pts = np.asarray(points_xy, float).reshape(21, 2)
        conf = None
    check = check_points(view, pts, array.shape, spacing_mm, confidence=conf)
    if np.isfinite(pts).all():
        try:
            levels = classify_levels(system, array, spacing_mm, view, pts)
        except ValueError as exc:  # coincident centres: nothing can be cropped
            check["view_ok"] = False
            check["view_flags"].append(str(exc))
            levels = []
    else:
        levels = []
    if not levels:
        levels = [{"level": lvl.name, "corners": list(lvl.corners),
                   "lesions": {les: [0.0, 0.0] for les in CORNER_LESIONS},
                   "bridging": 0.0, "scorable": [0.0, 0.0]} for lvl in disc_levels(view)]
    scored = score_levels(view, levels, check, missing, threshold)
    return {"view": view, "points_xy": pts.tolist(), "point_names": point_names(view),
            "confidence": None if conf is None else conf.tolist(), "check": check, "levels": levels, **scored}


def analyse_study(system: MsasssSystem, views: Mapping[str, tuple[np.ndarray, tuple[float, float]]],
                  points: Mapping[str, np.ndarray] | None = None, missing: Mapping[str, set[str]] | None = None,
                  missing_method: str = "segment_mean", threshold: float = 0.5) -> dict[str, Any]:
    """Both views ({view: (array, spacing_mm)}); a view not given counts as 12 missing corners."""
    per_view = {}
    for view, (arr, sp) in views.items():
        per_view[view] = analyse_view(system, arr, sp, view, None if points is None else points.get(view),
                                      None if missing is None else missing.get(view), threshold)
    scores = {v: r["scores"] for v, r in per_view.items()}
    result: dict[str, Any] = {"views": per_view, "total": total_score(scores, missing_method)}
    if all(r.get("ordinal_scores") for r in per_view.values()):
        result["total_ordinal"] = total_score({v: r["ordinal_scores"] for v, r in per_view.items()}, missing_method)
    return result


def rescore(system: MsasssSystem, views: Mapping[str, tuple[np.ndarray, tuple[float, float]]],
            points_xy: Mapping[str, np.ndarray], missing: Mapping[str, set[str]] | None = None,
            missing_method: str = "segment_mean") -> dict[str, Any]:
    """Scores from corrected points ({view: (21, 2) pixels}); the landmark model is not run."""
    for view, p in points_xy.items():
        if np.asarray(p).shape != (21, 2):
            raise ValueError(f"{view}: expected 21 points (x, y), got shape {np.asarray(p).shape}")
    return analyse_study(system, views, points_xy, missing, missing_method)


def view_points_lps(image: Any, result_view: dict[str, Any]) -> dict[str, Any]:
    """The 24-corner markups content of one view: labels, LPS mm, and the status of each point
    ("missing" for a corner that is not scorable), for :mod:`rheumai_mrml.landmark_scene`."""
    names = result_view["point_names"]
    xy = np.asarray(result_view["points_xy"], float)
    lps = points_to_lps(image, xy)
    out = []
    for c in scored_corners(result_view["view"]):
        i = names.index(c)
        score = result_view["scores"][c]
        out.append({"label": c, "lps": lps[i].tolist(), "xy": xy[i].tolist(),
                    "status": "missing" if score is None else "ok", "score": score,
                    "reason": "; ".join(result_view["not_scorable"].get(c, []))})
    return {"view": result_view["view"], "points": out}
