"""Radiograph results in a Slicer scene: landmark point list and per-item table beside the result scene.

``add_point_list`` / ``point_list_lps`` convert between LPS millimetre points (RheumAI's frame)
and a markups point list (MRML stores RAS: x and y negated). ``write_radiograph_scene`` builds the
standard result scene (:func:`rheumai_mrml.scene.build_result_scene`: radiograph as a one-slice
volume, saliency overlay, result table) and adds the labelled landmark points and a rows table
(e.g. the per-joint SvdH grades), all under the radiograph in the subject hierarchy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import vtk

from .hierarchy import place_under
from .scene import DEFAULT_SLICER_VERSION, build_result_scene, new_scene, save_scene
from .tables import rows_table

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def add_point_list(scene: Any, points_lps: np.ndarray, labels: Sequence[str], name: str = "Landmarks",
                   locked: bool = False) -> Any:
    """A ``vtkMRMLMarkupsFiducialNode`` with one labelled control point per LPS point (N, 3)."""
    pts = np.asarray(points_lps, float).reshape(-1, 3)
    if len(labels) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(labels)} labels")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    for p, label in zip(pts * _LPS_TO_RAS, labels):
        node.AddControlPoint(vtk.vtkVector3d(*map(float, p)), str(label))
    node.SetLocked(bool(locked))
    return node


def point_list_lps(node: Any) -> tuple[np.ndarray, list[str]]:
    """Control points (N, 3) LPS mm and labels of a markups point list (e.g. after user correction)."""
    n = node.GetNumberOfControlPoints()
    pts = np.zeros((n, 3))
    labels = []
    for i in range(n):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        pts[i] = np.asarray(p) * _LPS_TO_RAS
        labels.append(node.GetNthControlPointLabel(i))
    return pts, labels


def build_radiograph_scene(scene: Any, source: sitk.Image, saliency: sitk.Image | None, result: dict,
                           points_lps: np.ndarray | None = None, labels: Sequence[str] = (),
                           rows: list[dict[str, Any]] | None = None, rows_name: str = "per-item table",
                           name: str | None = None) -> dict[str, Any]:
    """Result scene nodes + landmark point list + rows table; returns the nodes by role."""
    nodes = build_result_scene(scene, source, saliency, result, name=name)
    base = nodes["source"].GetName()
    extra = []
    if points_lps is not None:
        nodes["points"] = add_point_list(scene, points_lps, labels, name=f"{base} landmarks")
        nodes["points"].SetAttribute("RheumAI.Role", "landmarks")
        extra.append(nodes["points"])
    if rows:
        nodes["rows"] = rows_table(scene, rows, name=f"{base} {rows_name}")
        nodes["rows"].SetAttribute("RheumAI.Role", "rows")
        extra.append(nodes["rows"])
    if extra:
        place_under(nodes["source"], extra)
    return nodes


def write_radiograph_scene(out_path: str | Path, source: sitk.Image, saliency: sitk.Image | None, result: dict,
                           points_lps: np.ndarray | None = None, labels: Sequence[str] = (),
                           rows: list[dict[str, Any]] | None = None, rows_name: str = "per-item table",
                           slicer_version: str = DEFAULT_SLICER_VERSION) -> Path:
    """Write a ``.mrb`` / ``.mrml`` scene with the radiograph, saliency, result table, landmark
    point list and rows table (see :func:`build_radiograph_scene`)."""
    ctx = new_scene(slicer_version=slicer_version)
    try:
        build_radiograph_scene(ctx.scene, source, saliency, result, points_lps, labels, rows, rows_name)
        return save_scene(ctx.scene, out_path)
    finally:
        ctx.close()
