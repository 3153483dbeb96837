"""mSASSS prediction through the engine's one predictor (:class:`rheumai.engine.predict.Predictor`).

The task's hooks: ``load_sample`` reads the views of a study ``{"cervical": path | image,
"lumbar": ...}`` (either may be absent: its 12 corners count as missing); ``forward`` finds the
21 landmarks per view (coarse heatmaps on the letterboxed view, the corners refined on disc-level
crops; points given in the sample, when re-scoring, skip both) and runs the crop classifiers;
``postprocess`` applies the anatomy checks, the corner rule (``None`` = not scorable, with the
reasons) and the total, and adds the 24 corners in LPS mm. Points are (x, y) pixels of the
radiograph; LPS mm of its own one-slice image through :func:`rheumai.landmarks.points_to_lps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ...engine.predict import Predictor, Prepared
from ...errors import InputError
from ...normalize import normalize_intensity
from ...landmarks import lps_to_points, points_to_lps, soft_argmax
from ...radiograph import Radiograph, as_radiograph
from .anatomy import VIEWS, check_points, disc_levels, point_names, scored_corners
from .crops import fit_grid, level_grid
from .model import MsasssSystem
from .scoring import CORNER_LESIONS, score_view, total_score


@dataclass
class MsasssSample:
    """One study: radiographs per view (file paths, Radiographs or one-slice SimpleITK images in LPS);
    for re-scoring, given points (21, 2) and corners marked missing."""

    rads: dict[str, Radiograph]
    points: dict[str, np.ndarray] = field(default_factory=dict)
    missing: dict[str, set[str]] = field(default_factory=dict)

    @property
    def sources(self) -> dict[str, str]:
        return {v: r.path for v, r in self.rads.items()}

    @property
    def source_images(self) -> dict[str, sitk.Image]:
        return {v: r.image for v, r in self.rads.items()}


def load_sample(inputs: Mapping[str, Any], card: dict[str, Any] | None = None) -> MsasssSample:
    unknown = sorted(set(inputs) - set(VIEWS) - {"id", "series_uid"})
    if unknown:
        raise InputError(None, f"unknown view(s) {unknown}; an mSASSS study has views {', '.join(VIEWS)}")
    rads = {v: as_radiograph(p) for v, p in inputs.items() if v in VIEWS and p is not None and not
            (isinstance(p, str) and not p)}
    if not rads:
        raise InputError(None, "an mSASSS study needs a lateral cervical and/or a lateral lumbar radiograph")
    return MsasssSample(rads)


def to_tensors(sample: MsasssSample, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per view the array, ``<view>_spacing`` (row, col) mm and, when given, ``<view>_points`` (21, 2)."""
    out = {f"{v}_points": torch.as_tensor(np.asarray(p, np.float64).reshape(21, 2)) for v, p in sample.points.items()}
    for v, r in sample.rads.items():
        out[v] = torch.from_numpy(r.array.astype(np.float32))
        out[f"{v}_spacing"] = torch.tensor(r.spacing_mm, dtype=torch.float64)
    return out


def _run(net: nn.Module, x: np.ndarray) -> dict[str, torch.Tensor]:
    """A network on an array (the engine's predictor runs the hooks in eval and inference mode)."""
    return net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))


