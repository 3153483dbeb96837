"""The console logic (what the Slicer panel and the README's console example call), on slicer-core.

Real parts throughout: a small real checkpoint (random ResNet-10 weights, 32 x 32 input) and the
real T2 test studies. Dataset building and training: Testing/test_mrml_process.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
torch = pytest.importorskip("torch")

from rheumai.errors import InputError  # noqa: E402
from rheumai_mrml.hierarchy import results_of  # noqa: E402
from rheumai_mrml.logic import RheumAIConsoleLogic, find_studies, slice_params  # noqa: E402
from rheumai_mrml.nodes import LPS_TO_RAS, image_from_volume_node, read_volume_node  # noqa: E402
from rheumai_mrml.slab import roi_box_ras  # noqa: E402
from rheumai_mrml.tables import table_rows  # noqa: E402

SIZE = (32, 32)




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real RheumAI checkpoint folder: ResNet-10, 6 channels, 32 x 32, seeded random weights."""
    from rheumai.checkpoint import save_checkpoint
    from rheumai.tasks.cervical_ra.model import build_model, default_architecture
    from rheumai.tasks.cervical_ra.slices import SliceParams

    torch.manual_seed(0)
    arch = default_architecture(10, 6, SIZE)
    card = {"task": "cervical_ra", "architecture": arch, "preprocessing": SliceParams(size=SIZE).to_dict(),
            "threshold": 0.5, "threshold_rule": "fixed", "training_data": {"n_train": 0}, "metrics": {},
            "model_id": "test-resnet10-32"}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", build_model(arch), card)


def test_select_slices_creates_slab_and_slices_under_input(mrml, t2_crop_path):
    logic = RheumAIConsoleLogic(mrml.scene)
    node = logic.loadVolume(t2_crop_path)
    out = logic.selectSlices(node, n_slices=6, spacing_mm=1.0, size=(48, 40))
    sel = out["selection"]
    assert sel.array.shape == (6, 48, 40) and out["params"]["size"] == [48, 40]
    assert {n.GetID() for n in results_of(node)} == {out["slicesNode"].GetID(), out["roiNode"].GetID()}
    centre, _, size = roi_box_ras(out["roiNode"])
    np.testing.assert_allclose(centre, out["slab_center_ras"], atol=1e-3)
    np.testing.assert_allclose(size, [40, 48, 6])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out["slicesNode"]), sel.array)
    # a clicked centre (RAS) moves the slab there; the nodes are updated, not duplicated
    target_ras = np.array(out["slab_center_ras"]) + np.array([2.0, -3.0, 4.0])
    moved = logic.selectSlices(node, out["params"], centerRAS=target_ras)
    np.testing.assert_allclose(moved["slab_center_ras"], target_ras, atol=1e-6)
    np.testing.assert_allclose(moved["slab_center_lps"], LPS_TO_RAS @ target_ras, atol=1e-6)
    assert moved["roiNode"] is out["roiNode"] and len(results_of(node)) == 2
    # no nodes when not asked
    n_nodes = mrml.scene.GetNumberOfNodes()
    plain = logic.selectSlices(str(t2_crop_path), {"size": [48, 40]}, createNodes=False)
    assert "roiNode" not in plain and mrml.scene.GetNumberOfNodes() == n_nodes
    np.testing.assert_allclose(plain["selection"].array, sel.array)


def test_predict_creates_overlay_table_and_slab(mrml, t2_crop_path, checkpoint):
    views = []
    for name in ("Red", "Yellow", "Green"):  # slice views as the application's slice logics make them
        views.append(slicer.vtkMRMLSliceLogic())
        views[-1].SetMRMLApplicationLogic(mrml.app_logic)
        views[-1].SetMRMLScene(mrml.scene)
        views[-1].AddSliceNode(name)
    logic = RheumAIConsoleLogic(mrml.scene)
    card = logic.modelCard(checkpoint)
    assert card["model_id"] == "test-resnet10-32"
    node = read_volume_node(mrml.scene, t2_crop_path)
    res = logic.predict(node, checkpoint, createNodes=True, saliency="gradcam", opacity=0.4)
    assert 0.0 <= res["probability"] <= 1.0
    assert res["label"] == int(res["probability"] >= 0.5) and res["model_id"] == "test-resnet10-32"
    assert res["source_path"] == str(t2_crop_path)
    ids = res["nodeIDs"]
    assert ids["input"] == node.GetID()
    sal = mrml.scene.GetNodeByID(ids["saliency"])
    src_img, sal_img = image_from_volume_node(node), image_from_volume_node(sal)
    assert sal_img.GetSize() == src_img.GetSize() and sal_img.GetOrigin() == src_img.GetOrigin()
    assert sal_img.GetDirection() == src_img.GetDirection() and sal_img.GetSpacing() == src_img.GetSpacing()
    arr = sitk.GetArrayFromImage(sal_img)
    assert arr.min() >= 0.0 and arr.max() <= 1.0 + 1e-6 and arr.max() > 0.0
    (row,) = table_rows(mrml.scene.GetNodeByID(ids["table"]))
    assert row["probability"] == pytest.approx(res["probability"]) and row["label"] == res["label"]
    for view in views:
        c = view.GetSliceCompositeNode()
        assert c.GetBackgroundVolumeID() == node.GetID() and c.GetForegroundVolumeID() == sal.GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.4)
    centre, _, _ = roi_box_ras(mrml.scene.GetNodeByID(ids["slab"]))
    grid = res["slab_grid"]
    d, sp, sz = np.array(grid["direction"]), np.array(grid["spacing"]), np.array(grid["size"])
    np.testing.assert_allclose(centre, LPS_TO_RAS @ (np.array(grid["origin"]) + d @ (sp * (sz - 1) / 2)), atol=1e-3)
    assert {n.GetID() for n in results_of(node)} == {ids["saliency"], ids["table"], ids["slab"]}

    # again: same numbers, nodes reused; the opacity can be changed afterwards
    n_nodes = mrml.scene.GetNumberOfNodes()
    again = logic.predict(node, checkpoint, createNodes=True)
    assert again["probability"] == pytest.approx(res["probability"], abs=1e-6)
    assert again["nodeIDs"] == ids and mrml.scene.GetNumberOfNodes() == n_nodes
    logic.setSaliencyOpacity(node, 0.9)
    assert views[0].GetSliceCompositeNode().GetForegroundOpacity() == pytest.approx(0.9)

    # from a path, without nodes: the same probability
    plain = logic.predict(str(t2_crop_path), checkpoint, saliency=None)
    assert plain["probability"] == pytest.approx(res["probability"], abs=1e-5) and "nodeIDs" not in plain
    assert mrml.scene.GetNumberOfNodes() == n_nodes


