"""`rheumai negspa dataset`: a NegSpA-AI cohort CSV -> cache + manifest.csv (training, evaluation and
prediction are the generic `rheumai train | evaluate | predict`; the generated cohort `rheumai synth`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("negspa", help="NegSpA-AI: axial SpA from sacroiliac MRI + clinical features",
                       description="HLA-B27-negative axial spondyloarthritis (Lu et al., QIMS 2024): T1, T2 and "
                                   "fat-suppressed sacroiliac MRI, a box around both joints, clinical features.")
    s = p.add_subparsers(dest="negspa_command", metavar="STEP", required=True)
    q = s.add_parser("dataset", help="preprocess a cohort CSV into a cache + manifest.csv")
    q.add_argument("cohort", type=Path, help="CSV: patient_id, t1, t2, stir, box, label, split")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--clinical", type=Path, default=None, help="clinical CSV (default: clinical.csv beside the cohort)")
    q.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="pixels per joint half (224 224)")
    q.add_argument("--n-slices", type=int, default=None, help="slices per sequence (3)")
    q.add_argument("--slice-spacing", type=float, default=None, help="mm between slices (4.0)")
    q.add_argument("--frame", choices=["acquisition", "patient"], default=None)
    q.set_defaults(func=_dataset)


def _dataset(a: argparse.Namespace) -> int:
    from .preprocess import params_with
    from .train import build_dataset

    p = params_with(size=a.size, n_slices=a.n_slices, slice_spacing_mm=a.slice_spacing, frame=a.frame)
    path = build_dataset(a.cohort, a.out, p, clinical_csv=a.clinical)
    info = json.loads((path.parent / "dataset.json").read_text())
    print(f"wrote {path}: {info['n']} studies, {len(info['excluded'])} excluded")
    return 0 if info["n"] else 1
