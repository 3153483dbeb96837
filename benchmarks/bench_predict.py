"""Benchmark: our whole predict vs a bare forward pass, MONAI's Grad-CAM and a naive MONAI pipeline.

Times, in one process, on the same study (the repository's real cervical T2) and the same model:
  forward   a bare forward pass on the (1, 6, H, W) input (inference mode)
  predict   our whole predict: read study -> slices -> model + Grad-CAM (CAM identity, same
            forward) -> saliency volume in the source grid -> write .nii.gz
  monai     monai.visualize.GradCAM on the same input (forward + backward)
  naive     MONAI LoadImage -> whole-volume Orientation + Spacing (1 mm) -> 6 middle sagittal
            slices -> pad/crop -> percentile scaling -> MONAI GradCAM
Peak memory: each variant again in a fresh child process (ru_maxrss), after the same imports and
model load, so the figures do not mask each other. Default: ResNet-101 at 512 x 512 (the paper);
``--quick``: ResNet-18 at 256 x 256 (CI smoke run). Random weights (timing does not depend on them).

Run: ``python benchmarks/bench_predict.py [--quick] [--repeats N]``; ``run(quick)`` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "Testing" / "Data" / "cervical_t2_sag" / "t2.nii.gz"
VARIANTS = ("forward", "predict", "monai", "naive")


def _config(quick: bool) -> dict[str, Any]:
    return {"depth": 18, "size": 256} if quick else {"depth": 101, "size": 512}


def make_checkpoint(folder: Path, depth: int, size: int) -> Path:
    """A random-weight RheumAI checkpoint (safetensors + card) of the given depth and input size."""
    import torch

    from rheumai.checkpoint import save_checkpoint
    from rheumai.models import build_model, default_architecture
    from rheumai.slices import SliceParams

    torch.manual_seed(0)
    arch = default_architecture(depth=depth, input_size=(size, size))
    card = {"architecture": arch, "preprocessing": SliceParams(size=(size, size)).to_dict(), "threshold": 0.5,
            "threshold_rule": "benchmark (random weights)", "task": "cervical_ra", "model_id": f"bench-r{depth}-{size}"}
    return save_checkpoint(folder, build_model(arch), card)


def _variants(ckpt: Path, study: Path, workdir: Path) -> dict[str, Callable[[], Any]]:
    """The four timed callables, sharing one loaded model."""
    import numpy as np
    import torch

    from rheumai.predict import Predictor, write_outputs

    pred = Predictor(ckpt)
    model, size = pred.model, tuple(pred.params.size)
    x = torch.from_numpy(np.ascontiguousarray(pred.select(study)[0].array))[None]

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    def predict() -> Any:
        res = pred.predict(study, saliency="gradcam")
        return write_outputs(res, workdir, "bench", montage=False)

    from monai.visualize import GradCAM

    # Built once: MONAI's hooks are never removed, rebuilding would stack them.
    gradcam = GradCAM(nn_module=model, target_layers="layer4", postprocessing=lambda m: m)

    def monai() -> Any:
        return gradcam(x)

    from monai.transforms import (Compose, LoadImage, Orientation, ResizeWithPadOrCrop,
                                  ScaleIntensityRangePercentiles, Spacing)

    load = Compose([LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS"),
                    Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear")])
    scale = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=False)
    pad = ResizeWithPadOrCrop(spatial_size=size)

    def naive() -> Any:
        vol = load(str(study))[0]  # (R->L... as RAS: x, y, z) whole volume at 1 mm
        mid = vol.shape[0] // 2
        slab = vol[mid - 3: mid + 3]  # six middle sagittal slices (A-P, I-S)
        slab = torch.flip(torch.as_tensor(slab).permute(0, 2, 1), dims=[1])  # (C, S->I, A->P)
        inp = torch.as_tensor(np.asarray(scale(pad(slab))), dtype=torch.float32)[None]
        return gradcam(inp)

    return {"forward": forward, "predict": predict, "monai": monai, "naive": naive}


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_rss_child(variant: str, ckpt: Path, study: Path) -> dict[str, float]:
    """Run one variant once in a fresh process; its peak RSS (MB) and its RSS before running."""
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--ckpt", str(ckpt), "--study", str(study)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(variant: str, ckpt: Path, study: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fns = _variants(ckpt, study, Path(tmp))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fns[variant]()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak, "rss_before_mb": before}))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"Python {platform.python_version()}")


def run(quick: bool = False, repeats: int = 3, memory: bool = True) -> list[dict[str, Any]]:
    """Time the four variants; return one row per variant (seconds, ratio to forward, peak RSS)."""
    cfg = _config(quick)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", cfg["depth"], cfg["size"])
        fns = _variants(ckpt, STUDY, Path(tmp) / "out")
        secs = {name: _time(fn, repeats) for name, fn in fns.items()}
        mem = {name: _peak_rss_child(name, ckpt, STUDY) for name in VARIANTS} if memory else {}
    rows = []
    for name in VARIANTS:
        rows.append({"benchmark": "predict", "variant": name, "model": f"resnet{cfg['depth']}",
                     "input": f"1x6x{cfg['size']}x{cfg['size']}", "seconds": round(secs[name], 4),
                     "ratio_to_forward": round(secs[name] / secs["forward"], 3),
                     "naive_over_this": round(secs["naive"] / secs[name], 3),
                     "peak_rss_mb": round(mem[name]["peak_rss_mb"], 1) if mem else None,
                     "rss_before_mb": round(mem[name]["rss_before_mb"], 1) if mem else None})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"machine: {machine()}")
    print(f"study: {STUDY.relative_to(ROOT)}; model {rows[0]['model']}, input {rows[0]['input']}")
    print(f"{'variant':<10}{'seconds':>10}{'x forward':>11}{'naive / this':>14}{'peak RSS MB':>13}{'RSS before':>12}")
    for r in rows:
        print(f"{r['variant']:<10}{r['seconds']:>10.3f}{r['ratio_to_forward']:>11.2f}{r['naive_over_this']:>14.2f}"
              f"{(r['peak_rss_mb'] or float('nan')):>13.0f}{(r['rss_before_mb'] or float('nan')):>12.0f}")
    d = {r["variant"]: r for r in rows}
    print(f"aims (full run, CPU): predict <= 1.3x forward: {d['predict']['ratio_to_forward']:.2f}x; "
          f"naive >= 3x predict: {d['predict']['naive_over_this']:.2f}x; "
          f"predict peak RSS <= 1500 MB: {d['predict']['peak_rss_mb']} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 256 x 256 (CI smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--study", type=Path, default=STUDY, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.ckpt, args.study)
        return 0
    print_table(run(args.quick, args.repeats, memory=not args.no_memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
