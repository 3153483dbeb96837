"""A task's box ROI as a markups ROI node, and back.

The package's box is axis-aligned in LPS mm: ``{"min_lps": [x, y, z], "max_lps": [x, y, z]}``.
A markups ROI stores a centre and size in RAS (optionally rotated, optionally under a transform).
Reading takes the ROI's world-space (transforms applied) axis-aligned bounds, so a rotated box
becomes the smallest axis-aligned box holding it; writing makes an axis-aligned ROI.
Works with the real Slicer and with ``slicer-core``.
"""

from __future__ import annotations

from typing import Any

import slicer

from rheumai.errors import InputError


def box_from_roi(node: "slicer.vtkMRMLMarkupsROINode") -> dict[str, list[float]]:
    """{"min_lps", "max_lps"} (mm) of a markups ROI node's world bounds."""
    if node is None or not node.IsA("vtkMRMLMarkupsROINode"):
        raise InputError(None, f"expected a markups ROI node, got {type(node).__name__}")
    if not node.GetNumberOfControlPoints() and all(s <= 0 for s in node.GetSize()):
        raise InputError(None, f"ROI '{node.GetName()}' is not placed yet")
    b = [0.0] * 6
    node.GetRASBounds(b)  # world coordinates: parent transforms applied
    if not (b[1] > b[0] and b[3] > b[2] and b[5] > b[4]):
        raise InputError(None, f"ROI '{node.GetName()}' has an empty box (bounds {b})")
    return {"min_lps": [-b[1], -b[3], b[4]], "max_lps": [-b[0], -b[2], b[5]]}


def roi_from_box(scene: "slicer.vtkMRMLScene", box: dict[str, Any], name: str = "RheumAI box",
                 node: "slicer.vtkMRMLMarkupsROINode | None" = None) -> "slicer.vtkMRMLMarkupsROINode":
    """An axis-aligned markups ROI (new or given) showing an LPS box."""
    lo, hi = [float(v) for v in box["min_lps"]], [float(v) for v in box["max_lps"]]
    centre_lps = [(a + b) / 2 for a, b in zip(lo, hi)]
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    with slicer.util.NodeModify(node):
        node.SetCenter(-centre_lps[0], -centre_lps[1], centre_lps[2])
        node.SetSize(*(b - a for a, b in zip(lo, hi)))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node
