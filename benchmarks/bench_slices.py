"""Imaging-core benchmark: windowed slice selection vs resample-everything-then-pick.

Both run in this process on the same images; the figures are medians of repeated runs. Printed:
time of each, speed-up, max abs difference of the normalised slices, mask disagreements.
Usage: python benchmarks/bench_slices.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from rheumai.io import read_study
from rheumai.tasks.cervical_ra.slices import SliceParams, select_slices, select_slices_full_resample

DATA = Path(__file__).resolve().parents[1] / "Testing" / "Data"


def _clinical_like(t2: sitk.Image) -> sitk.Image:
    """The real T2 re-sampled as a typical clinical sagittal T2: 0.5 x 0.5 mm in-plane, 3 mm slices."""
    spacing = (0.5, 0.5, 3.0)
    size = [int(round(sz * sp / s)) for sz, sp, s in zip(t2.GetSize(), t2.GetSpacing(), spacing)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(t2.GetDirection())
    ref.SetOrigin(t2.GetOrigin())
    return sitk.Resample(t2, ref, sitk.Transform(), sitk.sitkLinear, 0.0)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    repeats = 3 if quick else 7
    t2 = read_study(DATA / "cervical_t2_sag" / "t2.nii.gz").image
    cases = [
        ("real T2 384x185x52 @1mm", t2),
        ("clinical-like T2 @0.5x0.5x3mm", _clinical_like(t2)),
        ("real T1 DICOM 256x256x35 @1x1x4.8mm", read_study(DATA / "dicom_t1_sag_HFS").image),
    ]
    params = SliceParams()
    rows = []
    for name, image in cases:
        fast = select_slices(image, params)
        full = select_slices_full_resample(image, params)
        t_fast = _median_time(lambda: select_slices(image, params), repeats)
        t_full = _median_time(lambda: select_slices_full_resample(image, params), repeats)
        rows.append({
            "benchmark": "slices", "case": name, "selected_s": t_fast, "full_resample_s": t_full,
            "speedup": t_full / t_fast, "max_abs_diff": float(np.abs(fast.array - full.array).max()),
            "mask_mismatch": int((fast.mask != full.mask).sum()),
        })
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'case':40s} {'selected':>10s} {'full':>10s} {'speed-up':>9s} {'max|diff|':>10s} {'mask≠':>6s}")
    for r in rows:
        print(f"{r['case']:40s} {r['selected_s']*1000:8.1f}ms {r['full_resample_s']*1000:8.1f}ms "
              f"{r['speedup']:8.1f}x {r['max_abs_diff']:10.2e} {r['mask_mismatch']:6d}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    print_rows(run(ap.parse_args().quick))
