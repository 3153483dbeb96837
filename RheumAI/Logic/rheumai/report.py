"""Evaluation report: Markdown + HTML + CSV + PNG plots (ROC, confusion, calibration).

Blocks (heading, paragraph, list, table, image) render to both Markdown and HTML, so the two never
disagree; ``counts_report`` lists where a publication disagrees with its own confusion matrix.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .atomic import atomic_path, write_text
from .metrics import COUNT_METRICS, metrics_from_counts

LABELS = {"auc": "ROC AUC", "sensitivity": "Sensitivity (recall)", "specificity": "Specificity",
          "ppv": "PPV (precision)", "npv": "NPV", "accuracy": "Accuracy", "f1": "F1"}
Block = tuple[str, Any]


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def metrics_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per metric: value, CI, numerator / denominator, CI method (metrics.csv)."""
    rows = [("auc", report["auc"], report["auc"]["method"])] if "auc" in report else []
    rows += [(k, report["metrics"][k], "bootstrap (percentile)" if k == "f1" else "Wilson")
             for k in COUNT_METRICS]
    if "calibration" in report:
        rows.append(("brier", {"value": report["calibration"]["brier"]}, ""))
    return pd.DataFrame([{"metric": k, "value": e["value"], "ci_low": e.get("lo"), "ci_high": e.get("hi"),
                          "numerator": e.get("k"), "denominator": e.get("n"), "ci_method": how}
                         for k, e, how in rows])


def _metric_rows(report: dict[str, Any]) -> list[list[str]]:
    ci = int(round(100 * (1 - report.get("alpha", 0.05))))
    rows = [[LABELS[r.metric], _fmt(r.value), f"{_fmt(r.ci_low)} – {_fmt(r.ci_high)}",
             *(["", r.ci_method] if r.metric == "auc" else [f"{int(r.numerator)}/{int(r.denominator)}",
                                                            r.ci_method.split(" ")[0]])]
            for r in metrics_table(report).itertuples() if r.metric in LABELS]
    return [["Metric", "Value", f"{ci}% CI", "Counts", "CI method"]] + rows


def _confusion_rows(c: dict[str, int]) -> list[list[str]]:
    return [["", "Predicted positive", "Predicted negative", "Total"],
            ["**Actual positive**", f"TP {c['tp']}", f"FN {c['fn']}", str(c["tp"] + c["fn"])],
            ["**Actual negative**", f"FP {c['fp']}", f"TN {c['tn']}", str(c["fp"] + c["tn"])],
            ["**Total**", str(c["tp"] + c["fp"]), str(c["fn"] + c["tn"]), str(sum(c.values()))]]


def _inline(s: Any) -> str:
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(html.escape(str(s)).split("**")))


_MARKDOWN = {"h1": lambda c: f"# {c}\n", "h2": lambda c: f"## {c}\n", "p": lambda c: f"{c}\n",
             "list": lambda c: "\n".join(f"- {x}" for x in c) + "\n",
             "table": lambda c: "| " + " | ".join(c[0]) + " |\n|" + "|".join("---" for _ in c[0]) + "|\n"
             + "\n".join("| " + " | ".join(r) + " |" for r in c[1:]) + "\n",
             "img": lambda c: f"![{c[1]}]({c[0]})\n"}
_HTML = {"h1": lambda c: f"<h1>{_inline(c)}</h1>", "h2": lambda c: f"<h2>{_inline(c)}</h2>",
         "p": lambda c: f"<p>{_inline(c)}</p>",
         "list": lambda c: "<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in c) + "</ul>",
         "table": lambda c: "<table>" + "".join(
             "<tr>" + "".join(f"<{t}>{_inline(v)}</{t}>" for v in r) + "</tr>"
             for t, r in zip(["th"] + ["td"] * (len(c) - 1), c)) + "</table>",
         "img": lambda c: f'<figure><img src="{html.escape(c[0])}" alt="{html.escape(c[1])}" width="480">'
                          f"<figcaption>{_inline(c[1])}</figcaption></figure>"}
