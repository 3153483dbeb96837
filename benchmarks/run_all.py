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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small models and sizes (CI smoke run)")
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    for name in ("bench_slices", "bench_predict", "bench_train"):
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            print(f"[{name}] not available: {exc}\n")
            continue
        print(f"== {name} ==")
        rows = mod.run(quick=args.quick)
        if hasattr(mod, "print_rows"):
            mod.print_rows(rows)
        else:
            for r in rows:
                print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
