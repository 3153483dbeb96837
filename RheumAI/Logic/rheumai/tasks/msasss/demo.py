"""`rheumai demo --task msasss`: generated cohort -> training -> held-out evaluation -> scene, on CPU.

Generates ``n`` patients (a lateral cervical and a lateral lumbar DX each) and trains through the
task's ``train`` entry point (``configs/msasss.toml``'s defaults: the CPU crop model, a small
DenseNet shared by the lesion outputs; patients split 60 / 10 / 30 %, seeded), evaluates the
held-out patients from their DICOM files through ``evaluate`` (``eval/report.md``), re-scores one
patient from corrected points, and writes a Slicer scene of it when slicer-core is present.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import write_json

DEFAULT_N = 120
TARGETS = {"corner_accuracy": (">=", 0.85), "total_mae": ("<=", 3.0), "corner_keypoint_median_mm": ("<=", 2.0)}


def run_demo(out_dir: str | Path, seed: int = 0, n: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the demo into ``out_dir/msasss`` (its cohort/run/eval/scene folders are replaced); returns the figures."""
    from .dataset import load_cohort
    from .evaluate import evaluate
    from .predict import predictor, rescore_points, write_scene
    from .synth import make_cohort
    from .train import train

    say = print if progress else (lambda *a: None)
    out = Path(out_dir) / "msasss"
    for sub in ("cohort", "run", "eval", "scene"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    n = int(n or DEFAULT_N)
    t0 = time.perf_counter()
    say(f"[msasss] generating {n} patients (lateral cervical + lumbar DX) ...")
    make_cohort(out / "cohort", n=n, seed=seed, progress=progress)
    table = out / "cohort" / "studies.csv"
    t_gen = time.perf_counter() - t0

    say("[msasss] training: landmarks, corner refinement, lesion classifiers, ordinal alternative ...")
    t1 = time.perf_counter()
    model = train({"task": "msasss", "seed": seed}, table, out / "run", show_progress=progress, log=say).checkpoint
    t_train = time.perf_counter() - t1

    say("[msasss] predicting and evaluating the held-out patients ...")
    t2 = time.perf_counter()
    metrics = evaluate(model, table, out / "eval", show_progress=progress)
    t_pred = time.perf_counter() - t2

    # Re-scoring from corrected points: a held-out patient, the truth points as the "correction".
    pid = metrics["totals_table"][0]["patient_id"]
    test = [r for r in load_cohort(table) if r.patient_id == pid]
    study: dict[str, Any] = {r.view: r.path for r in test}
    re = rescore_points(model, study, {}, points_xy={r.view: r.points_xy for r in test})
    write_json(out / "eval" / "rescore_example.json", {"patient_id": pid, "total": re["total"]})
    scene = None
    try:
        import rheumai_mrml.landmark_scene  # noqa: F401  (needs slicer-core)
    except ImportError as exc:
        say(f"[msasss] no scene written ({exc})")
    else:
        res = predictor(model).predict(study, saliency=None).values
        scene = str(write_scene(out / "scene" / f"{pid}.mrb", res, {**study, "id": pid}))

    c, k, t = metrics["corners"], metrics["keypoints_corners"], metrics["total"]
    figures = {
        "n_patients": n, "n_test_patients": metrics["n_patients"], "n_test_corners": metrics["n_corners"],
        "corner_accuracy": c["accuracy"]["value"], "corner_accuracy_ci": [c["accuracy"]["lo"], c["accuracy"]["hi"]],
        "corner_accuracy_by_score": {s: e["value"] for s, e in c["accuracy_by_true_score"].items()},
        "corner_accuracy_ordinal_model": metrics.get("corners_ordinal_model", {}).get("accuracy", {}).get("value"),
        "total_mae": t.get("mae", {}).get("value"), "total_icc": t.get("icc", {}).get("value"),
        "total_mae_ordinal_model": metrics["total_ordinal_model"].get("mae", {}).get("value"),
        "corner_keypoint_median_mm": k["median_mm"]["value"], "corner_keypoint_within_2mm": k["success_2mm"]["value"],
        "seconds": {"generate": round(t_gen, 1), "train": round(t_train, 1), "predict_evaluate": round(t_pred, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "report": str(out / "eval" / "report.md"), "model": str(model), "scene": scene,
        "rescore_example_total": re["total"]["total"], "targets": {}}
    say("\n=== mSASSS demo (held-out generated patients) ===")
    for key, (op, target) in TARGETS.items():
        v = figures[key]
        ok = bool(v is not None and np.isfinite(v) and (v >= target if op == ">=" else v <= target))
        figures["targets"][key] = {"target": f"{op} {target}", "value": v, "reached": ok}
        say(f"  {key:28s} {'n/a' if v is None else f'{v:.3f}':>6s}   target {op} {target:<5} "
            f"{'reached' if ok else 'NOT reached'}")
    acc, mae = figures["corner_accuracy_ordinal_model"], figures["total_mae_ordinal_model"]
    say(f"  ordinal alternative: corner accuracy {acc if acc is None else round(acc, 3)}, total MAE "
        f"{mae if mae is None else round(mae, 2)}\n  time: {figures['seconds']}\n  report: {figures['report']}")
    write_json(out / "summary.json", figures)
    return figures
