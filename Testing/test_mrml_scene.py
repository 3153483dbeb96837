"""write_result_scene: written with slicer-core, read back with the same library, checked."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")

from rheumai.errors import InputError  # noqa: E402
from rheumai_mrml.hierarchy import SOURCE_REFERENCE_ROLE, results_of  # noqa: E402
from rheumai_mrml.nodes import image_from_volume_node  # noqa: E402
from rheumai_mrml.overlay import SALIENCY_COLOR_ATTRIBUTE  # noqa: E402
from rheumai_mrml.scene import load_scene, scene_version_string, write_result_scene  # noqa: E402
from rheumai_mrml.tables import table_rows  # noqa: E402

RESULT = {"source_path": "/data/case7/t2.nii.gz", "series_uid": None, "probability": 0.8125, "label": 1,
          "threshold": 0.4, "model_id": "cervical-ra-test", "saliency": "gradcam", "tta_mean": None,
          "sanity": {"passed": True, "randomisation_corr": 0.12}, "timings_s": {"model": 0.5}}


@pytest.fixture(scope="module")
def study(t2_crop_path):
    src = sitk.ReadImage(str(t2_crop_path), sitk.sitkFloat32)
    # saliency: a smooth blob in [0, 1], zero in the outer voxels, in the study's geometry
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in sitk.GetArrayFromImage(src).shape], indexing="ij")
    sal_arr = np.clip(1.0 - (k**2 + j**2 + i**2), 0.0, 1.0).astype(np.float32)
    sal = sitk.GetImageFromArray(sal_arr)
    sal.CopyInformation(src)
    return src, sal


def _corners(img: sitk.Image) -> np.ndarray:
    n = np.array(img.GetSize()) - 1
    idx = [(a, b, c) for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])]
    return np.array(sorted(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in i]) for i in idx))


def assert_same_physical_image(img: sitk.Image, ref: sitk.Image) -> None:
    """Same voxel centres (as a set of LPS points) and the same value at each of them."""
    np.testing.assert_allclose(sorted(img.GetSpacing()), sorted(ref.GetSpacing()), atol=1e-6)
    np.testing.assert_allclose(_corners(img), _corners(ref), atol=1e-3)
    on_ref = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0, ref.GetPixelID())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_ref), sitk.GetArrayFromImage(ref))


def _node(scene, role):
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        if n.GetAttribute("RheumAI.Role") == role:
            return n
    raise AssertionError(f"no node with role {role}")


@pytest.mark.parametrize("suffix", [".mrb", ".mrml"])
def test_scene_round_trip(tmp_path, study, suffix):
    src, sal = study
    out = write_result_scene(tmp_path / f"case7{suffix}", src, sal, RESULT)
    assert out == (tmp_path / f"case7{suffix}").absolute() and out.is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("case7.mrb", "case7.mrml", "case7_data")]
    assert leftovers == []  # nothing temporary left beside the scene
    if suffix == ".mrb":
        names = zipfile.ZipFile(out).namelist()
        assert "case7/case7.mrml" in names and any(n.endswith(".nrrd") for n in names)
    ctx = load_scene(out)
    try:
        scene = ctx.scene
        assert scene.GetLastLoadedVersion() == scene_version_string() == "Slicer 5.12.3 34627"

        bg, fg, table = _node(scene, "input"), _node(scene, "saliency"), _node(scene, "result")
        assert bg.GetClassName() == "vtkMRMLScalarVolumeNode" and bg.GetName() == "t2"
        assert fg.GetClassName() == "vtkMRMLScalarVolumeNode"
        assert table.GetClassName() == "vtkMRMLTableNode"

        # geometry and voxels, compared in LPS physical space with the inputs. This study's
        # voxel axes are left-handed, and Slicer's volume reader makes IJK right-handed on loading
        # (one axis reversed, origin moved to the other end): same voxels at the same places.
        for node, ref in ((bg, src), (fg, sal)):
            assert_same_physical_image(image_from_volume_node(node), ref)

        # overlay: colour table, fixed window, legend, slice views
        disp = fg.GetScalarVolumeDisplayNode()
        color = disp.GetColorNode()
        assert color.GetClassName() == "vtkMRMLColorTableNode"
        assert color.GetAttribute(SALIENCY_COLOR_ATTRIBUTE) == "1" and color.GetNumberOfColors() == 256
        rgba = [0.0] * 4
        color.GetColor(0, rgba)
        assert rgba[3] == 0.0  # zero saliency is transparent
        color.GetColor(255, rgba)
        assert rgba[3] == 1.0 and rgba[0] > 0.9  # inferno's bright end
        assert not disp.GetAutoWindowLevel()
        assert (disp.GetWindowLevelMin(), disp.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
        legends = [fg.GetNthDisplayNode(i) for i in range(fg.GetNumberOfDisplayNodes())
                   if fg.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")]
        assert len(legends) == 1 and legends[0].GetPrimaryDisplayNode() is disp
        assert legends[0].GetTitleText() == "Saliency" and legends[0].GetVisibility()
        views = {}
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            c = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            views[c.GetLayoutName()] = c
        assert set(views) == {"Red", "Yellow", "Green"}
        for c in views.values():
            assert c.GetSingletonTag() == c.GetLayoutName()
            assert c.GetBackgroundVolumeID() == bg.GetID() and c.GetForegroundVolumeID() == fg.GetID()
            assert c.GetForegroundOpacity() == pytest.approx(0.5)

        # table: one row with the result fields, typed
        (row,) = table_rows(table)
        assert row["probability"] == pytest.approx(0.8125) and row["label"] == 1
        assert row["threshold"] == pytest.approx(0.4) and row["model_id"] == "cervical-ra-test"
        assert row["sanity.passed"] == 1 and row["sanity.randomisation_corr"] == pytest.approx(0.12)
        assert row["source_path"] == RESULT["source_path"]

        # hierarchy and references: results under the study, referencing it
        assert {n.GetID() for n in results_of(bg)} == {fg.GetID(), table.GetID()}
        for n in (fg, table):
            assert n.GetNodeReference(SOURCE_REFERENCE_ROLE) is bg
    finally:
        ctx.close()


def test_scene_without_saliency(tmp_path, study):
    src, _ = study
    out = write_result_scene(tmp_path / "nosal.mrml", src, None, dict(RESULT, saliency=None))
    text = out.read_text()
    assert 'version="Slicer 5.12.3 34627"' in text  # a released Slicer, not slicer-core's 5.12.4
    ctx = load_scene(out)
    try:
        scene = ctx.scene
        assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
        assert scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode") == 0
        bg = _node(scene, "input")
        c = scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
        assert c.GetBackgroundVolumeID() == bg.GetID() and c.GetForegroundVolumeID() is None
        (row,) = table_rows(_node(scene, "result"))
        assert row["probability"] == pytest.approx(0.8125)
    finally:
        ctx.close()
    # written data files sit in <stem>_data, referenced relative to the scene file
    assert sorted(p.suffix for p in (tmp_path / "nosal_data").iterdir()) == [".nrrd", ".tsv", ".tsv"]
    assert 'fileName="nosal_data/' in text


def test_version_and_input_errors(tmp_path, study):
    assert scene_version_string("5.12.3") == "Slicer 5.12.3 34627"
    assert scene_version_string("5.8.1") == "Slicer 5.8.1 33241"
    assert scene_version_string("5.12.9", revision=34700) == "Slicer 5.12.9 34700"
    for not_a_release in ("4.11.0", "5.12.4"):  # 5.12.4 is slicer-core's package version only
        with pytest.raises(ValueError, match="not a known release"):
            scene_version_string(not_a_release)
    with pytest.raises(ValueError):
        scene_version_string("5.12")
    with pytest.raises(InputError, match=r"\.mrb or \.mrml"):
        write_result_scene(tmp_path / "x.nrrd", study[0], None, RESULT)
    with pytest.raises(InputError, match="not found"):
        load_scene(tmp_path / "missing.mrb")


def test_result_json_fields_survive_nesting(tmp_path, study):
    """Lists and nested dicts (e.g. the selection grid) are kept as JSON text, not dropped."""
    src, sal = study
    result = dict(RESULT, selection={"grid": {"size": [64, 64, 6]}}, tta={"probabilities": [0.1, 0.2]})
    out = write_result_scene(tmp_path / "nested.mrb", src, sal, result)
    ctx = load_scene(out)
    try:
        (row,) = table_rows(_node(ctx.scene, "result"))
        assert json.loads(row["selection.grid.size"]) == [64, 64, 6]
        assert json.loads(row["tta.probabilities"]) == [0.1, 0.2]
    finally:
        ctx.close()