def locate(system: MsasssSystem, array: np.ndarray, spacing_mm: tuple[float, float], view: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """The 21 landmarks (x, y) pixels of a view and a confidence per point in [0, 1] (the softmax
    mass of the coarse heatmap within 2 heatmap pixels of its peak); corners refined per level."""
    la = system.arch["landmarks"]
    grid = fit_grid(array.shape, tuple(la["input_size"]))
    heat = _run(system.landmarks, grid.sample(normalize_intensity(array))[None, None])["keypoints"].float()
    pts = grid.to_source(soft_argmax(heat, int(la["out_stride"]))[0].numpy().astype(float))
    b, k, h, w = heat.shape
    prob = torch.softmax(heat.reshape(k, h * w), -1).reshape(k, h, w)
    peak = prob.reshape(k, -1).argmax(-1)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    near = ((yy[None] - (peak // w)[:, None, None]) ** 2 + (xx[None] - (peak % w)[:, None, None]) ** 2) <= 4
    conf = (prob * near).sum((1, 2)).numpy()
    ra = system.arch["refine"]
    size, names = int(ra["crop_size"]), point_names(view)
    grids = [level_grid(pts, view, i, spacing_mm, size, side_factor=float(ra["side_factor"])) for i in range(6)]
    crops = np.stack([normalize_intensity(g.sample(array), method="zscore") for g in grids])[:, None]
    local = soft_argmax(_run(system.refine, crops)["keypoints"].float(), int(ra["out_stride"])).numpy()
    for g, lvl, xy in zip(grids, disc_levels(view), local.astype(float)):
        for c, p in zip(lvl.corners, g.to_source(xy)):
            pts[names.index(c)] = p
    return pts, conf


def classify_levels(system: MsasssSystem, array: np.ndarray, spacing_mm: tuple[float, float], view: str,
                    points_xy: np.ndarray) -> dict[str, np.ndarray]:
    """Per disc level (6): ``lesions`` (6, 4, 2) probabilities (:data:`CORNER_LESIONS` x slot),
    ``bridging`` (6,), ``scorable`` (6, 2), ``ordinal`` (6, 2) scores 0-3 (-1: no ordinal model)."""
    def crops(size: int) -> np.ndarray:
        return np.stack([normalize_intensity(level_grid(points_xy, view, i, spacing_mm, size).sample(array),
                                             method="zscore") for i in range(6)])[:, None]

    p = {k: torch.sigmoid(v.float()).numpy() for k, v in
         _run(system.crop_net("lesions", view), crops(int(system.arch["lesions"]["crop_size"]))).items()}
    out = {"lesions": np.stack([p[les] for les in CORNER_LESIONS], 1), "bridging": p["bridging"][:, 0],
           "scorable": 1.0 - p["not_scorable"], "ordinal": np.full((6, 2), -1.0)}
    if system.ordinal is not None:
        o = _run(system.crop_net("ordinal", view), crops(int(system.arch["ordinal"]["crop_size"])))
        out["ordinal"] = (torch.sigmoid(o["ordinal"].float()).numpy() >= 0.5).sum(-1).astype(float)
    return out


def forward(model: MsasssSystem, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw outputs per view ``points_<view>`` (B, 21, 2), ``confidence_<view>`` (B, 21; NaN for
    given points) and the arrays of :func:`classify_levels` as ``<key>_<view>``."""
    out: dict[str, list[torch.Tensor]] = {}
    for v in VIEWS:
        for b in range(batch[v].shape[0] if v in batch else 0):
            arr = batch[v][b].cpu().numpy()
            sp = tuple(float(s) for s in batch[f"{v}_spacing"][b])
            if f"{v}_points" in batch:
                pts, conf = batch[f"{v}_points"][b].cpu().numpy(), np.full(21, np.nan)
            else:
                pts, conf = locate(model, arr, sp, v)
            vals = {"points": pts, "confidence": conf, "lesions": np.zeros((6, 4, 2)), "bridging": np.zeros(6),
                    "scorable": np.zeros((6, 2)), "ordinal": np.full((6, 2), -1.0)}
            if np.isfinite(pts).all():
                try:
                    vals.update(classify_levels(model, arr, sp, v, pts))
                except ValueError:  # coincident centres: nothing to crop (the checks flag the view)
                    pass
            for key, val in vals.items():
                out.setdefault(f"{key}_{v}", []).append(torch.as_tensor(np.asarray(val, np.float64)))
    return {k: torch.stack(v) for k, v in out.items()}


def score_levels(view: str, o: Mapping[str, np.ndarray], check: dict[str, Any], missing: set[str] | None = None,
                 threshold: float = 0.5) -> dict[str, Any]:
    """Per-level dicts, corner findings and scores (None = not scorable, with reasons) of both models."""
    levels, findings, bridged, ordinal = [], {}, {}, {}
    reasons: dict[str, list[str]] = {c: [] for c in scored_corners(view)}
    for i, lvl in enumerate(disc_levels(view)):
        d = {"level": lvl.name, "corners": list(lvl.corners), "bridging": float(o["bridging"][i]),
             "lesions": {les: o["lesions"][i, j].tolist() for j, les in enumerate(CORNER_LESIONS)},
             "scorable": o["scorable"][i].tolist()}
        bridged[lvl.name] = d["bridging"] >= threshold
        for slot, c in enumerate(lvl.corners):
            findings[c] = {les: d["lesions"][les][slot] >= threshold for les in CORNER_LESIONS}
            if d["scorable"][slot] < threshold:
                reasons[c].append(f"not visible or covered (classifier p_scorable {d['scorable'][slot]:.2f})")
            if o["ordinal"][i, slot] >= 0:
                ordinal[c] = int(o["ordinal"][i, slot])
        if (o["ordinal"][i] >= 0).all():
            d["ordinal"] = {"score": [int(s) for s in o["ordinal"][i]]}
        levels.append(d)
    for c in reasons:
        if not check["view_ok"]:
            reasons[c].append("implausible landmarks: " + "; ".join(check["view_flags"]))
        reasons[c].extend(check["corner_flags"][c])
        if c in (missing or ()):
            reasons[c].append("marked missing")
    scorable = {c: not r for c, r in reasons.items()}
    return {"levels": levels, "scores": score_view(view, findings, bridged, scorable),
            "findings": findings, "bridged": bridged, "not_scorable": {c: r for c, r in reasons.items() if r},
            "ordinal_scores": {c: (v if scorable[c] else None) for c, v in ordinal.items()} or None}


def _corners(view: Mapping[str, Any], image: sitk.Image) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The 12 scored corners of a view as markups points (label, LPS mm, pixels, status "missing" =
    not scorable, score, reason; :mod:`rheumai_mrml.landmark_scene`) and as corner-table rows."""
    xy = np.asarray(view["points_xy"], float)
    lps = points_to_lps(image, xy)
    points, rows = [], []
    for lv in view["levels"]:
        for slot, c in enumerate(lv["corners"]):
            i, s, o = view["point_names"].index(c), view["scores"][c], (view["ordinal_scores"] or {}).get(c)
            common = {"score": s, "status": "missing" if s is None else "ok",
                      "reason": "; ".join(view["not_scorable"].get(c, []))}
            points.append({"label": c, "lps": lps[i].tolist(), "xy": xy[i].tolist(), **common})
            rows.append({"view": view["view"], "level": lv["level"], "corner": c, **common, "score": "" if s is None
                         else s, **{f"p_{k}": round(p[slot], 3) for k, p in lv["lesions"].items()},
                         "p_bridging": round(lv["bridging"], 3), "p_scorable": round(lv["scorable"][slot], 3),
                         **({"ordinal_score": "" if o is None else o} if view["ordinal_scores"] else {})})
    return points, rows


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """Flat totals: total, per-view subtotals, corners scored and missing, the missing-corner rule."""
    t = result["total"]
    out = {"total_msasss": "" if t["total"] is None else round(t["total"], 2), "corners_scored": t["n_scored"],
           "corners_missing": t["n_missing"], "missing_method": t["missing_method"]}
    for v, d in t["views"].items():
        out[f"{v}_subtotal"] = "" if d["subtotal"] is None else round(d["subtotal"], 2)
    return out


def postprocess(outputs: Mapping[str, torch.Tensor], card: dict[str, Any], sample: MsasssSample) -> dict[str, Any]:
    """One study's raw outputs -> per view points, checks, levels, scores; totals, LPS points, the
    corner table, :func:`summary`, ``label`` (the total) and a one-line ``summary``."""
    views = {}
    for v, rad in sample.rads.items():
        o = {k: outputs[f"{k}_{v}"].numpy() for k in ("points", "confidence", "lesions", "bridging", "scorable",
                                                      "ordinal")}
        conf = None if np.isnan(o["confidence"]).all() else o["confidence"]
        check = check_points(v, o["points"], rad.array.shape, rad.spacing_mm)
        views[v] = {"view": v, "points_xy": o["points"].tolist(), "point_names": point_names(v),
                    "confidence": None if conf is None else conf.tolist(), "check": check,
                    **score_levels(v, o, check, sample.missing.get(v))}
    result: dict[str, Any] = {"views": views, "total": total_score({v: r["scores"] for v, r in views.items()})}
    if all(r["ordinal_scores"] for r in views.values()):
        result["total_ordinal"] = total_score({v: r["ordinal_scores"] for v, r in views.items()})
    corners = {v: _corners(r, sample.rads[v].image) for v, r in views.items()}
    result["points"] = {v: {"view": v, "points": c[0]} for v, c in corners.items()}
    result["corner_table"] = [row for c in corners.values() for row in c[1]]
    result.update(summary(result), label=summary(result)["total_msasss"])
    t = result["total"]
    total = "not computed (too many corners missing)" if t["total"] is None else f"{t['total']:.1f}"
    result["summary"] = (f"mSASSS {total}; {t['n_scored']}/24 corners scored (" + ", ".join(
        f"{v} {'-' if d['subtotal'] is None else round(d['subtotal'], 1)}" for v, d in t["views"].items()) + ")")
    return result


def predictor(model: str | Path | Predictor) -> Predictor:
    """The engine's predictor of an mSASSS checkpoint folder (a Predictor passes through)."""
    pred = model if isinstance(model, Predictor) else Predictor(model)
    if pred.task.name != "msasss":
        raise InputError(pred.checkpoint, f"not an mSASSS checkpoint (task {pred.task.name!r})")
    return pred


def rescore_points(model: str | Path | Predictor, study: Mapping[str, Any],
                   points: Mapping[str, Mapping[str, Any]], previous: Mapping[str, Any] | None = None,
                   points_xy: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Re-score from corrected points; the landmark networks are not run.

    points: {view: {label: (x, y, z) LPS mm | None}} for the landmarks moved (any of the 21, e.g.
    "L3 centre") or, for a scored corner, marked missing (None / NaN: not scored). The other points
    keep the positions of ``points_xy`` ({view: (21, 2) pixels}) when given, else of ``previous``
    (a prediction's values; predicted when not given).
    """
    pred = predictor(model)
    inputs = pred.inputs_of(study)
    sample = load_sample(inputs)
    if points_xy is None:
        previous = previous or pred.predict(study, saliency=None).values
        points_xy = {v: previous["views"][v]["points_xy"] for v in sample.rads}
    for v, rad in sample.rads.items():
        names = point_names(v)
        pts = np.array(points_xy[v], float).reshape(21, 2)
        gone: set[str] = set()
        for label, lps in (points.get(v) or {}).items():
            if label not in names:
                raise InputError(None, f"{v}: {label!r} is not a landmark of this view ({', '.join(names)})")
            if lps is None or not np.isfinite(np.asarray(lps, float)).all():
                if label not in scored_corners(v):
                    raise InputError(None, f"{v}: only scored corners can be marked missing, not {label!r}")
                gone.add(label)
            else:
                pts[names.index(label)] = lps_to_points(rad.image, np.asarray(lps, float).reshape(1, 3))[0]
        sample.points[v], sample.missing[v] = pts, gone
    prepared = Prepared(key="rescore", name="", inputs=inputs, sample=sample, x=to_tensors(sample, pred.card))
    res = pred.run([prepared], saliency=None)[0].values
    res["landmarks_source"] = "corrected"
    return res


def write_scene(out_path: str | Path, result: Mapping[str, Any], study: Mapping[str, Any]) -> Path:
    """A Slicer scene of a result: per view the radiograph, its 12 corners as a labelled point list
    (status "missing" where not scorable), the per-corner table and the totals (needs slicer-core)."""
    from rheumai_mrml.landmark_scene import write_landmark_scene

    return write_landmark_scene(out_path, [
        {"name": f"{study.get('id') or 'study'} {v}", "image": rad.image, "result": summary(result),
         "points": result["points"][v]["points"], "rows": [r for r in result["corner_table"] if r["view"] == v],
         "rows_name": "corners"} for v, rad in load_sample(study).rads.items()])
