"""BatchNorm recalibration: running statistics equal the true statistics of clean training inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rheumai.checkpoint import load_checkpoint
from rheumai.config import TrainConfig
from rheumai.engine.train import read_manifest
from rheumai.tasks.cervical_ra.train import SliceStackDataset, build_eval_transform, write_toy_cohort
from rheumai.engine.batchnorm import recalibrate_batchnorm, trainable_batchnorms
from rheumai.engine.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_recalibration_gives_pooled_statistics_independent_of_batch_size() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    frozen = torch.nn.BatchNorm2d(2)
    frozen.weight.requires_grad_(False)
    model.append(frozen)
    x = 3.0 + 2.0 * torch.randn(10, 2, 8, 8)
    assert len(trainable_batchnorms(model)) == 2
    for bs in (1, 3, 10):
        n = recalibrate_batchnorm(model, [x[i:i + bs] for i in range(0, 10, bs)], lambda m, b: m(b))
        assert n == 2 and not model.training
        f = model[0](x)
        true_mean = f.mean(dim=(0, 2, 3))
        true_var = f.permute(1, 0, 2, 3).reshape(3, -1).var(dim=1, unbiased=True)
        torch.testing.assert_close(model[1].running_mean, true_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[1].running_var, true_var, rtol=1e-5, atol=1e-5)
    # the frozen layer keeps its statistics; dropout was off (eval) during the pass
    assert torch.equal(frozen.running_mean, torch.zeros(2)) and torch.equal(frozen.running_var, torch.ones(2))


@pytest.mark.parametrize("mode", ["final", "none"])
def test_checkpoint_carries_statistics_of_unaugmented_training_images(tmp_path: Path, mode: str) -> None:
    """Strong intensity augmentation and batches of 2: the checkpoint's first BatchNorm must hold
    the statistics of conv1's output on the clean training images (fails without recalibration)."""
    m = write_toy_cohort(tmp_path / "c", n_train=8, n_val=4, n_test=0, size=16, seed=7)
    cfg = TrainConfig.from_dict({
        "model": {"depth": 10, "input_size": [16, 16]}, "data": {"num_workers": 0},
        "augment": {"crop": "none", "contrast_prob": 1.0, "contrast_gamma": [0.3, 3.0], "scale_intensity_prob": 1.0,
                    "scale_intensity_factor": 0.9, "shift_intensity_prob": 1.0, "shift_intensity_offset": 0.8},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "seed": 1, "select": "last", "bn_recalibration": mode},
        "selection": {"method": "validation"}, "evaluate": {"n_bootstrap": 20}})
    res = train(cfg, m, tmp_path / mode, show_progress=False)
    model, card = load_checkpoint(res.checkpoint)
    assert card["training"]["bn_recalibration"] == mode
    df = read_manifest(m)
    ds = SliceStackDataset(df[df["split"] == "train"], build_eval_transform("none", 1.0, (16, 16)))
    x = torch.stack([ds[i]["input"] for i in range(len(ds))])
    with torch.no_grad():
        f = model.conv1(x).double()
    true_mean = f.mean(dim=(0, 2, 3))
    true_var = f.transpose(0, 1).reshape(f.shape[1], -1).var(dim=1)
    close = bool(np.allclose(model.bn1.running_mean.double(), true_mean, rtol=1e-4, atol=1e-5)
                 and np.allclose(model.bn1.running_var.double(), true_var, rtol=1e-4, atol=1e-5))
    assert close == (mode != "none")
