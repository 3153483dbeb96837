"""RheumAI background worker: runs one job described by a JSON file, reports progress on stdout.

Usage: ``PythonSlicer rheumai_worker.py JOB.json`` (or any Python with the ``rheumai`` package).
JOB.json: {"job": "select" | "predict_batch" | "build_dataset" | "train", "args": {...},
"result_path": "..."}. Progress lines follow the protocol of ``rheumai_mrml.process``
(``@rheumai {"stage", "progress", "message"}``); the last one carries the result (stage "done")
or the error (stage "error"); the result is also written to ``result_path``.
Exit status: 0 done, 1 unexpected failure, 2 bad input (the message names the file).

No Qt and no MRML: images come in and go out as files (NRRD keeps the geometry).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

# The module folder holds rheumai_mrml/ and Logic/rheumai/ (in the source tree and installed alike).
_MODULE_DIR = Path(__file__).resolve().parents[2]
for _p in (_MODULE_DIR / "Logic", _MODULE_DIR):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from rheumai_mrml.process import (dataset_progress, dataset_summary, format_event,  # noqa: E402
                                  stage_progress, to_jsonable)


def emit(stage: str, progress: float | None = None, message: str = "", **extra: Any) -> None:
    # One write call per line (print() writes the text and the newline separately): pool processes
    # share this stdout pipe, and single writes below PIPE_BUF bytes do not interleave.
    sys.stdout.write(format_event(stage, progress, message, **extra) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------- jobs

def _select_one(item: tuple[str, str, dict]) -> dict[str, Any]:
    """Slice selection of one study (file or DICOM folder) saved as ``stem`` (.npy + .json)."""
    from rheumai.errors import RheumAIError
    from rheumai.io import read_study
    from rheumai.tasks.cervical_ra.slices import SliceParams, select_slices

    path, stem, params = item
    try:
        sel = select_slices(read_study(path, require_modality=None), SliceParams.from_dict(params))
        sel.save(stem)
        return {"input": path, "stem": stem, "slab_center_lps": [float(v) for v in sel.slab_center],
                "grid": sel.grid.to_dict(), "error": None}
    except RheumAIError as exc:
        return {"input": path, "stem": None, "error": str(exc)}


def _announce_pool_worker() -> None:
    """Runs in each pool process: report its pid on the shared stdout (one short line, atomic)."""
    emit("select", None, "pool worker ready", pid=os.getpid())


def job_select(args: dict[str, Any]) -> dict[str, Any]:
    """args: inputs (list of paths), out_dir, params (SliceParams dict), workers (processes).

    One selection per input, saved as ``out_dir/<name>_<index>``; failures are reported per input
    (row with "error"), never dropped. workers > 1 runs a process pool (spawned children, which a
    cancel ends with the rest of the process group).
    """
    inputs = [str(p) for p in args["inputs"]]
    out_dir = Path(args["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(args.get("params") or {})
    items = [(p, str(out_dir / f"{_stem(p)}_{i:04d}"), params) for i, p in enumerate(inputs)]
    workers = max(1, int(args.get("workers", 1)))
    rows: list[dict[str, Any]] = []
    emit("select", 0.0, f"selecting slices of {len(items)} stud{'y' if len(items) == 1 else 'ies'}")
    if workers == 1 or len(items) == 1:
        results = map(_select_one, items)
        pool = None
    else:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_announce_pool_worker)
        results = pool.map(_select_one, items)
    try:
        for i, row in enumerate(results):
            rows.append(row)
            emit("select", stage_progress(0, 1, i + 1, len(items)),
                 f"{i + 1}/{len(items)} {Path(row['input']).name}" + (f": {row['error']}" if row["error"] else ""))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {"rows": rows, "n_ok": sum(r["error"] is None for r in rows),
            "n_failed": sum(r["error"] is not None for r in rows)}


def job_predict(args: dict[str, Any]) -> dict[str, Any]:
    """One study of any task. args: model, study ({role: {"image": NRRD path} | path, "roi": box,
    "clinical": {...}, "center_lps": [...]}), saliency, target_layer, device, tta, out_dir.
    Writes the StudyPrediction (prediction.json + saliency_<role>.nrrd) into out_dir."""
    import SimpleITK as sitk

    from rheumai_mrml.task_predict import load_predictor, predict_study

    study = {}
    for key, value in (args.get("study") or {}).items():
        study[key] = sitk.ReadImage(value["image"], sitk.sitkFloat32) \
            if isinstance(value, dict) and set(value) == {"image"} else value
    emit("load model", 0.05, f"loading {args['model']}")
    predictor = load_predictor(args["model"], args.get("device", "cpu"))
    saliency = args.get("saliency")
    emit("predict", 0.3, "predicting" + (f" with {saliency} saliency" if saliency else ""))
    pred = predict_study(predictor, study, saliency, args.get("target_layer"), int(args.get("tta", 0)))
    emit("write", 0.9, "writing the result")
    pred.save(args["out_dir"])
    return {"task": pred.task, "values": pred.values, "out_dir": str(args["out_dir"])}


def job_predict_batch(args: dict[str, Any]) -> dict[str, Any]:
    """args: checkpoint, out_dir, and either studies (paths: single-input tasks) or table (a
    study table CSV with one column per input role, roi, clinical values: any task); saliency,
    device, tta. Resumable: studies already in out_dir/predictions.csv are skipped."""
    from rheumai import api

    emit("load model", 0.0, f"loading {args['checkpoint']}")
    predictor = api.load(args["checkpoint"], device=args.get("device", "cpu"))
    studies = api.read_studies(args["table"], args["checkpoint"]) if args.get("table") \
        else [str(s) for s in args["studies"]]

    def progress(i: int, n: int, study: str) -> None:
        emit("predict", stage_progress(0, 1, i, n), f"{i}/{n} {Path(str(study)).name}")

    rows = api.predict_many(predictor, studies, args["out_dir"], progress=progress,
                            saliency=args.get("saliency", "default"), tta=int(args.get("tta", 0)))
    return {"rows": rows, "predictions_csv": str(Path(args["out_dir"]) / "predictions.csv")}


def job_build_dataset(args: dict[str, Any]) -> dict[str, Any]:
    """args: dicom_folder, labels_csv, out_dir, index_path (optional), rules, split, params, workers."""
    from rheumai.dataset import CohortRules, SplitConfig, build_dataset, index_archive
    from rheumai.tasks.cervical_ra.slices import SliceParams

    out_dir = Path(args["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = Path(args.get("index_path") or out_dir / "index.sqlite")

    def progress(stage: str, done: int, total: int) -> None:
        emit(stage, dataset_progress(stage, done, total), f"{stage} {done}/{total}")

    emit("index", 0.0, f"indexing {args['dicom_folder']}")
    summary = index_archive(args["dicom_folder"], index_path, progress=lambda s, d, t: progress("index", d, t))
    res = build_dataset(index_path, args["labels_csv"], out_dir,
                        rules=CohortRules(**(args.get("rules") or {})),
                        split_cfg=SplitConfig(**(args.get("split") or {})),
                        slice_params=SliceParams.from_dict(args["params"]) if args.get("params") else SliceParams(),
                        workers=int(args.get("workers", 1)), progress=progress)
    return dataset_summary(res, summary)


def job_train(args: dict[str, Any]) -> dict[str, Any]:
    """args: config, manifest, out_dir, resume."""
    from rheumai.api import train

    def progress(ev: dict[str, Any]) -> None:
        epochs = int(ev.get("epochs") or 1)
        epoch = int(ev.get("epoch") or 0)
        steps = int(ev.get("steps") or 0)
        step = int(ev.get("step") or 0)
        frac = ((max(epoch, 1) - 1) + (step / steps if steps else 1.0)) / epochs if ev.get("stage") == "step" \
            else epoch / epochs
        msg = ", ".join(f"{k} {ev[k]:.4g}" if isinstance(ev.get(k), float) else f"{k} {ev[k]}"
                        for k in ("epoch", "step", "loss", "val_auc") if ev.get(k) is not None)
        emit(str(ev.get("stage", "train")), min(1.0, frac), msg)

    res = train(args["config"], args.get("manifest"), args.get("out_dir"), progress=progress,
                resume=bool(args.get("resume", False)), show_progress=False)
    return to_jsonable(res)


JOBS = {"select": job_select, "predict": job_predict, "predict_batch": job_predict_batch, "build_dataset": job_build_dataset,
        "train": job_train}


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "study"
    return name or "study"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    job_path = Path(argv[0])
    try:
        spec = json.loads(job_path.read_text(encoding="utf-8"))
        func = JOBS[spec["job"]]
    except (OSError, ValueError, KeyError) as exc:
        emit("error", None, f"{job_path}: not a valid job file ({exc})", error=f"{job_path}: not a valid job file ({exc})")
        return 2
    emit("start", 0.0, f"job {spec['job']} (pid {os.getpid()})", pid=os.getpid())
    try:
        result = to_jsonable(func(spec.get("args") or {}))
    except Exception as exc:  # reported to the panel / caller; the traceback goes to the log
        from rheumai.errors import RheumAIError

        traceback.print_exc()
        emit("error", None, str(exc), error=str(exc))
        return 2 if isinstance(exc, RheumAIError) else 1
    if spec.get("result_path"):
        from rheumai.atomic import write_json

        write_json(spec["result_path"], result)
    emit("done", 1.0, "finished", result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
