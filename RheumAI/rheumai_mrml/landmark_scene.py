"""Labelled landmark point lists with a per-point status, and radiograph scenes holding them.

For radiograph tasks whose outputs are points (mSASSS vertebral corners, SvdH joint areas): each
point has a label ("C2 lower"), an LPS position (RheumAI's frame; MRML stores RAS, x and y
negated), a status ("ok" or "missing": Slicer's *position missing* state, used for a point the
task could not score) and a description (the reason, and for a missing point the position it
had, so a user can restore and correct it). :func:`read_landmarks` gives back what the user left
after dragging points, for re-scoring; a missing point comes back as NaN unless it was placed
again.

:func:`write_landmark_scene` writes one or more radiographs (one-slice volumes), each with its
result table, point list and per-item rows table under it in the subject hierarchy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import slicer
import vtk

from .hierarchy import place_under
from .scene import DEFAULT_SLICER_VERSION, build_result_scene, new_scene, save_scene
from .tables import rows_table

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
STATUSES = ("ok", "missing")
_PREDICTED = re.compile(r"predicted LPS \(([-\d.eE+]+), ([-\d.eE+]+), ([-\d.eE+]+)\)")


def add_landmarks(scene: Any, points_lps: np.ndarray, labels: Sequence[str], status: Sequence[str] | None = None,
                  descriptions: Sequence[str] | None = None, name: str = "Landmarks", locked: bool = False) -> Any:
    """A ``vtkMRMLMarkupsFiducialNode`` with one labelled control point per LPS point (N, 3) mm.

    status: "ok" | "missing" per point (default all "ok"); a missing point is set to Slicer's
    position-missing state and its position kept in its description.
    """
    pts = np.asarray(points_lps, float).reshape(-1, 3)
    n = len(pts)
    status = list(status) if status is not None else ["ok"] * n
    descriptions = list(descriptions) if descriptions is not None else [""] * n
    if not len(labels) == len(status) == len(descriptions) == n:
        raise ValueError(f"{n} points but {len(labels)} labels, {len(status)} statuses, "
                         f"{len(descriptions)} descriptions")
    bad = sorted(set(status) - set(STATUSES))
    if bad:
        raise ValueError(f"point status must be one of {STATUSES}, got {bad}")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    for i, (p, label, st, desc) in enumerate(zip(pts, labels, status, descriptions)):
        ras = np.nan_to_num(p) * _LPS_TO_RAS
        node.AddControlPoint(vtk.vtkVector3d(*map(float, ras)), str(label))
        if st == "missing":
            if np.isfinite(p).all():
                desc = (desc + "; " if desc else "") + "predicted LPS ({:.3f}, {:.3f}, {:.3f})".format(*p)
            node.SetNthControlPointPositionMissing(i)
        node.SetNthControlPointDescription(i, str(desc))
    node.SetLocked(bool(locked))
    node.SetAttribute("RheumAI.Role", "landmarks")
    return node


def read_landmarks(node: Any) -> dict[str, Any]:
    """{"labels", "lps" (N, 3) mm, NaN where missing, "status", "descriptions", "predicted_lps"}.

    ``predicted_lps`` holds, for a missing point, the position recorded when it was written (NaN
    otherwise), so a caller may re-score with it or ask the user to place the point.
    """
    n = node.GetNumberOfControlPoints()
    lps = np.full((n, 3), np.nan)
    predicted = np.full((n, 3), np.nan)
    labels, status, desc = [], [], []
    for i in range(n):
        labels.append(node.GetNthControlPointLabel(i))
        d = node.GetNthControlPointDescription(i)
        desc.append(d)
        missing = node.GetNthControlPointPositionStatus(i) == slicer.vtkMRMLMarkupsNode.PositionMissing
        status.append("missing" if missing else "ok")
        if not missing:
            p = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, p)
            lps[i] = np.asarray(p) * _LPS_TO_RAS
        m = _PREDICTED.search(d or "")
        if m:
            predicted[i] = [float(g) for g in m.groups()]
    return {"labels": labels, "lps": lps, "status": status, "descriptions": desc, "predicted_lps": predicted}


def write_landmark_scene(out_path: str | Path, views: Sequence[dict[str, Any]],
                         slicer_version: str = DEFAULT_SLICER_VERSION) -> Path:
    """Write a ``.mrb`` / ``.mrml`` scene with one radiograph per entry of ``views``.

    Each entry: ``name``, ``image`` (sitk one-slice image, LPS), ``result`` (flat dict for the
    result table), ``points`` (list of {"label", "lps", "status", "reason"}), optional ``rows``
    (per-item table rows) and ``rows_name``.
    """
    ctx = new_scene(slicer_version=slicer_version)
    try:
        for v in views:
            nodes = build_result_scene(ctx.scene, v["image"], None, v.get("result", {}), name=v["name"])
            extra = []
            pts = v.get("points") or []
            if pts:
                node = add_landmarks(ctx.scene, np.array([p["lps"] for p in pts], float), [p["label"] for p in pts],
                                     [p.get("status", "ok") for p in pts], [p.get("reason", "") for p in pts],
                                     name=f"{v['name']} landmarks")
                extra.append(node)
            if v.get("rows"):
                table = rows_table(ctx.scene, v["rows"], name=f"{v['name']} {v.get('rows_name', 'table')}")
                table.SetAttribute("RheumAI.Role", "rows")
                extra.append(table)
            if extra:
                place_under(nodes["source"], extra)
        return save_scene(ctx.scene, out_path)
    finally:
        ctx.close()


def image_landmark_nodes(scene: Any) -> list[Any]:
    """The landmark point lists of a scene (nodes with ``RheumAI.Role`` = landmarks)."""
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
        if node.GetAttribute("RheumAI.Role") == "landmarks":
            out.append(node)
    return out


__all__ = ["add_landmarks", "read_landmarks", "write_landmark_scene", "image_landmark_nodes", "STATUSES"]
