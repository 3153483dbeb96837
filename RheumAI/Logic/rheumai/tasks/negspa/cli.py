"""`rheumai negspa synth | dataset | train | evaluate | predict`: the NegSpA-AI task from the shell."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("negspa", help="NegSpA-AI: axial SpA from sacroiliac MRI + clinical features",
                       description="HLA-B27-negative axial spondyloarthritis (Lu et al., QIMS 2024): T1, T2 and "
                                   "fat-suppressed sacroiliac MRI, a box around both joints, clinical features.")
    s = p.add_subparsers(dest="negspa_command", metavar="STEP", required=True)

    q = s.add_parser("synth", help="write a generated cohort with known truth")
    q.add_argument("out", type=Path)
    q.add_argument("--n", type=int, default=24, help="subjects (half positive)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--spacing", type=float, default=1.0, help="T1 in-plane step in mm (T2 x1.25, STIR x1.5)")
    q.set_defaults(func=_synth)

    q = s.add_parser("dataset", help="preprocess a cohort CSV into a cache + manifest.csv")
    q.add_argument("cohort", type=Path, help="CSV: patient_id, t1, t2, stir, box, label, split")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--clinical", type=Path, default=None, help="clinical CSV (default: clinical.csv beside the cohort)")
    q.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="pixels per joint half (224 224)")
    q.add_argument("--n-slices", type=int, default=None, help="slices per sequence (3)")
    q.add_argument("--slice-spacing", type=float, default=None, help="mm between slices (4.0)")
    q.add_argument("--frame", choices=["acquisition", "patient"], default=None)
    q.set_defaults(func=_dataset)

    q = s.add_parser("train", help="two-stage training (image branches, then clinical fusion)")
    q.add_argument("manifest", type=Path)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--depth", type=int, default=50, help="ResNet depth per branch (50)")
    q.add_argument("--epochs-stage1", type=int, default=30)
    q.add_argument("--epochs-stage2", type=int, default=20)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--lr", type=float, default=1e-4, help="Adam, stage 1")
    q.add_argument("--lr-fusion", type=float, default=1e-3, help="Adam, stage 2")
    q.add_argument("--mixcut-alpha", type=float, default=1.0, help="Beta(alpha, alpha); 0 = off")
    q.add_argument("--mixcut-prob", type=float, default=0.5)
    q.add_argument("--threshold-rule", default="youden", help="youden | fixed:P | sensitivity:X (on validation)")
    q.add_argument("--state-every", type=int, default=1, help="write the resume state every N epochs (0: stage ends)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.add_argument("--resume", action="store_true", help="continue from <out>/state")
    q.set_defaults(func=_train)

    q = s.add_parser("evaluate", help="score a manifest split and write the report")
    q.add_argument("checkpoint", type=Path)
    q.add_argument("manifest", type=Path)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--split", default="test", help="train | val | test | all")
    q.add_argument("--n-bootstrap", type=int, default=2000)
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.set_defaults(func=_evaluate)

    q = s.add_parser("predict", help="predict one study (--t1 --t2 --stir --box) or a cohort CSV (--cohort)")
    q.add_argument("checkpoint", type=Path)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--t1", type=Path)
    q.add_argument("--t2", type=Path)
    q.add_argument("--stir", type=Path, help="fat-suppressed series (STIR / SPAIR)")
    q.add_argument("--box", type=Path, help="box JSON / CSV / Slicer markups ROI around both joints")
    q.add_argument("--clinical", default=None,
                   help="JSON file or inline JSON object of clinical values, e.g. '{\"crp\": 12, \"uveitis\": \"no\"}'")
    q.add_argument("--cohort", type=Path, help="cohort CSV instead of one study")
    q.add_argument("--no-saliency", action="store_true")
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.set_defaults(func=_predict)


def _synth(a: argparse.Namespace) -> int:
    from .synth import describe, make_cohort

    path = make_cohort(a.out, n=a.n, seed=a.seed, spacing=a.spacing)
    print(f"wrote {path} ({describe(path)})")
    return 0


def _dataset(a: argparse.Namespace) -> int:
    from .preprocess import params_with
    from .train import build_dataset

    p = params_with(size=a.size, n_slices=a.n_slices, slice_spacing_mm=a.slice_spacing, frame=a.frame)
    path = build_dataset(a.cohort, a.out, p, clinical_csv=a.clinical)
    info = json.loads((path.parent / "dataset.json").read_text())
    print(f"wrote {path}: {info['n']} studies, {len(info['excluded'])} excluded")
    return 0 if info["n"] else 1


def _train(a: argparse.Namespace) -> int:
    from .train import train_negspa

    r = train_negspa(a.manifest, a.out, depth=a.depth, epochs_stage1=a.epochs_stage1, epochs_stage2=a.epochs_stage2,
                     batch_size=a.batch_size, lr=a.lr, lr_fusion=a.lr_fusion, mixcut_alpha=a.mixcut_alpha,
                     mixcut_prob=a.mixcut_prob, threshold_rule=a.threshold_rule, seed=a.seed, device=a.device,
                     resume=a.resume, state_every=a.state_every)
    auc = "n/a" if r.val_auc is None else f"{r.val_auc:.3f}"
    print(f"checkpoint {r.checkpoint}: threshold {r.threshold:.4f}, validation AUC {auc}, "
          f"train loss {r.initial_loss:.4f} -> {r.final_loss:.4f}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from .train import evaluate_negspa

    rep = evaluate_negspa(a.checkpoint, a.manifest, a.out, split=a.split, n_bootstrap=a.n_bootstrap, device=a.device)
    print(f"{a.split}: n={rep['n']}, AUC {rep['auc']['value']:.3f}; report in {a.out / 'report.md'}")
    return 0


def _clinical(arg: str | None) -> dict | None:
    if not arg:
        return None
    text = Path(arg).read_text(encoding="utf-8") if Path(arg).is_file() else arg
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(arg if Path(arg).is_file() else None, f"clinical values are not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise InputError(None, "clinical values must be a JSON object {name: value}")
    return d


def _predict(a: argparse.Namespace) -> int:
    """The engine's predictor (same as ``rheumai predict``) with this task's historical options."""
    from ...engine.batch import read_study_table
    from ...engine.predict import predict_batch, task_of

    if a.cohort:
        studies = read_study_table(a.cohort, task_of(a.checkpoint))
    else:
        missing = [n for n in ("t1", "t2", "stir", "box") if getattr(a, n) is None]
        if missing:
            raise InputError(None, f"give --{' --'.join(missing)} (or --cohort)")
        studies = [{"t1": a.t1, "t2": a.t2, "stir": a.stir, "roi": a.box, "clinical": _clinical(a.clinical) or {}}]
    rows = predict_batch(studies, a.checkpoint, a.out, saliency=None if a.no_saliency else "gradcam",
                         device=a.device, show_progress=False)
    bad = [r for r in rows if r.get("error")]
    for r in rows:
        if not r.get("error"):
            print(f"{r['study']}: probability {r['probability']:.4f} (right {r['p_right']:.3f}, left "
                  f"{r['p_left']:.3f}), label {r['label']} at threshold {r['threshold']:.4f}; "
                  f"missing clinical: {r.get('clinical_missing') or 'none'}")
    print(f"wrote {a.out / 'predictions.csv'}: {len(rows) - len(bad)} predicted, {len(bad)} failed")
    return 1 if bad else 0
