"""NegSpA-AI: clinical encoding, MixCut, box + geometry, generated cohort, two-stage training,
checkpoint round trip, per-sequence saliency in each series' geometry, and the CLI end to end.

Kept small (ResNet-18 branches, 32 px halves, 8-10 subjects at 4 mm) to stay well under two
minutes; torch runs single-threaded here because the CI box has two shared cores.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from rheumai.errors import InputError
from rheumai.geometry import Grid
from rheumai.tasks.negspa.clinical import NAMES, ClinicalEncoder, read_clinical_csv
from rheumai.tasks.negspa.mixcut import mixcut
from rheumai.tasks.negspa.preprocess import Box, NegSpaParams, preprocess, read_box
from rheumai.tasks.negspa.synth import make_cohort, read_cohort

SIZE = (32, 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("spa") / "cohort", n=10, seed=5, spacing=4.0, show_progress=False)


# ---------------------------------------------------------------- clinical

def test_clinical_parsing_and_missing_encoding(tmp_path):
    csv = tmp_path / "clin.csv"
    csv.write_text("patient_id,inflammatory_back_pain,crp,sex,age\nA,yes,10,M,30\nB,,NA,F,\nC,0,2.5,,40\n")
    df = read_clinical_csv(csv)
    assert df.loc[0, "inflammatory_back_pain"] == 1 and math.isnan(df.loc[1, "crp"]) and df.loc[1, "sex"] == 0
    assert df["uveitis"].isna().all()  # absent column = missing, not "absent"
    enc = ClinicalEncoder.fit(df[list(NAMES)])
    x = enc.encode(df[list(NAMES)])
    n = len(NAMES)
    assert x.shape == (3, 2 * n) and np.isfinite(x).all()
    j = NAMES.index("crp")
    assert x[1, n + j] == 1 and x[0, n + j] == 0  # explicit missing flag
    assert x[1, j] == pytest.approx((enc.fill["crp"] - enc.mean["crp"]) / enc.std["crp"])  # imputed
    assert np.array_equal(ClinicalEncoder.from_dict(json.loads(json.dumps(enc.to_dict()))).encode(df), x)
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,crp,uveitis\nA,lots,no\n")
    with pytest.raises(InputError, match="bad.csv.*crp"):
        read_clinical_csv(bad)
    bad.write_text("patient_id,age\nA,250\n")
    with pytest.raises(InputError, match="plausible range"):
        read_clinical_csv(bad)


# ---------------------------------------------------------------- MixCut

def test_mixcut_box_shared_label_matches_pixel_mass_and_seeded():
    n, h, w = 6, 40, 48
    # each sample constant = its label-like value: the mixed mean must equal the mixed target
    vals = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.3, 0.7])
    imgs = vals.view(n, 1, 1, 1, 1, 1).expand(n, 3, 2, 3, h, w).clone()
    seen_partial = False
    for seed in range(20):
        r = mixcut(imgs, vals, alpha=1.0, generator=torch.Generator().manual_seed(seed))
        r0, r1, c0, c1 = r.box
        area = (r1 - r0) * (c1 - c0) / (h * w)
        assert r.weight == pytest.approx((1 - r.lam) * area)
        # label weight == the partner's fraction of pixel mass, per sample, for every sequence / half / slice
        np.testing.assert_allclose(r.images.mean(dim=(-1, -2)).numpy(),
                                   r.targets.view(n, 1, 1, 1).expand(n, 3, 2, 3).numpy(), atol=1e-5)
        changed = (r.images != imgs).any(dim=0)  # (3, 2, 3, H, W)
        assert all(torch.equal(changed[s, hv, c], changed[0, 0, 0]) for s in range(3) for hv in range(2) for c in range(3))
        if changed.any():
            rows, cols = torch.nonzero(changed[0, 0, 0], as_tuple=True)
            assert rows.min() >= r0 and rows.max() < r1 and cols.min() >= c0 and cols.max() < c1
            seen_partial = seen_partial or 0 < area < 1
    assert seen_partial
    a = mixcut(imgs, vals, 1.0, torch.Generator().manual_seed(3))
    b = mixcut(imgs, vals, 1.0, torch.Generator().manual_seed(3))
    assert a.box == b.box and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    off = mixcut(imgs, vals, alpha=0.0)
    assert off.weight == 0 and torch.equal(off.images, imgs)


# ---------------------------------------------------------------- box + geometry

def test_box_formats(tmp_path):
    b = Box((-80, -30, -50), (80, 30, 50))
    (tmp_path / "a.json").write_text(json.dumps({"min_lps": [-80, -30, -50], "max_lps": [80, 30, 50]}))
    (tmp_path / "b.json").write_text(json.dumps({"center_lps": [0, 0, 0], "size_mm": [160, 60, 100]}))
    (tmp_path / "c.csv").write_text("min_x,min_y,min_z,max_x,max_y,max_z\n-80,-30,-50,80,30,50\n")
    # Slicer markups ROI in RAS: centre (R=5, A=2, S=1) -> LPS (-5, -2, 1)
    (tmp_path / "d.mrk.json").write_text(json.dumps({"markups": [{"type": "ROI", "coordinateSystem": "RAS",
                                                                  "center": [5, 2, 1], "size": [160, 60, 100]}]}))
    for name in ("a.json", "b.json", "c.csv"):
        assert read_box(tmp_path / name) == b
    np.testing.assert_allclose(read_box(tmp_path / "d.mrk.json").center, [-5, -2, 1])
    (tmp_path / "e.json").write_text(json.dumps({"min_lps": [0, 0, 0], "max_lps": [0, 1, 1]}))
    with pytest.raises(InputError, match="e.json"):
        read_box(tmp_path / "e.json")


def _centroid(arr: np.ndarray) -> np.ndarray:
    idx = np.indices(arr.shape).reshape(3, -1).T[:, ::-1]  # (k, j, i) -> (i, j, k)
    w = arr.reshape(-1).astype(float)
    return (idx * w[:, None]).sum(0) / w.sum()


def test_geometry_round_trip_per_sequence(cohort):
    """A point marked in each series is found at the same LPS point on the half grids, and a map
    on the half grids comes back at that point in the series' own grid."""
    row = read_cohort(cohort).iloc[0]
    box = read_box(row["box"])
    target = box.center + np.array([-30.0, 0.0, 8.0])  # in the patient-right joint half
    images = {}
    for role in ("t1", "t2", "stir"):
        src = sitk.ReadImage(row[role], sitk.sitkFloat32)
        g = Grid.of(src)
        idx = np.indices(src.GetSize()[::-1]).reshape(3, -1).T[:, ::-1]
        d = np.linalg.norm(g.index_to_physical(idx) - target, axis=1).reshape(src.GetSize()[::-1])
        blob = sitk.GetImageFromArray(np.exp(-0.5 * (d / 5.0) ** 2).astype(np.float32))
        blob.CopyInformation(src)
        images[role] = blob
    sample = preprocess({**images, "box": box}, NegSpaParams(size=(48, 48), norm="none"))
    for role, seq in sample.sequences.items():
        assert seq.array[1].max() < 0.05 * seq.array[0].max()  # found in the right half only
        found = seq.grids[0].index_to_physical(_centroid(seq.array[0]))
        assert np.linalg.norm(found - target) < 1.5, role
        back = seq.to_source(seq.array)
        assert Grid.of(back) == Grid.of(images[role])  # exactly the series' geometry
        arr = sitk.GetArrayFromImage(back)
        assert np.linalg.norm(Grid.of(back).index_to_physical(_centroid(arr)) - target) < 2.0, role
    # the three sequences are sampled on the same planes (aligned inputs), each mapped back to its own grid
    assert sample.sequences["t1"].grids == sample.sequences["t2"].grids == sample.sequences["stir"].grids
    # columns run lateral -> medial in both halves (the left half is mirrored)
    gr, gl = sample.sequences["t2"].grids
    assert gr.direction_matrix[0, 0] > 0.9 and gl.direction_matrix[0, 0] < -0.9


