"""Prediction results -> vtkMRMLTableNode (one row per result, one typed column per field).

Nested fields are flattened with dots (``sanity.passed``); lists and other non-scalars are stored
as JSON text so nothing is silently dropped. Numbers become double columns, booleans integer
columns (0/1), everything else string columns. Works with the real Slicer and with ``slicer-core``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

import slicer
import vtk

# Fields shown first, in this order, when present (the rest follow sorted by name).
LEADING = ("source_path", "series_uid", "probability", "label", "threshold", "model_id",
           "tta_mean", "tta_std", "error")


def flatten_result(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys; leave scalars, JSON-encode lists and other objects."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_result(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
            out[name] = value.item()
        else:
            out[name] = json.dumps(value, default=str)
    return out


def results_table(scene: "slicer.vtkMRMLScene", results: dict[str, Any] | Iterable[dict[str, Any]],
                  name: str = "RheumAI results", node: "slicer.vtkMRMLTableNode | None" = None,
                  ) -> "slicer.vtkMRMLTableNode":
    """Write one result (dict) or several (list of dicts) into a (new or given) table node."""
    rows = [flatten_result(results)] if isinstance(results, dict) else [flatten_result(r) for r in results]
    keys = sorted({k for r in rows for k in r})
    columns = [k for k in LEADING if k in keys] + [k for k in keys if k not in LEADING]
    table = vtk.vtkTable()
    for key in columns:
        values = [r.get(key) for r in rows]
        present = [v for v in values if v is not None]
        if present and len(present) == len(values) and all(isinstance(v, int) for v in present):
            arr = vtk.vtkIntArray()  # integers and booleans (as 0/1), no missing values
            conv = int
        elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
            arr = vtk.vtkDoubleArray()
            conv = lambda v: math.nan if v is None else float(v)  # noqa: E731
        else:
            arr = vtk.vtkStringArray()
            conv = lambda v: "" if v is None else str(v)  # noqa: E731
        arr.SetName(key)
        for v in values:
            arr.InsertNextValue(conv(v))
        table.AddColumn(arr)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    node.SetUseColumnTitleAsColumnHeader(True)
    for key in columns:
        node.SetColumnDescription(key, _DESCRIPTIONS.get(key.split(".")[-1], ""))
    if "probability" in columns:
        node.SetColumnUnitLabel("probability", "0..1")
    return node


def table_rows(node: "slicer.vtkMRMLTableNode") -> list[dict[str, Any]]:
    """Read a table node back as a list of dicts (doubles as float, ints as int, strings as str)."""
    table = node.GetTable()
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            col = table.GetColumn(c)
            v = col.GetValue(r)
            row[col.GetName()] = v if isinstance(v, str) else (int(v) if col.IsA("vtkIntArray") else float(v))
        out.append(row)
    return out


_DESCRIPTIONS = {
    "probability": "Predicted probability of the positive class",
    "label": "Predicted class at the model card's threshold (1 = positive)",
    "threshold": "Decision threshold on the probability (from the model card)",
    "model_id": "Model identifier from the model card",
    "source_path": "Input study (file or DICOM folder)",
    "series_uid": "DICOM SeriesInstanceUID of the input",
    "tta_mean": "Mean probability over test-time augmentation",
    "tta_std": "Standard deviation of the probability over test-time augmentation",
    "error": "Why this study was not predicted",
}
