"""Training on a tiny generated cohort: loss falls, checkpoint round-trips, resume after a kill,
config handling, validation carving and the batch sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from rheumai.checkpoint import load_checkpoint
from rheumai.config import TrainConfig, dumps_toml, load_config
from rheumai.engine.fit import GlobalBatchSampler
from rheumai.engine.train import read_manifest, split_train_val, train
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.train import write_toy_cohort

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(size: int = 32, **train_overrides) -> TrainConfig:
    t = {"epochs": 4, "batch_size": 4, "lr": 1e-3, "seed": 3}
    t.update(train_overrides)
    return TrainConfig.from_dict({"model": {"depth": 18, "input_size": [size, size]}, "data": {"num_workers": 0},
                                  "train": t, "selection": {"method": "validation"}, "evaluate": {"n_bootstrap": 100}})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_toy_cohort(tmp_path_factory.mktemp("cohort"), n_train=16, n_val=8, n_test=8, size=32, seed=1)


def test_loss_falls_and_checkpoint_round_trips(cohort: Path, tmp_path: Path) -> None:
    cfg = tiny_config(epochs=5)
    cfg.augment.enabled = False
    events = []
    res = train(cfg, cohort, tmp_path / "run", progress=events.append, show_progress=False)
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 5 and np.mean(losses[-2:]) < 0.6 * losses[0]
    assert sum(e["stage"] == "step" for e in events) == 5 * 4 and sum(e["stage"] == "epoch" for e in events) == 5
    # the checkpoint holds the selected (best validation AUC) weights, exactly
    model, card = load_checkpoint(res.checkpoint)
    best = load_file(str(tmp_path / "run" / "state" / "best_model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k
    assert card["architecture"]["depth"] == 18 and card["architecture"]["input_size"] == [32, 32]
    assert card["preprocessing"]["n_slices"] == 6
    assert card["threshold"] == pytest.approx(res.threshold) and card["threshold_rule"] == "youden"
    assert card["training_data"] == {"n_train": 16, "n_train_positive": 8, "n_val": 8, "n_val_positive": 4,
                                     "val_source": "manifest", "n_test_held_out": 8, "sites": 1}
    assert card["training"]["best_epoch"] == res.best_epoch
    # the config saved beside the results reproduces the run's config
    assert load_config(tmp_path / "run" / "config.toml").to_dict() == cfg.to_dict()
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3, 4, 5]
    # the validation AUC in the card is the validation AUC of the saved weights
    val = pd.read_csv(tmp_path / "run" / "val_predictions.csv")
    from sklearn.metrics import roc_auc_score

    assert card["metrics"]["validation"]["auc"]["value"] == pytest.approx(roc_auc_score(val["label"], val["probability"]))


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from rheumai.config import TrainConfig
    from rheumai.engine.train import train
    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    def progress(ev):
        if ev["stage"] == "step" and ev["epoch"] == 2 and ev["step"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)   # a real kill, mid-epoch, no clean-up
    train(cfg, sys.argv[2], sys.argv[3], progress=progress, show_progress=False)
""")