def test_outside_box_and_missing_series_are_clear_errors(cohort):
    row = read_cohort(cohort).iloc[0]
    far = Box((900, 900, 900), (1000, 1000, 1000))
    with pytest.raises(InputError, match="outside the t1 series"):
        preprocess({"t1": row["t1"], "t2": row["t2"], "stir": row["stir"], "box": far})
    with pytest.raises(InputError, match="missing: stir"):
        preprocess({"t1": row["t1"], "t2": row["t2"], "box": far})


def test_bare_2d_image_is_a_clear_error_also_through_the_predict_hook(cohort):
    from rheumai.tasks.negspa.predict import load_sample

    row = read_cohort(cohort).iloc[0]
    t1 = sitk.ReadImage(row["t1"])
    flat = t1[:, :, t1.GetSize()[2] // 2]
    card = {"preprocessing": NegSpaParams(size=SIZE).to_dict()}
    with pytest.raises(InputError, match="t1 image.*2D"):
        preprocess({"t1": flat, "t2": row["t2"], "stir": row["stir"], "box": row["box"]})
    with pytest.raises(InputError, match="t1 image.*2D"):
        load_sample({"t1": flat, "t2": row["t2"], "stir": row["stir"], "roi": row["box"]}, card)


def test_synth_deterministic_with_truth(cohort, tmp_path):
    df = read_cohort(cohort)
    assert df["label"].sum() == len(df) // 2 and set(df["split"]) == {"train", "val", "test"}
    for _, r in df.iterrows():
        truth = sitk.GetArrayFromImage(sitk.ReadImage(r["truth"]))
        assert (truth.sum() > 0) == bool(r["label"])
        assert Grid.of(sitk.ReadImage(r["truth"])) == Grid.of(sitk.ReadImage(r["stir"]))
    spacings = {sitk.ReadImage(df.iloc[0][k]).GetSpacing()[0] for k in ("t1", "t2", "stir")}
    assert len(spacings) == 3  # each series its own geometry
    again = make_cohort(tmp_path / "again", n=2, seed=5, spacing=4.0, show_progress=False)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(read_cohort(again).iloc[1]["stir"])))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(df.iloc[1]["stir"])))
    np.testing.assert_array_equal(a, b)
    clin = pd.read_csv(cohort.parent / "clinical.csv", dtype=str, keep_default_na=False)
    assert (clin == "").to_numpy().any()  # missing values present


