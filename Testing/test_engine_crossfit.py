"""Out-of-fold model selection: folds, epoch choice, threshold refusal and CI, and the trainer's use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rheumai.config import TrainConfig
from rheumai.tasks.cervical_ra.train import write_toy_cohort
from rheumai.engine.crossfit import (choose_threshold_with_ci, crossfit, needs_oof, patient_folds, select_epoch)
from rheumai.engine.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_folds_are_stratified_and_keep_a_patient_together() -> None:
    y = np.array([1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0])
    g = np.array(["a", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m"])
    f = patient_folds(y, g, k=3, seed=0)
    assert set(f) == {0, 1, 2} and f[0] == f[1]
    per_fold_pos = [len({p for p in g[(f == j) & (y == 1)]}) for j in range(3)]
    assert max(per_fold_pos) - min(per_fold_pos) <= 1
    assert patient_folds(y, g, k=3, seed=0).tolist() == f.tolist()
    assert set(patient_folds([1, 1, 0, 0, 0], list("abcde"), k=5, seed=0)) == {0, 1}  # k capped at positives
    with pytest.raises(ValueError, match="1 positive"):
        patient_folds([1, 0, 0, 0], list("abcd"), k=3, seed=0)


def test_needs_oof_by_validation_positives() -> None:
    assert needs_oof("auto", [1, 0, 0, 0], 10)[0]
    assert "1 positive" in needs_oof("auto", [1, 0, 0, 0], 10)[1]
    assert not needs_oof("auto", [1] * 10 + [0] * 12, 10)[0]
    assert needs_oof("oof", [1] * 20 + [0] * 20, 10)[0] and not needs_oof("validation", [1], 10)[0]


def test_threshold_refused_from_two_positives_and_ci_from_enough() -> None:
    y = np.array([1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.99, 0.97, 0.2, 0.3, 0.1, 0.4, 0.5])
    c = choose_threshold_with_ci(y, p, "youden", "validation", min_positives=3)
    assert c.value == 0.5 and c.method == "default" and "2 positive" in c.note and c.ci_lo is None
    assert choose_threshold_with_ci(y, p, "fixed:0.3", "validation").value == 0.3
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30), np.zeros(70)].astype(int)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.15, y.size), 0, 1)
    c = choose_threshold_with_ci(y, p, "youden", "oof", n_boot=200, seed=1)
    assert c.method == "oof" and c.ci_lo <= c.value <= c.ci_hi and c.ci_hi > c.ci_lo
    assert c.n == 100 and c.n_positive == 30 and "CI" in c.note


def test_select_epoch_smooths_a_lucky_spike() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    good = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    bad = good[::-1].copy()
    half = np.array([0.1, 0.2, 0.8, 0.3, 0.7, 0.9])  # AUC 0.89
    scores = np.stack([bad, good, bad, bad, half, half, half])
    assert select_epoch(scores, y, smooth=1)[0] == 2
    assert select_epoch(scores, y, smooth=3)[0] == 6


def test_crossfit_pools_every_patient_once() -> None:
    y = np.array([1, 0, 1, 0, 0, 1, 0, 0, 1, 0])
    g = np.array([f"P{i}" for i in range(10)])
    seen = []

    def run_fold(j: int, tr: np.ndarray, ho: np.ndarray) -> np.ndarray:
        assert set(tr).isdisjoint(ho)
        seen.extend(ho.tolist())
        return np.stack([ho / 10.0, 1 - ho / 10.0])  # 2 epochs

    oof = crossfit(run_fold, y, g, k=3, seed=0)
    assert sorted(seen) == list(range(10)) and oof.scores.shape == (2, 10)
    np.testing.assert_allclose(oof.scores[0], np.arange(10) / 10.0)


def test_trainer_selects_out_of_fold_when_validation_has_one_positive(tmp_path: Path) -> None:
    m = write_toy_cohort(tmp_path / "c", n_train=12, n_val=3, n_test=0, size=16, positive_fraction=0.34, seed=3)
    assert pd.read_csv(m).query("split == 'val'")["label"].sum() == 1
    cfg = TrainConfig.from_dict({"model": {"depth": 10, "input_size": [16, 16]}, "data": {"num_workers": 0},
                                 "train": {"epochs": 3, "batch_size": 4, "lr": 1e-3, "seed": 0},
                                 "selection": {"folds": 2, "epoch_smoothing": 1, "threshold_ci_bootstrap": 50,
                                               "min_threshold_positives": 2},
                                 "evaluate": {"n_bootstrap": 20}})
    events: list[dict] = []
    res = train(cfg, m, tmp_path / "run", progress=events.append, show_progress=False)
    assert {(e.get("fold"), e.get("folds")) for e in events if e["stage"] == "epoch"} == {(1, 2), (2, 2), (None, None)}
    card = json.loads((res.checkpoint / "model_card.json").read_text())
    ms, ts = card["model_selection"], card["threshold_selection"]
    assert ms["method"] == "oof" and "1 positive" in ms["reason"] and ms["folds"] == 2
    assert len(ms["oof_auc_by_epoch"]) == 3 and card["training"]["epochs_run"] == ms["epochs_selected"] == res.epochs_run
    assert ts["method"] == "oof" and ts["n"] == 12 and ts["ci_lo"] <= ts["value"] <= ts["ci_hi"]
    assert card["threshold"] == ts["value"]
    oof = pd.read_csv(tmp_path / "run" / "oof_predictions.csv")
    assert sorted(oof["patient_id"]) == sorted(pd.read_csv(m).query("split == 'train'")["patient_id"])
    from rheumai.metrics import choose_threshold

    assert choose_threshold(oof["label"], oof["probability"], "youden") == pytest.approx(ts["value"])
    # the saved config is the user's, not the derived final run's
    from rheumai.config import load_config

    assert load_config(tmp_path / "run" / "config.toml").to_dict() == cfg.to_dict()