def test_resume_after_kill_matches_uninterrupted_run(cohort: Path, tmp_path: Path) -> None:
    cfg = tiny_config(16, epochs=3, class_weighting="balanced")
    ref = train(cfg, cohort, tmp_path / "ref", show_progress=False)

    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict()), str(cohort), str(run)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["epochs_completed"] == 1 and not (run / "model").exists()
    with pytest.raises(InputError, match="--resume"):
        train(cfg, cohort, run, show_progress=False)
    changed = tiny_config(16, epochs=3, class_weighting="balanced", lr=5e-4)
    with pytest.raises(InputError, match="lr"):
        train(changed, cohort, run, resume=True, show_progress=False)

    res = train(cfg, cohort, run, resume=True, show_progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    for a, b in zip(res.history, ref.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-9)
    last_a = load_file(str(run / "state" / "model.safetensors"))
    last_b = load_file(str(tmp_path / "ref" / "state" / "model.safetensors"))
    for k in last_b:
        torch.testing.assert_close(last_a[k], last_b[k], rtol=1e-5, atol=1e-6)
    assert res.threshold == pytest.approx(ref.threshold, abs=1e-6)


def test_should_stop_then_resume(cohort: Path, tmp_path: Path) -> None:
    cfg = tiny_config(16, epochs=2)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 6  # during epoch 2 (4 steps per epoch)

    res = train(cfg, cohort, tmp_path / "r", should_stop=stop, show_progress=False)
    assert res.stopped and res.checkpoint is None and res.epochs_run == 1
    res2 = train(cfg, cohort, tmp_path / "r", resume=True, show_progress=False)
    assert not res2.stopped and res2.epochs_run == 2 and (res2.checkpoint / "model_card.json").is_file()


def test_no_val_rows_carves_stratified_patient_split(tmp_path: Path) -> None:
    m = write_toy_cohort(tmp_path / "c", n_train=30, n_val=0, n_test=4, size=16, positive_fraction=0.3, seed=2)
    df = read_manifest(m)
    tr, va, how = split_train_val(df, 0.2, seed=0)
    assert "carved" in how and len(va) == 6 and len(tr) == 24
    assert set(tr["patient_id"]).isdisjoint(va["patient_id"])
    assert va["label"].sum() == 2  # 30 % of 6, stratified
    assert split_train_val(df, 0.2, seed=0)[1]["patient_id"].tolist() == va["patient_id"].tolist()


def test_global_batch_sampler_covers_every_case_and_splits_like_ddp() -> None:
    single = GlobalBatchSampler(10, 4, world_size=1, rank=0, accumulate=2, seed=5)
    single.set_epoch(1)
    micro = list(single)
    assert len(micro) == 6 and all(len(b) == 2 for b in micro)
    seen = [i for b in micro for i in b]
    assert set(seen) == set(range(10))  # last global batch wraps around: nothing dropped
    r0 = GlobalBatchSampler(10, 4, world_size=2, rank=0, seed=5)
    r1 = GlobalBatchSampler(10, 4, world_size=2, rank=1, seed=5)
    r0.set_epoch(1), r1.set_epoch(1)
    assert list(r0) == micro[0::2] and list(r1) == micro[1::2]
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 4, world_size=3)


def test_config_errors_and_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[train]\nepochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(InputError, match=r"c\.toml.*learning_rate"):
        load_config(p)
    p.write_text("[train]\nbatch_size = 4\naccumulate_steps = 3\n")
    with pytest.raises(InputError, match="accumulate_steps"):
        load_config(p)
    p.write_text("[threshold]\nrule = 'median'\n")
    with pytest.raises(InputError, match="median"):
        load_config(p)
    p.write_text("[model\n")
    with pytest.raises(InputError, match="TOML"):
        load_config(p)
    for name in ("paper.toml", "small_cpu.toml"):
        cfg = load_config(REPO / "configs" / name)
        p.write_text(dumps_toml(cfg.to_dict()))
        assert load_config(p).to_dict() == cfg.to_dict()
    paper = load_config(REPO / "configs" / "paper.toml")
    assert (paper.model.depth, paper.train.lr, paper.train.batch_size, paper.train.epochs) == (101, 1e-4, 4, 100)
    assert paper.train.loss == "bce" and paper.train.optimizer == "adam" and not paper.train.pretrained


def test_dumps_toml_reads_back_any_text_and_refuses_null() -> None:
    import math
    from rheumai.config import tomllib

    d = {"name": "run \U0001F600 caf\u00e9 \"q\" \\ \n", "xs": [1, [2.5, "a"]],
         "s": {"hi": math.inf, "on": True}}
    back = tomllib.loads(dumps_toml(d))
    assert back == d
    for bad in (None, [1, None], [{"k": 1}]):
        with pytest.raises(TypeError):
            dumps_toml({"a": bad})