# ---------------------------------------------------------------- train / evaluate / predict

def _config(**over) -> dict:
    """A small NegSpA config: ResNet-18 branches, 3 image + 12 fusion epochs, validation selection."""
    cfg = {"task": "negspa", "model": {"depth": 18}, "data": {"num_workers": 0},
           "train": {"epochs": 3, "batch_size": 3, "lr": 1e-3, "seed": 0, "device": "cpu", "state_every": 0,
                     "select": "last"},
           "fusion": {"epochs": 12, "lr": 3e-3}, "selection": {"method": "validation"},
           "evaluate": {"n_bootstrap": 100}}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    from rheumai import api
    from rheumai.dataset import build_image_dataset

    out = tmp_path_factory.mktemp("spa_run")
    manifest = build_image_dataset(cohort, out / "ds", params=NegSpaParams(size=SIZE), task="negspa",
                                   clinical_csv=cohort.parent / "clinical.csv", progress=lambda *a: None).manifest
    return manifest, api.train(_config(), manifest, out / "run", show_progress=False)


def test_two_stage_training_on_the_engine_lowers_loss_and_round_trips(trained):
    """Two stages through the engine's recipe; the card is the engine's (threshold with its
    selection, model selection); the reloaded weights give the validation probabilities."""
    from rheumai.checkpoint import load_checkpoint, read_card
    from rheumai.engine.fit import predict
    from rheumai.engine.heads import BinaryHead
    from rheumai.tasks.negspa.model import TriInputResNet
    from rheumai.tasks.negspa.train import eval_dataset

    manifest, res = trained
    assert [h["stage"] for h in res.history] == ["image"] * 3 + ["fusion"] * 12
    s2 = [h["train_loss"] for h in res.history if h["stage"] == "fusion"]
    assert np.mean(s2[-3:]) < s2[0]
    card = read_card(res.checkpoint)
    assert card["task"] == "negspa" and card["architecture"]["depth"] == 18
    assert card["preprocessing"]["size"] == list(SIZE) and "clinical_encoder" in card
    assert card["threshold_selection"]["method"] in ("validation", "default")
    assert [s["name"] for s in card["training"]["stages"]] == ["image", "fusion"]
    model, card2 = load_checkpoint(res.checkpoint)
    assert isinstance(model, TriInputResNet) and card2 == card and model.mode == "fusion"
    val = pd.read_csv(res.out_dir / "val_predictions.csv", dtype={"patient_id": str})
    from rheumai.engine.train import read_manifest

    df = read_manifest(manifest).set_index("patient_id").loc[val["patient_id"]].reset_index()
    out, _, _ = predict(model, eval_dataset(df, card), torch.device("cpu"), {"out": BinaryHead()})
    p = BinaryHead().decode(out["out"])["probability"]
    np.testing.assert_allclose(p, val["probability"], rtol=1e-4, atol=1e-6)  # the reloaded weights are the trained ones


