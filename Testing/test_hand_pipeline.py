"""Hand SvdH end to end on a tiny generated cohort: config, train through the task's entry point
(engine, 1 epoch per stage), predict through the engine's Predictor with Grad-CAM, write + read back
the Slicer scene, re-score from corrected landmarks, evaluate, pretrain + fine-tune, stacking ensemble."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk


from rheumai.errors import InputError  # noqa: E402
from rheumai.landmarks import points_to_lps  # noqa: E402
from rheumai.tasks import get_task  # noqa: E402
from rheumai.tasks.hand_svdh.dataset import HandParams, load_cohort  # noqa: E402
from rheumai.tasks.hand_svdh.synth import make_cohort  # noqa: E402
from rheumai.tasks.hand_svdh.train import HandTrainConfig, StageConfig, load_config  # noqa: E402

TINY = {"task": "hand_svdh", "whole": {"epochs": 1, "batch_size": 4}, "landmarks": {"epochs": 1, "batch_size": 4},
        "joints": {"epochs": 1, "batch_size": 32}}
CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hand_pipeline")
    labels = make_cohort(root / "cohort", n=6, seed=1)
    sheet = pd.read_csv(labels)
    sheet["split"] = ["train"] * 3 + ["test"] * 3
    sheet.to_csv(labels, index=False)
    cases = load_cohort(labels, HandParams(), root / "cohort" / "landmarks.csv")
    cfg = {**TINY, "ensemble": {"bases": ["resnet"], "folds": 2}}
    result = get_task("hand_svdh").entry("train")(cfg, labels, root / "run", show_progress=False)
    assert result.ensemble == root / "run" / "ensemble" and result.checkpoint == root / "run" / "model"
    return root, cases, result.checkpoint


def test_config_defaults_and_errors(tmp_path):
    from rheumai.config import load_config as read_any_config

    shipped = load_config(CONFIGS / "hand_svdh.toml")
    assert shipped == HandTrainConfig(source=str(CONFIGS / "hand_svdh.toml"))
    assert read_any_config(CONFIGS / "hand_svdh.toml") == shipped  # rheumai train reads it through the registry
    assert load_config(TINY).whole.epochs == 1 and load_config(TINY).whole.lr == HandTrainConfig().whole.lr
    bad = tmp_path / "bad.toml"
    for text, msg in (('task = "hand_svdh"\n[whole]\nepochs = 3\nlearning_rate = 1\n', "learning_rate"),
                      ('task = "msasss"\n', "not hand_svdh"), ('task = "hand_svdh"\nepoch = 3\n', "unknown key"),
                      ('[whole]\nfinetune = "head_only"\n', "pretrained backbone")):
        bad.write_text(text)
        with pytest.raises(InputError, match=f"bad.toml.*{msg}"):
            load_config(bad)


def test_registered_and_predicts_through_the_engine(trained, tmp_path):
    from rheumai.engine.predict import Predictor
    from rheumai.tasks.hand_svdh.outputs import result_from, write_result

    root, cases, ckpt = trained
    task = get_task("hand_svdh")
    assert task.head == "regression" and task.roles == ("hand",) and "rescore" in task.api
    case = cases[4]
    pred = Predictor(ckpt)
    res = result_from(pred.predict(case.prep.rad.path, saliency="gradcam"))
    v = res["values"]
    assert 0 <= v["total"] <= 140 and 0 <= v["class"] <= 4 and len(v["joints"]) == 22
    assert v["joint_total"] == v["joint_erosion"] + v["joint_jsn"]
    assert res["points_lps"].shape == (22, 3)
    sal = res["saliency"]
    src = case.prep.rad.image
    assert (sal.GetSize(), sal.GetSpacing(), sal.GetOrigin()) == (src.GetSize(), src.GetSpacing(), src.GetOrigin())
    arr = sitk.GetArrayFromImage(sal)
    assert arr.min() >= 0 and arr.max() <= 1 + 1e-6
    # per-joint points are in the file's own pixel frame: pixel -> LPS through the image's geometry
    first = v["joints"][0]
    lps = src.TransformContinuousIndexToPhysicalPoint((first["x_px"], first["y_px"], 0.0))
    np.testing.assert_allclose(lps, (first["L"], first["P"], first["S"]), atol=1e-6)

    # batch prediction is the engine's (the task's api["predict_batch"]): one row per radiograph, errors as rows
    rows = task.entry("predict_batch")(pred, [case.prep.rad.path, str(tmp_path / "missing.dcm")], tmp_path / "batch",
                                       saliency=None)
    ok, bad = sorted(rows, key=lambda r: bool(r.get("error")))
    assert ok["total"] == v["total"] and not ok.get("error") and "no such file" in bad["error"]
    assert (tmp_path / "batch" / "predictions.csv").is_file()

    from rheumai_mrml.radiograph_scene import point_list_lps
    from rheumai_mrml.scene import load_scene

    files = write_result(tmp_path, "hand1", res, scene=True)
    ctx = load_scene(files["scene_file"])
    try:
        s = ctx.scene
        assert s.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2  # radiograph + saliency
        assert s.GetNumberOfNodesByClass("vtkMRMLTableNode") == 2  # result + per-joint table
        pts, labels = point_list_lps(s.GetFirstNodeByClass("vtkMRMLMarkupsFiducialNode"))
        np.testing.assert_allclose(pts, res["points_lps"], atol=1e-3)
        assert labels == res["labels"]
        table = [n for n in (s.GetNthNodeByClass(i, "vtkMRMLTableNode") for i in range(2))
                 if n.GetAttribute("RheumAI.Role") == "rows"][0]
        assert table.GetNumberOfRows() == 22
    finally:
        ctx.close()


def test_rescore_uses_corrected_points(trained):
    from rheumai.tasks.hand_svdh.predict import rescore

    _, cases, ckpt = trained
    case = cases[5]
    true_lps = points_to_lps(case.prep.rad.image, case.prep.to_source(case.points_canon))
    res = rescore(ckpt, case.prep.rad.path, true_lps)
    assert res.values["landmarks_source"] == "corrected"
    np.testing.assert_allclose(np.array(res.values["landmarks_lps"]), true_lps, atol=1e-2)
    with pytest.raises(ValueError, match="22, 3"):
        rescore(ckpt, case.prep.rad.path, true_lps[:5])


def test_evaluation_report(trained, tmp_path):
    root, cases, ckpt = trained
    evaluate = get_task("hand_svdh").entry("evaluate")
    res = evaluate(ckpt, root / "cohort" / "labels.csv", tmp_path, show_progress=False)
    assert res["n"] == 3 and [c["patient_id"] for c in res["cases"]] == [c.patient_id for c in cases[3:]]
    assert set(res["ensemble"]) == {"resnet", "stacked"}  # the stacking ensemble trained beside the model
    res = evaluate(ckpt, root / "cohort" / "labels.csv", tmp_path, split="all", show_progress=False)
    for key in ("total", "joint_total"):
        assert {"pcc", "rmse", "mae", "icc", "bland_altman"} <= set(res[key])
    assert np.array(res["class"]["confusion"]).sum() == len(cases)
    assert res["landmarks"]["n_points"] == 22 * len(cases) and len(res["per_joint"]) == 22
    md = (tmp_path / "report.md").read_text()
    assert "| PCC |" in md and "truth \\ predicted" in md and "| MCP2 |" in md
    assert (tmp_path / "agreement.png").stat().st_size > 1000 and (tmp_path / "metrics.json").is_file()
    with pytest.raises(InputError, match="no patients in split 'val'"):
        evaluate(ckpt, root / "cohort" / "labels.csv", tmp_path, split="val", show_progress=False)


def test_command_line_train_and_evaluate(trained, tmp_path):
    from rheumai.cli import main

    root, _, _ = trained
    cfg = tmp_path / "tiny.toml"
    stages = "".join(f"[{k}]\nepochs = 1\nbatch_size = {32 if k == 'joints' else 4}\n"
                     for k in ("whole", "landmarks", "joints"))
    cfg.write_text('task = "hand_svdh"\n' + stages)
    labels = str(root / "cohort" / "labels.csv")
    assert main(["train", "--config", str(cfg), "--manifest", labels, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "model" / "model_card.json").is_file()
    assert main(["evaluate", "--model", str(tmp_path / "run" / "model"), "--manifest", labels,
                 "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    metrics = __import__("json").loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["split"] == "test" and (tmp_path / "eval" / "report.md").is_file()


def test_pretrain_finetune_and_stacking(trained, tmp_path):
    from rheumai.tasks.hand_svdh.ensemble import fit_stacking, load_stacking, predict_stacked
    from rheumai.tasks.hand_svdh.model import default_architecture
    from rheumai.tasks.hand_svdh.train import pretrain_backbone, train_whole

    root, cases, _ = trained
    weights = pretrain_backbone(root / "cohort" / "labels.csv", "hand_length_mm", tmp_path / "pre.safetensors",
                                cfg=StageConfig(epochs=1, batch_size=4))
    arch = default_architecture("resnet")["whole"]
    net = train_whole(cases[:4], None, arch, StageConfig(epochs=1, batch_size=4), tmp_path / "ft",
                      init_backbone=weights,
                      finetune="head_only")
    from safetensors.torch import load_file

    pre = load_file(str(weights))
    conv = "backbone.conv1.weight"
    assert np.allclose(net.state_dict()[conv].numpy(), pre[conv].numpy())  # frozen backbone kept its weights
    with pytest.raises(ValueError, match="pretrained backbone"):
        train_whole(cases[:4], None, arch, StageConfig(epochs=1), tmp_path / "x", finetune="last_blocks")
    archs = {"resnet": arch, "mobilenetv2": default_architecture("mobilenetv2")["whole"]}
    ens, nets = fit_stacking(cases, archs, StageConfig(epochs=1, batch_size=4), tmp_path / "ens", k=2,
                             show_progress=False)
    assert all(c >= 0 for c in ens.coef) and len(nets["resnet"]) == 2
    cols = predict_stacked(ens, nets, cases[:2])
    assert cols["stacked"].shape == (2,) and (tmp_path / "ens" / "stacking.json").is_file()
    np.testing.assert_allclose(predict_stacked(*load_stacking(tmp_path / "ens"), cases[:2])["stacked"],
                               cols["stacked"], rtol=1e-5)