_STYLE = ("body{font-family:sans-serif;max-width:900px;margin:2em auto;line-height:1.4}"
          "table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #bbb;padding:4px 8px;text-align:left}"
          "th{background:#eee}figure{display:inline-block;margin:0 1em 1em 0}")


def render_markdown(blocks: Sequence[Block]) -> str:
    return "\n".join(_MARKDOWN[kind](content) for kind, content in blocks if kind in _MARKDOWN)


def render_html(blocks: Sequence[Block], title: str) -> str:
    body = "\n".join(_HTML[kind](content) for kind, content in blocks if kind in _HTML)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _subplots(*args: Any, figsize: tuple[float, float], **kw: Any) -> tuple[Any, Any]:
    """A bare Figure (renders with Agg, touches no pyplot state) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kw)


def _save_fig(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def plot_roc(report: dict[str, Any], path: Path) -> Path:
    fig, ax = _subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1)
    if report.get("roc"):
        a = report["auc"]
        ax.plot(report["roc"]["fpr"], report["roc"]["tpr"], lw=2,
                label=f"AUC {a['value']:.3f} ({a['lo']:.2f}–{a['hi']:.2f}, {a['method']})")
    m = report["metrics"]
    ax.plot(1 - m["specificity"]["value"], m["sensitivity"]["value"], "o", c="C3", ms=8,
            label=f"threshold {report['threshold']:.3f}")
    ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="Sensitivity (true-positive rate)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=f"ROC (n={report['n']}, {report['n_positive']} positive)")
    ax.legend(loc="lower right", fontsize=8)
    return _save_fig(fig, path)


def plot_confusion(report: dict[str, Any], path: Path) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    c = report["counts"]
    fig, ax = _subplots(figsize=(4.2, 3.8))
    ConfusionMatrixDisplay(np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]]),
                           display_labels=["negative", "positive"]).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(f"Confusion matrix at threshold {report['threshold']:.3f}")
    return _save_fig(fig, path)


def plot_calibration(report: dict[str, Any], path: Path) -> Path:
    cal = report["calibration"]
    fig, (ax, hx) = _subplots(2, 1, figsize=(4.6, 5.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="perfect calibration")
    ax.plot(cal["prob_pred"], cal["prob_true"], "o-", label=f"model (Brier {cal['brier']:.3f})")
    ax.set(ylabel="Observed fraction positive", ylim=(-0.02, 1.02), title="Reliability curve")
    ax.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, len(cal["bin_counts"]) + 1)
    hx.bar(edges[:-1], cal["bin_counts"], width=np.diff(edges), align="edge", color="0.6", edgecolor="k")
    hx.set(xlabel="Predicted probability", ylabel="Cases", xlim=(0, 1))
    return _save_fig(fig, path)


def write_evaluation_report(out_dir: str | Path, report: dict[str, Any], card: dict[str, Any], title: str,
                            split: str, threshold_source: str, warnings: Sequence[str] = (),
                            extra_blocks: Sequence[Block] = ()) -> dict[str, Path]:
    """report.md / .html, metrics.csv and the three PNGs in ``out_dir`` (``extra_blocks`` before plots)."""
    out = Path(out_dir)
    paths = {"roc": plot_roc(report, out / "roc.png"),
             "confusion": plot_confusion(report, out / "confusion_matrix.png"),
             "calibration": plot_calibration(report, out / "calibration.png"),
             "metrics_csv": write_text(out / "metrics.csv", metrics_table(report).to_csv(index=False))}
    arch, cal = card.get("architecture", {}), report["calibration"]
    prevalence = report["n_positive"] / max(report["n"], 1)
    blocks: list[Block] = [
        ("h1", title),
        ("p", f"Model **{card.get('model_id', '?')}** "
              f"(ResNet-{arch.get('depth', '?')}, {arch.get('in_channels', '?')} channels, input "
              f"{'x'.join(str(s) for s in arch.get('input_size', []))}), split **{split}**: "
              f"{report['n']} patients, {report['n_positive']} positive, {report['n_negative']} negative."),
        ("p", f"Operating threshold **{report['threshold']:.4f}** (probability; positive when ≥ threshold): "
              f"{threshold_source}."),
    ]
    if warnings:
        blocks += [("h2", "Warnings"), ("list", list(warnings))]
    blocks += [("h2", "Discrimination and operating point"), ("table", _metric_rows(report)),
               ("p", "Every threshold metric is computed from the confusion counts below; proportions carry "
                     "Wilson intervals, F1 a percentile bootstrap interval, the AUC a "
                     f"{report['auc']['method']} interval."),
               ("h2", "Confusion matrix"), ("table", _confusion_rows(report["counts"])),
               ("h2", "Calibration"),
               ("p", f"Brier score {cal['brier']:.4f} (0 is perfect; always predicting the prevalence "
                     f"{prevalence:.3f} scores {prevalence * (1 - prevalence):.4f})."),
               ("table", [["Mean predicted", "Observed positive fraction"]]
                + [[_fmt(a), _fmt(b)] for a, b in zip(cal["prob_pred"], cal["prob_true"])]),
               *extra_blocks,
               ("h2", "Plots"), ("img", ("roc.png", "ROC curve")),
               ("img", ("confusion_matrix.png", "Confusion matrix")),
               ("img", ("calibration.png", "Reliability curve"))]
    if card.get("training_data"):
        blocks += [("h2", "Training data (counts)"), ("list", [f"{k}: {v}" for k, v in card["training_data"].items()])]
    if card.get("software"):
        blocks += [("h2", "Software"), ("list", [f"{k} {v}" for k, v in card["software"].items()])]
    blocks.append(("p", "Files: predictions.csv (one row per patient), metrics.csv, metrics.json, roc.png, "
                        "confusion_matrix.png, calibration.png."))
    paths["markdown"] = write_text(out / "report.md", render_markdown(blocks))
    paths["html"] = write_text(out / "report.html", render_html(blocks, title))
    return paths


def counts_report(counts: dict[str, int], reported: dict[str, float] | None = None,
                  stated_positives: int | None = None, alpha: float = 0.05, title: str = "Confusion-matrix check",
                  out_dir: str | Path | None = None, tol: float = 0.005) -> dict[str, Any]:
    """Metrics derived from a confusion matrix alone (e.g. a paper's), compared with what the paper
    reports. Returns {"metrics", "discrepancies", "markdown"}; writes ``counts_report.md`` and
    ``counts_metrics.csv`` into ``out_dir`` if given."""
    m = metrics_from_counts(*(counts[k] for k in ("tp", "fn", "fp", "tn")), alpha=alpha)
    rep = {"metrics": m, "alpha": alpha}
    issues = [f"{k}: reported {v:.2f}, from the counts {m[k]['k']}/{m[k]['n']} = {m[k]['value']:.3f}"
              for k, v in (reported or {}).items() if not abs(m[k]["value"] - v) <= tol]
    if stated_positives is not None and counts["tp"] + counts["fn"] != stated_positives:
        issues.insert(0, f"positives: TP {counts['tp']} + FN {counts['fn']} = {counts['tp'] + counts['fn']}, "
                         f"but the text states {stated_positives}")
    rows = _metric_rows(rep)
    if reported:
        rows = [rows[0] + ["Reported"]] + [r + [_fmt(reported.get(n, float("nan")), 2)]
                                           for r, n in zip(rows[1:], COUNT_METRICS)]
    blocks: list[Block] = [("h1", title), ("h2", "Confusion matrix"), ("table", _confusion_rows(counts)),
                           ("h2", "Derived from the counts"), ("table", rows)]
    blocks += ([("h2", "Inconsistencies"), ("list", issues)] if issues
               else [("p", "The reported values match the counts.")])
    md = render_markdown(blocks)
    if out_dir is not None:
        write_text(Path(out_dir) / "counts_report.md", md)
        write_text(Path(out_dir) / "counts_metrics.csv", metrics_table(rep).to_csv(index=False))
    return {"metrics": rep["metrics"], "discrepancies": issues, "markdown": md}
