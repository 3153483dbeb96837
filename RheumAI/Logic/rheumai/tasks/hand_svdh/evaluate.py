"""Evaluation of a hand SvdH checkpoint on labelled radiographs, through the engine's heads.

Figures (``evaluate_cases``): whole-hand total (regression report: PCC, RMSE, MAE, ICC, Bland-Altman
with CIs); severity class (accuracy, weighted kappa, MAE in classes, confusion); joint-level path:
the sum of per-joint grades as a total (same regression report), landmark radial error in mm
(keypoints report, on each radiograph's own pixel spacing), per-joint MAE of erosion and JSN grades
and pooled ordinal reports. ``write_report`` writes ``report.md`` + ``metrics.json`` + plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...atomic import atomic_path, write_json, write_text
from ...engine.heads import make_head
from .dataset import Case, HandDataset, load_cohort
from .heads import MaskedOrdinalHead
from .scoring import DEFAULT_CLASS_NAMES, EROSION_MASK, JOINT_NAMES, JSN_MASK, MAX_EROSION, MAX_JSN
from .train import run_network


def evaluate_cases(model: torch.nn.Module, card: dict[str, Any], cases: Sequence[Case], n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """All figures for ``cases`` (see module docstring); also returns per-case predictions."""
    out = run_network(model, HandDataset(cases), batch_size=16)
    arch = card["architecture"]
    y_total = np.array([c.total for c in cases], float)
    y_cls = np.array([c.cls for c in cases], int)
    n_classes = int(arch["whole"]["n_classes"])
    reg = make_head("regression", name="total", scale=float(arch["whole"]["total_scale"]))
    ordc = make_head("ordinal", name="class", n_classes=n_classes)
    pred_total = np.clip(reg.decode(out["total"])["value"], 0, None)
    pred_cls = ordc.decode(out["class"])["class"]
    res: dict[str, Any] = {"n": len(cases),
                           "total": reg.report({"value": pred_total}, y_total, n_boot=n_boot, seed=seed),
                           "class": ordc.report({"class": pred_cls}, y_cls, n_boot=n_boot, seed=seed),
                           "class_names": list(card.get("class_names") or DEFAULT_CLASS_NAMES)[:n_classes],
                           "class_edges": card.get("class_edges")}
    ero_h, jsn_h = MaskedOrdinalHead(name="erosion", n_classes=MAX_EROSION + 1), \
        MaskedOrdinalHead(name="jsn", n_classes=MAX_JSN + 1)
    K = len(JOINT_NAMES)
    pe = ero_h.decode(out["erosion"].reshape(-1, MAX_EROSION))["class"].reshape(-1, K)
    pj = jsn_h.decode(out["jsn"].reshape(-1, MAX_JSN))["class"].reshape(-1, K)
    te = np.stack([c.erosion for c in cases])
    tj = np.stack([c.jsn for c in cases])
    joint_total = (pe * EROSION_MASK).sum(1) + (pj * JSN_MASK).sum(1)
    res["joint_total"] = reg.report({"value": joint_total.astype(float)}, y_total, n_boot=n_boot, seed=seed)
    res["erosion_grades"] = ero_h.report({"class": pe.ravel()}, te.ravel(), n_boot=n_boot, seed=seed)
    res["jsn_grades"] = jsn_h.report({"class": pj.ravel()}, tj.ravel(), n_boot=n_boot, seed=seed)
    per_joint = []
    for j, name in enumerate(JOINT_NAMES):
        row: dict[str, Any] = {"joint": name}
        for key, p, t in (("erosion", pe, te), ("jsn", pj, tj)):
            ok = t[:, j] >= 0
            row[f"{key}_mae"] = float(np.abs(p[ok, j] - t[ok, j]).mean()) if ok.any() else None
        per_joint.append(row)
    res["per_joint"] = per_joint
    have = [i for i, c in enumerate(cases) if c.points_canon is not None]
    if have:
        pts = out["points"].numpy()
        pred_c = np.stack([cases[i].prep.from_hires(pts[i]) for i in have])
        true_c = np.stack([cases[i].points_canon for i in have])
        sp = np.array([cases[i].prep.rad.spacing_mm for i in have], float)
        kp = make_head("keypoints", name="landmarks", n_points=K)
        res["landmarks"] = kp.report({"points": pred_c}, true_c, spacing_mm=sp, n_boot=n_boot, seed=seed)
        res["landmarks"]["per_point"] = dict(zip(JOINT_NAMES, res["landmarks"].pop("per_point_mean_mm")))
    res["cases"] = [{"patient_id": c.patient_id, "total": c.total, "pred_total": float(pred_total[i]),
                     "joint_total": int(joint_total[i]), "class": int(c.cls), "pred_class": int(pred_cls[i])}
                    for i, c in enumerate(cases)]
    return res


def evaluate_hand(checkpoint: str | Path, labels_csv: str | Path, out_dir: str | Path,
                  landmarks_csv: str | Path | None = None, ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on a label sheet (optionally only ``ids``) and write the report."""
    from ...checkpoint import load_checkpoint
    from .predict import params_of

    model, card = load_checkpoint(checkpoint)
    cases = load_cohort(labels_csv, params_of(card), landmarks_csv, ids=ids)
    res = evaluate_cases(model, card, cases)
    write_report(out_dir, res, title=f"Hand SvdH evaluation: {Path(checkpoint)}")
    return res


