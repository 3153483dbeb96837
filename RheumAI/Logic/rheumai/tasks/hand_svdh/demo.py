"""``rheumai demo --task hand_svdh``: generate, train, evaluate, predict, explain, write a scene.

1. A generated cohort with known truth (``synth.make_cohort``: DICOM CR + label sheets).
2. Training through the task's ``api["train"]`` with the default config (``configs/hand_svdh.toml``):
   patient-level split stratified by severity class (70 % train / 30 % test, seeded), whole-hand
   network, landmark network, joint scorer; one checkpoint. ``ensemble=True`` adds the stacking
   ensemble of ResNet and MobileNetV2 whole-hand networks.
3. Evaluation on the held-out patients through ``api["evaluate"]`` (``eval/``).
4. Prediction of one held-out radiograph through the engine's Predictor with Grad-CAM, written as
   JSON + per-joint CSV + saliency NRRD + a Slicer scene (when slicer-core is installed), read back;
   re-scoring from the true landmarks as "corrected" points shows the landmark-correction path.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import write_json, write_text

DEFAULT_N = 400


def run_demo(out_dir: str | Path, seed: int = 0, n: int | None = None, progress: bool = True,
             ensemble: bool = False, epochs_scale: float = 1.0) -> dict[str, Any]:
    """Run the demo into ``out_dir`` (its ``cohort``, ``train``, ``eval``, ``predict`` folders are
    replaced); returns the figures. ``epochs_scale`` shortens training (tests)."""
    from ...report import render_markdown
    from .evaluate import evaluate, report_blocks
    from .synth import make_cohort
    from .train import HandTrainConfig, train

    out = Path(out_dir)
    for sub in ("cohort", "train", "eval", "predict"):
        shutil.rmtree(out / sub, ignore_errors=True)
    n = int(n or DEFAULT_N)
    t0 = time.perf_counter()
    if progress:
        print(f"[hand_svdh] generating {n} hand radiographs (DICOM CR) ...", flush=True)
    labels = make_cohort(out / "cohort", n=n, seed=seed, progress=progress)
    t_gen = time.perf_counter() - t0
    d = HandTrainConfig()
    cfg = {"task": "hand_svdh", "seed": seed, "ensemble": {"bases": ["resnet", "mobilenetv2"] if ensemble else []},
           **{k: {"epochs": max(1, round(getattr(d, k).epochs * epochs_scale))}
              for k in ("whole", "landmarks", "joints")}}
    if progress:
        print("[hand_svdh] training (whole hand, landmarks, joints) ...", flush=True)
    t1 = time.perf_counter()
    ckpt = train(cfg, labels, out / "train", show_progress=progress).checkpoint
    t_train = time.perf_counter() - t1
    res = evaluate(ckpt, labels, out / "eval", show_progress=False)
    top = max(res["cases"], key=lambda c: c["total"])
    f: dict[str, Any] = {"n": n, "seed": seed, "generate_s": round(t_gen, 1), "train_s": round(t_train, 1),
                         **_predict_one(out, ckpt, labels, top["patient_id"])}
    f["total_s"] = round(time.perf_counter() - t0, 1)
    pcc = res["total"]["pcc"]["value"]
    extra = [("p", f"Generated cohort: {n} patients (one hand each), {res['n']} held out, seed {seed}. Generation "
                   f"{f['generate_s']} s, training {f['train_s']} s (CPU). Target: whole-hand total PCC >= 0.9 "
                   f"({'met' if pcc >= 0.9 else 'NOT met'}: {pcc:.3f}).")]
    blocks = report_blocks(res, "Hand SvdH demo: held-out generated patients", extra, image="eval/agreement.png") + [
        ("h2", "One prediction (engine Predictor, Grad-CAM) and re-scoring"),
        ("p", f"Radiograph `{f['predict_study']}`: total {f['predict_total']}, class {f['predict_class']}, sum of "
              f"joints {f['predict_joint_total']} (truth {f['predict_truth_total']}); re-scored at the true "
              f"landmarks: sum of joints {f['rescore_joint_total']}. Files: `{f['predict_files']}`."),
        ("p", f"Slicer scene read back by slicer-core: {f['scene_nodes']}." if f.get("scene_nodes")
         else f"Slicer scene not written: {f.get('scene_error')}")]
    write_text(out / "report.md", render_markdown(blocks))
    f["metrics"] = {k: res[k] for k in ("n", "total", "class", "joint_total", "landmarks", "erosion_grades",
                                        "jsn_grades", "ensemble") if k in res}
    write_json(out / "demo.json", f)
    if progress:
        print(summary(f, out), flush=True)
    return f


def _predict_one(out: Path, ckpt: Path, labels: Path, patient_id: str) -> dict[str, Any]:
    """Predict, write (and read back the scene of) one labelled radiograph; re-score it at its true landmarks."""
    from ...engine.predict import Predictor
    from ...landmarks import points_to_lps
    from .dataset import HandParams, load_cohort
    from .outputs import result_from, write_result
    from .predict import rescore

    case = next(c for c in load_cohort(labels, HandParams(), labels.parent / "landmarks.csv")
                if c.patient_id == patient_id)
    pred = Predictor(ckpt)
    src = case.prep.rad.path
    res = result_from(pred.predict(src, saliency="gradcam"))
    f: dict[str, Any] = {"predict_study": patient_id, "predict_total": res["values"]["total"],
                         "predict_class": res["values"]["class"], "predict_joint_total": res["values"]["joint_total"],
                         "predict_truth_total": case.total}
    try:
        import slicer  # noqa: F401
    except ImportError as exc:
        f["scene_error"] = f"slicer-core not installed ({exc})"
    files = write_result(out / "predict", patient_id, res, scene="scene_error" not in f)
    f["predict_files"] = sorted(Path(p).name for p in files.values())
    if "scene_file" in files:
        from rheumai_mrml.radiograph_scene import point_list_lps
        from rheumai_mrml.scene import load_scene

        ctx = load_scene(files["scene_file"])
        try:
            s = ctx.scene
            counts: dict[str, Any] = {cls: s.GetNumberOfNodesByClass(cls) for cls in
                                      ("vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLTableNode")}
            pts, _ = point_list_lps(s.GetFirstNodeByClass("vtkMRMLMarkupsFiducialNode"))
            counts["landmark_max_diff_mm"] = float(np.abs(pts - res["points_lps"]).max())
            f["scene_nodes"] = counts
        finally:
            ctx.close()
    true_lps = points_to_lps(case.prep.rad.image, case.prep.to_source(case.points_canon))
    f["rescore_joint_total"] = rescore(pred, src, true_lps).values["joint_total"]
    return f


def summary(f: dict[str, Any], out: Path) -> str:
    """The console summary of the demo's figures (``run_demo``'s return value)."""
    m = f["metrics"]
    t, c, j, lm = m["total"], m["class"], m["joint_total"], m["landmarks"]
    v = lambda r, k: r[k]["value"]  # noqa: E731
    lines = ["", f"Hand SvdH demo ({m['n']} held-out generated patients)",
             f"  whole-hand total: PCC {v(t, 'pcc'):.3f}, RMSE {v(t, 'rmse'):.2f}, MAE {v(t, 'mae'):.2f}, ICC "
             f"{v(t, 'icc'):.3f}  (target PCC >= 0.9: {'met' if v(t, 'pcc') >= 0.9 else 'NOT met'})",
             f"  severity class: accuracy {v(c, 'accuracy'):.3f}, weighted kappa {v(c, 'kappa_quadratic'):.3f}",
             "  class confusion (rows truth, columns predicted):",
             *("    " + " ".join(f"{x:3d}" for x in row) for row in c["confusion"]),
             f"  joint-level path: sum-of-joints PCC {v(j, 'pcc'):.3f}, MAE {v(j, 'mae'):.2f}; per-grade MAE erosion "
             f"{v(m['erosion_grades'], 'mae_classes'):.2f}, JSN {v(m['jsn_grades'], 'mae_classes'):.2f}",
             f"  landmarks: mean radial error {v(lm, 'mean_mm'):.2f} mm, within 4 mm {v(lm, 'success_4mm'):.3f}",
             f"  times: generate {f['generate_s']} s, train {f['train_s']} s, total {f['total_s']} s",
             f"  report: {out / 'report.md'}"]
    return "\n".join(lines)