def test_predict_batch_folder_with_a_bad_file(mrml, tmp_path, t2_crop_path, checkpoint):
    folder = tmp_path / "studies"
    folder.mkdir()
    shutil.copy(t2_crop_path, folder / "a.nii.gz")
    shutil.copy(t2_crop_path, folder / "b.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    assert [p.rsplit("/", 1)[-1] for p in find_studies(folder)] == ["a.nii.gz", "b.nii.gz", "broken.nii.gz"]
    seen = []
    rows = RheumAIConsoleLogic(mrml.scene).predictBatch(folder, checkpoint, tmp_path / "out",
                                                        progressCallback=lambda f, m: seen.append(f),
                                                        saliency=None)
    assert len(rows) == 3 and seen[-1] == pytest.approx(1.0)
    by_name = {r["source_path"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_name["a.nii.gz"]["probability"] == pytest.approx(by_name["b.nii.gz"]["probability"])
    assert "broken.nii.gz" in by_name["broken.nii.gz"]["error"]
    assert (tmp_path / "out" / "predictions.csv").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        find_studies(tmp_path / "empty")


def test_slice_params_and_bad_inputs(mrml):
    assert slice_params(None).size == (512, 512)
    assert slice_params({"n_slices": 4}, size=(64, 64)).to_dict()["size"] == [64, 64]
    logic = RheumAIConsoleLogic(mrml.scene)
    with pytest.raises(InputError, match="scalar volume node"):
        logic.selectSlices(mrml.scene.AddNewNodeByClass("vtkMRMLTableNode"))
    with pytest.raises(InputError):
        logic.predict("/nonexistent/t2.nii.gz", "/nonexistent/model")


def test_missing_requirements_and_model_card_text(tmp_path, checkpoint):
    from rheumai_mrml.logic import missing_requirements, model_card_text

    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=1.0\nnumpy>=999\nSimpleITK>=999\nsurely-not-installed-pkg>=1.0\n"
                   "scipy>=1.0; python_version < '3.0'\n-r other.txt\n")
    assert missing_requirements(req, skip=["simpleitk"]) == ["numpy>=999", "surely-not-installed-pkg>=1.0"]
    shipped = Path(__file__).resolve().parents[1] / "RheumAI" / "Resources" / "requirements.txt"
    assert missing_requirements(shipped) == []  # this environment has them all
    text = model_card_text(RheumAIConsoleLogic(None).modelCard(checkpoint))
    assert "test-resnet10-32" in text and "resnet10" in text and "Threshold: 0.5 (fixed)" in text


# The README's plain-Python console example, verbatim (the test below runs it on real files).
README_EXAMPLE = '''from rheumai_mrml.scene import new_scene, save_scene
from rheumai_mrml.logic import RheumAIConsoleLogic

ctx = new_scene()                          # vtkMRMLScene + Slicer's logics, no Qt
logic = RheumAIConsoleLogic(ctx.scene)
volume = logic.loadVolume("/data/case7/t2.nii.gz")
result = logic.predict(volume, "/models/cervical_ra", createNodes=True)
save_scene(ctx.scene, "case7.mrb")         # open it in 3D Slicer
'''


def test_readme_plain_python_example_runs(tmp_path, t2_crop_path, checkpoint):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    if "from rheumai_mrml.logic import RheumAIConsoleLogic" in readme:
        assert README_EXAMPLE in readme, "README's plain-Python example differs from README_EXAMPLE"
    code = (README_EXAMPLE.replace("/data/case7/t2.nii.gz", str(t2_crop_path))
            .replace("/models/cervical_ra", str(checkpoint)).replace('"case7.mrb"', repr(str(tmp_path / "case7.mrb"))))
    ns: dict = {}
    exec(compile(code, "README example", "exec"), ns)
    assert 0.0 <= ns["result"]["probability"] <= 1.0
    from rheumai_mrml.scene import load_scene

    loaded = load_scene(tmp_path / "case7.mrb")
    assert loaded.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2  # study + saliency
    assert loaded.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 1
    assert loaded.scene.GetLastLoadedVersion() == "Slicer 5.12.3 34627"  # a released Slicer
    red = loaded.scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")  # opens with the overlay
    assert red.GetForegroundVolumeID() == loaded.scene.GetFirstNodeByName("t2 saliency").GetID()
    loaded.close()
    ns["ctx"].close()


def test_tasks_from_the_registry(mrml, checkpoint):
    logic = RheumAIConsoleLogic(mrml.scene)
    names = [t["name"] for t in logic.listTasks()]
    assert {"cervical_ra", "negspa"} <= set(names)
    assert logic.taskOfModel(checkpoint)["name"] == "cervical_ra"