def _ci(e: dict[str, Any], nd: int = 3) -> str:
    return f"{e['value']:.{nd}f} ({e['lo']:.{nd}f} to {e['hi']:.{nd}f})"


def regression_lines(r: dict[str, Any]) -> list[str]:
    ba = r["bland_altman"]
    return [f"| PCC | {_ci(r['pcc'])} |", f"| RMSE | {_ci(r['rmse'], 2)} |", f"| MAE | {_ci(r['mae'], 2)} |",
            f"| ICC(A,1) | {_ci(r['icc'])} |", f"| Bland-Altman bias | {_ci(ba['bias'], 2)} |",
            f"| limits of agreement | {ba['loa_lower']['value']:.2f} to {ba['loa_upper']['value']:.2f} |"]


def confusion_lines(c: dict[str, Any], names: Sequence[str]) -> list[str]:
    k = len(c["confusion"])
    head = "| truth \\ predicted | " + " | ".join(str(i) for i in range(k)) + " |"
    lines = [head, "|" + "---|" * (k + 1)]
    for i, row in enumerate(c["confusion"]):
        label = f"{i} {names[i]}" if i < len(names) else str(i)
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def report_markdown(res: dict[str, Any], title: str, extra: Sequence[str] = ()) -> str:
    """Markdown of the figures (values with 95 % CIs)."""
    L = [f"# {title}", "", f"Held-out radiographs: {res['n']}.", "", *extra,
         "## Whole-hand path (the paper's): total SvdH score (one hand, 0-140)", "", "| metric | value (95 % CI) |",
         "|---|---|", *regression_lines(res["total"]), "",
         "## Severity class (whole-hand class head)", "",
         f"Class edges on the one-hand total: {res.get('class_edges')} (classes {', '.join(res['class_names'])}).", "",
         f"Accuracy {_ci(res['class']['accuracy'])}, quadratic-weighted kappa {_ci(res['class']['kappa_quadratic'])}, "
         f"MAE {_ci(res['class']['mae_classes'], 2)} classes.", "", *confusion_lines(res["class"], res["class_names"]),
         "", "## Joint-level path: sum of per-joint grades", "", "| metric | value (95 % CI) |", "|---|---|",
         *regression_lines(res["joint_total"]), ""]
    if "landmarks" in res:
        lm = res["landmarks"]
        L += ["### Landmarks (22 SvdH areas)", "",
              f"Radial error: mean {_ci(lm['mean_mm'], 2)} mm, median {_ci(lm['median_mm'], 2)} mm; within 2 mm "
              f"{_ci(lm['success_2mm'])}, within 4 mm {_ci(lm['success_4mm'])} ({lm['n_points']} points).", ""]
    L += ["### Per-joint grades", "",
          f"Erosion (0-5, all scored areas pooled): accuracy {_ci(res['erosion_grades']['accuracy'])}, "
          f"weighted kappa {_ci(res['erosion_grades']['kappa_quadratic'])}, MAE {_ci(res['erosion_grades']['mae_classes'])}.",
          f"JSN (0-4): accuracy {_ci(res['jsn_grades']['accuracy'])}, weighted kappa "
          f"{_ci(res['jsn_grades']['kappa_quadratic'])}, MAE {_ci(res['jsn_grades']['mae_classes'])}.", "",
          "| joint | erosion MAE | JSN MAE | landmark error (mm) |", "|---|---|---|---|"]
    pp = res.get("landmarks", {}).get("per_point", {})
    for row in res["per_joint"]:
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        L.append(f"| {row['joint']} | {f(row['erosion_mae'])} | {f(row['jsn_mae'])} | {f(pp.get(row['joint']))} |")
    L.append("")
    return "\n".join(L)


def plot_agreement(res: dict[str, Any], path: Path) -> Path:
    """Scatter (predicted vs true total, both paths) and Bland-Altman of the whole-hand total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([c["total"] for c in res["cases"]])
    p = np.array([c["pred_total"] for c in res["cases"]])
    q = np.array([c["joint_total"] for c in res["cases"]], float)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.5))
    hi = max(t.max(), p.max(), q.max()) * 1.05 + 1
    ax[0].plot([0, hi], [0, hi], "k--", lw=0.8)
    ax[0].scatter(t, p, s=14, label=f"whole hand (PCC {res['total']['pcc']['value']:.3f})")
    ax[0].scatter(t, q, s=14, marker="x", label=f"sum of joints (PCC {res['joint_total']['pcc']['value']:.3f})")
    ax[0].set(xlabel="true total", ylabel="predicted total", title="Total SvdH (one hand)")
    ax[0].legend()
    ba = res["total"]["bland_altman"]
    ax[1].scatter((t + p) / 2, p - t, s=14)
    for v, ls in ((ba["bias"]["value"], "-"), (ba["loa_lower"]["value"], "--"), (ba["loa_upper"]["value"], "--")):
        ax[1].axhline(v, color="k", ls=ls, lw=0.8)
    ax[1].set(xlabel="mean of predicted and true", ylabel="predicted - true", title="Bland-Altman (whole hand)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, res: dict[str, Any], title: str, extra: Sequence[str] = ()) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", res)
    plot_agreement(res, out / "agreement.png")
    md = report_markdown(res, title, extra) + "\n![agreement](agreement.png)\n"
    return write_text(out / "report.md", md)
