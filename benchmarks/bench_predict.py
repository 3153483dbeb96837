"""Benchmark: whole predict vs a bare forward pass, a naive MONAI pipeline, and batch throughput.

Times, in one process, on the same study and the same model:
  forward   a bare forward pass on the (1, 6, H, W) input (inference mode)
  predict   our whole predict (``rheumai.engine.predict``): read study -> slices -> model +
            Grad-CAM (CAM identity, same forward) -> saliency volume in the source grid ->
            write .nii.gz + JSON
  monai     monai.visualize.GradCAM on the same input (forward + backward)
  naive     MONAI LoadImage -> whole-volume Orientation + Spacing (1 mm) -> 6 middle sagittal
            slices -> pad/crop -> percentile scaling -> MONAI GradCAM
and on N copies of the study (default 50): ``predict_batch`` (streamed: reading ahead on worker
threads, writing on a writer thread; every file and table written) against a forward-only loop
over the N inputs pre-loaded as tensors. Peak memory: each single-study variant again in a fresh
child process (Linux VmHWM). Default: ResNet-101 at 512 x 512 (the paper) on the clinical-like
study (0.5 x 0.5 x 3 mm); ``--quick``: ResNet-18 at 256 x 256, 10 studies (CI smoke run). Random
weights (timing does not depend on them).

Run: ``python benchmarks/bench_predict.py [--quick] [--repeats N] [--n-studies N] [--original]``.
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
    from rheumai.tasks.cervical_ra.model import build_model, default_architecture
    from rheumai.tasks.cervical_ra.slices import SliceParams

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

    from rheumai.engine.predict import Predictor
    from rheumai.engine.write import write_study

    pred = Predictor(ckpt)
    model, size = pred.model, tuple(pred.card["preprocessing"]["size"])
    x = pred.prepare(str(study)).x[None]
    fns: dict[str, Callable[[], Any]] = {}

    def forward() -> Any:
        with torch.inference_mode():
            return model(x)

    def predict() -> Any:
        res = pred.predict(study, saliency="gradcam")
        return write_study(res, workdir, "bench", montage=False)

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


def _time_all(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best of ``repeats`` per variant after a warm-up (the minimum: least disturbed by other
    processes), as wall-clock seconds and as CPU seconds of this process (all its threads: the
    work done, which other processes on a shared machine do not inflate). Variants are
    interleaved within each repeat, so a burst of load elsewhere hits all of them rather than one."""
    for fn in fns.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {n: min(v) for n, v in wall.items()}, {n: min(v) for n, v in cpu.items()}


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


def throughput(ckpt: Path, study: Path, workdir: Path, n: int) -> dict[str, Any]:
    """Seconds for ``n`` studies: ``predict_batch`` (streamed, all files written) vs a
    forward-only loop over the ``n`` inputs pre-loaded as tensors (same model, same process)."""
    import torch

    from rheumai.engine.predict import Predictor, predict_batch

    copies = []
    for i in range(n):  # distinct paths: each is a study of its own (own key, own outputs)
        p = workdir / "studies" / f"s{i:03d}_{study.name}"
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            os.link(study, p) if hasattr(os, "link") else p.write_bytes(study.read_bytes())
        copies.append(str(p))
    pred = Predictor(ckpt)
    xs = [pred.prepare(c).x[None] for c in copies]  # pre-loaded inputs
    with torch.inference_mode():
        pred.model(xs[0])  # warm-up
        t, c = time.perf_counter(), time.process_time()
        for x in xs:
            pred.model(x)
        fwd, fwd_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    rows = predict_batch(copies, ckpt, workdir / "batch", saliency="gradcam", montage=False, show_progress=False,
                         predictor=pred)
    batch, batch_cpu = time.perf_counter() - t, time.process_time() - c
    if sum(bool(r.get("error")) for r in rows):
        raise RuntimeError(f"batch prediction failed: {[r['error'] for r in rows if r.get('error')][:2]}")
    return {"n": n, "forward_loop_s": round(fwd, 3), "predict_batch_s": round(batch, 3),
            "throughput_ratio": round(fwd / batch, 3), "forward_loop_cpu_s": round(fwd_cpu, 3),
            "predict_batch_cpu_s": round(batch_cpu, 3), "throughput_ratio_cpu": round(fwd_cpu / batch_cpu, 3)}