def test_stop_in_the_fusion_stage_then_resume(trained, tmp_path):
    from rheumai import api

    manifest, _ = trained
    cfg = _config(model={"depth": 10}, train={"epochs": 1, "state_every": 1}, fusion={"epochs": 2})
    seen: list[str] = []
    first = api.train(cfg, manifest, tmp_path, progress=lambda e: seen.append(e["stage"]),
                      should_stop=lambda: seen.count("epoch") >= 2, show_progress=False)
    assert first.stopped and first.checkpoint is None
    with pytest.raises(InputError, match="--resume"):
        api.train(cfg, manifest, tmp_path, show_progress=False)
    done = api.train(cfg, manifest, tmp_path, resume=True, show_progress=False)
    assert [(h["stage"], h["epoch"]) for h in done.history] == [("image", 1), ("fusion", 1), ("fusion", 2)]
    assert api.train(cfg, manifest, tmp_path, resume=True, show_progress=False).already_finished


def test_out_of_fold_selection_runs_both_stages_per_fold(trained, tmp_path):
    """Out-of-fold selection on NegSpA: every fold trains both stages; the pooled fusion-stage
    probabilities choose that stage's epoch count and the threshold of the final run."""
    from rheumai import api
    from rheumai.checkpoint import read_card

    manifest, _ = trained
    cfg = _config(model={"depth": 10}, train={"epochs": 1}, fusion={"epochs": 2},
                  selection={"method": "oof", "folds": 2, "epoch_smoothing": 1, "threshold_ci_bootstrap": 20})
    card = read_card(api.train(cfg, manifest, tmp_path, show_progress=False).checkpoint)
    ms = card["model_selection"]
    assert ms["method"] == "oof" and ms["folds"] == 2 and len(ms["oof_auc_by_epoch"]) == 2
    assert card["training"]["epochs_run"] == ms["epochs_selected"]
    assert (tmp_path / "folds" / "fold1" / "fusion" / "history.csv").is_file()
    assert card["threshold_selection"]["method"] in ("oof", "default")