def test_bad_manifest_is_reported(tmp_path: Path) -> None:
    m = write_toy_cohort(tmp_path / "c", n_train=4, n_val=0, n_test=0, size=16)
    df = pd.read_csv(m)
    df.loc[0, "label"] = 2
    df.to_csv(tmp_path / "c" / "bad.csv", index=False)
    with pytest.raises(InputError, match="bad.csv.*label"):
        read_manifest(tmp_path / "c" / "bad.csv")
    (tmp_path / "c" / "cache" / "P0001.npy").unlink()
    with pytest.raises(InputError, match="P0001.npy"):
        train(tiny_config(epochs=1), m, tmp_path / "out", show_progress=False)


def test_early_stopping_on_val_auc_and_workers(tmp_path: Path) -> None:
    m = write_toy_cohort(tmp_path / "c", n_train=8, n_val=6, n_test=0, size=16, seed=5)
    cfg = tiny_config(16, epochs=5, early_stopping_patience=1)
    cfg.data.num_workers = 2  # worker processes load and augment the cases
    res = train(cfg, m, tmp_path / "r", show_progress=False)
    h = res.history
    improved = [i == 0 or a["val_auc"] > h[i - 1]["best_val_auc"] for i, a in enumerate(h)]
    if res.early_stopped:
        assert len(h) < 5 and not improved[-1]
    else:
        assert len(h) == 5 and all(improved)
    assert res.best_val_auc == max(a["val_auc"] for a in h)
    assert res.best_epoch == 1 + int(np.argmax([a["val_auc"] for a in h]))


def test_unusable_manifests_are_named_with_the_reason(tmp_path: Path) -> None:
    m = write_toy_cohort(tmp_path / "c", n_train=6, n_val=2, n_test=2, size=16, positive_fraction=0.5, seed=1)
    df = pd.read_csv(m)
    cfg = tiny_config(16, epochs=1)
    df.iloc[:0].to_csv(tmp_path / "c" / "empty.csv", index=False)           # header, no rows
    with pytest.raises(InputError, match=r"empty\.csv.*header but no rows"):
        train(cfg, tmp_path / "c" / "empty.csv", tmp_path / "o1", show_progress=False)
    df.assign(split=df["split"].replace({"train": "test"})).to_csv(tmp_path / "c" / "notrain.csv", index=False)
    with pytest.raises(InputError, match=r"notrain\.csv.*no rows with split == 'train'.*test: 8"):
        train(cfg, tmp_path / "c" / "notrain.csv", tmp_path / "o2", show_progress=False)
    # the one positive went to validation: the message says so
    one = pd.concat([df[df["label"] == 0], df[df["label"] == 1].head(1).assign(split="val")])
    one.to_csv(tmp_path / "c" / "one.csv", index=False)
    with pytest.raises(InputError, match=r"one\.csv.*only one class.*negative.*the only positive is in val \(1\)"):
        train(cfg, tmp_path / "c" / "one.csv", tmp_path / "o3", show_progress=False)


def test_resume_keeps_history_columns_and_finished_run_is_left_alone(cohort: Path, tmp_path: Path) -> None:
    cfg = tiny_config(16, epochs=2)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    assert train(cfg, cohort, tmp_path / "r", should_stop=stop, show_progress=False).stopped
    first = list(pd.read_csv(tmp_path / "r" / "history.csv").columns)
    res = train(cfg, cohort, tmp_path / "r", resume=True, show_progress=False)
    assert list(pd.read_csv(tmp_path / "r" / "history.csv").columns) == first == \
        ["epoch", "train_loss", "val_loss", "val_auc", "best_val_auc", "lr"]
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()}
    again = train(cfg, cohort, tmp_path / "r", resume=True, show_progress=False)
    assert again.already_finished and again.checkpoint == res.checkpoint and again.threshold == res.threshold
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()} == files
    from rheumai.cli import main

    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(dumps_toml(cfg.to_dict()))
    assert main(["train", "--config", str(cfg_path), "--manifest", str(cohort), "--out", str(tmp_path / "r"),
                 "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()} == files
