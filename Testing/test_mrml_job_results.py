"""Every result in the scene: a prediction, the dataset flow, a batch table and the training charts
written with slicer-core's own storage nodes and read back with every value intact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")

from rheumai_mrml.job_results import batch_nodes, dataset_nodes, training_nodes  # noqa: E402
from rheumai_mrml.plots import chart_series  # noqa: E402
from rheumai_mrml.scene import build_result_scene, load_scene, new_scene, save_scene  # noqa: E402
from rheumai_mrml.tables import results_table, rows_table, table_rows  # noqa: E402

FLOW = {  # the structure of rheumai.dataset's flow.json
    "rules": {}, "series_rule": "sagittal T2", "start": 44, "included": 40, "not_in_label_sheet": [],
    "steps": [
        {"key": "baseline_study", "title": "Baseline MRI study found", "remaining": 42, "n_excluded": 2, "note": "",
         "excluded": [{"patient_id": "P015", "reason": "no MRI study on baseline date 2015-04-02"},
                      {"patient_id": "", "reason": "label row without a patient id"}]},
        {"key": "followup", "title": "Follow-up >= 1000 days", "remaining": 40, "n_excluded": 2,
         "note": "2 intermediate", "excluded": [{"patient_id": "P017", "reason": "follow-up 700 days < 1000"},
                                                {"patient_id": "P018", "reason": "\tstarts with a tab"}]}],
    "split": {"train": {"n": 24, "positive": 7, "negative": 17}, "test": {"n": 16, "positive": 4, "negative": 12}},
}
BATCH = [  # a study loaded by Slicer has no source path; a failed study has no probability
    {"source_path": None, "series_uid": None, "probability": 0.8125, "label": 1, "threshold": 0.4, "model_id": "m"},
    {"source_path": "/data/b.nii.gz", "series_uid": "1.2.3", "probability": 0.125, "label": 0, "threshold": 0.4,
     "model_id": "m"},
    {"source_path": "/data/c", "error": "c: not a DICOM folder"},
]
TRAIN = {"history": [{"epoch": 1, "train_loss": 0.69, "val_loss": 0.7, "val_auc": math.nan, "lr": 1e-4},
                     {"epoch": 2, "train_loss": 0.55, "val_loss": 0.61, "val_auc": 0.75, "lr": 1e-4}],
         "val_report": {"roc": {"fpr": [0.0, 0.0, 0.5, 1.0], "tpr": [0.0, 0.5, 1.0, 1.0],
                                "thresholds": [1.0, 0.8, 0.4, 0.1]}}}


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert list(ra) == list(rb)
        for k in ra:
            if isinstance(ra[k], float) and math.isnan(ra[k]):
                assert isinstance(rb[k], float) and math.isnan(rb[k]), k
            else:
                assert ra[k] == rb[k] and type(ra[k]) is type(rb[k]), (k, ra[k], rb[k])


def _roles(scene) -> dict:
    out = {}
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        if n.GetAttribute("RheumAI.Role"):
            out[n.GetAttribute("RheumAI.Role")] = n
    return out


def test_leading_empty_value_survives_slicers_table_storage(mrml, tmp_path):
    """The fault: an empty first field shifted every later value one column left on reading."""
    result = {"source_path": None, "series_uid": None, "probability": 0.73, "label": 1, "threshold": 0.5,
              "model_id": "m", "tta_mean": None}
    for node in (results_table(mrml.scene, result), rows_table(mrml.scene, [{"a": "", "p": 1.0}, {"a": "x", "p": 2.0}]),
                 rows_table(mrml.scene, [{"a": " lead", "p": 1.0}])):
        storage = mrml.scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
        storage.SetFileName(str(tmp_path / f"{node.GetID()}.tsv"))
        assert storage.WriteData(node)
        back = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode")
        assert storage.ReadData(back)
        _same(table_rows(node), table_rows(back))
    (row,) = table_rows(results_table(mrml.scene, result))
    assert row["study"] == "study 1" and row["probability"] == 0.73 and row["threshold"] == 0.5


@pytest.mark.parametrize("suffix", [".mrb", ".mrml"])
def test_scene_with_every_result_round_trips(tmp_path, t2_crop_path, suffix):
    src = sitk.ReadImage(str(t2_crop_path), sitk.sitkFloat32)
    sal = sitk.GetImageFromArray(np.linspace(0, 1, src.GetNumberOfPixels(), dtype=np.float32)
                                 .reshape(sitk.GetArrayFromImage(src).shape))
    sal.CopyInformation(src)
    prediction = dict(BATCH[0], saliency="gradcam")
    ctx = new_scene()
    try:
        build_result_scene(ctx.scene, src, sal, prediction, name="case7")
        dataset_nodes(ctx.scene, FLOW)
        batch_nodes(ctx.scene, BATCH)
        training_nodes(ctx.scene, TRAIN)
        written = {role: table_rows(n) for role, n in _roles(ctx.scene).items() if n.IsA("vtkMRMLTableNode")}
        out = save_scene(ctx.scene, tmp_path / f"all{suffix}")
    finally:
        ctx.close()
    assert set(written) == {"result", "dataset_flow", "dataset_excluded", "dataset_split", "batch_predictions",
                            "training_history", "training_roc"}
    ctx = load_scene(out)
    try:
        roles = _roles(ctx.scene)
        for role, rows in written.items():
            _same(rows, table_rows(roles[role]))
        # the values themselves, not just "same as written"
        (pred,) = table_rows(roles["result"])
        assert (pred["study"], pred["probability"], pred["threshold"], pred["source_path"]) == ("case7", 0.8125, 0.4, "")
        flow = table_rows(roles["dataset_flow"])
        assert [r["remaining"] for r in flow] == [44, 42, 40, 40] and flow[2]["note"] == "2 intermediate"
        excl = table_rows(roles["dataset_excluded"])
        assert [r["patient_id"] for r in excl] == ["P015", "", "P017", "P018"] and excl[1]["row"] == 2
        assert excl[3]["reason"] == " starts with a tab"  # TSV cannot hold a tab: written as a space
        batch = table_rows(roles["batch_predictions"])
        assert [r["study"] for r in batch] == ["study 1", "b", "c"]
        assert math.isnan(batch[2]["probability"]) and batch[2]["error"] == "c: not a DICOM folder"
        hist = table_rows(roles["training_history"])
        assert math.isnan(hist[0]["val_auc"]) and hist[1]["val_auc"] == 0.75
        loss = roles["training_loss_chart"]
        assert loss.IsA("vtkMRMLPlotChartNode") and loss.GetTitle() == "Training: loss"
        assert [(s.GetXColumnName(), s.GetYColumnName(), s.GetTableNode().GetID()) for s in chart_series(loss)] \
            == [("epoch", "train_loss", roles["training_history"].GetID()),
                ("epoch", "val_loss", roles["training_history"].GetID())]
        roc = roles["training_roc_chart"]
        assert [s.GetYColumnName() for s in chart_series(roc)] == ["tpr", "chance"]
        assert chart_series(roc)[1].GetLineStyle() == slicer.vtkMRMLPlotSeriesNode.LineStyleDash
        assert [r["tpr"] for r in table_rows(roles["training_roc"])] == [0.0, 0.5, 1.0, 1.0]
        assert roles["training_auc_chart"].GetYAxisTitle() == "AUC"
    finally:
        ctx.close()


def test_training_history_with_restarting_epochs_uses_row_numbers(mrml):
    hist = [{"stage": 1, "epoch": 0, "loss": 0.7}, {"stage": 1, "epoch": 1, "loss": 0.6},
            {"stage": 2, "epoch": 0, "loss": 0.5}]
    nodes = training_nodes(mrml.scene, {"history": hist}, name="NegSpA")
    assert set(nodes) == {"training_history", "training_loss_chart"}
    (series,) = chart_series(nodes["training_loss_chart"])
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("row", "loss")
    assert [r["row"] for r in table_rows(nodes["training_history"])] == [1, 2, 3]
    assert training_nodes(mrml.scene, {"history": []}) == {}
