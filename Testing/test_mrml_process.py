"""Background worker: protocol, real jobs in a real subprocess (sys.executable), cancel of the tree,
and the console logic's dataset building / training on a small synthetic cohort."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rheumai_mrml.process import (EVENT_PREFIX, WorkerError, WorkerEvent, WorkerProcess, dataset_progress,
                                  format_event, group_alive, parse_line, python_executable, stage_progress,
                                  worker_command, worker_script, write_job)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_protocol_round_trip():
    line = format_event("cache", 0.25, "3/12 done", pid=42, result=None)
    assert line.startswith(EVENT_PREFIX)
    ev = parse_line(line + "\n")
    assert ev == WorkerEvent(stage="cache", progress=0.25, message="3/12 done", data={"pid": 42})
    done = parse_line(format_event("done", 1.0, result={"rows": [1, 2]}))
    assert done.result == {"rows": [1, 2]}
    for other in ("plain log line", EVENT_PREFIX + "{not json", EVENT_PREFIX + '{"no_stage": 1}', ""):
        assert parse_line(other) is None
    assert stage_progress(1, 4, 5, 10) == pytest.approx(0.375)
    assert stage_progress(3, 4, 10, 0) == 1.0
    assert dataset_progress("index", 5, 10) == pytest.approx(0.15)
    assert dataset_progress("computing task inputs", 10, 10) == pytest.approx(1.0)


def test_command_line_and_job_file(tmp_path):
    assert python_executable() == sys.executable  # no Slicer application here
    assert worker_script().is_file() and worker_script().parent.name == "Scripts"
    job = write_job(tmp_path, "select", {"inputs": ["a.nii.gz"]})
    assert worker_command(job) == [sys.executable, "-u", str(worker_script()), str(job)]
    with pytest.raises(ValueError, match="unknown worker job"):
        write_job(tmp_path, "format_disk", {})


def test_worker_select_job(tmp_path, t2_crop_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"nope")
    w = WorkerProcess("select", {"inputs": [str(t2_crop_path), str(bad)], "out_dir": str(tmp_path / "sel"),
                                 "params": {"size": [40, 32]}}, work_dir=tmp_path / "job")
    events, logs = [], []
    result = w.wait(on_output=lambda x: (events if isinstance(x, WorkerEvent) else logs).append(x), timeout=120)
    assert w.returncode == 0 and events[0].stage == "start" and events[-1].stage == "done"
    progress = [e.progress for e in events if e.stage == "select"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert result["n_ok"] == 1 and result["n_failed"] == 1  # the bad input is reported, not dropped
    ok, failed = result["rows"]
    assert str(bad) in failed["error"]
    from rheumai.tasks.cervical_ra.slices import SliceSelection

    sel = SliceSelection.load(ok["stem"])
    assert sel.array.shape == (6, 40, 32)
    np.testing.assert_allclose(sel.slab_center, ok["slab_center_lps"])
    assert (tmp_path / "job" / "result.json").is_file()


def test_worker_failure_is_reported(tmp_path):
    w = WorkerProcess("select", {"inputs": []}, work_dir=tmp_path / "job")
    w.job_file.write_text("{ truncated")  # e.g. a disk-full write
    with pytest.raises(WorkerError, match=r"job\.json: not a valid job file"):
        w.wait(timeout=120)
    assert w.returncode == 2  # bad input: the message names the file
    w = WorkerProcess("select", {"out_dir": str(tmp_path / "o")}, work_dir=tmp_path / "job2")  # no inputs
    with pytest.raises(WorkerError, match="inputs"):
        w.wait(timeout=120)
    assert w.returncode == 1


@pytest.mark.skipif(os.name == "nt", reason="process-group check uses POSIX /proc")
def test_cancel_ends_the_whole_process_tree(tmp_path, t2_path):
    w = WorkerProcess("select", {"inputs": [str(t2_path)] * 200, "out_dir": str(tmp_path / "sel"),
                                 "params": {}, "workers": 2}, work_dir=tmp_path / "job").start()
    pool_pids: set[int] = set()
    deadline = time.monotonic() + 120
    first_done = False
    while not (first_done and len(pool_pids) == 2) and time.monotonic() < deadline:
        for item in w.poll():
            if isinstance(item, WorkerEvent) and item.message == "pool worker ready":
                pool_pids.add(item.data["pid"])
            if isinstance(item, WorkerEvent) and item.stage == "select" and (item.progress or 0) > 0:
                first_done = True
        time.sleep(0.02)
    assert first_done and len(pool_pids) == 2 and w.proc.pid not in pool_pids
    pgid = os.getpgid(w.proc.pid)
    assert pgid == w.proc.pid  # the worker leads its own group
    assert all(_alive(p) for p in pool_pids) and group_alive(pgid)
    w.cancel()
    assert not group_alive(pgid)
    assert not any(_alive(p) for p in pool_pids)
    assert w.returncode is not None and w.returncode != 0
    with pytest.raises(WorkerError, match="cancelled"):
        w.outcome()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ----------------------------------------------------------------- dataset and training


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from rheumai.tasks.cervical_ra.synth import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort"), n=6, prevalence=0.5, seed=3, progress=False)


def _load_worker():
    """The worker script as a module, to run its job functions in this process (the subprocess
    mechanics are covered above; this keeps torch / MONAI imports to one process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rheumai_worker", worker_script())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _events(text: str) -> list[WorkerEvent]:
    return [ev for ev in map(parse_line, text.splitlines()) if ev is not None]


@pytest.fixture(scope="module")
def dataset(cohort, tmp_path_factory):
    """Built by the worker's build_dataset job (the panel's path)."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("ds")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        built = _load_worker().job_build_dataset({
            "dicom_folder": str(cohort.dicom_dir), "labels_csv": str(cohort.labels_csv), "out_dir": str(out_dir),
            "params": {"size": [32, 32]}, "rules": {"min_followup_days": 0}, "split": {"train_fraction": 0.7}})
    return built, _events(buf.getvalue())


def test_worker_build_dataset(dataset):
    built, events = dataset
    assert built["index"]["n_patients"] == 6
    assert built["n_included"] >= 4 and sum(built["split_counts"].values()) == built["n_included"]
    assert Path(built["manifest"]).is_file() and Path(built["paths"]["txt"]).is_file()
    progress = [e.progress for e in events if e.progress is not None]
    assert progress[-1] == 1.0 and all(0.0 <= p <= 1.0 for p in progress)
    assert any(e.stage == "index" for e in events)


def test_dataset_result_becomes_table_nodes(dataset, mrml):
    """The flow, excluded patients and split of a real build as tables (what the panel shows)."""
    from rheumai_mrml.logic import RheumAIConsoleLogic
    from rheumai_mrml.tables import table_rows

    built, _ = dataset
    ids = RheumAIConsoleLogic(mrml.scene).showDatasetResult(built)
    flow = table_rows(mrml.scene.GetNodeByID(ids["dataset_flow"]))
    assert flow[0]["remaining"] == built["flow"]["start"] and flow[-1]["remaining"] == built["n_included"]
    assert [r["title"] for r in flow[1:-1]] == [s["title"] for s in built["flow"]["steps"]]
    excluded = table_rows(mrml.scene.GetNodeByID(ids["dataset_excluded"]))
    assert len(excluded) == sum(s["n_excluded"] for s in built["flow"]["steps"])
    split = {r["split"]: r["patients"] for r in table_rows(mrml.scene.GetNodeByID(ids["dataset_split"]))}
    assert split == built["split_counts"]


def test_build_dataset_console_resumes_to_the_same_files(dataset, cohort):
    """The console logic in this process, into the same folder: incremental, byte-identical."""
    pytest.importorskip("slicer", reason="needs slicer-core")
    from rheumai_mrml.logic import RheumAIConsoleLogic
    from rheumai_mrml.scene import new_scene

    built, _ = dataset
    before = Path(built["manifest"]).read_bytes()
    ctx = new_scene()
    seen: list[tuple[float, str]] = []
    out = RheumAIConsoleLogic(ctx.scene).buildDataset(
        cohort.dicom_dir, cohort.labels_csv, built["out_dir"], progressCallback=lambda f, m: seen.append((f, m)),
        params={"size": [32, 32]}, rules={"min_followup_days": 0}, split={"train_fraction": 0.7})
    ctx.close()
    assert out["n_included"] == built["n_included"] and out["manifest"] == built["manifest"]
    assert Path(out["manifest"]).read_bytes() == before
    assert out["index"]["files_seen"] == built["index"]["files_seen"]
    assert seen and seen[-1][0] == pytest.approx(1.0)  # index unchanged: later stages only
    with pytest.raises(TypeError, match="unknown options"):
        RheumAIConsoleLogic(ctx.scene).buildDataset(cohort.dicom_dir, cohort.labels_csv, built["out_dir"],
                                                    colour="red")


def _tiny_config(tmp_path: Path) -> Path:
    """configs/small_cpu.toml made smaller still: ResNet-10, 32 x 32, one epoch, CPU, epoch and
    threshold from the validation split (the six-patient cohort is too small for out-of-fold)."""
    text = (CONFIGS / "small_cpu.toml").read_text()
    for key, value in (("depth", "10"), ("input_size", "[32, 32]"), ("epochs", "1"), ("device", '"cpu"'),
                       ("n_bootstrap", "20"), ("method", '"validation"')):
        text, n = re.subn(rf"(?m)^{key}\s*=\s*[^#\n]*", f"{key} = {value} ", text)
        assert n == 1, f"{key} not found in small_cpu.toml"
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_train_worker_job_and_console(dataset, tmp_path, capsys):
    """The worker's train job (progress lines on stdout), then the console logic resuming the
    finished run (nothing left to train: same checkpoint)."""
    config = _tiny_config(tmp_path)
    res = _load_worker().job_train({"config": str(config), "manifest": dataset[0]["manifest"],
                                    "out_dir": str(tmp_path / "run")})
    stages = [e.stage for e in _events(capsys.readouterr().out)]
    assert res["epochs_run"] == 1 and not res["stopped"]
    assert (Path(res["checkpoint"]) / "model_card.json").is_file()
    assert "step" in stages and "epoch" in stages

    pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
    from rheumai_mrml.logic import RheumAIConsoleLogic

    seen: list[float] = []
    again = RheumAIConsoleLogic(None).train(config, dataset[0]["manifest"], tmp_path / "run", resume=True,
                                            progressCallback=lambda f, m: seen.append(f))
    assert again["checkpoint"] == res["checkpoint"] and again["best_epoch"] == res["best_epoch"]

    from rheumai_mrml.scene import new_scene
    from rheumai_mrml.tables import table_rows

    ctx = new_scene()
    try:
        ids = RheumAIConsoleLogic(ctx.scene).showTrainingResult(res)
        history = table_rows(ctx.scene.GetNodeByID(ids["training_history"]))
        assert len(history) == len(res["history"]) and "training_loss_chart" in ids
    finally:
        ctx.close()


# ----------------------------------------------------------------- one prediction in the worker
# (a whole prediction through the worker, with its progress and result: test_mrml_slicer_logic.py)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A real cervical checkpoint (ResNet-10, 32 x 32, seeded random weights)."""
    torch = pytest.importorskip("torch")
    from rheumai.checkpoint import save_checkpoint
    from rheumai.tasks.cervical_ra.model import build_model, default_architecture
    from rheumai.tasks.cervical_ra.slices import SliceParams

    torch.manual_seed(0)
    arch = default_architecture(10, 6, (32, 32))
    card = {"task": "cervical_ra", "architecture": arch, "preprocessing": SliceParams(size=(32, 32)).to_dict(),
            "threshold": 0.5, "threshold_rule": "fixed", "training_data": {}, "metrics": {}, "model_id": "w-r10"}
    return save_checkpoint(tmp_path_factory.mktemp("wmodel") / "model", build_model(arch), card)


@pytest.mark.skipif(os.name == "nt", reason="process-group check uses POSIX /proc")
def test_cancelled_predict_job_ends_and_cleans_up(mrml, t2_crop_path, tiny_model):
    pytest.importorskip("slicer", reason="needs slicer-core")
    from rheumai_mrml.logic import RheumAIConsoleLogic

    logic = RheumAIConsoleLogic(mrml.scene)
    node = logic.loadVolume(t2_crop_path)
    job = logic.startPredictStudy(tiny_model, {"t2_sag": node}, saliency="occlusion")
    deadline = time.monotonic() + 120
    seen = []
    while "start" not in seen and time.monotonic() < deadline:
        seen += [e.stage for e in job.worker.poll() if isinstance(e, WorkerEvent)]
        time.sleep(0.02)
    pgid = os.getpgid(job.worker.proc.pid)
    job.worker.cancel()
    assert not group_alive(pgid)
    with pytest.raises(WorkerError, match="cancelled"):
        logic.finishPredictStudy(job)
    assert not job.worker.work_dir.exists()