def test_predict_saliency_in_each_series_geometry(trained, cohort, tmp_path):
    """The engine's Predictor on a NegSpA checkpoint: the task comes from the card; half
    probabilities, clinical missingness, and one Grad-CAM volume per sequence in its own geometry."""
    from rheumai import api
    from rheumai.engine.predict import Predictor

    _, res = trained
    row = read_cohort(cohort).iloc[1]
    pred = Predictor(res.checkpoint)
    assert pred.task.name == "negspa"
    study = {"t1": row["t1"], "t2": row["t2"], "stir": row["stir"], "roi": row["box"],
             "clinical": {"crp": "12.5", "inflammatory_back_pain": "yes"}}
    out = api.predict(pred, study, out_dir=tmp_path)
    v = out.values
    assert 0 <= out.probability <= 1 and out.probability == pytest.approx(max(v["p_right"], v["p_left"]))
    assert "uveitis" in v["clinical_missing"] and "crp" not in v["clinical_missing"]
    # The probability is the network's: the packed input through the fusion head, max over halves.
    from rheumai.checkpoint import load_checkpoint

    model, _ = load_checkpoint(res.checkpoint)
    x = pred.task.to_tensors(out.sample, pred.card)
    with torch.no_grad():
        p_ref = torch.sigmoid(model(x["x"][None], x["clinical"][None])).item()
    assert out.probability == pytest.approx(p_ref, abs=1e-5)
    for role in ("t1", "t2", "stir"):
        vol = sitk.ReadImage(out.files["saliency_files"][role])
        src = sitk.ReadImage(row[role])
        assert vol.GetSize() == src.GetSize()
        np.testing.assert_allclose(vol.GetOrigin(), src.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(vol.GetSpacing(), src.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(vol.GetDirection(), src.GetDirection(), atol=1e-6)
        g = out.maps[role].grid
        assert g.shape == (2, 3, *SIZE) and g.min() >= 0 and g.max() <= 1
        assert Path(out.files["montage_files"][role]).is_file()
    saved = json.loads(Path(out.files["result_file"]).read_text())
    assert saved["probability"] == pytest.approx(out.probability) and saved["task"] == "negspa"
    # A missing ROI / unknown clinical variable: clear errors.
    with pytest.raises(InputError, match="roi"):
        pred.predict({k: study[k] for k in ("t1", "t2", "stir")})
    with pytest.raises(InputError, match="hla_b27"):
        pred.predict(dict(study, clinical={"hla_b27": "no"}))


def test_rheumai_predict_reads_negspa_task_from_card(trained, cohort, tmp_path):
    """`rheumai predict` (the one command for every task) on a NegSpA checkpoint: --input/--roi/
    --clinical for one study, --cohort for many, sharded runs merged without loss."""
    from rheumai import predict_cli

    _, res = trained
    parser = argparse.ArgumentParser()
    predict_cli.register(parser.add_subparsers())

    def run(*argv):
        a = parser.parse_args(["predict", *map(str, argv)])
        return a.func(a)

    row = read_cohort(cohort).iloc[0]
    assert run("--model", res.checkpoint, "--out", tmp_path / "one", "--input", f"t1={row['t1']}",
               "--input", f"t2={row['t2']}", "--input", f"stir={row['stir']}", "--roi", row["box"],
               "--clinical", "crp=3", "--id", "P1", "--saliency", "none") == 0
    table = pd.read_csv(tmp_path / "one" / "predictions.csv")
    assert list(table["study"]) == ["P1"] and table["task"][0] == "negspa" and 0 <= table["p_left"][0] <= 1
    for i in range(2):
        assert run("--model", res.checkpoint, "--out", tmp_path / f"s{i}", "--cohort", cohort, "--shard", f"{i}/2",
                   "--saliency", "none") == 0
    assert run("merge", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "all") == 0
    merged = pd.read_csv(tmp_path / "all" / "predictions.csv")
    assert sorted(merged["study"]) == sorted(read_cohort(cohort)["patient_id"])
    with pytest.raises(InputError, match="--input"):
        run("--model", res.checkpoint, "--out", tmp_path / "bad", row["t1"])


def test_evaluate_writes_report(trained, tmp_path):
    from rheumai import api

    manifest, res = trained
    rep = api.evaluate(res.checkpoint, manifest, tmp_path, split="all", n_bootstrap=50, device="cpu",
                       show_progress=False)
    assert rep["n"] == 10 and 0 <= rep["auc"]["value"] <= 1
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert len(pred) == 10 and {"probability", "predicted"} <= set(pred.columns)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "roc.png").is_file()


def test_cli_end_to_end(tmp_path):
    """Generic commands with the task from the config / card; `rheumai dataset build --task negspa` builds the cache."""
    from rheumai.cli import main
    from rheumai.config import dumps_toml

    def run(*argv):
        return main([str(a) for a in argv])

    assert run("synth", "--task", "negspa", "--out", tmp_path / "c", "--n", 8, "--seed", 2, "--spacing", 4) == 0
    cohort = next((tmp_path / "c").rglob("cohort.csv"))
    assert run("dataset", "build", "--task", "negspa", "--images", cohort, "--clinical", cohort.parent / "clinical.csv",
               "--out", tmp_path / "ds", "--size", 32, 32) == 0
    cfg = tmp_path / "spa.toml"
    cfg.write_text(dumps_toml(_config(model={"depth": 10}, train={"epochs": 1}, fusion={"epochs": 1})))
    assert run("train", "--config", cfg, "--manifest", tmp_path / "ds" / "manifest.csv", "--out", tmp_path / "run",
               "--quiet") == 0
    ckpt = tmp_path / "run" / "model"
    assert run("evaluate", "--model", ckpt, "--manifest", tmp_path / "ds" / "manifest.csv", "--out", tmp_path / "ev",
               "--split", "all", "--n-bootstrap", 20, "--device", "cpu", "--quiet") == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 8
    d = cohort.parent / "SPA0000"
    assert run("predict", "--model", ckpt, "--out", tmp_path / "p1", "--input", f"t1={d / 't1.nii.gz'}",
               "--input", f"t2={d / 't2.nii.gz'}", "--input", f"stir={d / 'stir.nii.gz'}", "--roi", d / "box.json",
               "--clinical", "crp=3") == 0
    assert len(list((tmp_path / "p1").glob("*_saliency_stir.nii.gz"))) == 1
    assert run("train", "--config", cfg, "--task", "cervical_ra", "--out", tmp_path / "x") == 1  # config says negspa
