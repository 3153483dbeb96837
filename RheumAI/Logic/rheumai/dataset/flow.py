"""The inclusion flow report: flow.txt, flow.json, excluded.csv, flow.png (CONSORT-style diagram);
deterministic for the same inputs (sorted, no timestamps), written atomically."""

from __future__ import annotations

import csv
import io
import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, write_json, write_text
from .cohort import CohortResult
from .split import SPLITS


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def flow_dict(cohort: CohortResult, split: dict[str, tuple[str, int]] | None = None) -> dict[str, Any]:
    """JSON-able flow: start count, steps (remaining, excluded with reasons), split table."""
    d: dict[str, Any] = {
        "rules": cohort.rules.to_dict(), "series_rule": cohort.rules.series_rule_text(), "start": cohort.n_start,
        "steps": [{"key": s.key, "title": s.title, "remaining": s.remaining, "n_excluded": len(s.excluded),
                   "excluded": [{"patient_id": p, "reason": r} for p, r in s.excluded], "note": s.note}
                  for s in cohort.steps],
        "included": cohort.steps[-1].remaining if cohort.steps else cohort.n_start,
        "not_in_label_sheet": cohort.not_in_sheet, "rule_lines": cohort.rules.rule_lines()}
    if split is not None:
        labels = {e.patient_id: e.label for e in cohort.included}
        n = Counter((name, bool(labels[p])) for p, (name, _fold) in split.items())
        d["split"] = {k: {"n": n[k, True] + n[k, False], "positive": n[k, True], "negative": n[k, False]}
                      for k in SPLITS if n[k, True] + n[k, False]}
        folds = Counter(f for _, f in split.values() if f >= 0)
        if folds:
            d["folds"] = {str(k): folds[k] for k in sorted(folds)}
    return d


def flow_text(flow: dict[str, Any], header: str = "", split_desc: str = "") -> str:
    """The flow as a fixed-width text table, then the rules, split and every excluded patient."""
    w = max([len(s["title"]) for s in flow["steps"]] + [24]) + 2
    out = ["RheumAI dataset inclusion flow"]
    if header:
        out.append(header)
    out += ["", f"  #  {'Step':<{w}}{'Remaining':>10}{'Excluded':>10}", "  " + "-" * (w + 23)]
    out.append(f"     {'Patients in the label sheet':<{w}}{flow['start']:>10}")
    for i, s in enumerate(flow["steps"], 1):
        note = f"   ({s['note']})" if s["note"] else ""
        out.append(f"  {i}  {s['title']:<{w}}{s['remaining']:>10}{s['n_excluded']:>10}{note}")
    out.append("  " + "-" * (w + 23))
    sp = flow.get("split", {})
    pos, neg = (sum(v[k] for v in sp.values()) for k in ("positive", "negative"))
    tail = f"   (positive {pos}, negative {neg})" if sp else ""
    out.append(f"     {'Included':<{w}}{flow['included']:>10}{'':>10}{tail}")
    out += ["", "Rules", *flow["rule_lines"]]
    if sp:
        out += ["", f"Split: {split_desc}" if split_desc else "Split",
                f"  {'split':<8}{'patients':>10}{'positive':>10}{'negative':>10}"]
        out += [f"  {k:<8}{v['n']:>10}{v['positive']:>10}{v['negative']:>10}" for k, v in sp.items()]
        if "folds" in flow:
            out.append("  folds: " + ", ".join(f"{k}: {n}" for k, n in flow["folds"].items()))
    if flow["not_in_label_sheet"]:
        ids = flow["not_in_label_sheet"]
        shown = ", ".join(ids[:20]) + (f", ... ({len(ids) - 20} more)" if len(ids) > 20 else "")
        out += ["", f"Patients in the index without a label row: {len(ids)} ({shown})"]
    excl = [(e["patient_id"], s["key"], e["reason"]) for s in flow["steps"] for e in s["excluded"]]
    if excl:
        pw = max([len(p) for p, _, _ in excl] + [len("patient")]) + 2
        sw = max(len(k) for _, k, _ in excl) + 2
        out += ["", "Excluded patients", f"  {'patient':<{pw}}{'step':<{sw}}reason"]
        out += [f"  {p:<{pw}}{k:<{sw}}{why}" for p, k, why in excl]
    return "\n".join(out) + "\n"


