"""Subject hierarchy: results sit under their input volume and reference it.

Each result node (saliency volume, slices volume, slab ROI, table) becomes a child item of the
input volume's subject-hierarchy item, and carries a MRML node reference (role
``SOURCE_REFERENCE_ROLE``) to the input, saved with the scene. Works with the real Slicer and with
``slicer-core``; in a bare scene the subject hierarchy logic must be set on the scene first (the
application does that; ``rheumai_mrml.scene.new_scene`` does it without one).
"""

from __future__ import annotations

from typing import Iterable

import slicer
import vtk

SOURCE_REFERENCE_ROLE = "rheumaiSource"


def subject_hierarchy(scene: "slicer.vtkMRMLScene") -> "slicer.vtkMRMLSubjectHierarchyNode":
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise RuntimeError("the scene has no subject hierarchy node")
    return sh


def place_under(source: "slicer.vtkMRMLNode", results: Iterable["slicer.vtkMRMLNode"]) -> list[int]:
    """Make each result a child of ``source`` in the subject hierarchy and reference ``source``.

    Returns the subject-hierarchy item IDs of the results (in order).
    """
    scene = source.GetScene()
    sh = subject_hierarchy(scene)
    parent = sh.GetItemByDataNode(source)
    if not parent:
        parent = sh.CreateItem(sh.GetSceneItemID(), source)
    items = []
    for node in results:
        if node is None:
            continue
        node.SetNodeReferenceID(SOURCE_REFERENCE_ROLE, source.GetID())
        item = sh.GetItemByDataNode(node)
        if not item:
            item = sh.CreateItem(parent, node)
        sh.SetItemParent(item, parent)
        items.append(item)
    return items


def results_of(source: "slicer.vtkMRMLNode") -> list["slicer.vtkMRMLNode"]:
    """Data nodes of the subject-hierarchy children of ``source`` (direct children, in order)."""
    sh = subject_hierarchy(source.GetScene())
    item = sh.GetItemByDataNode(source)
    if not item:
        return []
    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [sh.GetItemDataNode(ids.GetId(i)) for i in range(ids.GetNumberOfIds())]
