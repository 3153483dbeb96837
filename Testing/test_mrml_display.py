"""Overlay, result table, slab ROI and subject hierarchy, on Slicer's real MRML (slicer-core)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")

from rheumai.tasks.cervical_ra.slices import SliceParams, select_slices  # noqa: E402
from rheumai_mrml.hierarchy import SOURCE_REFERENCE_ROLE, place_under, results_of  # noqa: E402
from rheumai_mrml.nodes import LPS_TO_RAS, image_from_volume_node, volume_node_from_image  # noqa: E402
from rheumai_mrml.overlay import saliency_color_node, set_slice_viewer_layers, show_saliency  # noqa: E402
from rheumai_mrml.slab import grid_box_ras, roi_box_ras, selection_volume, slab_roi  # noqa: E402
from rheumai_mrml.tables import flatten_result, results_table, table_rows  # noqa: E402




@pytest.fixture(scope="module")
def t2(t2_path):
    return sitk.ReadImage(str(t2_path), sitk.sitkFloat32)


def _views_like_the_application(ctx):
    """Red / Yellow / Green slice views as the application's slice logics create them."""
    logics = []
    for name in ("Red", "Yellow", "Green"):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(ctx.app_logic)
        logic.SetMRMLScene(ctx.scene)
        logic.AddSliceNode(name)
        logics.append(logic)
    return logics


def test_overlay_in_existing_views(mrml, t2):
    logics = _views_like_the_application(mrml)
    n_composite = mrml.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    assert n_composite == 3
    bg = volume_node_from_image(mrml.scene, t2, "t2")
    sal_img = sitk.Image(t2)
    sal_img = sitk.RescaleIntensity(sal_img, 0.0, 1.0)
    sal = volume_node_from_image(mrml.scene, sal_img, "t2 saliency")
    shown = show_saliency(bg, sal, opacity=0.3, lower_threshold=0.2)
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == n_composite  # none added
    for logic in logics:
        c = logic.GetSliceCompositeNode()
        assert c.GetBackgroundVolumeID() == bg.GetID() and c.GetForegroundVolumeID() == sal.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.3)
    disp = shown["display"]
    assert disp.GetApplyThreshold() and disp.GetLowerThreshold() == pytest.approx(0.2)
    assert disp.GetColorNodeID() == shown["color"].GetID()
    assert shown["legend"].GetPrimaryDisplayNode() is disp
    # a second overlay reuses the colour table and the legend
    again = show_saliency(bg, sal, opacity=0.6, lower_threshold=None)
    assert again["color"] is shown["color"] and again["legend"] is shown["legend"]
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode") == 1
    assert not again["display"].GetApplyThreshold()
    assert logics[0].GetSliceCompositeNode().GetForegroundOpacity() == pytest.approx(0.6)
    with pytest.raises(ValueError, match="opacity"):
        show_saliency(bg, sal, opacity=1.5)
    set_slice_viewer_layers(mrml.scene, bg, None)
    assert logics[1].GetSliceCompositeNode().GetForegroundVolumeID() is None


def test_color_table_is_inferno_with_transparent_zero(mrml):
    from matplotlib import colormaps

    node = saliency_color_node(mrml.scene)
    assert saliency_color_node(mrml.scene) is node
    assert not node.GetHideFromEditors()
    rgba = [0.0] * 4
    ref = colormaps["inferno"](np.linspace(0, 1, 256))
    for i in (0, 100, 255):
        node.GetColor(i, rgba)
        np.testing.assert_allclose(rgba[:3], ref[i, :3], atol=1 / 255)  # stored as 8-bit
        assert rgba[3] == (0.0 if i == 0 else 1.0)


