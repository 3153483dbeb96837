"""``rheumai evaluate``: score a manifest split with a checkpoint and write a readable report.

Outputs in ``out_dir``: predictions.csv (patient_id, label, probability, predicted),
metrics.json (everything, incl. ROC points and calibration), metrics.csv, report.md,
report.html, roc.png, confusion_matrix.png, calibration.png.

The operating threshold is the model card's (chosen on validation at training time) unless a
rule is given: ``fixed:<p>`` is used as is; ``youden`` / ``sensitivity:<x>`` are then chosen on
the evaluated split itself, which is optimistic, and the report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .atomic import write_json, write_text
from .checkpoint import load_checkpoint, read_card, save_checkpoint
from .data import SliceStackDataset, eval_transform_from_card, read_dataset_info, read_manifest
from .engine.fit import predict
from .engine.heads import BinaryHead
from .errors import InputError
from .metrics import (apply_card_recalibration, binary_report, choose_threshold, logistic_calibration,
                      parse_threshold_rule, recalibrate_probability)
from .report import write_evaluation_report


@dataclass
class EvalResult:
    out_dir: Path
    report: dict[str, Any]                 # metrics.binary_report output
    predictions: pd.DataFrame
    threshold: float
    threshold_source: str
    files: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def evaluate(model: str | Path, manifest_path: str | Path, out_dir: str | Path, split: str = "test",
             threshold_rule: str | None = None, auc_ci: str = "delong", n_bootstrap: int = 2000,
             alpha: float = 0.05, seed: int = 0, batch_size: int = 8, device: str = "auto",
             calibration_bins: int = 10, progress: Callable[[dict[str, Any]], None] | None = None,
             should_stop: Callable[[], bool] | None = None, show_progress: bool = True) -> EvalResult:
    """Evaluate checkpoint folder ``model`` on rows of ``manifest_path`` with ``split`` (or "all")."""
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    net, card = load_checkpoint(model, dev)
    df = read_manifest(manifest_path)
    rows = df if split == "all" else df[df["split"] == split]
    if rows.empty:
        raise InputError(manifest_path, f"no rows with split == {split!r} (splits present: {sorted(df['split'].unique())})")
    rows = rows.reset_index(drop=True)
    warnings: list[str] = []
    info = read_dataset_info(manifest_path)
    prep = info.get("preprocessing")
    if prep is not None and card.get("preprocessing") is not None and prep != card["preprocessing"]:
        diff = sorted(k for k in set(prep) | set(card["preprocessing"]) if prep.get(k) != card["preprocessing"].get(k))
        warnings.append(f"the evaluated cache was built with other slice parameters than the model's ({', '.join(diff)})")
    if split in ("train", "val", "all"):
        warnings.append(f"evaluating on the {split} split: it holds patients that shaped the model or its threshold")
    ds = SliceStackDataset(rows, eval_transform_from_card(card), expect_channels=int(card["architecture"]["in_channels"]))
    if progress:
        progress({"stage": "predict", "n": len(ds)})
    head = BinaryHead("out")
    outputs, _, _ = predict(net, ds, dev, {"out": head}, batch_size, should_stop=should_stop,
                            desc=f"evaluate {split}" if show_progress else None)
    p = apply_card_recalibration(head.decode(outputs["out"])["probability"], card)
    y = rows["label"].to_numpy(dtype=int)

    if threshold_rule is None:
        threshold = float(card["threshold"])
        note = card.get("threshold_note") or f"rule {card.get('threshold_rule', '?')}"
        source = f"from the model card ({note})"
    else:
        rule = parse_threshold_rule(threshold_rule)
        try:
            threshold = choose_threshold(y, p, rule)
        except ValueError as exc:
            raise InputError(manifest_path, f"threshold rule {rule} on split {split!r}: {exc}") from None
        if rule.kind == "fixed":
            source = f"fixed by rule {rule}"
        else:
            source = f"chosen on this {split} split by rule {rule}"
            warnings.append(f"the threshold was chosen on the evaluated data ({rule}): threshold metrics are optimistic")
    if min(y.sum(), (1 - y).sum()) < 5:
        warnings.append(f"only {int(y.sum())} positive / {int((1 - y).sum())} negative cases: intervals are wide")

    report = binary_report(y, p, threshold, alpha=alpha, auc_method=auc_ci, n_boot=n_bootstrap, seed=seed,
                           n_bins=calibration_bins)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = pd.DataFrame({"patient_id": ds.patient_ids, "label": y, "probability": p,
                          "predicted": (p >= threshold).astype(int)})
    files = {"predictions": write_text(out / "predictions.csv", preds.to_csv(index=False))}
    files["metrics_json"] = write_json(out / "metrics.json", {
        **report, "split": split, "threshold_source": source, "model_id": card.get("model_id"),
        "model": str(model), "manifest": str(manifest_path), "warnings": warnings})
    files.update(write_evaluation_report(out, report, {
        "title": f"RheumAI evaluation: {card.get('task', '')} ({split})", "model_id": card.get("model_id"),
        "split": split, "threshold_source": source, "card": card, "warnings": warnings}))
    if show_progress:
        a = report["auc"]
        m = report["metrics"]
        print(f"rheumai evaluate: {split} n={report['n']} AUC {a['value']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] "
              f"sens {m['sensitivity']['value']:.3f} spec {m['specificity']['value']:.3f} at {threshold:.3f}; "
              f"report {files['markdown']}")
    return EvalResult(out, report, preds, threshold, source, files, warnings)


def _development_figures(card: dict[str, Any]) -> dict[str, Any]:
    """The development site's figures stored in the card (validation or out-of-fold)."""
    vm = (card.get("metrics") or {}).get("validation") or {}
    cal = (card.get("metrics") or {}).get("calibration") or {}
    g = lambda d, k: (d.get(k) or {}).get("value") if isinstance(d.get(k), dict) else d.get(k)  # noqa: E731
    return {"n": vm.get("n"), "n_positive": vm.get("n_positive"), "auc": g(vm, "auc"), "brier": vm.get("brier"),
            "sensitivity": g(vm, "sensitivity"), "specificity": g(vm, "specificity"),
            "calibration_intercept": g(cal, "intercept"), "calibration_slope": g(cal, "slope"),
            "source": "model card: validation split of the development site"}


