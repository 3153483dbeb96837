"""Rows of results -> vtkMRMLTableNode (one row per result, one typed column per field).

Nested fields are flattened with dots (``sanity.passed``); lists and other non-scalars are stored
as JSON text so nothing is silently dropped. Numbers become double columns, booleans integer
columns (0/1), everything else string columns. Works with the real Slicer and with ``slicer-core``.

Saved scenes: Slicer's table storage node writes TSV/CSV and reads it back with VTK's delimited
text reader, which drops a *leading* empty field of a line (it trims leading white space, and a
tab is white space), shifting every later value one column left. So the first column of every
table written here never holds an empty value: a result table starts with ``study`` (a name that
is never empty) and any other table whose first column could be empty gets a ``row`` number
column in front. Missing numbers are NaN (written "nan", read back as NaN); missing text is "".
Slicer's TSV has no quoting, so tabs and line breaks inside text become spaces.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

import slicer
import vtk

_TEXT_BREAKS = re.compile(r"[\t\r\n]")  # would end a TSV field or line in Slicer's table storage
# Fields shown first, in this order, when present (the rest follow sorted by name).
LEADING = ("study", "source_path", "series_uid", "probability", "label", "threshold", "model_id",
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


def study_name(result: dict[str, Any], index: int = 0) -> str:
    """A never-empty name for one result row: its ``study``, the file name of its source path,
    its patient id, or ``study <index + 1>``."""
    for key in ("study", "patient_id"):
        if result.get(key) not in (None, ""):
            return str(result[key])
    path = result.get("source_path")
    if path:
        name = str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        for suffix in (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        if name:
            return name
    return f"study {index + 1}"


def results_table(scene: "slicer.vtkMRMLScene", results: dict[str, Any] | Iterable[dict[str, Any]],
                  name: str = "RheumAI results", node: "slicer.vtkMRMLTableNode | None" = None,
                  ) -> "slicer.vtkMRMLTableNode":
    """Write one result (dict) or several (list of dicts) into a (new or given) table node.

    The first column is ``study`` (:func:`study_name`), so the table survives Slicer's table
    storage even when the source path is unknown (a volume loaded by Slicer has none)."""
    rows = [results] if isinstance(results, dict) else list(results)
    flat = []
    for i, r in enumerate(rows):
        f = flatten_result(r)
        f["study"] = study_name(r, i)
        flat.append(f)
    keys = sorted({k for r in flat for k in r})
    columns = [k for k in LEADING if k in keys] + [k for k in keys if k not in LEADING]
    node = rows_table(scene, flat, columns, name=name, node=node)
    for key in columns:
        node.SetColumnDescription(key, _DESCRIPTIONS.get(key.split(".")[-1], ""))
    if "probability" in columns:
        node.SetColumnUnitLabel("probability", "0..1")
    return node


def rows_table(scene: "slicer.vtkMRMLScene", rows: list[dict[str, Any]], columns: list[str] | None = None,
               name: str = "RheumAI table", node: "slicer.vtkMRMLTableNode | None" = None,
               ) -> "slicer.vtkMRMLTableNode":
    """Flat rows (scalars or None) -> a (new or given) table node with typed columns.

    columns: order of the columns (default: keys in first-seen order). Integer columns need a
    value in every row (else double, missing = NaN); text columns hold "" for missing values. If
    the first column is text with an empty value, a ``row`` column (1..n) is put in front (see the
    module docstring)."""
    rows = [flatten_result(r) for r in rows]
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    table = vtk.vtkTable()
    arrays = [_column(key, [r.get(key) for r in rows]) for key in columns]
    if arrays and arrays[0].IsA("vtkStringArray") and any(
            arrays[0].GetValue(i)[:1].strip() == "" for i in range(arrays[0].GetNumberOfValues())):
        arrays.insert(0, _column("row", list(range(1, len(rows) + 1))))
    for arr in arrays:
        table.AddColumn(arr)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    node.SetUseColumnTitleAsColumnHeader(True)
    return node


def _column(key: str, values: list[Any]) -> vtk.vtkAbstractArray:
    present = [v for v in values if v is not None]
    if present and len(present) == len(values) and all(isinstance(v, int) for v in present):
        arr = vtk.vtkIntArray()  # integers and booleans (as 0/1), no missing values
        conv = int
    elif present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        arr = vtk.vtkDoubleArray()
        conv = lambda v: math.nan if v is None else float(v)  # noqa: E731
    else:
        arr = vtk.vtkStringArray()
        conv = lambda v: "" if v is None else _TEXT_BREAKS.sub(" ", str(v))  # noqa: E731
    arr.SetName(key)
    for v in values:
        arr.InsertNextValue(conv(v))
    return arr


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
    "study": "Study name (input file name, patient id or volume name)",
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
