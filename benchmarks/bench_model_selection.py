"""Training-side fixes measured on a small learnable cohort (not imaging data: the toy cohort of
``rheumai.tasks.cervical_ra.train.write_toy_cohort``), CPU, one thread.

1. BatchNorm recalibration (``[train] bn_recalibration``): with batches of 2 and strong intensity
   augmentation, the first BatchNorm's running variance against the true variance of its input on
   the clean training images, and the test probabilities' spread and Brier score, "none" vs "epoch".
2. Model selection with one validation positive (``[selection] method``): the threshold chosen on
   validation (Youden on one positive, allowed here only to show what it does) vs out-of-fold over
   the training patients; test sensitivity / specificity at each threshold.

Usage: python benchmarks/bench_model_selection.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rheumai.checkpoint import load_checkpoint
from rheumai.config import TrainConfig
from rheumai.api import evaluate, train
from rheumai.engine.train import read_manifest
from rheumai.tasks.cervical_ra.train import SliceStackDataset, build_eval_transform, write_toy_cohort

AUG = {"crop": "random_center", "contrast_prob": 1.0, "contrast_gamma": [0.5, 2.0], "scale_intensity_prob": 1.0,
       "scale_intensity_factor": 0.5, "shift_intensity_prob": 1.0, "shift_intensity_offset": 0.3}


def _cfg(epochs: int, **sections: dict) -> TrainConfig:
    d = {"model": {"depth": 18, "input_size": [32, 32]}, "data": {"num_workers": 0}, "augment": AUG,
         "train": {"epochs": epochs, "batch_size": 2, "lr": 1e-3, "seed": 0, "class_weighting": "balanced"},
         "evaluate": {"n_bootstrap": 200}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return TrainConfig.from_dict(d)


def bn_recalibration(tmp: Path, epochs: int) -> list[str]:
    m = write_toy_cohort(tmp / "bn", n_train=24, n_val=12, n_test=24, size=32, positive_fraction=0.5, seed=3)
    df = read_manifest(m)
    ds = SliceStackDataset(df[df["split"] == "train"], build_eval_transform("none", 1.0, (32, 32)))
    x = torch.stack([ds[i]["input"] for i in range(len(ds))])
    lines = []
    for mode in ("none", "epoch"):
        r = train(_cfg(epochs, train={"bn_recalibration": mode}, selection={"method": "validation"}), m,
                  tmp / f"bn_{mode}", show_progress=False)
        model, card = load_checkpoint(r.checkpoint)
        with torch.no_grad():
            f = model.conv1(x).double()
        ratio = (model.bn1.running_var.double() / f.transpose(0, 1).reshape(f.shape[1], -1).var(1)).numpy()
        ev = evaluate(r.checkpoint, m, tmp / f"ev_{mode}", split="test", n_bootstrap=200, show_progress=False)
        p = pd.read_csv(ev["files"]["predictions"])["probability"].to_numpy()
        lines.append(f"bn_recalibration={mode:5s}: bn1 running var / true var median {np.median(ratio):6.2f} "
                     f"(range {ratio.min():.2f}-{ratio.max():.2f}); test AUC {ev['auc']['value']:.3f}, "
                     f"p range {p.min():.3f}-{p.max():.3f}, Brier {ev['calibration']['brier']:.3f}")
    return lines


def selection(tmp: Path, epochs: int, folds: int) -> list[str]:
    m = write_toy_cohort(tmp / "sel", n_train=30, n_val=4, n_test=40, size=32, positive_fraction=0.3, seed=8)
    df = pd.read_csv(m)
    assert int(df.query("split == 'val'")["label"].sum()) == 1
    lines = []
    for method, extra in (("validation", {"min_threshold_positives": 1}), ("oof", {"folds": folds})):
        r = train(_cfg(epochs, train={"bn_recalibration": "epoch"}, selection={"method": method, **extra}), m,
                  tmp / f"sel_{method}", show_progress=False)
        ev = evaluate(r.checkpoint, m, tmp / f"sev_{method}", split="test", n_bootstrap=200, show_progress=False)
        card = load_checkpoint(r.checkpoint)[1]
        ts = card["threshold_selection"]
        ci = f"{ts['ci_lo']:.3f}-{ts['ci_hi']:.3f}" if ts.get("ci_lo") is not None else "n/a"
        mm = ev["metrics"]
        lines.append(f"selection={method:10s}: {r.epochs_run} epochs, threshold {ts['value']:.3f} (CI {ci}); "
                     f"test AUC {ev['auc']['value']:.3f}, sensitivity {mm['sensitivity']['value']:.2f}, "
                     f"specificity {mm['specificity']['value']:.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and folds")
    a = ap.parse_args()
    torch.set_num_threads(1)
    epochs = 4 if a.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        for line in bn_recalibration(Path(tmp), epochs) + selection(Path(tmp), epochs, 3 if a.quick else 5):
            print(line)


if __name__ == "__main__":
    main()
