"""Evaluation of a hand SvdH checkpoint on labelled radiographs, through the engine's heads.

Figures (``evaluate_cases``): whole-hand total (regression report: PCC, RMSE, MAE, ICC, Bland-Altman
with CIs); severity class (accuracy, weighted kappa, MAE in classes, confusion); joint-level path:
the sum of per-joint grades as a total (same report), landmark radial error in mm (keypoints
report, on each radiograph's own pixel spacing), per-joint MAE of erosion and JSN grades and pooled
ordinal reports. :func:`evaluate` (``api["evaluate"]``) writes ``metrics.json``, ``report.md`` /
``.html`` and ``agreement.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...atomic import write_json, write_text
from ...engine.fit import predict
from ...engine.heads import make_head
from ...errors import InputError
from ...report import render_html, render_markdown
from .dataset import Case, HandDataset
from .heads import joint_heads
from .scoring import DEFAULT_CLASS_NAMES, EROSION_MASK, JOINT_NAMES, JSN_MASK


def _mae(pred: np.ndarray, true: np.ndarray) -> float | None:
    """Mean absolute grade error over the scored (true >= 0) entries; None if none is scored."""
    ok = true >= 0
    return float(np.abs(pred[ok] - true[ok]).mean()) if ok.any() else None


def evaluate_cases(model: torch.nn.Module, card: dict[str, Any], cases: Sequence[Case], n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """All figures for ``cases`` (see module docstring), with per-case predictions."""
    out = predict(model, HandDataset(cases), torch.device("cpu"), batch_size=16)[0]
    whole = card["architecture"]["whole"]
    n_classes = int(whole["n_classes"])
    kw = {"n_boot": n_boot, "seed": seed}
    reg = make_head("regression", name="total", scale=float(whole["total_scale"]))
    ordc = make_head("ordinal", name="class", n_classes=n_classes)
    y_total = np.array([c.total for c in cases], float)
    pred_total = np.clip(reg.decode(out["total"])["value"], 0, None)
    pred_cls = ordc.decode(out["class"])["class"]
    K = len(JOINT_NAMES)
    jh = joint_heads()
    pred = {k: h.decode(out[k].reshape(-1, h.n_classes - 1))["class"].reshape(-1, K) for k, h in jh.items()}
    true = {"erosion": np.stack([c.erosion for c in cases]), "jsn": np.stack([c.jsn for c in cases])}
    joint_total = (pred["erosion"] * EROSION_MASK).sum(1) + (pred["jsn"] * JSN_MASK).sum(1)
    res: dict[str, Any] = {
        "n": len(cases), "class_names": list(card.get("class_names") or DEFAULT_CLASS_NAMES)[:n_classes],
        "class_edges": card.get("class_edges"), "total": reg.report({"value": pred_total}, y_total, **kw),
        "class": ordc.report({"class": pred_cls}, np.array([c.cls for c in cases]), **kw),
        "joint_total": reg.report({"value": joint_total.astype(float)}, y_total, **kw),
        "erosion_grades": jh["erosion"].report({"class": pred["erosion"].ravel()}, true["erosion"].ravel(), **kw),
        "jsn_grades": jh["jsn"].report({"class": pred["jsn"].ravel()}, true["jsn"].ravel(), **kw),
        "per_joint": [{"joint": name, **{f"{k}_mae": _mae(pred[k][:, j], true[k][:, j]) for k in true}}
                      for j, name in enumerate(JOINT_NAMES)]}
    have = [i for i, c in enumerate(cases) if c.points_canon is not None]
    if have:
        pts = out["points"].numpy()
        pred_c = np.stack([cases[i].prep.from_hires(pts[i]) for i in have])
        true_c = np.stack([cases[i].points_canon for i in have])
        sp = np.array([cases[i].prep.rad.spacing_mm for i in have], float)
        lm = make_head("keypoints", name="landmarks", n_points=K).report({"points": pred_c}, true_c, spacing_mm=sp,
                                                                         **kw)
        lm["per_point"] = dict(zip(JOINT_NAMES, lm.pop("per_point_mean_mm")))
        res["landmarks"] = lm
    res["cases"] = [{"patient_id": c.patient_id, "total": c.total, "pred_total": float(pred_total[i]),
                     "joint_total": int(joint_total[i]), "class": int(c.cls), "pred_class": int(pred_cls[i])}
                    for i, c in enumerate(cases)]
    return res


def evaluate(model: str | Path, manifest: str | Path, out_dir: str | Path, *, split: str = "test",
             show_progress: bool = True) -> dict[str, Any]:
    """The task's ``api["evaluate"]``: a checkpoint on a label sheet's ``split`` patients (the sheet's
    ``split`` column, else the card's training split recomputed; ``"all"``: every patient) ->
    report files in ``out_dir``; returns the figures. Landmarks: ``landmarks.csv`` beside the sheet."""
    from ...checkpoint import load_checkpoint
    from .dataset import load_cohort
    from .predict import params_of
    from .train import split_cases

    net, card = load_checkpoint(model)
    lms = Path(manifest).parent / "landmarks.csv"
    cases = load_cohort(manifest, params_of(card), lms if lms.is_file() else None, progress=show_progress)
    if split != "all":
        t = card["training"]
        cases = split_cases(cases, t["data"], int(t["seed"])).get(split, [])
    if not cases:
        raise InputError(manifest, f"no patients in split {split!r}")
    res = evaluate_cases(net, card, cases)
    res["split"] = split
    ens = Path(model).parent / "ensemble"
    if (ens / "stacking.json").is_file():
        from .ensemble import load_stacking, predict_stacked

        y = np.array([c.total for c in cases], float)
        cols = predict_stacked(*load_stacking(ens), cases)
        res["ensemble"] = {k: {"pcc": float(np.corrcoef(v, y)[0, 1]), "mae": float(np.abs(v - y).mean())}
                           for k, v in cols.items()}
    write_report(out_dir, res, f"Hand SvdH evaluation: {Path(model)} on {Path(manifest).name} ({split})")
    return res


def report_blocks(res: dict[str, Any], title: str, extra: Sequence[Any] = (), image: str = "agreement.png"
                  ) -> list[Any]:
    """Report blocks (``rheumai.report``) of the figures, tables per head as the engine's evaluator
    writes them; ``extra``: blocks after the heading; ``image``: the agreement plot's path."""
    from ...engine.evaluate import _rows as head_rows

    c, names = res["class"], res["class_names"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    pp = res.get("landmarks", {}).get("per_point", {})
    ero, jsn = (head_rows("ordinal", res[k])[1:] for k in ("erosion_grades", "jsn_grades"))
    b: list[Any] = [("h1", title), ("p", f"Held-out radiographs: {res['n']}."), *extra,
                    ("h2", "Whole-hand path (the paper's): total SvdH score (one hand, 0-140)"),
                    ("table", head_rows("regression", res["total"])),
                    ("h2", "Severity class (whole-hand class head)"),
                    ("p", f"Class edges on the one-hand total: {res.get('class_edges')} (classes {', '.join(names)})."),
                    ("table", head_rows("ordinal", c)),
                    ("table", [["truth \\ predicted", *map(str, range(len(c["confusion"])))]]
                     + [[f"{i} {names[i]}" if i < len(names) else str(i), *map(str, row)]
                        for i, row in enumerate(c["confusion"])]),
                    ("h2", "Joint-level path: sum of per-joint grades"),
                    ("table", head_rows("regression", res["joint_total"]))]
    if "landmarks" in res:
        b += [("h2", "Landmarks (22 SvdH areas)"), ("table", head_rows("keypoints", res["landmarks"]))]
    b += [("h2", "Per-joint grades (all scored areas pooled)"),
          ("table", [["metric", "erosion (0-5)", "JSN (0-4)"]] + [[e[0], e[1], j[1]] for e, j in zip(ero, jsn)]),
          ("table", [["joint", "erosion MAE", "JSN MAE", "landmark error (mm)"]]
           + [[r["joint"], f(r["erosion_mae"]), f(r["jsn_mae"]), f(pp.get(r["joint"]))] for r in res["per_joint"]])]
    if "ensemble" in res:
        b += [("h2", "Stacking ensemble (whole hand)"),
              ("table", [["model", "PCC", "MAE"]] + [[k, f"{v['pcc']:.3f}", f"{v['mae']:.2f}"]
                                                   for k, v in res["ensemble"].items()])]
    return b + [("img", (image, "agreement"))]


def plot_agreement(res: dict[str, Any], path: Path) -> Path:
    """Scatter (predicted vs true total, both paths) and Bland-Altman of the whole-hand total."""
    from ...report import _save_fig, _subplots

    t, p, q = (np.array([c[k] for c in res["cases"]], float) for k in ("total", "pred_total", "joint_total"))
    fig, ax = _subplots(1, 2, figsize=(10, 4.5))
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
    return _save_fig(fig, path)


def write_report(out_dir: str | Path, res: dict[str, Any], title: str, extra: Sequence[Any] = ()) -> Path:
    """``metrics.json``, ``agreement.png``, ``report.md`` / ``.html`` into ``out_dir``; returns report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", res)
    plot_agreement(res, out / "agreement.png")
    blocks = report_blocks(res, title, extra)
    write_text(out / "report.html", render_html(blocks, title))
    return write_text(out / "report.md", render_markdown(blocks))
