"""`rheumai demo --task msasss`: generated cohort -> training -> held-out evaluation -> scene, on CPU.

Generates ``n`` patients (a lateral cervical and a lateral lumbar DX each), splits them at patient
level (60 % train, 10 % validation, 30 % test, seeded), trains the four networks on the engine
(the CPU configuration: a small DenseNet shared by the lesion outputs, not the paper's one
DenseNet-121 per lesion), predicts every held-out view from its DICOM file, evaluates against the
truth (``eval/report.md``), re-scores one view from moved points (the console path used after a
user drags a point), and writes a Slicer scene of one held-out patient when slicer-core is present.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atomic import write_json

DEFAULT_N = 120
TARGETS = {"corner_accuracy": (">=", 0.85), "total_mae": ("<=", 3.0), "corner_keypoint_median_mm": ("<=", 2.0)}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def run_demo(out_dir: str | Path, seed: int = 0, n: int | None = None, progress: bool = True,
             epochs_scale: float = 1.0) -> dict[str, Any]:
    """Run the demo into ``out_dir/msasss`` (its cohort/run/eval/scene folders are replaced, so the
    default ``demo_out`` of the other tasks' demos is not touched); returns the figures.

    ``epochs_scale`` shortens every training stage (tests).
    """
    from .anatomy import VIEWS
    from .dataset import load_cohort, split_patients
    from .evaluate import evaluate, write_report
    from .predict import analyse_view, rescore
    from .synth import make_cohort
    from .train import StageConfig, TrainConfig, train_system

    out = Path(out_dir) / "msasss"
    for sub in ("cohort", "run", "eval", "scene"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    n = int(n or DEFAULT_N)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    _say(progress, f"[msasss] generating {n} patients (lateral cervical + lumbar DX) ...")
    make_cohort(out / "cohort", n=n, seed=seed, progress=progress)
    records = load_cohort(out / "cohort")
    split = split_patients([r.patient_id for r in records], seed=seed)
    write_json(out / "split.json", split)
    train = [r for r in records if split[r.patient_id] == "train"]
    val = [r for r in records if split[r.patient_id] == "val"]
    test = [r for r in records if split[r.patient_id] == "test"]
    t_gen = time.perf_counter() - t0

    def ep(e: int) -> int:
        return max(1, int(round(e * epochs_scale)))

    base = TrainConfig(seed=seed)
    cfg = TrainConfig(seed=seed, landmarks=StageConfig(epochs=ep(base.landmarks.epochs), batch_size=16, lr=3e-3),
                      refine=StageConfig(epochs=ep(base.refine.epochs), batch_size=32, lr=3e-3),
                      lesions=StageConfig(epochs=ep(base.lesions.epochs), batch_size=32, lr=3e-3),
                      ordinal=StageConfig(epochs=ep(base.ordinal.epochs), batch_size=32, lr=3e-3),
                      show_progress=progress)
    n_tr = len({r.patient_id for r in train})
    _say(progress, f"[msasss] training on {n_tr} patients ({len(train)} views): landmarks, corner refinement, "
                   "lesion classifiers, ordinal alternative ...")
    t1 = time.perf_counter()
    system, model_dir = train_system(train, val, out / "run", cfg, log=(print if progress else None))
    t_train = time.perf_counter() - t1

    _say(progress, f"[msasss] predicting {len(test)} held-out views ...")
    t2 = time.perf_counter()
    results = [analyse_view(system, r.array, r.spacing_mm, r.view) for r in test]
    t_pred = time.perf_counter() - t2
    metrics, rows = evaluate(test, results)
    write_report(out / "eval", metrics, rows)

    # Re-scoring from corrected points: the first held-out patient, truth points as the "correction".
    pid = test[0].patient_id
    views = {r.view: (r.array, r.spacing_mm) for r in test if r.patient_id == pid}
    corrected = {r.view: r.points_xy for r in test if r.patient_id == pid}
    re = rescore(system, views, corrected)
    write_json(out / "eval" / "rescore_example.json", {"patient_id": pid, "total": re["total"]})

    scene = None
    study: dict[str, Any] = {r.view: r.path for r in test if r.patient_id == pid}
    study["id"] = pid
    try:
        import rheumai_mrml.landmark_scene  # noqa: F401  (needs slicer-core)
    except ImportError as exc:
        _say(progress, f"[msasss] no scene written ({exc})")
    else:
        from .console import predict_study, write_scene

        scene = str(write_scene(out / "scene" / f"{pid}.mrb", predict_study(system, study), study))

    c, t, k = metrics["corners"], metrics["total"], metrics["keypoints_corners"]
    figures = {
        "n_patients": n, "n_test_patients": metrics["n_patients"], "n_test_corners": metrics["n_corners"],
        "corner_accuracy": c["accuracy"]["value"], "corner_accuracy_ci": [c["accuracy"]["lo"], c["accuracy"]["hi"]],
        "corner_accuracy_by_score": {s: e["value"] for s, e in c["accuracy_by_true_score"].items()},
        "corner_accuracy_ordinal_model": metrics.get("corners_ordinal_model", {}).get("accuracy", {}).get("value"),
        "total_mae": t.get("mae", {}).get("value"), "total_icc": t.get("icc", {}).get("value"),
        "total_mae_ordinal_model": metrics.get("total_ordinal_model", {}).get("mae", {}).get("value"),
        "corner_keypoint_median_mm": k["median_mm"], "corner_keypoint_within_2mm": k["within_2mm"],
        "seconds": {"generate": round(t_gen, 1), "train": round(t_train, 1), "predict": round(t_pred, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "report": str(out / "eval" / "report.md"), "model": str(model_dir), "scene": scene,
        "rescore_example_total": re["total"]["total"],
    }
    reached = {}
    for key, (op, target) in TARGETS.items():
        v = figures[key]
        reached[key] = bool(v is not None and np.isfinite(v) and (v >= target if op == ">=" else v <= target))
    figures["targets"] = {k: {"target": f"{op} {tv}", "value": figures[k], "reached": reached[k]}
                          for k, (op, tv) in TARGETS.items()}
    write_json(out / "summary.json", figures)
    if progress:
        print("\n=== mSASSS demo (held-out generated patients) ===")
        for key, d in figures["targets"].items():
            val = "n/a" if d["value"] is None else f"{d['value']:.3f}"
            print(f"  {key:28s} {val:>6s}   target {d['target']:8s} {'reached' if d['reached'] else 'NOT reached'}")
        print(f"  ordinal alternative: corner accuracy {figures['corner_accuracy_ordinal_model']}, "
              f"total MAE {figures['total_mae_ordinal_model']}")
        print(f"  time: {figures['seconds']}")
        print(f"  report: {figures['report']}")
    return figures
