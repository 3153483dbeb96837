"""Training-throughput benchmark: samples per second of one optimisation step (forward, backward,
Adam) on a bare in-memory batch (baseline) and through the real pipeline (manifest -> memory-mapped
cache -> MONAI augmentation -> DataLoader -> step). The ratio is the cost of the data pipeline.

Usage: python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rheumai.engine.train import read_manifest
from rheumai.tasks.cervical_ra.train import (AugmentConfig, SliceStackDataset, build_train_transform,
                                             write_toy_cohort)
from rheumai.tasks.cervical_ra.model import build_model, default_architecture


def _steps(model, opt, batches, loss_fn) -> float:
    n = 0
    t0 = time.perf_counter()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).squeeze(1), y)
        loss.backward()
        opt.step()
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[dict]:
    configs = [(18, 128, 4, 6)] if quick else [(18, 128, 4, 8), (18, 256, 4, 6), (101, 512, 4, 3)]
    rows = []
    for depth, size, batch, n_steps in configs:
        torch.manual_seed(0)
        model = build_model(default_architecture(depth=depth, input_size=(size, size)))
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        x = torch.rand(batch, 6, size, size)
        y = torch.randint(0, 2, (batch,)).float()
        _steps(model, opt, [(x, y)], loss_fn)  # warm-up
        bare = _steps(model, opt, [(x, y)] * n_steps, loss_fn)
        with tempfile.TemporaryDirectory() as tmp:
            manifest = write_toy_cohort(tmp, n_train=batch * n_steps, n_val=0, n_test=0, size=size)
            rows_df = read_manifest(manifest)
            ds = SliceStackDataset(rows_df, build_train_transform(AugmentConfig(), (size, size)))
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
            batches = [(b["input"], b["target"]["out"].float()) for b in loader]
            t0 = time.perf_counter()
            batches = [(b["input"], b["target"]["out"].float()) for b in loader]
            data_s = time.perf_counter() - t0
            piped = _steps(model, opt, batches, loss_fn)
        pipeline = 1.0 / (1.0 / piped + data_s / (batch * n_steps))
        rows.append({"benchmark": "train", "model": f"ResNet-{depth} {size}x{size} batch {batch}",
                     "bare_samples_per_s": bare, "pipeline_samples_per_s": pipeline, "ratio": pipeline / bare})
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'model':32s} {'bare step':>14s} {'full pipeline':>15s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['model']:32s} {r['bare_samples_per_s']:10.2f} s/s {r['pipeline_samples_per_s']:11.2f} s/s "
              f"{r['ratio']:7.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    print_rows(run(ap.parse_args().quick))