def test_results_table_types_and_order(mrml):
    rows = [{"probability": 0.25, "label": 0, "model_id": "m", "source_path": "a.nii.gz",
             "sanity": {"passed": False}, "tta": {"probabilities": [0.2, 0.3]}},
            {"probability": 0.9, "label": 1, "model_id": "m", "source_path": "b.nii.gz", "error": None,
             "sanity": {"passed": True}, "tta_std": None}]
    node = results_table(mrml.scene, rows, name="batch")
    table = node.GetTable()
    names = [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())]
    assert names[:5] == ["study", "source_path", "probability", "label", "model_id"]
    assert [table.GetValueByName(r, "study").ToString() for r in range(2)] == ["a", "b"]
    assert table.GetColumnByName("probability").IsA("vtkDoubleArray")
    assert table.GetColumnByName("label").IsA("vtkIntArray")
    assert table.GetColumnByName("sanity.passed").IsA("vtkIntArray")
    assert table.GetColumnByName("model_id").IsA("vtkStringArray")
    out = table_rows(node)
    assert [r["probability"] for r in out] == [0.25, 0.9] and [r["label"] for r in out] == [0, 1]
    assert out[0]["tta.probabilities"] == "[0.2, 0.3]" and out[1]["tta.probabilities"] == ""
    assert out[0]["tta_std"] == out[1]["tta_std"] == ""  # no value at all: an empty text column
    assert math.isnan(table_rows(results_table(mrml.scene, [{"p": 1.0}, {"p": None}]))[1]["p"])
    assert node.GetColumnDescription("probability").startswith("Predicted probability")
    # the same node is rewritten in place
    assert results_table(mrml.scene, rows[:1], node=node) is node and node.GetNumberOfRows() == 1
    assert flatten_result({"a": {"b": {"c": np.float32(1.5)}}}) == {"a.b.c": 1.5}


def test_slab_roi_and_slices_volume_match_the_selection(mrml, t2):
    sel = select_slices(t2, SliceParams(size=(96, 80)))
    roi = slab_roi(mrml.scene, sel.grid)
    centre, axes, size = roi_box_ras(roi)
    np.testing.assert_allclose(centre, LPS_TO_RAS @ sel.slab_center, atol=1e-3)
    np.testing.assert_allclose(axes, LPS_TO_RAS @ np.asarray(sel.grid.direction), atol=1e-9)
    np.testing.assert_allclose(size, [80.0, 96.0, 6.0])  # (W, H, C) x 1 mm
    # every selected sample point lies inside the ROI box (RAS bounds), the box is no larger
    bounds = np.zeros(6)
    roi.GetRASBounds(bounds)
    n = np.asarray(sel.grid.size) - 1
    pts = np.array([sel.grid.index_to_physical(np.array([a, b, c])) for a in (0, n[0]) for b in (0, n[1])
                    for c in (0, n[2])]) @ LPS_TO_RAS.T
    assert np.all(pts.min(axis=0) >= bounds[0::2] - 1e-3) and np.all(pts.max(axis=0) <= bounds[1::2] + 1e-3)
    np.testing.assert_allclose(pts.max(axis=0) - pts.min(axis=0) + 1.0, bounds[1::2] - bounds[0::2], atol=1e-3)
    # the slices volume sits on the selection grid and holds the selected array
    vol = selection_volume(mrml.scene, sel)
    img = image_from_volume_node(vol)
    np.testing.assert_allclose(img.GetOrigin(), sel.grid.origin, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(vol), sel.array)
    c_ras, _, s = grid_box_ras(sel.grid)
    np.testing.assert_allclose(s, size)


def test_hierarchy_places_results_under_input(mrml, t2):
    src = volume_node_from_image(mrml.scene, t2, "t2")
    other = volume_node_from_image(mrml.scene, t2, "other study")
    sal = volume_node_from_image(mrml.scene, t2, "t2 saliency")
    table = results_table(mrml.scene, {"probability": 0.5})
    items = place_under(src, [sal, None, table])
    assert len(items) == 2
    assert [n.GetID() for n in results_of(src)] == [sal.GetID(), table.GetID()]
    assert results_of(other) == []
    assert sal.GetNodeReference(SOURCE_REFERENCE_ROLE) is src
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert sh.GetItemParent(items[0]) == sh.GetItemByDataNode(src)
