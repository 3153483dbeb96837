"""DistributedDataParallel: 2 CPU processes (gloo, torchrun) follow the single-process run.

BatchNorm choice: gloo/CPU has no SyncBatchNorm (PyTorch: "SyncBatchNorm layers only work with
GPU modules"), so each DDP process normalises with the statistics of its own half of the global
batch. The single-process reference therefore runs the same global batch of 4 as 2 accumulated
micro-batches of 2 (``accumulate_steps = 2``): BatchNorm sees the same 2-case groups, the summed
gradient equals DDP's averaged one, and the trainable weights must agree to float tolerance. (On
GPUs the trainer converts to SyncBatchNorm, making DDP match a plain batch of 4.) BatchNorm
running statistics are not compared: DDP keeps rank 0's, the reference updates them from both
micro-batches; they do not enter the training-mode forward pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from rheumai.config import TrainConfig, save_config
from rheumai.tasks.cervical_ra.train import write_toy_cohort
from rheumai.engine.train import train


def _config(accumulate: int) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"depth": 18, "input_size": [32, 32]},
        "data": {"num_workers": 0},
        "augment": {"enabled": True, "crop": "random_center"},   # per-case seeded: same in both runs
        "train": {"epochs": 2, "batch_size": 4, "accumulate_steps": accumulate, "lr": 1e-3, "seed": 11,
                  "select": "last"},
        "selection": {"method": "validation"},
        "evaluate": {"n_bootstrap": 50}})


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    manifest = write_toy_cohort(tmp_path / "cohort", n_train=12, n_val=4, n_test=0, size=32, seed=4)
    cfg_path = save_config(_config(accumulate=1), tmp_path / "ddp.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rheumai.cli", "train", "--config", str(cfg_path), "--manifest", str(manifest),
           "--out", str(tmp_path / "ddp"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun process (OMP_NUM_THREADS=1)
    try:
        single = train(_config(accumulate=2), manifest, tmp_path / "single", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    b = load_file(str(single.checkpoint / "model.safetensors"))
    assert set(a) == set(b)
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = 0
    init = {k: v for k, v in _initial_weights().items()}
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += int(not torch.allclose(a[k], init[k]))
    assert moved > len(params) // 2  # training really changed the weights
    card = json.loads((tmp_path / "ddp" / "model" / "model_card.json").read_text())
    assert card["training"]["world_size"] == 2


def _initial_weights() -> dict[str, torch.Tensor]:
    from rheumai.tasks.cervical_ra.model import build_model, default_architecture

    torch.manual_seed(11)
    return build_model(default_architecture(18, 6, (32, 32))).state_dict()
