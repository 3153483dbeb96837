"""``rheumai evaluate``: score a manifest split with a checkpoint and write a readable report.

Outputs in ``out_dir``: predictions.csv (patient_id, label, probability, predicted),
metrics.json (everything, incl. ROC points and calibration), metrics.csv, report.md,
report.html, roc.png, confusion_matrix.png, calibration.png.

The operating threshold is the model card's (chosen on validation at training time) unless a
rule is given: ``fixed:<p>`` is used as is; ``youden`` / ``sensitivity:<x>`` are then chosen on
the evaluated split itself, which is optimistic, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .atomic import write_json, write_text
from .checkpoint import load_checkpoint
from .data import SliceStackDataset, eval_transform_from_card, read_dataset_info, read_manifest
from .errors import InputError
from .metrics import binary_report, choose_threshold, parse_threshold_rule
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
    from .train import _sigmoid, predict_logits

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
    logits = predict_logits(net, ds, dev, batch_size, should_stop=should_stop,
                            desc=f"evaluate {split}" if show_progress else None)
    p = _sigmoid(logits)
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