def flow_png(flow: dict[str, Any], path: str | Path) -> Path:
    """CONSORT-style diagram: the remaining counts down the left, exclusions to the right."""
    # A bare Figure renders with Agg and touches no pyplot state (safe inside Slicer's Qt process).
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    steps = flow["steps"]
    n = len(steps) + 1
    ax = Figure(figsize=(9, 1.2 + 1.25 * n), dpi=100).subplots()
    ax.set(xlim=(0, 10), ylim=(0, n * 1.25 + 0.4))
    ax.axis("off")

    def box(x: float, y: float, w: float, h: float, text: str, color: str) -> None:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="#333333", lw=1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, wrap=True)

    top = n * 1.25 - 0.4
    box(0.3, top, 4.2, 0.7, f"Patients in the label sheet\nn = {flow['start']}", "#dbe9f6")
    for i, s in enumerate(steps, 1):
        y = top - 1.25 * i
        ax.annotate("", xy=(2.4, y + 0.75), xytext=(2.4, y + 1.25), arrowprops=dict(arrowstyle="->", lw=1.2))
        title = "\n".join(textwrap.wrap(("Included: " if i == len(steps) else "") + s["title"], 38))
        box(0.3, y, 4.2, 0.7, f"{title}\nn = {s['remaining']}", "#dbe9f6" if i < len(steps) else "#cfe8cf")
        if s["n_excluded"] or s["note"]:
            reasons = Counter(_short_reason(e["reason"]) for e in s["excluded"])
            lines = [f"Excluded n = {s['n_excluded']}"] + [f"{k}: {v}" for k, v in sorted(reasons.items())][:3]
            if s["note"]:
                lines.append(textwrap.shorten(s["note"], 44))
            ax.annotate("", xy=(5.3, y + 0.95), xytext=(2.4, y + 0.95), arrowprops=dict(arrowstyle="->", lw=1))
            box(5.3, y + 0.6, 4.3, 0.7, "\n".join(lines), "#f6dede" if s["n_excluded"] else "#eeeeee")
    if sp := flow.get("split"):
        txt = "   ".join(f"{k}: {v['n']} (+{v['positive']}/-{v['negative']})" for k, v in sp.items())
        ax.text(0.3, 0.05, f"Split: {txt}", fontsize=9, va="bottom")
    with atomic_path(path) as tmp:  # no Software / date metadata: the PNG is byte-stable across runs
        ax.figure.savefig(tmp, format="png", metadata={"Software": None})
    return Path(path)


def _short_reason(reason: str) -> str:
    """Group reasons for the diagram: drop dates, day counts and details after ':' ';' '('."""
    head = reason.split(";")[0].split(":")[0].split(" (")[0]
    head = re.sub(r"( of| on baseline date)? \d{4}-\d{2}-\d{2}", "", head)
    head = re.sub(r"follow-up -?\d+ days", "follow-up", head)
    return textwrap.shorten(head, 40)


def write_flow(out_dir: str | Path, flow: dict[str, Any], header: str = "", split_desc: str = "") -> dict[str, Path]:
    """Write flow.txt, flow.json, excluded.csv and flow.png into ``out_dir``."""
    out = Path(out_dir)
    return {
        "txt": write_text(out / "flow.txt", flow_text(flow, header, split_desc)),
        "json": write_json(out / "flow.json", flow),
        "excluded": write_text(out / "excluded.csv", csv_text(["patient_id", "step", "reason"], [
            [e["patient_id"], s["key"], e["reason"]] for s in flow["steps"] for e in s["excluded"]])),
        "png": flow_png(flow, out / "flow.png"),
    }
