"""Results of the background jobs as MRML nodes, so they are saved with the scene.

* dataset build -> tables: inclusion flow (one row per step), excluded patients (patient, step,
  reason), split counts (split, patients, positive, negative);
* batch prediction -> one result table (one row per study, errors kept as rows);
* training -> history table + loss chart (+ validation AUC chart when recorded), and the
  validation ROC (false / true positive rate, threshold, chance line) as table + chart.

Every node carries ``RheumAI.Role`` (the key under which the functions return it), so a widget or
a script finds it again after a scene reload. Works with the real Slicer and with ``slicer-core``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import slicer

from .plots import line_chart
from .tables import results_table, rows_table


def _tag(nodes: dict[str, Any]) -> dict[str, Any]:
    for role, node in nodes.items():
        node.SetAttribute("RheumAI.Role", role)
    return nodes


def dataset_nodes(scene: "slicer.vtkMRMLScene", flow: dict[str, Any], name: str = "Dataset") -> dict[str, Any]:
    """Inclusion flow, excluded patients and split counts (``rheumai.dataset`` flow dict, as in
    ``flow.json``) as table nodes. Returns {"dataset_flow", "dataset_excluded"[, "dataset_split"]}."""
    steps = [{"step": 0, "key": "label_sheet", "title": "Patients in the label sheet", "remaining": int(flow["start"]),
              "excluded": 0, "note": ""}]
    for i, s in enumerate(flow["steps"], 1):
        steps.append({"step": i, "key": s["key"], "title": s["title"], "remaining": int(s["remaining"]),
                      "excluded": int(s["n_excluded"]), "note": s.get("note") or ""})
    steps.append({"step": len(steps), "key": "included", "title": "Included", "remaining": int(flow["included"]),
                  "excluded": 0, "note": ""})
    nodes = {"dataset_flow": rows_table(scene, steps, name=f"{name} inclusion flow")}
    excluded = [{"patient_id": e["patient_id"], "step": s["key"], "reason": e["reason"]}
                for s in flow["steps"] for e in s["excluded"]]
    nodes["dataset_excluded"] = rows_table(scene, excluded, ["patient_id", "step", "reason"],
                                           name=f"{name} excluded patients")
    if flow.get("split"):
        split = [{"split": k, "patients": int(v["n"]), "positive": int(v["positive"]), "negative": int(v["negative"])}
                 for k, v in flow["split"].items()]
        nodes["dataset_split"] = rows_table(scene, split, name=f"{name} split")
    return _tag(nodes)


def batch_nodes(scene: "slicer.vtkMRMLScene", rows: Sequence[dict[str, Any]], name: str = "Batch predictions",
                ) -> dict[str, Any]:
    """Batch prediction rows (one dict per study, failed studies with "error") as one table."""
    return _tag({"batch_predictions": results_table(scene, list(rows), name=name)})


def training_nodes(scene: "slicer.vtkMRMLScene", result: dict[str, Any], name: str = "Training") -> dict[str, Any]:
    """Training history and validation ROC of a training result dict (``history``: one dict per
    epoch; ``val_report.roc``: {"fpr", "tpr", "thresholds"}) as tables and plot charts.

    The x axis is ``epoch`` when it increases along the history, else the row number (tasks that
    restart the epoch count per training stage). Returns the nodes by role; charts only for the
    series that exist (loss columns, AUC columns, ROC)."""
    nodes: dict[str, Any] = {}
    history = [dict(r) for r in result.get("history") or []]
    if history:
        epochs = [r.get("epoch") for r in history]
        x = "epoch"
        if not all(isinstance(e, (int, float)) for e in epochs) or any(b <= a for a, b in zip(epochs, epochs[1:])):
            x = "row"
            history = [{"row": i, **r} for i, r in enumerate(history, 1)]
        table = rows_table(scene, history, name=f"{name} history")
        nodes["training_history"] = table
        numeric = [table.GetTable().GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())
                   if table.GetTable().GetColumn(i).IsA("vtkDataArray")]
        losses = [c for c in numeric if "loss" in c]
        aucs = [c for c in numeric if "auc" in c]
        if losses:
            nodes["training_loss_chart"] = line_chart(scene, table, x, losses, f"{name}: loss", x, "loss")
        if aucs:
            nodes["training_auc_chart"] = line_chart(scene, table, x, aucs, f"{name}: validation AUC", x, "AUC")
    roc = (result.get("val_report") or {}).get("roc")
    if roc and roc.get("fpr"):
        rows = [{"fpr": float(f), "tpr": float(t), "threshold": float(th) if th is not None else math.nan,
                 "chance": float(f)} for f, t, th in zip(roc["fpr"], roc["tpr"], roc.get("thresholds") or
                                                         [None] * len(roc["fpr"]))]
        table = rows_table(scene, rows, ["fpr", "tpr", "threshold", "chance"], name=f"{name} validation ROC")
        nodes["training_roc"] = table
        nodes["training_roc_chart"] = line_chart(scene, table, "fpr", ["tpr", "chance"], f"{name}: validation ROC",
                                                 "false positive rate (1 - specificity)",
                                                 "true positive rate (sensitivity)", dashed=("chance",))
    return _tag(nodes)
