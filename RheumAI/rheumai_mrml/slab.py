"""The selected slab in the views: a markups ROI box on a selection grid, plus the slices volume.

A selection grid (``rheumai.geometry.Grid``, LPS mm, size (i, j, k) = (W, H, C)) samples points at
voxel centres; the box drawn is the grid's voxel-corner extent, i.e. ``size * spacing`` along each
grid axis, centred on the grid centre and rotated with the grid's direction. The ROI node stores
it in RAS: centre = LPS_TO_RAS @ centre_lps, axes = LPS_TO_RAS @ direction columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer
import vtk

from .nodes import LPS_TO_RAS, volume_node_from_image


def grid_box_ras(grid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre_ras (3,), axes_ras (3, 3) columns = grid i/j/k axes, size_mm (3,)) of a grid's box."""
    d = np.asarray(grid.direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(grid.spacing, dtype=float)
    size = np.asarray(grid.size, dtype=float)
    centre_lps = np.asarray(grid.origin, dtype=float) + d @ (spacing * (size - 1) / 2.0)
    return LPS_TO_RAS @ centre_lps, LPS_TO_RAS @ d, size * spacing


def slab_roi(scene: "slicer.vtkMRMLScene", grid: Any, name: str = "RheumAI slab",
             node: "slicer.vtkMRMLMarkupsROINode | None" = None, locked: bool = True,
             ) -> "slicer.vtkMRMLMarkupsROINode":
    """Show a selection grid as a (new or given) markups ROI box, oriented with the grid."""
    centre, axes, size = grid_box_ras(grid)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(axes[r, c]))
        m.SetElement(r, 3, float(centre[r]))
    with slicer.util.NodeModify(node):
        node.SetAndObserveObjectToNodeMatrix(m)
        node.SetCenter(*(float(v) for v in centre))
        node.SetSize(*(float(v) for v in size))
        node.SetLocked(bool(locked))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetHandlesInteractive(False)
    display.SetFillOpacity(0.1)
    display.SetSelectedColor(1.0, 0.8, 0.1)
    return node


def roi_box_ras(node: "slicer.vtkMRMLMarkupsROINode") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre_ras, axes_ras (columns), size_mm) read back from a ROI node."""
    m = vtk.vtkMatrix4x4()
    m.DeepCopy(node.GetObjectToNodeMatrix())
    axes = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    centre = np.zeros(3)
    node.GetCenter(centre)
    return centre, axes, np.asarray(node.GetSize(), dtype=float)


def selection_volume(scene: "slicer.vtkMRMLScene", selection: Any, name: str = "RheumAI slices",
                     node: "slicer.vtkMRMLScalarVolumeNode | None" = None) -> "slicer.vtkMRMLScalarVolumeNode":
    """The selected (normalised) slices as a volume node on their own grid (C slices of H x W)."""
    return volume_node_from_image(scene, selection.grid_image(), name, node=node)
