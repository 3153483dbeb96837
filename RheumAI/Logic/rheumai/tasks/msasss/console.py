"""Console entry points (MRML-free): predict one study, re-score from corrected points, write a scene.

A study is ``{"cervical": path, "lumbar": path}`` (either view may be absent: its 12 corners
count as missing). Results carry, per view, the 12 scored corners with their label ("C2 lower"),
LPS position (mm, the radiograph's own frame), status ("ok" | "missing" = not scorable) and the
reason, so the Slicer layer shows them as a markups point list and sends corrected positions back
to :func:`rescore_points`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from ...checkpoint import load_checkpoint
from ...errors import InputError
from ...landmarks import lps_to_points
from ...radiograph import Radiograph, radiograph_from_array, read_radiograph
from .anatomy import VIEWS, point_names, scored_corners
from .predict import MsasssSystem, analyse_study, view_points_lps


def _read(study: Mapping[str, Any]) -> dict[str, Radiograph]:
    unknown = sorted(set(study) - set(VIEWS) - {"id"})
    if unknown:
        raise InputError(None, f"unknown view(s) {unknown}; an mSASSS study has views {', '.join(VIEWS)}")
    rads = {v: _radiograph(p) for v, p in study.items() if v in VIEWS and p is not None and not
            (isinstance(p, str) and not p)}
    if not rads:
        raise InputError(None, "an mSASSS study needs a lateral cervical and/or a lateral lumbar radiograph")
    return rads


def _radiograph(src: Any) -> Radiograph:
    """A view's input: a file path, a :class:`Radiograph` or a one-slice SimpleITK image (LPS,
    bone bright; e.g. a Slicer volume node's image), whose geometry is kept."""
    if isinstance(src, Radiograph):
        return src
    if isinstance(src, sitk.Image):
        arr = sitk.GetArrayFromImage(src)
        arr = arr[0] if arr.ndim == 3 else arr
        sp = src.GetSpacing()
        rad = radiograph_from_array(arr, spacing_mm=(float(sp[1]), float(sp[0])))
        if src.GetDimension() == 3:
            rad.image = sitk.Cast(src, sitk.sitkFloat32)
        return rad
    return read_radiograph(src)


def _load(checkpoint: str | Path | MsasssSystem) -> MsasssSystem:
    if isinstance(checkpoint, MsasssSystem):
        return checkpoint
    model, card = load_checkpoint(checkpoint)
    if card.get("task") != "msasss" or not isinstance(model, MsasssSystem):
        raise InputError(checkpoint, f"not an mSASSS checkpoint (task {card.get('task')!r})")
    return model


def _with_points(result: dict[str, Any], rads: Mapping[str, Radiograph]) -> dict[str, Any]:
    result["points"] = {v: view_points_lps(rads[v].image, r) for v, r in result["views"].items()}
    result["corner_table"] = corner_table(result)
    result["sources"] = {v: rads[v].path for v in rads}
    return result


def predict_study(checkpoint: str | Path | MsasssSystem, study: Mapping[str, Any]) -> dict[str, Any]:
    """Landmarks, corner scores, total and the 24 corner points in LPS for one study."""
    system = _load(checkpoint)
    rads = _read(study)
    res = analyse_study(system, {v: (r.array, r.spacing_mm) for v, r in rads.items()})
    return _with_points(res, rads)


