"""Prediction of any registered task from the console logic, on slicer-core: NegSpA-AI with its
three input volumes, its box as a markups ROI and clinical values; the cervical slab centre; the
model cache; the saliency display controls of the panel."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
torch = pytest.importorskip("torch")

from rheumai.errors import InputError  # noqa: E402
from rheumai_mrml.hierarchy import results_of  # noqa: E402
from rheumai_mrml.logic import RheumAIConsoleLogic  # noqa: E402
from rheumai_mrml.nodes import LPS_TO_RAS, image_from_volume_node, volume_node_from_image  # noqa: E402
from rheumai_mrml.roi import box_from_roi, roi_from_box  # noqa: E402
from rheumai_mrml.slab import roi_box_ras  # noqa: E402
from rheumai_mrml.tables import table_rows  # noqa: E402
from rheumai_mrml.task_predict import PredictorCache, StudyPrediction  # noqa: E402

BOX = {"min_lps": [-36.0, -20.0, -12.0], "max_lps": [36.0, 12.0, 12.0]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def negspa_model(tmp_path_factory):
    """A real NegSpA-AI checkpoint: three ResNet-10 branches (32 x 32, 3 slices), seeded random
    weights, a clinical encoder fitted on four rows."""
    from rheumai.checkpoint import save_checkpoint
    from rheumai.tasks.negspa.clinical import ClinicalEncoder, parse_table
    from rheumai.tasks.negspa.model import build_model, default_architecture
    from rheumai.tasks.negspa.preprocess import NegSpaParams

    torch.manual_seed(0)
    arch = default_architecture(depth=10, n_slices=3, input_size=(32, 32))
    rows = pd.DataFrame([{"crp": "12", "age": "30", "sex": "M"}, {"crp": "3", "age": "45", "sex": "F"},
                         {"crp": "", "age": "52", "sex": "F"}, {"crp": "30", "age": "28", "sex": "M"}])
    card = {"task": "negspa", "architecture": arch, "model_id": "negspa-test-r10",
            "preprocessing": NegSpaParams(size=(32, 32), n_slices=3, slice_spacing_mm=4.0).to_dict(),
            "clinical_encoder": ClinicalEncoder.fit(parse_table(rows)).to_dict(), "threshold": 0.5,
            "threshold_rule": "fixed"}
    return save_checkpoint(tmp_path_factory.mktemp("negspa") / "model", build_model(arch), card)


def _series(seed: int, spacing: tuple[float, float, float]) -> sitk.Image:
    """A smooth random volume covering -40..40 mm (x), -30..22 (y), -20..20 (z), LPS."""
    rng = np.random.default_rng(seed)
    size = [int(round(s / sp)) for s, sp in zip((80, 52, 40), spacing)]
    arr = rng.normal(size=size[::-1]).astype(np.float32)
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(arr), 2.0)
    img.SetSpacing(spacing)
    img.SetOrigin((-40.0, -30.0, -20.0))
    return sitk.Cast(img, sitk.sitkFloat32) * 100 + 500


def test_negspa_predicts_from_three_volume_nodes_and_a_markups_roi(mrml, negspa_model, tmp_path):
    logic = RheumAIConsoleLogic(mrml.scene)
    assert logic.taskOfModel(negspa_model)["name"] == "negspa"
    images = {"t1": _series(1, (1.0, 1.0, 4.0)), "t2": _series(2, (1.0, 1.0, 4.0)), "stir": _series(3, (2.0, 2.0, 4.0))}
    nodes = {role: volume_node_from_image(mrml.scene, img, f"SI {role}") for role, img in images.items()}
    roi = roi_from_box(mrml.scene, BOX, "SI joints")
    assert box_from_roi(roi) == BOX
    clinical = {"crp": "15", "sex": "M", "inflammatory_back_pain": "yes"}
    with pytest.raises(InputError, match="stir"):
        logic.predictStudy(negspa_model, {"t1": nodes["t1"], "t2": nodes["t2"]}, roi=roi)
    with pytest.raises(InputError, match="box ROI"):
        logic.predictStudy(negspa_model, nodes)
    with pytest.raises(InputError, match="predictStudy"):
        logic.predict(nodes["t1"], negspa_model)

    res = logic.predictStudy(negspa_model, nodes, roi=roi, clinical=clinical, createNodes=True, saliency="gradcam")
    assert res["task"] == "negspa" and 0.0 <= res["probability"] <= 1.0
    assert res["label"] == int(res["probability"] >= 0.5) and res["box"] == BOX
    assert "crp" not in res["clinical_missing"] and "age" in res["clinical_missing"]
    ids = res["nodeIDs"]
    assert ids["inputs"] == {r: n.GetID() for r, n in nodes.items()} and ids["roi"] == roi.GetID()
    assert set(ids["saliencyByRole"]) == {"t1", "t2", "stir"}
    for role, node in nodes.items():  # each saliency in its own series' geometry, under its input
        sal = mrml.scene.GetNodeByID(ids["saliencyByRole"][role])
        img = image_from_volume_node(sal)
        assert img.GetSize() == images[role].GetSize() and img.GetSpacing() == images[role].GetSpacing()
        assert sal.GetID() in {n.GetID() for n in results_of(node)}
        arr = sitk.GetArrayFromImage(img)
        assert 0.0 <= arr.min() and arr.max() <= 1.0 + 1e-6
    (row,) = table_rows(mrml.scene.GetNodeByID(ids["table"]))
    assert row["study"] == "SI t1" and row["probability"] == pytest.approx(res["probability"])
    scalars = {k: v for k, v in res.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    assert scalars and all(row[k] == pytest.approx(v) if isinstance(v, float) else row[k] == v
                           for k, v in scalars.items())

    # saved and reopened: the three saliency volumes, the table and the box ROI come back
    from rheumai_mrml.scene import load_scene, save_scene

    out = save_scene(mrml.scene, tmp_path / "negspa.mrb")
    back = load_scene(out)
    try:
        roles = [back.scene.GetNthNode(i).GetAttribute("RheumAI.Role") for i in range(back.scene.GetNumberOfNodes())]
        assert roles.count("saliency") == 3 and roles.count("result") == 1
        rois = [back.scene.GetNthNodeByClass(i, "vtkMRMLMarkupsROINode")
                for i in range(back.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode"))]
        (roi_back,) = [r for r in rois if r.GetName() == "SI joints"]
        np.testing.assert_allclose(box_from_roi(roi_back)["min_lps"], BOX["min_lps"], atol=1e-4)
        np.testing.assert_allclose(box_from_roi(roi_back)["max_lps"], BOX["max_lps"], atol=1e-4)
    finally:
        back.close()

    # the same study from images and a box dict: the same probability, and a box ROI is created
    again = logic.predictStudy(negspa_model, images, roi=BOX, clinical=clinical, createNodes=True, saliency=None)
    assert again["probability"] == pytest.approx(res["probability"], abs=1e-5)
    box_node = mrml.scene.GetNodeByID(again["nodeIDs"]["roi"])
    assert box_node.IsA("vtkMRMLMarkupsROINode") and box_from_roi(box_node) == BOX


@pytest.fixture(scope="module")
def cervical_model(tmp_path_factory):
    from rheumai.checkpoint import save_checkpoint
    from rheumai.tasks.cervical_ra.model import build_model, default_architecture
    from rheumai.tasks.cervical_ra.slices import SliceParams

    torch.manual_seed(0)
    arch = default_architecture(10, 6, (32, 32))
    card = {"task": "cervical_ra", "architecture": arch, "preprocessing": SliceParams(size=(32, 32)).to_dict(),
            "threshold": 0.5, "threshold_rule": "fixed", "training_data": {}, "metrics": {}, "model_id": "c-r10"}
    return save_checkpoint(tmp_path_factory.mktemp("cervical") / "model", build_model(arch), card)


def test_predict_honours_the_centre_and_keeps_the_slab_box(mrml, t2_crop_path, cervical_model):
    logic = RheumAIConsoleLogic(mrml.scene)
    node = logic.loadVolume(t2_crop_path)
    first = logic.selectSlices(node, {"size": [32, 32]})
    centre = np.array(first["slab_center_ras"]) + np.array([3.0, 0.0, -2.0])
    sel = logic.selectSlices(node, {"size": [32, 32]}, centerRAS=centre)
    slab_before = roi_box_ras(sel["roiNode"])
    res = logic.predict(node, cervical_model, createNodes=True, saliency=None, centerRAS=centre)
    g = res["slab_grid"]
    d, sp, sz = np.array(g["direction"]).reshape(3, 3), np.array(g["spacing"]), np.array(g["size"])
    np.testing.assert_allclose(LPS_TO_RAS @ (np.array(g["origin"]) + d @ (sp * (sz - 1) / 2)), centre, atol=1e-3)
    assert res["nodeIDs"]["slab"] == sel["roiNode"].GetID() and "warnings" not in res
    # without the centre the prediction samples another slab: the Select slices box stays as it was
    other = logic.predict(node, cervical_model, createNodes=True, saliency=None)
    assert "another slab" in other["warnings"][0]
    after = roi_box_ras(sel["roiNode"])
    for a, b in zip(slab_before, after):
        np.testing.assert_allclose(a, b, atol=1e-9)
    pred_slab = mrml.scene.GetNodeByID(other["nodeIDs"]["predictionSlab"])
    assert pred_slab.GetAttribute("RheumAI.Role") == "prediction_slab"
    assert not np.allclose(roi_box_ras(pred_slab)[0], after[0])


def test_model_cache_follows_the_weights_file(cervical_model, tmp_path):
    import shutil

    from rheumai.checkpoint import save_checkpoint
    from rheumai.tasks.cervical_ra.model import build_model

    folder = tmp_path / "model"
    shutil.copytree(cervical_model, folder)
    cache = PredictorCache()
    a = cache.get(folder)
    assert cache.get(folder) is a
    card = a.card if hasattr(a, "card") else None
    torch.manual_seed(1)  # "retrain" into the same folder
    save_checkpoint(folder, build_model(card["architecture"]), {k: v for k, v in card.items()
                                                               if k not in ("weights_file", "format")})
    os.utime(folder / "model.safetensors", ns=(1, 1))  # even with an unchanged size, the time differs
    b = cache.get(folder)
    assert b is not a and len(cache._items) == 1
    wa = next(iter(a.model.parameters())).detach()
    wb = next(iter(b.model.parameters())).detach()
    assert not torch.equal(wa, wb)
    with pytest.raises(InputError, match="not found"):
        cache.get(tmp_path / "nowhere")


def test_saliency_display_controls_never_raise_for_a_volume_without_saliency(mrml, t2_crop_path, cervical_model):
    logic = RheumAIConsoleLogic(mrml.scene)
    node = logic.loadVolume(t2_crop_path)
    plain = volume_node_from_image(mrml.scene, image_from_volume_node(node), "no saliency")
    assert logic.updateSaliencyDisplay(plain, opacity=0.3, lowerThreshold=0.2) is False
    assert logic.updateSaliencyDisplay(None, opacity=0.3) is False
    with pytest.raises(InputError, match="no RheumAI saliency"):
        logic.setSaliencyOpacity(plain, 0.3)
    res = logic.predict(node, cervical_model, createNodes=True, saliency="gradcam")
    sal = mrml.scene.GetNodeByID(res["nodeIDs"]["saliency"])
    assert logic.updateSaliencyDisplay(node, lowerThreshold=0.3) is True
    assert sal.GetScalarVolumeDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    assert sal.GetScalarVolumeDisplayNode().GetApplyThreshold()
    assert logic.updateSaliencyDisplay(node, opacity=0.25) is True
    c = mrml.scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
    assert c.GetForegroundOpacity() == pytest.approx(0.25) and c.GetForegroundVolumeID() == sal.GetID()


def test_study_prediction_files_round_trip(tmp_path):
    img = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    img.SetOrigin((1.0, 2.0, 3.0))
    img.SetSpacing((0.5, 1.0, 2.0))
    pred = StudyPrediction("negspa", {"probability": 0.25}, {"t1": img}, box=BOX)
    pred.save(tmp_path)
    back = StudyPrediction.load(tmp_path)
    assert back.values == {"probability": 0.25} and back.box == BOX and back.task == "negspa"
    assert back.saliency["t1"].GetOrigin() == img.GetOrigin() and back.saliency["t1"].GetSpacing() == img.GetSpacing()
    with pytest.raises(InputError, match="cannot name"):
        StudyPrediction("x", {}, {"../evil": img}).save(tmp_path / "o")
    with pytest.raises(InputError, match="not found"):
        StudyPrediction.load(tmp_path / "missing")


def test_negspa_batch_from_a_study_table_becomes_a_table_node(mrml, negspa_model, tmp_path):
    import json

    for role, seed in (("t1", 1), ("t2", 2), ("stir", 3)):
        sitk.WriteImage(_series(seed, (2.0, 2.0, 4.0)), str(tmp_path / f"{role}.nrrd"))
    (tmp_path / "box.json").write_text(json.dumps(BOX))
    (tmp_path / "studies.csv").write_text("patient_id,t1,t2,stir,roi,crp\n"
                                          "S1,t1.nrrd,t2.nrrd,stir.nrrd,box.json,12\n"
                                          "S2,t1.nrrd,t2.nrrd,missing.nrrd,box.json,\n")
    logic = RheumAIConsoleLogic(mrml.scene)
    rows = logic.predictBatch(tmp_path / "studies.csv", negspa_model, tmp_path / "out", saliency=None,
                              createNodes=True)
    by_id = {str(r.get("study_id") or r.get("patient_id") or r.get("id") or r.get("study")): r for r in rows}
    assert len(by_id) == 2, rows
    assert 0.0 <= by_id["S1"]["probability"] <= 1.0 and by_id["S2"].get("error")
    node = next(mrml.scene.GetNthNode(i) for i in range(mrml.scene.GetNumberOfNodes())
                if mrml.scene.GetNthNode(i).GetAttribute("RheumAI.Role") == "batch_predictions")
    table = table_rows(node)
    assert len(table) == 2 and table[0]["probability"] == pytest.approx(by_id["S1"]["probability"])
    assert "missing.nrrd" in table[1]["error"]


def test_point_and_row_outputs_become_a_point_list_and_a_table(mrml):
    """Outputs found by shape (a radiograph task's landmarks and per-joint rows), not by task."""
    from rheumai_mrml.landmark_scene import read_landmarks

    logic = RheumAIConsoleLogic(mrml.scene)
    img = sitk.Image(40, 30, 1, sitk.sitkFloat32)
    img.SetSpacing((0.2, 0.2, 1.0))
    radiograph = volume_node_from_image(mrml.scene, img, "hand")
    values = {"total": 12.5, "class": 1, "landmarks_lps": [[1.0, 2.0, 0.0], [3.5, -1.0, 0.0]],
              "landmark_labels": ["MCP1", "MCP2"], "joints": [{"joint": "MCP1", "erosion": 2},
                                                             {"joint": "MCP2", "erosion": 0}]}
    ids = logic.showPrediction(StudyPrediction("some_radiograph_task", values), {"hand": radiograph})
    points = mrml.scene.GetNodeByID(ids["landmarks"])
    got = read_landmarks(points)
    assert got["labels"] == ["MCP1", "MCP2"]
    np.testing.assert_allclose(got["lps"], values["landmarks_lps"], atol=1e-6)
    assert points.GetAttribute("RheumAI.Role") == "landmarks"
    assert table_rows(mrml.scene.GetNodeByID(ids["rows:joints"])) == [{"joint": "MCP1", "erosion": 2},
                                                                      {"joint": "MCP2", "erosion": 0}]
    (row,) = table_rows(mrml.scene.GetNodeByID(ids["table"]))
    assert row["total"] == 12.5 and row["study"] == "hand"
    children = {n.GetID() for n in results_of(radiograph)}
    assert {ids["landmarks"], ids["rows:joints"], ids["table"]} <= children
    again = logic.showPrediction(StudyPrediction("some_radiograph_task", values), {"hand": radiograph})
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1  # replaced, not added
    assert again["rows:joints"] == ids["rows:joints"]


def test_point_dicts_per_input_go_under_their_input_with_missing_status(mrml):
    from rheumai_mrml.landmark_scene import read_landmarks

    logic = RheumAIConsoleLogic(mrml.scene)
    img = sitk.Image(20, 20, 1, sitk.sitkFloat32)
    nodes = {v: volume_node_from_image(mrml.scene, img, v) for v in ("cervical", "lumbar")}
    pts = {"cervical": {"view": "cervical", "points": [{"label": "C2 lower", "lps": [1.0, 2.0, 0.0], "status": "ok"}]},
           "lumbar": {"view": "lumbar", "points": [{"label": "L1 upper", "lps": [4.0, 5.0, 0.0], "status": "ok"},
                                                   {"label": "S1 upper", "lps": [6.0, 7.0, 0.0], "status": "missing",
                                                    "reason": "outside the image"}]}}
    ids = logic.showPrediction(StudyPrediction("some_task", {"total": 3, "points": pts}), nodes)
    lumbar = mrml.scene.GetNodeByID(ids["points lumbar"])
    got = read_landmarks(lumbar)
    assert got["labels"] == ["L1 upper", "S1 upper"] and got["status"] == ["ok", "missing"]
    np.testing.assert_allclose(got["lps"][0], [4.0, 5.0, 0.0], atol=1e-6)
    assert lumbar.GetID() in {n.GetID() for n in results_of(nodes["lumbar"])}
    assert ids["points cervical"] in {n.GetID() for n in results_of(nodes["cervical"])}


def test_negspa_job_files_carry_inputs_box_and_clinical_to_the_worker(mrml, negspa_model, capsys):
    """The worker's predict job on a NegSpA-AI study as the panel sends it (volumes as NRRD, the
    box and clinical values as JSON), run in this process; the same result as in-process."""
    import importlib.util
    import json

    from rheumai_mrml.process import PredictJob, worker_script

    images = {"t1": _series(1, (2.0, 2.0, 4.0)), "t2": _series(2, (2.0, 2.0, 4.0)), "stir": _series(3, (2.0, 2.0, 4.0))}
    clinical = {"crp": 20.0, "sex": "F"}
    logic = RheumAIConsoleLogic(mrml.scene)
    study, _, _ = logic.studyInputs(images, BOX, clinical)
    job = PredictJob(negspa_model, study, saliency="gradcam")
    try:
        spec = json.loads(job.worker.job_file.read_text())
        args = spec["args"]
        assert args["study"]["roi"] == BOX and args["study"]["clinical"] == clinical
        assert all(Path(args["study"][r]["image"]).is_file() for r in ("t1", "t2", "stir"))
        mod_spec = importlib.util.spec_from_file_location("rheumai_worker", worker_script())
        worker = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(worker)
        out = worker.job_predict(args)
        assert out["task"] == "negspa"
        pred = StudyPrediction.load(args["out_dir"])
    finally:
        job.close()
    assert not job.worker.work_dir.exists()
    inproc = logic.predictStudy(negspa_model, images, roi=BOX, clinical=clinical, saliency=None)
    assert pred.values["probability"] == pytest.approx(inproc["probability"], abs=1e-5)
    assert set(pred.saliency) == {"t1", "t2", "stir"} and pred.box == BOX
    stages = [line for line in capsys.readouterr().out.splitlines() if line.startswith("@rheumai ")]
    assert len(stages) == 3  # load model, predict, write
