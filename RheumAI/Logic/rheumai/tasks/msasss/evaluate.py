"""Evaluation of mSASSS predictions against known truth (held-out patients).

Corner level (24 corners per patient): accuracy over the corners scorable in the truth (a corner
the model calls "not scorable" counts as wrong) with a Wilson CI, accuracy by true score, the
4 x 4 confusion (corners scorable in both), agreement on "not scorable"; per lesion type
accuracy / sensitivity / specificity (Wilson CIs; bridging per disc level); keypoint radial error
of the 24 corners in mm (median and mean with bootstrap CIs, success within 2 and 4 mm); patient
totals: MAE, RMSE, PCC, ICC(A,1), Bland-Altman with CIs (``engine.heads.regression_report``);
everything per disc level too (C2-C3 and C7-T1 are the hard ones on films). The ordinal
alternative model is scored the same way beside the per-lesion classifiers.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...atomic import write_json, write_text
from ...engine.heads import regression_report
from ...landmarks import radial_errors_mm, success_rates
from ...metrics import wilson_ci
from .anatomy import disc_levels, point_names
from .dataset import ViewRecord
from .scoring import CORNER_LESIONS, total_score


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_ci(k, n) if n else (float("nan"), float("nan"))
    return {"value": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": int(k), "n": int(n)}


def _median_ci(e: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    e = e[np.isfinite(e)]
    if not e.size:
        return {"value": float("nan"), "lo": float("nan"), "hi": float("nan")}
    idx = np.random.default_rng(seed).integers(0, e.size, (n_boot, e.size))
    meds = np.median(e[idx], axis=1)
    return {"value": float(np.median(e)), "lo": float(np.quantile(meds, 0.025)), "hi": float(np.quantile(meds, 0.975))}


def corner_rows(records: Sequence[ViewRecord], results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (patient, view, corner): truth, prediction (both models), findings, keypoint error mm."""
    rows = []
    for rec, res in zip(records, results):
        names = point_names(rec.view)
        pts = np.asarray(res["points_xy"], float)
        err = radial_errors_mm(pts, rec.points_xy, rec.spacing_mm) if rec.points_xy is not None else np.full(21, np.nan)
        for lvl in disc_levels(rec.view):
            for slot, c in enumerate(lvl.corners):
                i = names.index(c)
                lv = next(x for x in res["levels"] if x["level"] == lvl.name)
                row = {"patient_id": rec.patient_id, "view": rec.view, "level": lvl.name, "corner": c,
                       "true": rec.scores.get(c), "pred": res["scores"][c],
                       "ordinal": None if not res.get("ordinal_scores") else res["ordinal_scores"][c],
                       "error_mm": float(err[i])}
                for les in CORNER_LESIONS:
                    row[f"true_{les}"] = rec.findings.get(c, {}).get(les)
                    row[f"p_{les}"] = lv["lesions"][les][slot]
                row["true_bridging"] = rec.bridged.get(lvl.name)
                row["p_bridging"] = lv["bridging"]
                row["true_scorable"] = rec.scorable.get(c, True)
                row["p_scorable"] = lv["scorable"][slot]
                rows.append(row)
    return rows