def validate_external(model: str | Path, manifest_path: str | Path, out_dir: str | Path, split: str = "all",
                      recalibrate_out: str | Path | None = None, alpha: float = 0.05, n_bootstrap: int = 2000,
                      seed: int = 0, batch_size: int = 8, device: str = "auto", calibration_bins: int = 10,
                      show_progress: bool = True) -> EvalResult:
    """External validation of a frozen checkpoint on another site's manifest.

    Discrimination (AUC) and calibration (Brier, calibration intercept and slope, reliability
    curve) at the card's threshold, side by side with the development site's figures from the
    card (``comparison.csv`` and the report). ``recalibrate_out``: also write a new checkpoint
    folder there with the same weights (tensor hash recorded and checked) whose card carries the
    logistic recalibration fitted on this cohort (``p' = sigmoid(a + b * logit(p))``) and the
    threshold mapped through it, so the same patients stay on each side of it.
    """
    res = evaluate(model, manifest_path, out_dir, split=split, n_bootstrap=n_bootstrap, alpha=alpha, seed=seed,
                   batch_size=batch_size, device=device, calibration_bins=calibration_bins, show_progress=False)
    y = res.predictions["label"].to_numpy(dtype=int)
    p = res.predictions["probability"].to_numpy(dtype=float)
    card = read_card(model)
    try:
        cal = logistic_calibration(y, p, alpha)
    except ValueError as exc:
        raise InputError(manifest_path, f"calibration intercept / slope on split {split!r}: {exc}") from None
    dev = _development_figures(card)
    m = res.report["metrics"]
    ext = {"n": res.report["n"], "n_positive": res.report["n_positive"], "auc": res.report["auc"]["value"],
           "brier": res.report["calibration"]["brier"], "sensitivity": m["sensitivity"]["value"],
           "specificity": m["specificity"]["value"], "calibration_intercept": cal["intercept"]["value"],
           "calibration_slope": cal["slope"]["value"], "source": f"{manifest_path} ({split})"}
    rows = [{"metric": k, "development": dev.get(k), "external": ext[k]} for k in ext if k != "source"]
    out = Path(out_dir)
    files = dict(res.files)
    files["comparison"] = write_text(out / "comparison.csv", pd.DataFrame(rows).to_csv(index=False))
    recal = None
    if recalibrate_out is not None:
        a, b = cal["slope_model_intercept"]["value"], cal["slope"]["value"]
        if b <= 0:
            raise InputError(manifest_path, f"calibration slope {b:.3f} <= 0 on this cohort: the model does not rank "
                                            "its patients; recalibration would invert it")
        net, _ = load_checkpoint(model)
        thr = float(recalibrate_probability(np.array([res.threshold]), a, b)[0])
        new_card = {k: v for k, v in card.items() if k not in ("model_id", "weights_sha256")}
        new_card.update({
            "threshold": thr, "threshold_rule": f"recalibrated from {res.threshold:.6g}",
            "threshold_note": f"the development threshold {res.threshold:.4f} mapped through the recalibration",
            "recalibration": {"intercept": a, "slope": b, "fitted_on": str(manifest_path), "split": split,
                              "n": int(y.size), "n_positive": int(y.sum()), "calibration_before": cal,
                              "source_model_id": card.get("model_id"),
                              "source_weights_sha256": card.get("weights_sha256"),
                              "source_threshold": res.threshold}})
        recal = save_checkpoint(recalibrate_out, net, new_card)
        if read_card(recal).get("weights_sha256") != card.get("weights_sha256"):
            raise RuntimeError("recalibrated checkpoint: weights changed")  # save_checkpoint hashes the same tensors
        files["recalibrated_checkpoint"] = recal
        after = logistic_calibration(y, recalibrate_probability(p, a, b), alpha)
        rows.append({"metric": "calibration_slope_after_recalibration", "development": None,
                     "external": after["slope"]["value"]})
        rows.append({"metric": "calibration_intercept_after_recalibration", "development": None,
                     "external": after["intercept"]["value"]})
        files["comparison"] = write_text(out / "comparison.csv", pd.DataFrame(rows).to_csv(index=False))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    metrics.update({"external_validation": {"development": dev, "external": ext, "calibration": cal,
                                            "recalibrated_checkpoint": str(recal) if recal else None}})
    files["metrics_json"] = write_json(out / "metrics.json", metrics)
    table = [["metric", "development site", "external site"]] + [
        [r["metric"], _fmt(r["development"]), _fmt(r["external"])] for r in rows]
    files.update(write_evaluation_report(out, res.report, {
        "title": f"RheumAI external validation: {card.get('task', '')}", "model_id": card.get("model_id"),
        "split": split, "threshold_source": res.threshold_source, "card": card, "warnings": res.warnings,
        "extra_blocks": [("h2", "External validation: development vs external site"), ("table", table),
                         ("p", "Calibration intercept (slope fixed at 1; 0 ideal, < 0 risks overestimated) and "
                               "slope (1 ideal, < 1 predictions too extreme), logistic models, Wald CIs "
                               f"{_fmt(cal['slope']['lo'])}-{_fmt(cal['slope']['hi'])} for the slope."
                               + (f" Recalibrated checkpoint: {recal}." if recal else ""))]}))
    if show_progress:
        print(f"rheumai evaluate --external: AUC {ext['auc']:.3f} (development {_fmt(dev['auc'])}), calibration "
              f"slope {ext['calibration_slope']:.3f}, intercept {ext['calibration_intercept']:.3f}"
              + (f"; recalibrated checkpoint {recal}" if recal else "") + f"; report {files['markdown']}")
    return EvalResult(out, {**res.report, "external_validation": metrics["external_validation"]}, res.predictions,
                      res.threshold, res.threshold_source, files, res.warnings)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
