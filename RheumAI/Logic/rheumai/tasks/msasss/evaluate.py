"""Evaluation of an mSASSS checkpoint against known truth (held-out patients).

Corners (24 per patient): accuracy over the corners scorable in the truth ("not scorable"
predicted counts as wrong; Wilson CI), by true score, the 4 x 4 confusion, agreement on "not
scorable"; per lesion type accuracy / sensitivity / specificity (bridging per disc level);
keypoints: radial error in mm of the 24 corners and of all 21 points per view (the engine's
keypoints report: bootstrap CIs, success within 2 and 4 mm); patient totals: MAE, RMSE, PCC,
ICC(A,1), Bland-Altman (:func:`rheumai.engine.heads.regression_report`); per disc level. The
ordinal alternative is scored beside the per-lesion classifiers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ...atomic import write_json, write_text
from ...checkpoint import read_card
from ...engine.heads import KeypointsHead, regression_report
from ...landmarks import radial_errors_mm
from ...metrics import metrics_from_counts, wilson_ci
from .anatomy import disc_levels, point_names, scored_corners
from .dataset import ViewRecord, cohort_split, load_cohort
from .scoring import CORNER_LESIONS, total_score


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_ci(k, n)
    return {"value": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": int(k), "n": int(n)}


def corner_rows(records: Sequence[ViewRecord], results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (patient, view, corner): truth, prediction (both models), findings, keypoint error mm."""
    rows = []
    for rec, res in zip(records, results):
        names = point_names(rec.view)
        err = radial_errors_mm(np.asarray(res["points_xy"], float), rec.points_xy, rec.spacing_mm)
        for lvl, lv in zip(disc_levels(rec.view), res["levels"]):
            for slot, c in enumerate(lvl.corners):
                row = {"patient_id": rec.patient_id, "view": rec.view, "level": lvl.name, "corner": c,
                       "true": rec.scores.get(c), "pred": res["scores"][c],
                       "ordinal": (res.get("ordinal_scores") or {}).get(c), "error_mm": float(err[names.index(c)])}
                for les in CORNER_LESIONS:
                    row[f"true_{les}"] = rec.findings.get(c, {}).get(les)
                    row[f"p_{les}"] = lv["lesions"][les][slot]
                row.update(true_bridging=rec.bridged.get(lvl.name), p_bridging=lv["bridging"],
                           true_scorable=rec.scorable.get(c, True), p_scorable=lv["scorable"][slot])
                rows.append(row)
    return rows


