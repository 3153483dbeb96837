"""Evaluation: one report per head for any task (:func:`evaluate_heads`), and the binary tasks'
full report with optional external validation and recalibration (:func:`evaluate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch

from ..atomic import write_json, write_text
from ..errors import InputError
from ..metrics import (apply_card_recalibration, binary_report, choose_threshold, logistic_calibration,
                       parse_threshold_rule, recalibrate_probability, validation_summary)
from ..report import render_html, render_markdown, write_evaluation_report
from .fit import predict
from .heads import BinaryHead, Head
from .train import read_dataset_info, read_manifest


def _fmt(e: Any) -> str:
    """An estimate as "v (lo-hi)" ("v (lo to hi)" with a negative bound), 3 decimals; "-" if missing."""
    v, lo, hi = (e.get("value"), e.get("lo"), e.get("hi")) if isinstance(e, dict) else (e, None, None)
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    sep = " to " if lo is not None and hi is not None and min(lo, hi) < 0 else "-"
    ci = f" ({lo:.3f}{sep}{hi:.3f})" if lo is not None and hi is not None and np.isfinite([lo, hi]).all() else ""
    return f"{v:.3f}{ci}" if isinstance(v, float) else str(v)


def _rows(kind: str, rep: dict[str, Any]) -> list[list[str]]:
    """(metric, estimate (CI)) rows of one head's report."""
    if kind == "binary":
        m = rep["metrics"]
        pairs = [("ROC AUC", rep["auc"]), ("sensitivity", m["sensitivity"]), ("specificity", m["specificity"]),
                 ("PPV", m["ppv"]), ("NPV", m["npv"]), ("Brier", {"value": rep["calibration"]["brier"]})]
    elif kind == "regression":
        ba = rep["bland_altman"]
        pairs = [("PCC", rep["pcc"]), ("RMSE", rep["rmse"]), ("MAE", rep["mae"]), ("ICC(A,1)", rep["icc"]),
                 ("Bland-Altman bias", ba["bias"]), ("lower limit of agreement", ba["loa_lower"]),
                 ("upper limit of agreement", ba["loa_upper"])]
    elif kind in ("ordinal", "multiclass"):
        pairs = [("accuracy", rep["accuracy"]), ("quadratic-weighted kappa", rep["kappa_quadratic"]),
                 ("MAE (classes)", rep["mae_classes"])]
    else:
        pairs = [("mean radial error (mm)", rep["mean_mm"]), ("median radial error (mm)", rep["median_mm"]),
                 ("success within 2 mm", rep["success_2mm"]), ("success within 4 mm", rep["success_4mm"])]
    return [["metric", "estimate (95% CI)" if rep.get("alpha", 0.05) == 0.05 else "estimate (CI)"]] + \
        [[k, _fmt(v)] for k, v in pairs]


_HEADLINE = ("n", "n_positive", "auc", "brier", "sensitivity", "specificity", "calibration_intercept",
             "calibration_slope")


def _headline(summary: Mapping[str, Any], cal: Mapping[str, Any] | None) -> dict[str, Any]:
    """The external-validation figures of a validation summary and its calibration."""
    both = {**summary, **{f"calibration_{k}": v for k, v in (cal or {}).items()}}
    return {k: both[k].get("value") if isinstance(both.get(k), dict) else both.get(k) for k in _HEADLINE}


def _columns(name: str, kind: str, decoded: dict[str, np.ndarray], target: np.ndarray | None) -> dict[str, Any]:
    """Flat per-sample columns of one head for predictions.csv."""
    cols: dict[str, Any] = {f"{name}_{k}": decoded[k] for k in ("probability", "value", "class", "expected")
                            if k in decoded}
    if kind == "keypoints":
        pts = decoded["points"]
        for k in range(pts.shape[1]):
            cols[f"{name}_p{k}_x"], cols[f"{name}_p{k}_y"] = pts[:, k, 0], pts[:, k, 1]
            if target is not None:
                cols[f"{name}_p{k}_x_true"], cols[f"{name}_p{k}_y_true"] = target[:, k, 0], target[:, k, 1]
    elif target is not None:
        cols[f"{name}_true"] = target
    return cols


