"""Benchmark: our whole predict vs a bare forward pass, MONAI's Grad-CAM and a naive MONAI pipeline.

Times, in one process, on the same study (the repository's real cervical T2) and the same model:
  forward   a bare forward pass on the (1, 6, H, W) input (inference mode)
  predict   our whole predict: read study -> slices -> model + Grad-CAM (CAM identity, same
            forward) -> saliency volume in the source grid -> write .nii.gz
  monai     monai.visualize.GradCAM on the same input (forward + backward)
  naive     MONAI LoadImage -> whole-volume Orientation + Spacing (1 mm) -> 6 middle sagittal
            slices -> pad/crop -> percentile scaling -> MONAI GradCAM
Peak memory: each variant again in a fresh child process (Linux VmHWM), after the same imports and
model load, so the figures do not mask each other. Default: ResNet-101 at 512 x 512 (the paper);
``--quick``: ResNet-18 at 256 x 256 (CI smoke run). Random weights (timing does not depend on them).

Run: ``python benchmarks/bench_predict.py [--quick] [--repeats N]``; ``run(quick)`` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def _variants(ckpt: Path, study: Path, workdir: Path, only: str | None = None) -> dict[str, Callable[[], Any]]:
    """The timed callables (all four, or ``only`` one), sharing one loaded model.

    MONAI's GradCAM gets its own copy of the model: its hooks are never removed and would
    otherwise also run (and cost) in the forward and predict variants.
    """
    import copy

    import numpy as np
    import torch

    from rheumai.predict import Predictor, write_outputs

    pred = Predictor(ckpt)
    model, size = pred.model, tuple(pred.params.size)
    x = torch.from_numpy(np.ascontiguousarray(pred.select(study)[0].array))[None]
    fns: dict[str, Callable[[], Any]] = {}

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    def predict() -> Any:
        res = pred.predict(study, saliency="gradcam")
        return write_outputs(res, workdir, "bench", montage=False)

    fns["forward"], fns["predict"] = forward, predict
    if only in (None, "monai", "naive"):
        from monai.visualize import GradCAM

        # Built once (rebuilding would stack hooks); identity post-processing.
        gradcam = GradCAM(nn_module=copy.deepcopy(model) if only is None else model, target_layers="layer4",
                          postprocessing=lambda m: m)

        def monai() -> Any:
            return gradcam(x)

        from monai.transforms import (Compose, LoadImage, Orientation, ResizeWithPadOrCrop,
                                      ScaleIntensityRangePercentiles, Spacing)

        load = Compose([LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS"),
                        Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear")])
        scale = ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=False)
        pad = ResizeWithPadOrCrop(spatial_size=size)

        def naive() -> Any:
            vol = load(str(study))[0]  # whole volume at 1 mm, RAS axes (x: R->L is -, y: P->A, z: I->S)
            mid = vol.shape[0] // 2
            slab = vol[mid - 3: mid + 3]  # six middle sagittal slices (A-P, I-S)
            slab = torch.flip(torch.as_tensor(slab).permute(0, 2, 1), dims=[1])  # (C, S->I, P->A)
            inp = torch.as_tensor(np.asarray(scale(pad(slab))), dtype=torch.float32)[None]
            return gradcam(inp)

        fns["monai"], fns["naive"] = monai, naive
    return fns if only is None else {only: fns[only]}


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time_all(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Best of ``repeats`` per variant after a warm-up (the minimum: least disturbed by other
    processes). Variants are interleaved within each repeat, so a burst of load elsewhere hits all
    of them rather than one."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(v) for name, v in times.items()}


def _peak_rss_child(variant: str, ckpt: Path, study: Path) -> dict[str, float]:
    """Run one variant once in a fresh process; its peak RSS (MB) and its RSS before running."""
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--ckpt", str(ckpt), "--study", str(study)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(variant: str, ckpt: Path, study: Path) -> None:
    """One variant in a fresh process: its process peak RSS, and the peak during the call alone.

    The high-water mark is reset (Linux ``/proc/self/clear_refs`` = 5) after set-up, so
    ``call_peak_mb`` is the peak while the variant runs, not the checkpoint loading's.
    """
    with tempfile.TemporaryDirectory() as tmp:
        fn = _variants(ckpt, study, Path(tmp), only=variant)[variant]
        before = _rss_mb("VmRSS")
        setup_peak = _rss_mb("VmHWM")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        fn()
        call_peak = _rss_mb("VmHWM")
    # Process peak = max(set-up, call). Not ru_maxrss: Linux carries it over from the parent
    # across fork + exec, so a child would report the benchmark driver's peak.
    print(json.dumps({"peak_rss_mb": max(setup_peak, call_peak), "rss_before_mb": before, "call_peak_mb": call_peak}))


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
            f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} at start "
            "(other processes share these cores: compare ratios, not absolute times)")


def _clinical_like_study(folder: Path) -> Path:
    """The real T2 re-sampled as a typical clinical sagittal T2 (0.5 x 0.5 mm in-plane, 3 mm slices)."""
    import SimpleITK as sitk

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_slices import _clinical_like

    path = folder / "t2_clinical_like.nii.gz"
    sitk.WriteImage(_clinical_like(sitk.ReadImage(str(STUDY), sitk.sitkFloat32)), str(path))
    return path


def run(quick: bool = False, repeats: int = 5, memory: bool = True, clinical_like: bool = False) -> list[dict[str, Any]]:
    """Time the four variants; return one row per variant (seconds, ratio to forward, peak RSS).

    clinical_like: use the real T2 re-sampled to 0.5 x 0.5 x 3 mm (an anisotropic clinical
    geometry, where whole-volume resampling costs more) instead of the 1 mm original.
    """
    cfg = _config(quick)
    with tempfile.TemporaryDirectory() as tmp:
        study = _clinical_like_study(Path(tmp)) if clinical_like else STUDY
        ckpt = make_checkpoint(Path(tmp) / "ckpt", cfg["depth"], cfg["size"])
        fns = _variants(ckpt, study, Path(tmp) / "out")
        secs = _time_all(fns, repeats)
        mem = {name: _peak_rss_child(name, ckpt, study) for name in VARIANTS} if memory else {}
    rows = []
    for name in VARIANTS:
        rows.append({"benchmark": "predict", "variant": name, "model": f"resnet{cfg['depth']}",
                     "study": "clinical-like 0.5x0.5x3mm" if clinical_like else "real T2 1mm",
                     "input": f"1x6x{cfg['size']}x{cfg['size']}", "seconds": round(secs[name], 4),
                     "ratio_to_forward": round(secs[name] / secs["forward"], 3),
                     "naive_over_this": round(secs["naive"] / secs[name], 3),
                     "peak_rss_mb": round(mem[name]["peak_rss_mb"], 1) if mem else None,
                     "rss_before_mb": round(mem[name]["rss_before_mb"], 1) if mem else None,
                     "call_peak_rss_mb": round(mem[name]["call_peak_mb"], 1) if mem else None})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"machine: {machine()}")
    print(f"study: {rows[0]['study']}; model {rows[0]['model']}, input {rows[0]['input']}")
    print("seconds: best of the repeats; peak RSS: whole child process (imports + model + call); "
          "during call: high-water mark reset after set-up")
    print(f"{'variant':<10}{'seconds':>10}{'x forward':>11}{'naive / this':>14}{'peak RSS MB':>13}"
          f"{'RSS before':>12}{'during call':>13}")
    nan = float("nan")
    for r in rows:
        print(f"{r['variant']:<10}{r['seconds']:>10.3f}{r['ratio_to_forward']:>11.2f}{r['naive_over_this']:>14.2f}"
              f"{(r['peak_rss_mb'] or nan):>13.0f}{(r['rss_before_mb'] or nan):>12.0f}{(r['call_peak_rss_mb'] or nan):>13.0f}")
    d = {r["variant"]: r for r in rows}
    print(f"aims (full run, CPU): predict <= 1.3x forward: {d['predict']['ratio_to_forward']:.2f}x; "
          f"naive >= 3x predict: {d['predict']['naive_over_this']:.2f}x; "
          f"predict peak RSS <= 1500 MB: {d['predict']['peak_rss_mb']} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 256 x 256 (CI smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--clinical-like", action="store_true",
                    help="benchmark on the real T2 re-sampled to 0.5 x 0.5 x 3 mm (anisotropic clinical geometry)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--study", type=Path, default=STUDY, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.ckpt, args.study)
        return 0
    print_table(run(args.quick, args.repeats, memory=not args.no_memory, clinical_like=args.clinical_like))
    return 0


if __name__ == "__main__":
    sys.exit(main())
