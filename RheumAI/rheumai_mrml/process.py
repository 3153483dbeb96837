"""Background worker processes: command line, progress-line protocol, cancel of the whole tree.

Heavy jobs (dataset building, training, batch prediction, batch slice selection) run in a separate
Python process, ``Resources/Scripts/rheumai_worker.py``, started with ``PythonSlicer`` inside
Slicer and with ``sys.executable`` elsewhere. Inputs and outputs travel as files (images as NRRD,
whose header keeps the geometry; arguments and results as JSON).

Protocol: the worker prints ordinary log lines and, for progress, lines ``@rheumai {json}`` with
``stage`` (str), ``progress`` (0..1 over the whole job, or null), ``message`` and, on the last one,
``result`` (stage "done") or ``error`` (stage "error").

Cancel ends the whole process tree. ``slicer.util.launchConsoleProcess`` does not start a new
process group and psutil is not part of Slicer, so the worker is started here in its own process
group (POSIX session / Windows process group) and the group is signalled (``os.killpg``;
``taskkill /T /F`` on Windows): the PythonSlicer launcher, the Python process and any pool or
DataLoader workers go together. No Qt and no MRML here: the widget polls :meth:`WorkerProcess.poll`
from a QTimer; scripts call :meth:`WorkerProcess.wait`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

EVENT_PREFIX = "@rheumai "
JOBS = ("select", "predict", "predict_batch", "build_dataset", "train")


@dataclasses.dataclass
class WorkerEvent:
    """One progress line from the worker. progress: 0..1 over the whole job (None if unknown)."""

    stage: str
    progress: float | None = None
    message: str = ""
    result: Any = None
    error: str | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other keys of the line


class WorkerError(RuntimeError):
    """The worker failed (message: its error line, or its exit status and last log lines)."""


def format_event(stage: str, progress: float | None = None, message: str = "", **extra: Any) -> str:
    """The protocol line for one event (what the worker prints)."""
    payload = {"stage": stage, "progress": None if progress is None else round(float(progress), 4),
               "message": message, **extra}
    return EVENT_PREFIX + json.dumps(payload, default=_json_default)


def parse_line(line: str) -> WorkerEvent | None:
    """A protocol line -> WorkerEvent; any other line (ordinary log output) -> None."""
    line = line.strip()
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        d = json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None
    if not isinstance(d, dict) or "stage" not in d:
        return None
    p = d.get("progress")
    extra = {k: v for k, v in d.items() if k not in ("stage", "progress", "message", "result", "error")}
    return WorkerEvent(stage=str(d["stage"]), progress=None if p is None else float(p),
                       message=str(d.get("message") or ""), result=d.get("result"), error=d.get("error"),
                       data=extra)


def stage_progress(stage_index: int, n_stages: int, done: int, total: int) -> float:
    """Overall 0..1 progress for ``done/total`` within stage ``stage_index`` of ``n_stages`` equal stages."""
    frac = (done / total) if total else 1.0
    return min(1.0, max(0.0, (stage_index + min(1.0, frac)) / n_stages))


def dataset_progress(stage: str, done: int, total: int) -> float:
    """Overall 0..1 progress of a dataset build: indexing the DICOM headers is the first 30 %,
    the later stages (labels, cohort, hashing, caching the task inputs) share the rest."""
    frac = min(1.0, done / total) if total else 1.0
    return 0.3 * frac if stage == "index" else 0.3 + 0.7 * frac


def worker_script() -> Path:
    """The worker script, a module resource (Resources/Scripts/rheumai_worker.py)."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Scripts" / "rheumai_worker.py"


def python_executable() -> str:
    """``PythonSlicer`` inside Slicer (it sets up Slicer's Python environment), else this Python."""
    try:
        import slicer

        in_slicer = getattr(slicer, "app", None) is not None
    except ImportError:
        in_slicer = False
    if in_slicer:
        exe = shutil.which("PythonSlicer")
        if not exe:
            raise RuntimeError("PythonSlicer executable not found on PATH")
        return exe
    return sys.executable