def rescore_points(checkpoint: str | Path | MsasssSystem, study: Mapping[str, Any],
                   corners_lps: Mapping[str, Mapping[str, Any]], previous: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Re-score from corrected corner positions.

    corners_lps: {view: {label: (x, y, z) LPS mm | None}} for the corners the user moved or marked
    missing (None / NaN = missing: the corner is not scored), and optionally other landmarks of the
    view (vertebra corners not scored, centres: "L3 centre"). Points not given keep the
    positions of ``previous`` (a result of :func:`predict_study`), or are found again by the model.
    """
    system = _load(checkpoint)
    rads = _read(study)
    if previous is None:
        previous = analyse_study(system, {v: (r.array, r.spacing_mm) for v, r in rads.items()})
    points, missing = {}, {}
    for v, rad in rads.items():
        names = point_names(v)
        pts = np.asarray(previous["views"][v]["points_xy"], float).copy()
        gone: set[str] = set()
        for label, lps in (corners_lps.get(v) or {}).items():
            if label not in names:
                raise InputError(None, f"{v}: {label!r} is not a landmark of this view ({', '.join(names)})")
            if lps is None or not np.isfinite(np.asarray(lps, float)).all():
                if label not in scored_corners(v):
                    raise InputError(None, f"{v}: only scored corners can be marked missing, not {label!r}")
                gone.add(label)
                continue
            pts[names.index(label)] = lps_to_points(rad.image, np.asarray(lps, float).reshape(1, 3))[0]
        points[v], missing[v] = pts, gone
    res = analyse_study(system, {v: (r.array, r.spacing_mm) for v, r in rads.items()}, points, missing)
    return _with_points(res, rads)


def rescore_study(checkpoint: str | Path | MsasssSystem, study: Mapping[str, Any],
                  points: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The task's ``rescore_points`` entry point: :func:`rescore_points` with the flat values of a
    prediction (total_msasss, corners_scored, subtotals, summary, label) added, so a caller shows
    the re-scored result as it shows a prediction. points: {view: {corner label: (x, y, z) LPS mm |
    None (missing: not scored)}}; corners not given are found again by the model."""
    res = rescore_points(checkpoint, study, points)
    res.update(study_values(res))
    res["landmarks_source"] = "corrected"
    return res


def study_values(result: Mapping[str, Any]) -> dict[str, Any]:
    """Flat totals (:func:`summary`), ``label`` and a one-line ``summary`` of a result."""
    out = summary(result)
    out["label"] = out["total_msasss"]
    t = result["total"]
    total = "not computed (too many corners missing)" if t["total"] is None else f"{t['total']:.1f}"
    out["summary"] = (f"mSASSS {total}; {t['n_scored']}/24 corners scored ("
                      + ", ".join(f"{v} {'-' if d['subtotal'] is None else round(d['subtotal'], 1)}"
                                  for v, d in t["views"].items()) + ")")
    return out


def corner_table(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-corner rows: view, level, corner, score (empty = not scorable), findings, reason."""
    rows = []
    for v, r in result["views"].items():
        for lv in r["levels"]:
            for slot, c in enumerate(lv["corners"]):
                s = r["scores"][c]
                row = {"view": v, "level": lv["level"], "corner": c, "score": "" if s is None else int(s),
                       "status": "missing" if s is None else "ok"}
                row.update({f"p_{k}": round(float(p[slot]), 3) for k, p in lv["lesions"].items()})
                row["p_bridging"] = round(float(lv["bridging"]), 3)
                row["p_scorable"] = round(float(lv["scorable"][slot]), 3)
                if r.get("ordinal_scores"):
                    o = r["ordinal_scores"][c]
                    row["ordinal_score"] = "" if o is None else int(o)
                row["reason"] = "; ".join(r["not_scorable"].get(c, []))
                rows.append(row)
    return rows


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """Flat totals for a result table: total, per-view subtotals, corners scored, missing handling."""
    t = result["total"]
    out = {"total_msasss": "" if t["total"] is None else round(t["total"], 2), "corners_scored": t["n_scored"],
           "corners_missing": t["n_missing"], "missing_method": t["missing_method"]}
    for v, d in t["views"].items():
        out[f"{v}_subtotal"] = "" if d["subtotal"] is None else round(d["subtotal"], 2)
    return out


def write_scene(out_path: str | Path, result: Mapping[str, Any], study: Mapping[str, Any]) -> Path:
    """A Slicer scene of a result: per view the radiograph, its 12 corners as a labelled point list
    (status "missing" where not scorable), the per-corner table and the totals (needs slicer-core)."""
    from rheumai_mrml.landmark_scene import write_landmark_scene

    rads = _read(study)
    table = corner_table(result)
    views = []
    for v, rad in rads.items():
        views.append({"name": f"{study.get('id') or 'study'} {v}", "image": rad.image, "result": summary(result),
                      "points": result["points"][v]["points"], "rows": [r for r in table if r["view"] == v],
                      "rows_name": "corners"})
    return write_landmark_scene(out_path, views)
