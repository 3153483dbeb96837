"""Saliency overlay in MRML: colour table, foreground layer of the slice views, colour legend.

The saliency volume holds values in [0, 1] (1 = most relevant) in the input's geometry. It is
shown as the foreground layer over the input with a heat colour table whose first entry is
transparent, a fixed window 0..1 (so colours mean the same thing for every case), an optional
lower threshold, and a colour legend. Works with the real Slicer and with ``slicer-core``.
"""

from __future__ import annotations

import numpy as np
import slicer

SALIENCY_COLOR_NAME = "RheumAI Saliency"
SALIENCY_COLOR_ATTRIBUTE = "RheumAI.SaliencyColorTable"
VIEW_NAMES = ("Red", "Yellow", "Green")


def saliency_color_node(scene: "slicer.vtkMRMLScene", n_colors: int = 256) -> "slicer.vtkMRMLColorTableNode":
    """The scene's saliency colour table (created once, then reused).

    Colours: matplotlib's perceptually uniform "inferno" map (the same one Slicer ships as
    "Inferno"; built here because ``slicer-core`` has no Colors module share folder). Entry 0 is
    transparent, so voxels at 0 (outside the selected slab, or no saliency) show the input only.
    """
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(SALIENCY_COLOR_ATTRIBUTE) == "1":
            return node
    from matplotlib import colormaps

    rgba = colormaps["inferno"](np.linspace(0.0, 1.0, n_colors))
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", SALIENCY_COLOR_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(n_colors)
    node.SetHideFromEditors(False)  # listed in the Colors module and saved as regular data
    for i, (r, g, b, _a) in enumerate(rgba):
        node.SetColor(i, f"{i / (n_colors - 1):.3f}", float(r), float(g), float(b), 0.0 if i == 0 else 1.0)
    node.SetAttribute(SALIENCY_COLOR_ATTRIBUTE, "1")
    node.SetAttribute("Category", "RheumAI")
    return node


def show_saliency(background: "slicer.vtkMRMLScalarVolumeNode", saliency: "slicer.vtkMRMLScalarVolumeNode",
                  opacity: float = 0.5, lower_threshold: float | None = 0.05, legend: bool = True,
                  create_views: bool = False) -> dict:
    """Style ``saliency`` (values in [0, 1]) and put it as foreground over ``background``.

    opacity: foreground opacity in the slice views, 0..1. lower_threshold: saliency below it is
    transparent (None: only exact zeros are). create_views: add the Red/Yellow/Green slice
    composite nodes when the scene has none (a scene written without the application), so the
    overlay is what opens. Returns {"display", "color", "legend", "views"}.
    """
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be within [0, 1], got {opacity}")
    scene = saliency.GetScene()
    color = saliency_color_node(scene)
    if saliency.GetDisplayNode() is None:
        saliency.CreateDefaultDisplayNodes()
    display = saliency.GetScalarVolumeDisplayNode()
    with slicer.util.NodeModify(display):
        display.SetAndObserveColorNodeID(color.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        if lower_threshold is not None:
            display.SetApplyThreshold(True)
            display.SetThreshold(float(lower_threshold), 1.0e6)
        else:
            display.SetApplyThreshold(False)
        display.SetInterpolate(True)
    legend_node = None
    if legend:
        # Static in vtkSlicerColorLogic: same call inside Slicer and under slicer-core.
        legend_node = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(saliency)
        legend_node.SetTitleText("Saliency")
        legend_node.SetLabelFormat("%.1f")
        legend_node.SetVisibility(True)
    views = set_slice_viewer_layers(scene, background, saliency, opacity, create_views=create_views)
    return {"display": display, "color": color, "legend": legend_node, "views": views}


def set_slice_viewer_layers(scene: "slicer.vtkMRMLScene", background: "slicer.vtkMRMLVolumeNode | None",
                            foreground: "slicer.vtkMRMLVolumeNode | None", opacity: float = 0.5,
                            create_views: bool = False) -> list:
    """Set background / foreground / opacity on every slice composite node of the scene
    (what ``slicer.util.setSliceViewerLayers`` does, for an explicit scene).

    With ``create_views`` and no composite node in the scene, the three standard ones are added as
    singletons tagged Red / Yellow / Green, which Slicer merges into its views on loading.
    """
    nodes = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    if not nodes and create_views:
        for view in VIEW_NAMES:
            node = slicer.vtkMRMLSliceCompositeNode()
            node.SetLayoutName(view)
            node.SetSingletonTag(view)
            nodes.append(scene.AddNode(node))
    for node in nodes:
        with slicer.util.NodeModify(node):
            node.SetBackgroundVolumeID(background.GetID() if background else None)
            node.SetForegroundVolumeID(foreground.GetID() if foreground else None)
            node.SetForegroundOpacity(float(opacity))
    return nodes