def worker_command(job_file: str | Path, python: str | None = None) -> list[str]:
    """Command line running the worker on a job file (unbuffered, so progress arrives at once)."""
    return [python or python_executable(), "-u", str(worker_script()), str(job_file)]


def write_job(work_dir: str | Path, job: str, args: dict[str, Any]) -> Path:
    """Write ``job.json`` ({"job", "args", "result_path"}) in ``work_dir``; return its path."""
    if job not in JOBS:
        raise ValueError(f"unknown worker job {job!r}; one of {', '.join(JOBS)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "job.json"
    path.write_text(json.dumps({"job": job, "args": args, "result_path": str(work_dir / "result.json")},
                               indent=2, default=_json_default), encoding="utf-8")
    return path


class WorkerProcess:
    """One background job: start, poll (GUI) or wait (scripts), cancel (the whole tree).

    env: the environment for the process; inside Slicer pass ``slicer.util.startupEnvironment()``
    (what ``launchConsoleProcess`` uses), elsewhere the current environment is used.
    """

    def __init__(self, job: str, args: dict[str, Any], work_dir: str | Path | None = None,
                 python: str | None = None, env: dict[str, str] | None = None, owns_work_dir: bool | None = None):
        self.job = job
        # A work folder made here (or handed over with owns_work_dir=True) is removed by close().
        self.owns_work_dir = (work_dir is None) if owns_work_dir is None else bool(owns_work_dir)
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=f"rheumai-{job}-"))
        self.job_file = write_job(self.work_dir, job, args)
        self.command = worker_command(self.job_file, python)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.last_event: WorkerEvent | None = None
        self.result: Any = None
        self.error: str | None = None
        self.cancelled = False
        self._reader: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "WorkerProcess":
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags = subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0  # hide the console window, as launchConsoleProcess does
            kwargs.update(startupinfo=info, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
        else:
            kwargs.update(start_new_session=True)  # own process group: cancel reaches every child
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, encoding="utf-8",
                                     errors="replace", env=env, **kwargs)
        self._reader = threading.Thread(target=self._read, name=f"rheumai-{self.job}-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\r\n"))
        self.proc.wait()
        self.lines.put(None)  # end marker

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def finished(self) -> bool:
        """True once the process has exited and all of its output has been handled."""
        return self.proc is not None and self._reader is not None and not self._reader.is_alive() \
            and self.lines.empty() and self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def poll(self) -> list[str | WorkerEvent]:
        """Everything printed since the last call, without blocking: log lines and events."""
        out: list[str | WorkerEvent] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._finish()
                continue
            out.append(self._handle(line))
        return out

    def wait(self, on_output: Callable[[str | WorkerEvent], None] | None = None,
             timeout: float | None = None) -> Any:
        """Block until the job ends; pass each line/event to ``on_output``; return the result.

        Raises WorkerError if the job failed or was cancelled, TimeoutError after ``timeout`` s
        (the process is then cancelled).
        """
        if self.proc is None:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.cancel()
                raise TimeoutError(f"worker job {self.job} did not finish within {timeout} s")
            try:
                line = self.lines.get(timeout=0.1 if remaining is None else min(0.1, remaining))
            except queue.Empty:
                continue
            if line is None:
                self._finish()
                break
            item = self._handle(line)
            if on_output is not None:
                on_output(item)
        return self.outcome()

    def outcome(self) -> Any:
        """The result of a finished job, or WorkerError."""
        if self.cancelled:
            raise WorkerError(f"worker job {self.job} was cancelled")
        if self.error is not None:
            raise WorkerError(self.error)
        return self.result

    def cancel(self, grace_s: float = 3.0) -> None:
        """End the whole process tree: SIGTERM to the group, SIGKILL after ``grace_s`` seconds."""
        self.cancelled = True
        if self.proc is None:
            return
        kill_process_tree(self.proc, grace_s)
        if self._reader is not None:
            self._reader.join(timeout=5.0)

    def close(self) -> None:
        """End the process if it still runs and remove the work folder if this object owns it
        (job file, result, files passed to and from the worker)."""
        if self.running:
            self.cancel()
        if self.owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _handle(self, line: str) -> str | WorkerEvent:
        self.log.append(line)
        ev = parse_line(line)
        if ev is None:
            return line
        self.last_event = ev
        if ev.stage == "done":
            self.result = ev.result
        elif ev.stage == "error":
            self.error = ev.error or ev.message or "worker failed"
        return ev

    def _finish(self) -> None:
        rc = self.proc.poll() if self.proc else None
        if self.cancelled:
            return
        if self.result is None and self.error is None:
            result_file = self.work_dir / "result.json"
            if rc == 0 and result_file.is_file():
                self.result = json.loads(result_file.read_text(encoding="utf-8"))
            else:
                tail = "\n".join(self.log[-15:])
                self.error = f"worker job {self.job} exited with status {rc}:\n{tail}"


