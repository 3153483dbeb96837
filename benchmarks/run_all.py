"""All benchmarks in one process: imaging core, predict, training throughput.

Prints a description of the machine, then one table of figures and ratios (each ratio against a
baseline run in this same process). Usage: python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical cores{mem}, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def unify(row: dict) -> dict:
    """One row of the common table: what, ours, baseline (same process), ratio, note."""
    b = row.get("benchmark")
    if b == "slices":
        return {"what": f"slice selection: {row['case']}", "ours": f"{row['selected_s'] * 1000:.1f} ms",
                "baseline": f"{row['full_resample_s'] * 1000:.1f} ms (resample all, then pick)",
                "ratio": f"{row['speedup']:.1f}x faster",
                "note": f"max|diff| {row['max_abs_diff']:.1e}, mask mismatches {row['mask_mismatch']}"}
    if b == "predict":
        rss = row.get("peak_rss_mb")
        return {"what": f"predict {row['model']} {row.get('study', '')} {row['input']}: {row['variant']}", "ours": f"{row['seconds']:.3f} s",
                "baseline": "bare forward / naive", "ratio": f"{row['ratio_to_forward']:.2f}x fwd, "
                f"naive {row['naive_over_this']:.2f}x", "note": f"peak RSS {rss:.0f} MB" if rss else ""}
    if b == "predict_batch":
        return {"what": f"predict_batch, {row['n']} studies (streamed, files written)",
                "ours": f"{row['predict_batch_s']:.2f} s", "baseline": f"{row['forward_loop_s']:.2f} s "
                "(forward-only loop, pre-loaded tensors)", "ratio": f"{row['throughput_ratio']:.2f}x throughput",
                "note": "aim >= 0.85x"}
    if b == "train":
        return {"what": f"training: {row['model']}", "ours": f"{row['pipeline_samples_per_s']:.2f} samples/s",
                "baseline": f"{row['bare_samples_per_s']:.2f} samples/s (bare step)",
                "ratio": f"{row['ratio']:.2f}", "note": "full pipeline / bare step"}
    return {"what": str(row), "ours": "", "baseline": "", "ratio": "", "note": ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small models and sizes (CI smoke run)")
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    table: list[dict] = []
    for name in ("bench_slices", "bench_predict", "bench_train"):
        mod = importlib.import_module(name)
        print(f"running {name} ...", flush=True)
        if name == "bench_predict":  # clinical-like study + batch throughput, then the 1 mm original
            rows, batch = mod.run(quick=args.quick)
            table += [unify(r) for r in rows] + ([unify(dict(batch, benchmark="predict_batch"))] if batch else [])
            table += [unify(r) for r in mod.run(quick=args.quick, memory=False, clinical_like=False, n_studies=0)[0]]
            continue
        table += [unify(r) for r in mod.run(quick=args.quick)]
    cols = ("what", "ours", "baseline", "ratio", "note")
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols}
    print()
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in table:
        print("  ".join(r[c].ljust(widths[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