def evaluate_heads(model: torch.nn.Module, dataset: torch.utils.data.Dataset, heads: Mapping[str, Head],
                   device: str | torch.device = "cpu", out_dir: str | Path | None = None, batch_size: int = 8,
                   alpha: float = 0.05, n_boot: int = 1000, seed: int = 0,
                   report_kw: Mapping[str, Mapping[str, Any]] | None = None, title: str = "RheumAI evaluation",
                   context: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{head name: report}`` for ``model`` on ``dataset``; with ``out_dir`` predictions.csv,
    metrics.json, report.md / .html. ``report_kw``: extra arguments per head's ``report`` (binary
    ``threshold``; keypoints ``spacing_mm`` (row, col) mm); ``context``: JSON-able report lines."""
    outputs, targets, ids = predict(model, dataset, torch.device(device), heads, batch_size)
    reports: dict[str, dict[str, Any]] = {}
    cols: dict[str, Any] = {"id": ids}
    for name, head in heads.items():
        if name not in outputs:
            raise KeyError(f"head {name!r} missing from the model output ({sorted(outputs)})")
        decoded = head.decode(outputs[name])
        target = targets[name].numpy() if name in targets else None
        cols.update(_columns(name, head.kind, decoded, target))
        if target is not None:
            kw = {"alpha": alpha, "n_boot": n_boot, "seed": seed, **(report_kw or {}).get(name, {})}
            reports[name] = {"kind": head.kind, **head.report(decoded, target, **kw)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "predictions.csv", pd.DataFrame(cols).to_csv(index=False))
        write_json(out / "metrics.json", {"reports": reports, "n": len(ids), "context": dict(context or {})})
        blocks: list[Any] = [("h1", title), ("p", f"{len(ids)} samples; {len(heads)} head(s).")]
        if context:
            blocks.append(("list", [f"{k}: {v}" for k, v in context.items()]))
        for name, rep in reports.items():
            blocks += [("h2", f"Head {name!r} ({rep['kind']})"), ("table", _rows(rep["kind"], rep))]
            if rep["kind"] in ("ordinal", "multiclass"):
                classes = rep["classes"]
                blocks.append(("table", [["truth \\ predicted"] + [str(c) for c in classes]]
                               + [[str(c)] + [str(v) for v in row] for c, row in zip(classes, rep["confusion"])]))
        blocks.append(("p", "Files: predictions.csv (one row per sample), metrics.json (every estimate and interval)."))
        write_text(out / "report.md", render_markdown(blocks))
        write_text(out / "report.html", render_html(blocks, title))
    return reports


def evaluate(model: str | Path, manifest: str | Path, out_dir: str | Path, *, split: str = "test",
             threshold_rule: str | None = None, external: bool = False, recalibrate_out: str | Path | None = None,
             auc_ci: str = "delong", n_bootstrap: int = 2000, alpha: float = 0.05, seed: int = 0, batch_size: int = 8,
             device: str = "auto", calibration_bins: int = 10, should_stop: Callable[[], bool] | None = None,
             show_progress: bool = True) -> dict[str, Any]:
    """A binary task's checkpoint on the manifest rows of ``split`` (or "all"): metrics.json's content
    plus ``files``. The card's threshold unless ``threshold_rule`` (chosen here: optimistic, said so);
    ``external``: development beside external figures (comparison.csv); ``recalibrate_out``: the same
    weights with the recalibration ``p' = sigmoid(a + b * logit(p))`` fitted here, threshold mapped."""
    from ..checkpoint import load_checkpoint, read_card, save_checkpoint
    from ..tasks import get_task

    if recalibrate_out is not None and not external:
        raise InputError(None, "recalibration needs external validation (--external)")
    if external and threshold_rule:
        raise InputError(None, "--external keeps the model card's threshold; drop --threshold-rule")
    try:
        rule = parse_threshold_rule(threshold_rule) if threshold_rule is not None else None
    except ValueError as exc:
        raise InputError(None, f"--threshold-rule: {exc}") from None
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    net, card = load_checkpoint(model, dev)
    df = read_manifest(manifest).query("label >= 0")
    rows = (df if split == "all" else df[df["split"] == split]).reset_index(drop=True)
    if rows.empty:
        raise InputError(manifest, f"no rows with split == {split!r} and a label "
                                   f"(splits present: {sorted(df['split'].unique())})")
    warnings: list[str] = []
    prep, card_prep = read_dataset_info(manifest).get("preprocessing"), card.get("preprocessing")
    if prep is not None and card_prep is not None and prep != card_prep:
        diff = sorted(k for k in set(prep) | set(card_prep) if prep.get(k) != card_prep.get(k))
        warnings.append(f"the evaluated cache was built with other preprocessing than the model's ({', '.join(diff)})")
    if split in ("train", "val", "all") and not external:
        warnings.append(f"evaluating on the {split} split: it holds patients that shaped the model or its threshold")
    ds = get_task(card["task"]).training_recipe().eval_dataset(rows, card)
    outputs, _, _ = predict(net, ds, dev, {"out": BinaryHead()}, batch_size, should_stop=should_stop,
                            desc=f"evaluate {split}" if show_progress else None)
    p = apply_card_recalibration(BinaryHead().decode(outputs["out"])["probability"], card)
    y = rows["label"].to_numpy(dtype=int)
    if rule is None:
        threshold = float(card["threshold"])
        source = f"from the model card ({card.get('threshold_note') or 'rule ' + str(card.get('threshold_rule', '?'))})"
    else:
        try:
            threshold = choose_threshold(y, p, rule)
        except ValueError as exc:
            raise InputError(manifest, f"threshold rule {rule} on split {split!r}: {exc}") from None
        source = f"fixed by rule {rule}" if rule.kind == "fixed" else f"chosen on this {split} split by rule {rule}"
        if rule.kind != "fixed":
            warnings.append(f"the threshold was chosen on the evaluated data ({rule}): threshold metrics are "
                            "optimistic")
    if min(y.sum(), (1 - y).sum()) < 5:
        warnings.append(f"only {int(y.sum())} positive / {int((1 - y).sum())} negative cases: intervals are wide")
    report = binary_report(y, p, threshold, alpha=alpha, auc_method=auc_ci, n_boot=n_bootstrap, seed=seed,
                           n_bins=calibration_bins)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "predictions.csv", pd.DataFrame({"patient_id": rows["patient_id"].astype(str), "label": y,
                                                      "probability": p, "predicted": (p >= threshold).astype(int)}
                                                     ).to_csv(index=False))
    metrics = {**report, "split": split, "threshold_source": source, "model_id": card.get("model_id"),
               "model": str(model), "manifest": str(manifest), "warnings": warnings}
    blocks: list[Any] = []
    if external:
        try:
            cal = logistic_calibration(y, p, alpha)
        except ValueError as exc:
            raise InputError(manifest, f"calibration intercept / slope on split {split!r}: {exc}") from None
        cm = card.get("metrics") or {}
        dev_fig = {**_headline(cm.get("validation") or {}, cm.get("calibration")),
                   "source": "model card: validation split of the development site"}
        ext = {**_headline(validation_summary(report), cal), "source": f"{manifest} ({split})"}
        table = [{"metric": k, "development": dev_fig.get(k), "external": ext[k]} for k in ext if k != "source"]
        recal = None
        if recalibrate_out is not None:
            a, b = cal["slope_model_intercept"]["value"], cal["slope"]["value"]
            if b <= 0:
                raise InputError(manifest, f"calibration slope {b:.3f} <= 0 on this cohort: the model does not rank "
                                           "its patients; recalibration would invert it")
            thr = float(recalibrate_probability(np.array([threshold]), a, b)[0])
            new_card = {
                **{k: v for k, v in card.items() if k not in ("model_id", "weights_sha256")},
                "threshold": thr, "threshold_rule": f"recalibrated from {threshold:.6g}",
                "threshold_note": f"the development threshold {threshold:.4f} mapped through the recalibration",
                "recalibration": {"intercept": a, "slope": b, "fitted_on": str(manifest), "split": split,
                                  "n": int(y.size), "n_positive": int(y.sum()), "calibration_before": cal,
                                  "source_model_id": card.get("model_id"), "source_threshold": threshold,
                                  "source_weights_sha256": card.get("weights_sha256")}}
            recal = save_checkpoint(recalibrate_out, net, new_card)
            if read_card(recal).get("weights_sha256") != card.get("weights_sha256"):
                raise RuntimeError("recalibrated checkpoint: weights changed")  # the same tensors were hashed
            after = logistic_calibration(y, recalibrate_probability(p, a, b), alpha)
            table += [{"metric": f"calibration_{k}_after_recalibration", "development": None,
                       "external": after[k]["value"]} for k in ("slope", "intercept")]
        write_text(out / "comparison.csv", pd.DataFrame(table).to_csv(index=False))
        metrics["external_validation"] = {"development": dev_fig, "external": ext, "calibration": cal,
                                          "recalibrated_checkpoint": str(recal) if recal else None}
        blocks = [("h2", "External validation: development vs external site"),
                  ("table", [["metric", "development site", "external site"]]
                   + [[r["metric"], _fmt(r["development"]), _fmt(r["external"])] for r in table]),
                  ("p", "Calibration intercept (slope fixed at 1; 0 ideal, < 0 risks overestimated) and slope (1 "
                        "ideal, < 1 predictions too extreme), logistic models, Wald CIs "
                        f"{_fmt(cal['slope']['lo'])} to {_fmt(cal['slope']['hi'])} for the slope."
                        + (f" Recalibrated checkpoint: {recal}." if recal else ""))]
    write_json(out / "metrics.json", metrics)
    title = f"RheumAI {'external validation' if external else 'evaluation'}: {card.get('task', '')} ({split})"
    files = write_evaluation_report(out, report, card, title, split, source, warnings, blocks)
    metrics["files"] = {k: str(v) for k, v in {**files, "metrics_json": out / "metrics.json",
                                                "predictions": out / "predictions.csv"}.items()}
    if show_progress:
        a, m = report["auc"], report["metrics"]
        print(f"rheumai evaluate: {split} n={report['n']} AUC {a['value']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] "
              f"sens {m['sensitivity']['value']:.3f} spec {m['specificity']['value']:.3f} at {threshold:.3f}"
              + (f"; calibration slope {metrics['external_validation']['external']['calibration_slope']:.3f}"
                 if external else "") + f"; report {files['markdown']}")
    return metrics