class PredictJob:
    """One study predicted in the worker: inputs written as NRRD into the job's own temporary
    folder, the :class:`~rheumai_mrml.task_predict.StudyPrediction` read back by :meth:`result`,
    the folder removed by :meth:`close` (also after a failure or a cancel)."""

    def __init__(self, model: str | Path, study: dict[str, Any], saliency: str | None = "default",
                 target_layer: str | None = None, device: str = "cpu", tta: int = 0,
                 python: str | None = None, env: dict[str, str] | None = None):
        import SimpleITK as sitk

        from rheumai.atomic import atomic_path
        from rheumai.paths import safe_child

        work = Path(tempfile.mkdtemp(prefix="rheumai-predict-"))
        try:
            inputs: dict[str, Any] = {}
            for key, value in study.items():
                if isinstance(value, sitk.Image):
                    path = safe_child(work, f"input_{key}", ".nrrd", what="input role")
                    with atomic_path(path) as tmp:
                        sitk.WriteImage(value, str(tmp), useCompression=False)
                    inputs[key] = {"image": str(path)}
                else:
                    inputs[key] = value  # paths, the box, clinical values, the slab centre
            self.out_dir = work / "prediction"
            args = {"model": str(model), "study": inputs, "saliency": saliency, "target_layer": target_layer,
                    "device": device, "tta": int(tta), "out_dir": str(self.out_dir)}
            self.worker = WorkerProcess("predict", args, work_dir=work, python=python, env=env, owns_work_dir=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def result(self) -> Any:
        """The StudyPrediction of a finished job (images in memory), or WorkerError."""
        from .task_predict import StudyPrediction

        self.worker.outcome()
        return StudyPrediction.load(self.out_dir)

    def close(self) -> None:
        self.worker.close()


def kill_process_tree(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """End ``proc`` and every process in its group (started by :class:`WorkerProcess`)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, check=False)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid  # leader already reaped; its group may still hold children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            if not group_alive(pgid):
                return
            time.sleep(0.05)
    proc.poll()


def group_alive(pgid: int) -> bool:
    """True while any process of the POSIX process group ``pgid`` exists (zombies excluded)."""
    proc_dir = Path("/proc")
    if proc_dir.is_dir():  # Linux: look, so zombies awaiting reaping do not count as alive
        for p in proc_dir.iterdir():
            if not p.name.isdigit():
                continue
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def dataset_summary(res: Any, index_summary: Any = None) -> dict[str, Any]:
    """Plain summary of a ``rheumai.dataset.DatasetResult`` (and of the IndexSummary of its
    indexing run): manifest path, counts per split, inclusion flow, written files."""
    out: dict[str, Any] = {"out_dir": str(res.out_dir), "manifest": str(res.manifest),
                           "n_included": res.n_included, "flow": to_jsonable(res.flow),
                           "paths": {k: str(v) for k, v in res.paths.items()}, "split_counts": {}}
    for split, _fold in res.split.values():
        out["split_counts"][split] = out["split_counts"].get(split, 0) + 1
    if index_summary is not None:
        out["index"] = {"index_path": str(index_summary.index_path), "files_seen": index_summary.files_seen,
                        "n_patients": index_summary.n_patients, "n_series": index_summary.n_series,
                        "unreadable": len(index_summary.unreadable)}
    return out


def to_jsonable(obj: Any) -> Any:
    """Dataclasses / Paths / numpy scalars -> plain JSON types (results crossing the process line)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item") and getattr(o, "ndim", 1) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
