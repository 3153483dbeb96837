"""mSASSS pipeline: crops, imbalance sampling, scoring from points, evaluation, a tiny end-to-end
training through the task's train entry (config + cohort table), checkpoint -> the engine's
Predictor -> re-score -> evaluate entry -> Slicer scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rheumai.tasks.msasss.anatomy import disc_levels, point_names, scored_corners
from rheumai.tasks.msasss.crops import fit_grid, level_grid
from rheumai.tasks.msasss.dataset import LevelCropDataset, imbalance_indices, load_cohort, split_patients
from rheumai.tasks.msasss.evaluate import corner_metrics
from rheumai.tasks.msasss.synth import make_cohort

SMALL = {"init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1], "crop_size": 32}
STAGE = {"epochs": 1, "batch_size": 8, "lr": 1e-3}
TINY = {"task": "msasss", "separate_views": True, "split": [0.34, 0.33, 0.33],
        "landmarks": {**STAGE, "arch": {"channels": [4, 8, 16], "input_size": [64, 48]}},
        "refine": {**STAGE, "arch": {"channels": [4, 8], "crop_size": 32}},
        "lesions": {**STAGE, "arch": SMALL}, "ordinal": {**STAGE, "arch": SMALL}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("msasss")
    make_cohort(root / "cohort", n=3, seed=5)
    return root


@pytest.fixture(scope="module")
def records(cohort):
    return load_cohort(cohort / "cohort")


def test_level_crop_holds_both_corners_oriented_along_the_spine(records):
    rec = records[0]
    for lvl in range(6):
        g = level_grid(rec.points_xy, rec.view, lvl, rec.spacing_mm, size=48)
        names = point_names(rec.view)
        corners = g.from_source(rec.points_xy[[names.index(c) for c in disc_levels(rec.view)[lvl].corners]])
        assert corners[0, 1] < 23.5 < corners[1, 1]            # lower corner of the vertebra above on top
        assert np.allclose(corners[:, 0], 23.5 - 0.2 * 48, atol=3.0)  # anterior side, left of centre
        idx = [names.index(c) for c in disc_levels(rec.view)[lvl].corners]
        assert np.allclose(g.to_source(corners), rec.points_xy[idx])
    g = fit_grid((320, 256), (160, 128))
    assert np.allclose(g.to_source(g.from_source(rec.points_xy)), rec.points_xy)


def test_vertical_flip_swaps_the_corner_labels(records):
    rec_i = next(i for i, r in enumerate(records) for lv in disc_levels(r.view)
                 if r.findings[lv.corners[0]] != r.findings[lv.corners[1]])
    rec = records[rec_i]
    lvl = next(k for k, lv in enumerate(disc_levels(rec.view))
               if rec.findings[lv.corners[0]] != rec.findings[lv.corners[1]])
    plain = LevelCropDataset(records, index=[(rec_i, lvl)])[0]
    seen = set()
    for seed in range(20):
        s = LevelCropDataset(records, index=[(rec_i, lvl)], augment=True, jitter=(0, 0, 0), seed=seed)[0]
        x = s["input"].ravel()
        flipped = bool(torch.corrcoef(torch.stack([x, plain["input"].flip(1).ravel()]))[0, 1] >
                       torch.corrcoef(torch.stack([x, plain["input"].ravel()]))[0, 1])
        seen.add(flipped)
        for les in ("erosion", "sclerosis", "squaring", "syndesmophyte", "ordinal", "not_scorable"):
            want = plain["target"][les].flip(0) if flipped else plain["target"][les]
            assert torch.equal(torch.nan_to_num(s["target"][les], -1), torch.nan_to_num(want, -1))
    assert seen == {True, False}


def test_imbalance_indices_reduce_negatives_and_repeat_positives():
    pos = np.zeros(200, bool)
    pos[:10] = True
    idx = imbalance_indices(pos, np.random.default_rng(0), neg_per_pos=3, pos_repeat=3)
    assert len(idx) == 30 + 30 and np.sum(pos[idx]) == 30 and set(np.flatnonzero(pos)) <= set(idx)
    assert len(imbalance_indices(np.zeros(5, bool), np.random.default_rng(0))) == 5
    split = split_patients([f"P{i}" for i in range(10)], seed=1)
    assert sorted(split.values()).count("test") == 3


def _truth_result(rec):
    levels = []
    for lv in disc_levels(rec.view):
        levels.append({"level": lv.name, "corners": list(lv.corners),
                       "lesions": {k: [float(rec.findings[c][k]) for c in lv.corners]
                                   for k in ("erosion", "sclerosis", "squaring", "syndesmophyte")},
                       "bridging": float(rec.bridged[lv.name]),
                       "scorable": [float(rec.scorable[c]) for c in lv.corners]})
    return {"points_xy": rec.points_xy.tolist(), "scores": dict(rec.scores), "levels": levels,
            "ordinal_scores": dict(rec.scores)}


def test_evaluation_of_a_perfect_prediction(records):
    m, rows = corner_metrics(records, [_truth_result(r) for r in records])
    assert m["corners"]["accuracy"]["value"] == 1.0 and len(rows) == 12 * len(records)
    assert m["keypoints_corners"]["median_mm"]["value"] == 0.0
    assert m["total"]["n_compared"] + m["total"]["n_without_total"] == 3
    if "mae" in m["total"]:
        assert m["total"]["mae"]["value"] == 0.0
    assert all(e["specificity"]["value"] == 1.0 or np.isnan(e["specificity"]["value"]) for e in m["lesions"].values())
    worse = [_truth_result(r) for r in records]
    worse[0]["scores"] = {c: (None if s is None else (s + 1) % 4) for c, s in worse[0]["scores"].items()}
    m2, _ = corner_metrics(records, worse)
    assert m2["corners"]["accuracy"]["value"] < 1.0


@pytest.fixture(scope="module")
def tiny_model(cohort, records):
    from rheumai.tasks.msasss.train import train

    torch.set_num_threads(1)
    res = train(TINY, cohort / "cohort" / "studies.csv", cohort / "run", show_progress=False)
    assert res.checkpoint == cohort / "run" / "model" and (cohort / "run" / "landmarks" / "history.csv").is_file()
    return res.checkpoint


def _study(records, pid):
    return {r.view: r.path for r in records if r.patient_id == pid}


def test_scores_from_points_flag_missing_and_implausible(records, tiny_model):
    from rheumai.tasks.msasss.predict import rescore_points

    rec = records[0]
    gone = scored_corners(rec.view)[1]
    given = {r.view: r.points_xy for r in records if r.patient_id == rec.patient_id}
    res = rescore_points(tiny_model, _study(records, rec.patient_id), {rec.view: {gone: None}}, points_xy=given)
    view = res["views"][rec.view]
    assert set(view["scores"]) == set(scored_corners(rec.view)) and np.allclose(view["points_xy"], rec.points_xy)
    assert view["scores"][gone] is None and "marked missing" in view["not_scorable"][gone]
    assert res["landmarks_source"] == "corrected" and view["confidence"] is None
    bad = rescore_points(tiny_model, _study(records, rec.patient_id), {},
                         points_xy={**given, rec.view: rec.points_xy[::-1].copy()})["views"][rec.view]
    assert not bad["check"]["view_ok"] and all(v is None for v in bad["scores"].values())


def test_checkpoint_predictor_rescore_and_scene(cohort, records, tiny_model):
    from rheumai import api
    from rheumai.checkpoint import load_checkpoint
    from rheumai.tasks.msasss.predict import rescore_points

    folder = tiny_model
    model, card = load_checkpoint(folder)
    assert card["task"] == "msasss" and type(model).__name__ == "MsasssSystem"
    assert model.crop_net("lesions", "cervical") is not model.crop_net("lesions", "lumbar")  # crop models per view
    pid = records[0].patient_id
    study = {**_study(records, pid), "id": pid}
    # The console API (the task's "predict" entry): the engine's predictor with the task's hooks.
    res = api.predict(folder, study, out_dir=cohort / "pred").values
    assert sum(len(p["points"]) for p in res["points"].values()) == 24 and (cohort / "pred" / f"{pid}.json").is_file()
    assert res["total"]["n_scored"] + res["total"]["n_missing"] == 24
    assert res["corners_scored"] == res["total"]["n_scored"] and res["summary"].startswith("mSASSS ")
    assert len(res["corner_table"]) == 24 and {r["corner"] for r in res["corner_table"]} == {
        p["label"] for v in res["points"].values() for p in v["points"]}
    # Re-score: move one corner by 3 mm, mark another missing.
    p0 = res["points"]["lumbar"]["points"][0]
    moved = np.asarray(p0["lps"]) + [3.0, 0.0, 0.0]
    re = rescore_points(folder, study, {"lumbar": {p0["label"]: moved, "L3 upper": None}}, previous=res)
    got = {p["label"]: p for p in re["points"]["lumbar"]["points"]}
    assert np.allclose(got[p0["label"]]["lps"], moved, atol=1e-6)
    assert got["L3 upper"]["status"] == "missing" and re["views"]["lumbar"]["scores"]["L3 upper"] is None

    from rheumai.tasks.msasss.predict import write_scene
    from rheumai_mrml.landmark_scene import image_landmark_nodes, read_landmarks
    from rheumai_mrml.scene import load_scene

    path = write_scene(cohort / "scene" / f"{pid}.mrb", re, study)
    ctx = load_scene(path)
    try:
        nodes = image_landmark_nodes(ctx.scene)
        assert len(nodes) == 2
        for node in nodes:
            view = "cervical" if "cervical" in node.GetName() else "lumbar"
            back = read_landmarks(node)
            assert back["labels"] == scored_corners(view)
            want = {p["label"]: p for p in re["points"][view]["points"]}
            for label, lps, st, pred in zip(back["labels"], back["lps"], back["status"], back["predicted_lps"]):
                assert st == want[label]["status"]
                if st == "ok":
                    assert np.allclose(lps, want[label]["lps"], atol=1e-3)
                else:
                    assert np.isnan(lps).all() and np.allclose(pred, want[label]["lps"], atol=1e-3)
        assert "missing" in read_landmarks(next(n for n in nodes if "lumbar" in n.GetName()))["status"]
    finally:
        ctx.close()


def test_paper_configuration_is_one_densenet121_per_output(one_torch_thread):
    from monai.networks.nets import DenseNet121

    from rheumai.tasks.msasss.model import LESION_OUTPUTS, CropNet, architecture, make_heads

    net = CropNet(architecture("lesions", "paper"))
    assert not net.shared and set(net.nets) == set(LESION_OUTPUTS)
    assert all(isinstance(m, DenseNet121) for m in net.nets.values())
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 1, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (1, n) for k, n in LESION_OUTPUTS.items()}
    heads = make_heads("lesions")
    target = torch.tensor([[1.0, float("nan")]])
    assert torch.isfinite(heads["erosion"].loss(torch.zeros(1, 2), target))


def test_shared_crop_model_trains_on_both_views(tmp_path, records, one_torch_thread):
    from rheumai.tasks.msasss.model import CropNet, architecture
    from rheumai.tasks.msasss.train import Run, StageConfig, TrainConfig, train_crop_model

    arch = architecture("lesions", init_features=4, growth_rate=4, block_config=[1, 1, 1], crop_size=32)
    run = Run(TrainConfig(lesions=StageConfig(epochs=1, batch_size=8)), tmp_path)
    net = train_crop_model("lesions", records[:4], records[4:], run, arch)
    assert isinstance(net, CropNet) and net.shared
    assert (tmp_path / "lesions" / "history.csv").is_file()


def test_train_config_file_resume_and_evaluate_entry(cohort, tiny_model, tmp_path):
    import json

    from rheumai.errors import InputError
    from rheumai.tasks import get_task

    task = get_task("msasss")
    lines = ['task = "msasss"', 'manifest = "cohort/studies.csv"', "separate_views = true",
             "split = [0.34, 0.33, 0.33]"]
    for stage, d in TINY.items():
        if isinstance(d, dict):
            arch = ", ".join(f"{k} = {json.dumps(v)}" for k, v in d["arch"].items())
            lines += [f"[{stage}]", "epochs = 1", "batch_size = 8", "lr = 1e-3", f"arch = {{ {arch} }}"]
    cfg = cohort / "tiny.toml"
    cfg.write_text("\n".join(lines) + "\n")
    # The run of the fixture is finished: resuming it reloads every stage and saves the same weights.
    res = task.entry("train")(cfg, None, cohort / "run", resume=True, show_progress=False)
    assert res.checkpoint is not None and not res.stopped
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "msasss"\n[lesions]\nepoch = 3\n')
    with pytest.raises(InputError, match="bad.toml.*epoch"):
        task.entry("train")(bad, cohort / "cohort" / "studies.csv", tmp_path / "run")
    bad.write_text('task = "negspa"\n')
    with pytest.raises(InputError, match="bad.toml.*not msasss"):
        task.entry("train")(bad, cohort / "cohort" / "studies.csv", tmp_path / "run")
    with pytest.raises(InputError, match="already holds|earlier run"):
        task.entry("train")(cfg, None, cohort / "run", show_progress=False)
    # The one command line: the config names the task (its manifest too); the card names it for evaluate.
    from rheumai.cli import main

    assert main(["train", "--config", str(cfg), "--out", str(cohort / "run"), "--resume", "--quiet"]) == 0
    assert main(["evaluate", "--model", str(res.checkpoint), "--manifest", str(cohort / "cohort" / "studies.csv"),
                 "--out", str(tmp_path / "cli"), "--split", "test", "--quiet"]) == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["n_patients"] == 1
    m = task.entry("evaluate")(res.checkpoint, cohort / "cohort" / "studies.csv", tmp_path / "eval", split="all",
                               show_progress=False)
    assert m["n_patients"] == 3 and m["n_corners"] == 72 and 0 <= m["corners"]["accuracy"]["value"] <= 1
    assert (tmp_path / "eval" / "metrics.json").is_file() and "# mSASSS evaluation" in (
        tmp_path / "eval" / "report.md").read_text()


def test_shipped_config_is_the_default_run():
    from dataclasses import asdict
    from pathlib import Path

    from rheumai.tasks.msasss.train import STAGES, TrainConfig, load_config

    cfg, _ = load_config(Path(__file__).parents[1] / "configs" / "msasss.toml")
    default = TrainConfig()
    assert cfg.system_architecture() == default.system_architecture()
    assert all(getattr(cfg, s).fit_config(0) == getattr(default, s).fit_config(0) for s in STAGES)
    assert {k: v for k, v in asdict(cfg).items() if k not in STAGES} == \
        {k: v for k, v in asdict(default).items() if k not in STAGES}