def _corner_metrics(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    scorable = [r for r in rows if r["true"] is not None]
    correct = sum(1 for r in scorable if r[key] is not None and r[key] == r["true"])
    both = [r for r in scorable if r[key] is not None]
    conf = np.zeros((4, 4), int)
    for r in both:
        conf[int(r["true"]), int(r[key])] += 1
    by_score = {str(s): _rate(int(conf[s, s]), int(sum(1 for r in scorable if r["true"] == s))) for s in range(4)}
    return {"accuracy": _rate(correct, len(scorable)), "accuracy_both_scorable": _rate(int(np.trace(conf)), len(both)),
            "accuracy_by_true_score": by_score, "confusion_true_by_pred": conf.tolist(),
            "called_not_scorable_when_scorable": int(len(scorable) - len(both))}


def evaluate(records: Sequence[ViewRecord], results: Sequence[dict[str, Any]], threshold: float = 0.5,
             missing_method: str = "segment_mean") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics (module doc) from per-view records with truth and the matching per-view results."""
    rows = corner_rows(records, results)
    m: dict[str, Any] = {"n_patients": len({r.patient_id for r in records}), "n_views": len(records),
                         "n_corners": len(rows)}
    m["corners"] = _corner_metrics(rows, "pred")
    if all(r["ordinal"] is not None or r["pred"] is None for r in rows) and any(r["ordinal"] is not None for r in rows):
        m["corners_ordinal_model"] = _corner_metrics(rows, "ordinal")
    truth_ns = [r for r in rows if r["true"] is None]
    m["not_scorable"] = {"true_not_scorable": len(truth_ns),
                         "detected": sum(1 for r in truth_ns if r["pred"] is None),
                         "false_not_scorable": m["corners"]["called_not_scorable_when_scorable"]}
    lesions: dict[str, Any] = {}
    for les in (*CORNER_LESIONS, "bridging"):
        rs = [r for r in rows if r["true_scorable"] and r[f"true_{les}"] is not None]
        if les == "bridging":  # one decision per disc level
            seen, uniq = set(), []
            for r in rs:
                k = (r["patient_id"], r["view"], r["level"])
                if k not in seen:
                    seen.add(k)
                    uniq.append(r)
            rs = uniq
        y = np.array([bool(r[f"true_{les}"]) for r in rs])
        p = np.array([r[f"p_{les}"] >= threshold for r in rs])
        tp, tn = int((y & p).sum()), int((~y & ~p).sum())
        lesions[les] = {"accuracy": _rate(tp + tn, len(y)), "sensitivity": _rate(tp, int(y.sum())),
                        "specificity": _rate(tn, int((~y).sum())),
                        "prevalence": float(y.mean()) if len(y) else float("nan")}
    m["lesions"] = lesions
    err = np.array([r["error_mm"] for r in rows], float)
    m["keypoints_corners"] = {**success_rates(err), "median_ci": _median_ci(err)}
    all_err = []
    for rec, res in zip(records, results):
        if rec.points_xy is not None:
            all_err.append(radial_errors_mm(np.asarray(res["points_xy"]), rec.points_xy, rec.spacing_mm))
    m["keypoints_all_points"] = success_rates(np.concatenate(all_err)) if all_err else {}
    # patient totals
    by_patient: dict[str, dict[str, dict[str, Any]]] = {}
    for rec, res in zip(records, results):
        d = by_patient.setdefault(rec.patient_id, {"true": {}, "pred": {}, "ordinal": {}})
        d["true"][rec.view] = rec.scores
        d["pred"][rec.view] = res["scores"]
        if res.get("ordinal_scores"):
            d["ordinal"][rec.view] = res["ordinal_scores"]
    totals = []
    for pid, d in sorted(by_patient.items()):
        t = total_score(d["true"], missing_method)
        p = total_score(d["pred"], missing_method)
        o = total_score(d["ordinal"], missing_method) if d["ordinal"] else None
        totals.append({"patient_id": pid, "true": t["total"], "pred": p["total"], "pred_n_scored": p["n_scored"],
                       "ordinal": None if o is None else o["total"]})
    m["totals_table"] = totals
    ok = [t for t in totals if t["true"] is not None and t["pred"] is not None]
    m["total"] = {"n_compared": len(ok), "n_without_total": len(totals) - len(ok), "missing_method": missing_method}
    if len(ok) >= 3:
        m["total"].update(regression_report(np.array([t["pred"] for t in ok]), np.array([t["true"] for t in ok])))
    ok_o = [t for t in totals if t["true"] is not None and t["ordinal"] is not None]
    if len(ok_o) >= 3:
        m["total_ordinal_model"] = regression_report(np.array([t["ordinal"] for t in ok_o]),
                                                     np.array([t["true"] for t in ok_o]))
    per_level = {}
    for view in sorted({r["view"] for r in rows}):
        for lvl in disc_levels(view):
            rs = [r for r in rows if r["view"] == view and r["level"] == lvl.name]
            sc = [r for r in rs if r["true"] is not None]
            per_level[lvl.name] = {
                "accuracy": _rate(sum(1 for r in sc if r["pred"] == r["true"]), len(sc)),
                "accuracy_ordinal": _rate(sum(1 for r in sc if r["ordinal"] == r["true"]), len(sc)),
                "keypoint_median_mm": float(np.nanmedian([r["error_mm"] for r in rs])) if rs else float("nan")}
    m["per_level"] = per_level
    return m, rows


def _fmt(e: dict[str, Any], pct: bool = True, nd: int = 3) -> str:
    if pct:
        return f"{e['value']:.{nd}f} ({e['lo']:.{nd}f}-{e['hi']:.{nd}f})"
    return f"{e['value']:.2f} ({e['lo']:.2f} to {e['hi']:.2f})"


def report_markdown(m: dict[str, Any]) -> str:
    c = m["corners"]
    lines = ["# mSASSS evaluation (held-out patients)", "",
             f"{m['n_patients']} patients, {m['n_views']} views, {m['n_corners']} corners.", "",
             "## Corners", "",
             "Accuracy (corners scorable in the truth; 'not scorable' predicted counts as wrong): "
             f"{_fmt(c['accuracy'])}",
             f"Accuracy where both call the corner scorable: {_fmt(c['accuracy_both_scorable'])}", "",
             "| true score | accuracy (95% CI) | n |", "|---|---|---|"]
    for s, e in c["accuracy_by_true_score"].items():
        lines.append(f"| {s} | {_fmt(e)} | {e['n']} |")
    lines += ["", "Confusion (rows: true 0-3, columns: predicted 0-3):", "", "```"]
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in c["confusion_true_by_pred"]]
    ns = m["not_scorable"]
    lines += ["```", "", f"Not scorable in the truth: {ns['true_not_scorable']}, detected {ns['detected']}; "
              f"scorable corners called not scorable: {ns['false_not_scorable']}.", ""]
    if "corners_ordinal_model" in m:
        o = m["corners_ordinal_model"]
        lines += ["## Alternative: ordinal 0-3 head per corner", "",
                  f"Accuracy: {_fmt(o['accuracy'])} (per-lesion classifiers + rule: {_fmt(c['accuracy'])})", "",
                  "| true score | accuracy (95% CI) |", "|---|---|"]
        lines += [f"| {s} | {_fmt(e)} |" for s, e in o["accuracy_by_true_score"].items()]
        lines.append("")
    lines += ["## Lesions (per corner; bridging per disc level), threshold 0.5", "",
              "| lesion | prevalence | accuracy | sensitivity | specificity |", "|---|---|---|---|---|"]
    for les, e in m["lesions"].items():
        lines.append(f"| {les} | {e['prevalence']:.2f} | {_fmt(e['accuracy'])} | {_fmt(e['sensitivity'])} | "
                     f"{_fmt(e['specificity'])} |")
    k = m["keypoints_corners"]
    lines += ["", "## Keypoints (24 corners)", "",
              f"Median radial error {k['median_ci']['value']:.2f} mm "
              f"({k['median_ci']['lo']:.2f}-{k['median_ci']['hi']:.2f}), "
              f"mean {k['mean_mm']:.2f} mm; within 2 mm {k['within_2mm']:.3f}, within 4 mm {k['within_4mm']:.3f} "
              f"(n = {int(k['n'])}).", ""]
    if m.get("keypoints_all_points"):
        a = m["keypoints_all_points"]
        lines += [f"All 21 points per view (corners + centres): median {a['median_mm']:.2f} mm, within 2 mm "
                  f"{a['within_2mm']:.3f}.", ""]
    t = m["total"]
    lines += ["## Total score (0-72)", "", f"Patients compared: {t['n_compared']} (without a total: "
              f"{t['n_without_total']}; missing corners: {t['missing_method']})."]
    if "mae" in t:
        ba = t["bland_altman"]
        lines += ["", f"MAE {_fmt(t['mae'], False)}, RMSE {_fmt(t['rmse'], False)}, ICC {_fmt(t['icc'], False)}, "
                  f"PCC {_fmt(t['pcc'], False)}",
                  f"Bland-Altman bias {_fmt(ba['bias'], False)}, limits {ba['loa_lower']['value']:.2f} to "
                  f"{ba['loa_upper']['value']:.2f}"]
    if "total_ordinal_model" in m:
        to = m["total_ordinal_model"]
        lines += [f"Ordinal model: MAE {_fmt(to['mae'], False)}, ICC {_fmt(to['icc'], False)}"]
    lines += ["", "## Per disc level", "",
              "| level | accuracy (lesion classifiers) | accuracy (ordinal) | keypoint median mm |",
              "|---|---|---|---|"]
    for name, e in m["per_level"].items():
        lines.append(f"| {name} | {_fmt(e['accuracy'])} | {_fmt(e['accuracy_ordinal'])} | "
                     f"{e['keypoint_median_mm']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """``metrics.json``, ``corners.csv`` and ``report.md`` in ``out_dir`` (atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    buf = io.StringIO()
    if rows:
        wr = csv.DictWriter(buf, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    write_text(out / "corners.csv", buf.getvalue())
    return write_text(out / "report.md", report_markdown(metrics))