def run(quick: bool = False, repeats: int = 5, memory: bool = True, clinical_like: bool = True,
        n_studies: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Time the four single-study variants (one row each: seconds, ratio to forward, peak RSS) and
    the batch throughput on ``n_studies`` copies (default 50, 10 with ``quick``; 0: skip).

    clinical_like: use the real T2 re-sampled to 0.5 x 0.5 x 3 mm (an anisotropic clinical
    geometry, where whole-volume resampling costs more) instead of the 1 mm original.
    """
    cfg = _config(quick)
    n_studies = (10 if quick else 50) if n_studies is None else n_studies
    with tempfile.TemporaryDirectory() as tmp:
        study = _clinical_like_study(Path(tmp)) if clinical_like else STUDY
        ckpt = make_checkpoint(Path(tmp) / "ckpt", cfg["depth"], cfg["size"])
        fns = _variants(ckpt, study, Path(tmp) / "out")
        print(f"timing forward / predict / monai / naive, best of {repeats} ...", file=sys.stderr, flush=True)
        secs, cpu = _time_all(fns, repeats)
        del fns
        print(f"single study done (wall {secs}, CPU {cpu}); throughput on {n_studies} studies ...", file=sys.stderr,
              flush=True)
        batch = throughput(ckpt, study, Path(tmp), n_studies) if n_studies else None
        mem = {name: _peak_rss_child(name, ckpt, study) for name in VARIANTS} if memory else {}
    rows = []
    for name in VARIANTS:
        rows.append({"benchmark": "predict", "variant": name, "model": f"resnet{cfg['depth']}",
                     "study": "clinical-like 0.5x0.5x3mm" if clinical_like else "real T2 1mm",
                     "input": f"1x6x{cfg['size']}x{cfg['size']}", "seconds": round(secs[name], 4),
                     "ratio_to_forward": round(secs[name] / secs["forward"], 3),
                     "naive_over_this": round(secs["naive"] / secs[name], 3),
                     "cpu_seconds": round(cpu[name], 4), "cpu_ratio_to_forward": round(cpu[name] / cpu["forward"], 3),
                     "naive_over_this_cpu": round(cpu["naive"] / cpu[name], 3),
                     "peak_rss_mb": round(mem[name]["peak_rss_mb"], 1) if mem else None,
                     "rss_before_mb": round(mem[name]["rss_before_mb"], 1) if mem else None,
                     "call_peak_rss_mb": round(mem[name]["call_peak_mb"], 1) if mem else None})
    return rows, batch


def print_table(rows: list[dict[str, Any]], batch: dict[str, Any] | None = None) -> None:
    print(f"machine: {machine()}")
    print(f"study: {rows[0]['study']}; model {rows[0]['model']}, input {rows[0]['input']}")
    print("seconds: best of the repeats, wall clock and CPU (this process, all threads); peak RSS: whole child "
          "process (imports + model + call); during call: high-water mark reset after set-up")
    print(f"{'variant':<10}{'seconds':>10}{'x forward':>11}{'naive / this':>14}{'CPU s':>9}{'CPU x fwd':>11}"
          f"{'naive/this CPU':>16}{'peak RSS MB':>13}{'RSS before':>12}{'during call':>13}")
    nan = float("nan")
    for r in rows:
        print(f"{r['variant']:<10}{r['seconds']:>10.3f}{r['ratio_to_forward']:>11.2f}{r['naive_over_this']:>14.2f}"
              f"{r['cpu_seconds']:>9.2f}{r['cpu_ratio_to_forward']:>11.2f}{r['naive_over_this_cpu']:>16.2f}"
              f"{(r['peak_rss_mb'] or nan):>13.0f}{(r['rss_before_mb'] or nan):>12.0f}"
              f"{(r['call_peak_rss_mb'] or nan):>13.0f}")
    d = {r["variant"]: r for r in rows}
    if batch:
        print(f"batch of {batch['n']}: predict_batch {batch['predict_batch_s']:.2f} s wall / "
              f"{batch['predict_batch_cpu_s']:.2f} s CPU (streamed, all files written); forward-only loop over "
              f"pre-loaded tensors {batch['forward_loop_s']:.2f} s wall / {batch['forward_loop_cpu_s']:.2f} s CPU")
    p = d["predict"]
    print(f"aims (full run, CPU; wall / CPU time): whole predict <= 1.2x forward: {p['ratio_to_forward']:.2f}x / "
          f"{p['cpu_ratio_to_forward']:.2f}x; naive >= 3x predict: {p['naive_over_this']:.2f}x / "
          f"{p['naive_over_this_cpu']:.2f}x; "
          + (f"batch throughput >= 0.85x forward-only: {batch['throughput_ratio']:.2f}x / "
             f"{batch['throughput_ratio_cpu']:.2f}x; " if batch else "")
          + f"predict peak RSS <= 1500 MB: {p['peak_rss_mb']} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 256 x 256 (CI smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--original", action="store_true",
                    help="benchmark on the repository's 1 mm T2 instead of the clinical-like 0.5 x 0.5 x 3 mm copy")
    ap.add_argument("--n-studies", type=int, default=None, help="studies in the throughput run (50; quick 10; 0 skips)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--study", type=Path, default=STUDY, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.ckpt, args.study)
        return 0
    print_table(*run(args.quick, args.repeats, memory=not args.no_memory, clinical_like=not args.original,
                     n_studies=args.n_studies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
