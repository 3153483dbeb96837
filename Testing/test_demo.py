"""Demo pieces that do not need a trained model: the hit figures, the targets table, the outside-cohort
check (on a small random checkpoint) and `rheumai demo --task NAME` dispatch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from rheumai import demo as general
from rheumai.checkpoint import save_checkpoint
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.model import build_model, default_architecture
from rheumai.tasks.cervical_ra.slices import SliceParams
from rheumai.tasks import get_task, register_task
from rheumai.tasks.cervical_ra import demo

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CALLS: list[tuple] = []


def _fake_demo(out_dir, seed=0, n=None, progress=True):
    CALLS.append((Path(out_dir), seed, n, progress))
    return {"ok": True}


def test_hit_figures_follow_the_stated_rule():
    tol = demo.HIT_TOLERANCE_MM
    f = demo.hit_figures([0.0, tol - 0.5, tol + 0.5, float("nan")])
    assert f["n_positives"] == 4
    assert f["hit_rate"] == 0.5  # inside, within tolerance; beyond it and lesion-not-in-input are misses
    assert f["exact_hit_rate"] == 0.25
    assert f["median_peak_distance_mm"] == pytest.approx(tol - 0.5)
    assert math.isnan(demo.hit_figures([])["hit_rate"])


def _summary(auc=0.97, hit=0.85, real_p=0.1, thr=0.4, out_auc=0.93):
    return {"test_auc": auc, "test_auc_ci": [0.9, 1.0], "test_auc_ci_method": "delong", "hit_rate": hit,
            "n_positives": 20, "exact_hit_rate": 0.7, "median_peak_distance_mm": 0.0, "threshold": thr,
            "real_t2": {"probability": real_p},
            "outside": {"seed": 1000, "prevalence": 0.3, "n": 40, "auc": out_auc, "auc_ci": [0.8, 1.0],
                        "hit_rate": 0.8}}


def test_target_rows_reached_and_missed():
    assert [ok for *_, ok in demo.target_rows(_summary())] == [True, True, True, True]
    rows = demo.target_rows(_summary(auc=0.94, hit=0.79, real_p=0.45, thr=0.3, out_auc=0.89))
    assert [ok for *_, ok in rows] == [False, False, False, False]  # real T2 above the threshold: missed
    assert "within 8 mm" in rows[1][0] or f"{demo.HIT_TOLERANCE_MM:g} mm" in rows[1][0]


def test_compare_table_has_one_row_per_design():
    row = {"test_auc": 0.97, "test_auc_ci": [0.9, 1.0], "hit_rate": 0.9, "n_positives": 20, "exact_hit_rate": 0.7,
           "hit_rate_gradcam": 0.2, "real_t2_p": 0.1, "train_s": 100.0}
    text = demo.compare_table({"resnet": row, "slice_attention": {**row, "test_auc": 0.95}})
    lines = text.splitlines()
    assert len(lines) == 4 and "`resnet`" in lines[2] and "`slice_attention`" in lines[3] and "0.950" in lines[3]


def test_outside_check_on_a_small_random_checkpoint(tmp_path):
    """Structure and bookkeeping of the outside-cohort check (a random network: figures are not judged)."""
    torch.manual_seed(0)
    arch = default_architecture(10, 6, (32, 32))
    card = {"architecture": arch, "preprocessing": SliceParams(n_slices=6, size=(32, 32), spacing_mm=4.0).to_dict(),
            "threshold": 0.5, "threshold_rule": "fixed for the test", "task": "cervical_ra", "model_id": "tiny10"}
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(arch), card)
    res = demo.outside_check(ckpt, seed=7, n=6, prevalence=0.5, out_dir=tmp_path / "outside", progress=False)
    rows = json.loads((tmp_path / "outside" / "outside_predictions.json").read_text())["rows"]
    assert res["n"] == len(rows) >= 4 and res["n_positive"] == sum(r["label"] for r in rows)
    assert 0 < res["n_positive"] < res["n"]
    assert 0.0 <= res["auc"] <= 1.0 and res["seed"] == 7 and res["prevalence"] == 0.5
    assert sum(res["counts"].values()) == res["n"]
    positives = [r for r in rows if r["label"] == 1]
    assert all("peak_distance_mm" in r and isinstance(r["hit"], bool) for r in positives)
    assert res["n_positives"] == len(positives)


def test_demo_task_dispatch(tmp_path):
    base = get_task("cervical_ra")
    register_task(dataclasses.replace(base, name="demo_dispatch_probe", api={"demo": "test_demo:_fake_demo"}),
                  replace=True)
    register_task(dataclasses.replace(base, name="demo_dispatch_none", api={}), replace=True)
    parser = argparse.ArgumentParser()
    general.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--task", "demo_dispatch_probe", "--out", str(tmp_path / "d"), "--n", "5",
                              "--seed", "3"])
    CALLS.clear()
    assert args.func(args) == 0
    assert CALLS == [(tmp_path / "d", 3, 5, True)]
    with pytest.raises(InputError, match="--epochs"):  # an option the task's demo does not take
        general.run_task_demo("demo_dispatch_probe", tmp_path, 0, None, epochs=3)
    with pytest.raises(InputError, match="declares no demo"):
        general.run_task_demo("demo_dispatch_none", tmp_path, 0, None)
    with pytest.raises(InputError, match="unknown task"):
        general.run_task_demo("no_such_task", tmp_path, 0, None)
    assert parser.parse_args(["demo"]).task == "cervical_ra"
