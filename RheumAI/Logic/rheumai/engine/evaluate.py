"""Evaluation by head: any task's model on a dataset of sample dicts -> one report per head.

:func:`evaluate_heads` runs the network once (:func:`rheumai.engine.fit.predict`), decodes each
head's output and calls its ``report`` (binary: ROC AUC, threshold metrics, calibration;
regression: PCC, RMSE, MAE, ICC, Bland-Altman; ordinal / multiclass: accuracy, weighted kappa,
MAE, confusion; keypoints: radial error in mm, success within 2 / 4 mm; all with CIs). With
``out_dir`` it writes ``predictions.csv`` (one row per sample: id, decoded values and targets per
head), ``metrics.json`` (every report) and ``report.md`` / ``report.html`` (a table per head).
A binary single-head task's full report with plots is :func:`rheumai.evaluate.evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from ..atomic import write_json, write_text
from ..report import render_html, render_markdown
from .fit import predict
from .heads import Head


def _fmt(e: Any) -> str:
    if isinstance(e, dict) and "value" in e:
        v, lo, hi = e["value"], e.get("lo"), e.get("hi")
        if v is None or not np.isfinite(v):
            return "-"
        ci = f" ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi) else ""
        return f"{v:.3f}{ci}"
    return "-" if e is None else str(e)


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


def _columns(name: str, kind: str, decoded: dict[str, np.ndarray], target: np.ndarray | None) -> dict[str, Any]:
    """Flat per-sample columns of one head for predictions.csv."""
    cols: dict[str, Any] = {}
    if kind == "keypoints":
        pts = decoded["points"]
        for k in range(pts.shape[1]):
            cols[f"{name}_p{k}_x"], cols[f"{name}_p{k}_y"] = pts[:, k, 0], pts[:, k, 1]
            if target is not None:
                cols[f"{name}_p{k}_x_true"], cols[f"{name}_p{k}_y_true"] = target[:, k, 0], target[:, k, 1]
        return cols
    for key in ("probability", "value", "class", "expected"):
        if key in decoded:
            cols[f"{name}_{key}"] = decoded[key]
    if target is not None:
        cols[f"{name}_true"] = target
    return cols


def evaluate_heads(model: torch.nn.Module, dataset: torch.utils.data.Dataset, heads: Mapping[str, Head],
                   device: str | torch.device = "cpu", out_dir: str | Path | None = None, batch_size: int = 8,
                   alpha: float = 0.05, n_boot: int = 1000, seed: int = 0,
                   report_kw: Mapping[str, Mapping[str, Any]] | None = None, title: str = "RheumAI evaluation",
                   context: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Reports ``{head name: report}`` for ``model`` on ``dataset`` (samples with targets).

    ``report_kw``: extra arguments per head's ``report`` (binary: ``threshold``; keypoints:
    ``spacing_mm``, (row, col) mm or one pair per sample). ``context``: JSON-able lines for the
    report (model id, split, ...)."""
    dev = torch.device(device) if isinstance(device, str) else device
    outputs, targets, ids = predict(model, dataset, dev, heads, batch_size)
    reports: dict[str, dict[str, Any]] = {}
    cols: dict[str, Any] = {"id": ids}
    for name, head in heads.items():
        if name not in outputs:
            raise KeyError(f"head {name!r} missing from the model output ({sorted(outputs)})")
        decoded = head.decode(outputs[name])
        target = targets[name].numpy() if name in targets else None
        cols.update(_columns(name, head.kind, decoded, target))
        if target is None:
            continue
        reports[name] = {"kind": head.kind, **head.report(decoded, target, alpha=alpha, n_boot=n_boot, seed=seed,
                                                          **dict((report_kw or {}).get(name, {})))}
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