def _corner_metrics(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    scorable = [r for r in rows if r["true"] is not None]
    both = [r for r in scorable if r[key] is not None]
    conf = np.zeros((4, 4), int)
    for r in both:
        conf[int(r["true"]), int(r[key])] += 1
    by_score = {str(s): _rate(int(conf[s, s]), sum(1 for r in scorable if r["true"] == s)) for s in range(4)}
    return {"accuracy": _rate(int(np.trace(conf)), len(scorable)), "accuracy_both_scorable": _rate(int(np.trace(conf)),
            len(both)), "accuracy_by_true_score": by_score, "confusion_true_by_pred": conf.tolist(),
            "called_not_scorable_when_scorable": len(scorable) - len(both)}


def _keypoints(records: Sequence[ViewRecord], results: Sequence[dict[str, Any]], corners: bool) -> dict[str, Any]:
    def pts(view: str, xy: Any) -> np.ndarray:
        xy = np.asarray(xy, float)
        return xy[[point_names(view).index(c) for c in scored_corners(view)]] if corners else xy

    pred = np.stack([pts(r.view, res["points_xy"]) for r, res in zip(records, results)])
    return KeypointsHead().report({"points": pred}, np.stack([pts(r.view, r.points_xy) for r in records]),
                                  spacing_mm=np.array([r.spacing_mm for r in records]))


def corner_metrics(records: Sequence[ViewRecord], results: Sequence[dict[str, Any]], threshold: float = 0.5,
                   missing_method: str = "segment_mean") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics (module doc) from per-view records with truth and the matching per-view results."""
    rows = corner_rows(records, results)
    m: dict[str, Any] = {"n_patients": len({r.patient_id for r in records}), "n_views": len(records),
                         "n_corners": len(rows), "corners": _corner_metrics(rows, "pred")}
    if any(r["ordinal"] is not None for r in rows):
        m["corners_ordinal_model"] = _corner_metrics(rows, "ordinal")
    truth_ns = [r for r in rows if r["true"] is None]
    m["not_scorable"] = {"true_not_scorable": len(truth_ns), "detected": sum(1 for r in truth_ns if r["pred"] is None),
                         "false_not_scorable": m["corners"]["called_not_scorable_when_scorable"]}
    m["lesions"] = {}
    for les in (*CORNER_LESIONS, "bridging"):
        rs = [r for r in rows if r["true_scorable"] and r[f"true_{les}"] is not None]
        if les == "bridging":  # one decision per disc level
            rs = list({(r["patient_id"], r["view"], r["level"]): r for r in rs}.values())
        y = np.array([bool(r[f"true_{les}"]) for r in rs], bool)
        p = np.array([r[f"p_{les}"] >= threshold for r in rs], bool)
        m["lesions"][les] = {**metrics_from_counts((y & p).sum(), (y & ~p).sum(), (~y & p).sum(), (~y & ~p).sum()),
                             "prevalence": float(y.mean()) if len(y) else float("nan")}
    m["keypoints_corners"] = _keypoints(records, results, corners=True)
    m["keypoints_all_points"] = _keypoints(records, results, corners=False)
    by_patient: dict[str, dict[str, dict[str, Any]]] = {}
    for rec, res in zip(records, results):
        d = by_patient.setdefault(rec.patient_id, {"true": {}, "pred": {}, "ordinal": {}})
        d["true"][rec.view], d["pred"][rec.view] = rec.scores, res["scores"]
        if res.get("ordinal_scores"):
            d["ordinal"][rec.view] = res["ordinal_scores"]
    totals = [{"patient_id": pid, **{k: total_score(d[k], missing_method)["total"] if d[k] else None
                                     for k in ("true", "pred", "ordinal")}} for pid, d in sorted(by_patient.items())]
    m["totals_table"] = totals
    m["total"] = {"missing_method": missing_method}
    for key, name in (("pred", "total"), ("ordinal", "total_ordinal_model")):
        ok = [t for t in totals if t["true"] is not None and t[key] is not None]
        m.setdefault(name, {}).update(n_compared=len(ok), n_without_total=len(totals) - len(ok))
        if len(ok) >= 3:
            m[name].update(regression_report(np.array([t[key] for t in ok]), np.array([t["true"] for t in ok])))
    m["per_level"] = {}
    for view in sorted({r["view"] for r in rows}):
        for lvl in disc_levels(view):
            rs = [r for r in rows if r["view"] == view and r["level"] == lvl.name]
            sc = [r for r in rs if r["true"] is not None]
            m["per_level"][lvl.name] = {
                "accuracy": _rate(sum(1 for r in sc if r["pred"] == r["true"]), len(sc)),
                "accuracy_ordinal": _rate(sum(1 for r in sc if r["ordinal"] == r["true"]), len(sc)),
                "keypoint_median_mm": float(np.nanmedian([r["error_mm"] for r in rs]))}
    return m, rows


def _fmt(e: dict[str, Any], nd: int = 3) -> str:
    sep = " to " if min(e["lo"], e["hi"]) < 0 else "-"
    return f"{e['value']:.{nd}f} ({e['lo']:.{nd}f}{sep}{e['hi']:.{nd}f})"


def report_markdown(m: dict[str, Any]) -> str:
    c, ns, k, a, t = m["corners"], m["not_scorable"], m["keypoints_corners"], m["keypoints_all_points"], m["total"]
    lines = ["# mSASSS evaluation (held-out patients)", "",
             f"{m['n_patients']} patients, {m['n_views']} views, {m['n_corners']} corners.", "", "## Corners", "",
             "Accuracy (corners scorable in the truth; 'not scorable' predicted counts as wrong): "
             f"{_fmt(c['accuracy'])}",
             f"Accuracy where both call the corner scorable: {_fmt(c['accuracy_both_scorable'])}", "",
             "| true score | accuracy (95% CI) | n |", "|---|---|---|"]
    lines += [f"| {s} | {_fmt(e)} | {e['n']} |" for s, e in c["accuracy_by_true_score"].items()]
    lines += ["", "Confusion (rows: true 0-3, columns: predicted 0-3):", "", "```"]
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in c["confusion_true_by_pred"]]
    lines += ["```", "", f"Not scorable in the truth: {ns['true_not_scorable']}, detected {ns['detected']}; "
              f"scorable corners called not scorable: {ns['false_not_scorable']}.", ""]
    if "corners_ordinal_model" in m:
        o = m["corners_ordinal_model"]
        lines += ["## Alternative: ordinal 0-3 head per corner", "",
                  f"Accuracy: {_fmt(o['accuracy'])} (per-lesion classifiers + rule: {_fmt(c['accuracy'])})", "",
                  "| true score | accuracy (95% CI) |", "|---|---|"]
        lines += [f"| {s} | {_fmt(e)} |" for s, e in o["accuracy_by_true_score"].items()] + [""]
    lines += ["## Lesions (per corner; bridging per disc level), threshold 0.5", "",
              "| lesion | prevalence | accuracy | sensitivity | specificity |", "|---|---|---|---|---|"]
    lines += [f"| {les} | {e['prevalence']:.2f} | {_fmt(e['accuracy'])} | {_fmt(e['sensitivity'])} | "
              f"{_fmt(e['specificity'])} |" for les, e in m["lesions"].items()]
    lines += ["", "## Keypoints (24 corners)", "",
              f"Median radial error {_fmt(k['median_mm'], 2)} mm, mean {_fmt(k['mean_mm'], 2)} mm; within 2 mm "
              f"{_fmt(k['success_2mm'])}, within 4 mm {_fmt(k['success_4mm'])} (n = {k['n_points']}).",
              f"All 21 points per view (corners + centres): median {a['median_mm']['value']:.2f} mm, within 2 mm "
              f"{a['success_2mm']['value']:.3f}.", "", "## Total score (0-72)", "",
              f"Patients compared: {t['n_compared']} (without a total: {t['n_without_total']}; missing corners: "
              f"{t['missing_method']})."]
    for name, e in (("Lesion classifiers + rule", t), ("Ordinal model", m["total_ordinal_model"])):
        if "mae" in e:
            ba = e["bland_altman"]
            lines += [f"{name}: MAE {_fmt(e['mae'], 2)}, RMSE {_fmt(e['rmse'], 2)}, ICC {_fmt(e['icc'], 2)}, PCC "
                      f"{_fmt(e['pcc'], 2)}; Bland-Altman bias {_fmt(ba['bias'], 2)}, limits "
                      f"{ba['loa_lower']['value']:.2f} to {ba['loa_upper']['value']:.2f}"]
    lines += ["", "## Per disc level", "", "| level | accuracy (lesion classifiers) | accuracy (ordinal) | "
              "keypoint median mm |", "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(e['accuracy'])} | {_fmt(e['accuracy_ordinal'])} | {e['keypoint_median_mm']:.2f} |"
              for name, e in m["per_level"].items()]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """``metrics.json``, ``corners.csv`` and ``report.md`` in ``out_dir`` (atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    write_text(out / "corners.csv", pd.DataFrame(rows, dtype=object).to_csv(index=False))
    return write_text(out / "report.md", report_markdown(metrics))


def evaluate(model: str | Path, manifest: str | Path, out_dir: str | Path, *, split: str = "test",
             show_progress: bool = True) -> dict[str, Any]:
    """Predict every view of the cohort table's ``split`` patients ("all": every patient; the split as
    in training, see :func:`.dataset.cohort_split`) with the checkpoint through the engine's
    predictor and score them against the truth; writes metrics.json, corners.csv, report.md."""
    from tqdm import tqdm

    from .predict import predictor

    records = load_cohort(manifest)
    if split != "all":
        tc = read_card(Path(model)).get("train_config", {})
        which = cohort_split(records, tc.get("split", (0.6, 0.1, 0.3)), int(tc.get("seed", 0)))
        records = [r for r in records if which[r.patient_id] == split]
    if not records:
        raise ValueError(f"{manifest}: no patients in split {split!r}")
    pred = predictor(model)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for pid in tqdm(sorted({r.patient_id for r in records}), desc="mSASSS evaluate", disable=not show_progress):
        study = {r.view: r.path for r in records if r.patient_id == pid}
        results.update({(pid, v): r for v, r in pred.predict(study, saliency=None).values["views"].items()})
    metrics, rows = corner_metrics(records, [results[(r.patient_id, r.view)] for r in records])
    metrics.update(split=split, model=str(model), manifest=str(manifest))
    write_report(out_dir, metrics, rows)
    return metrics

