"""One predictor for every task: study -> task preprocessing -> network -> head decode -> saliency.

``Predictor(checkpoint)`` reads the model card, takes the task it names from the registry
(``card["task"]``; ``task=`` only for cards that name none) and loads the network once. For each
study it runs the task's declared predict-side hooks (:class:`rheumai.tasks.base.Task`):

``load_sample(inputs, card)``   study inputs -> the task's sample (network arrays + the grids that
                                map results back into every source series, LPS mm)
``to_tensors(sample, card)``    sample -> network input without batch axis (Tensor or dict)
``forward(model, batch)``       optional: batched input -> {head: Tensor}; default ``model(x)`` /
                                ``model(**x)``, a bare Tensor meaning the single head ``"out"``
``postprocess(outputs, card, sample)``  one study's outputs -> JSON-able values (at least
                                ``probability``, ``label``, ``threshold`` for a binary head)
``saliency_maps(model, batch, samples, card, method, target_layer)`` -> (outputs or None,
                                [{role: RoleMap}]): maps per input role, each in its own series'
                                geometry; outputs from the same pass when it gives them (CAM)

Study inputs are ``{role: path | Study | sitk.Image, "roi": ..., "clinical": {...}, "id": str}``;
a single-input task also takes the path / Study / image alone. :func:`predict_batch` streams a
list of studies: a thread pool reads and preprocesses the next studies while the network runs on
the current ones, and a writer thread writes the files and tables (``engine.write``) off the
critical path.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..checkpoint import load_checkpoint, read_card
from ..errors import InputError, RheumAIError
from ..io import Study
from ..tasks import Task, get_task
from . import write as W


@dataclass
class RoleMap:
    """Saliency of one input role.

    grid: float32 map on the task's sampling grid, in [0, 1]; images / overlay: (K, H, W) input
    slices and the map on them for the montage; input_map: the map on the network input (for the
    sanity checks), when the task gives it; to_source: grid -> image in the role's source geometry
    (LPS). :attr:`volume` is that image, computed on first use (in batches: on the writer thread,
    off the network's critical path).
    """

    role: str
    grid: np.ndarray
    images: np.ndarray
    overlay: np.ndarray
    titles: list[str] | None = None
    input_map: np.ndarray | None = None
    to_source: Callable[[np.ndarray], sitk.Image] | None = field(default=None, repr=False)
    _volume: sitk.Image | None = field(default=None, repr=False)

    @property
    def volume(self) -> sitk.Image | None:
        """The map in the source series' exact grid (LPS), float32 in [0, 1]."""
        if self._volume is None and self.to_source is not None:
            self._volume = self.to_source(self.grid)
        return self._volume


@dataclass
class PredictionResult:
    """One study's prediction: ``values`` from the task's postprocess (JSON-able), maps per role."""

    task: str
    model_id: str
    values: dict[str, Any]
    sample: Any
    sources: dict[str, str | None]
    series_uid: str | None = None
    study_id: str | None = None
    saliency_method: str | None = None
    target_layer: str | None = None
    maps: dict[str, RoleMap] = field(default_factory=dict)
    tta: dict[str, Any] | None = None
    sanity: dict[str, Any] | None = None
    source_images: dict[str, sitk.Image] = field(default_factory=dict, repr=False)
    timings_s: dict[str, float] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)  # set by writers that wrote this result

    # Binary-head shortcuts, and single-input shortcuts (the first role) for the common case.
    @property
    def probability(self) -> float:
        return float(self.values["probability"])

    @property
    def label(self) -> int:
        return int(self.values["label"])

    @property
    def threshold(self) -> float:
        return float(self.values["threshold"])

    @property
    def tta_mean(self) -> float | None:
        return None if self.tta is None else self.tta["mean"]

    @property
    def tta_std(self) -> float | None:
        return None if self.tta is None else self.tta["std"]

    @property
    def source_path(self) -> str | None:
        return next(iter(self.sources.values()), None)

    @source_path.setter
    def source_path(self, value: str | None) -> None:
        self.sources[next(iter(self.sources), "input")] = value

    @property
    def study_name(self) -> str:
        return self.study_id or Path(self.source_path or "image").name

    @property
    def selection(self) -> Any:
        """The sample's ``selection`` (cervical: the :class:`~rheumai.tasks.cervical_ra.slices.SliceSelection`), else the sample."""
        return getattr(self.sample, "selection", self.sample)

    @property
    def source_image(self) -> sitk.Image | None:
        return next(iter(self.source_images.values()), None)

    @property
    def saliency_volume(self) -> sitk.Image | None:
        m = next(iter(self.maps.values()), None)
        return None if m is None else m.volume

    @property
    def saliency_grid(self) -> np.ndarray | None:
        m = next(iter(self.maps.values()), None)
        return None if m is None else m.grid

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no arrays or images)."""
        sample_info = self.sample.describe() if hasattr(self.sample, "describe") else None
        return dict(self.values, task=self.task, model_id=self.model_id, study_id=self.study_id,
                    sources=self.sources, source_path=self.source_path, series_uid=self.series_uid,
                    saliency=self.saliency_method, target_layer=self.target_layer, saliency_roles=list(self.maps),
                    tta=self.tta, tta_mean=self.tta_mean, tta_std=self.tta_std, sanity=self.sanity,
                    sample=sample_info, timings_s=self.timings_s)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available; refuses ``cuda`` without a GPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RheumAIError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return dev


def task_of(checkpoint: str | Path, task: str | None = None) -> Task:
    """The registered task a checkpoint's card names (``task`` only when the card names none;
    a contradicting ``task`` is refused)."""
    card = read_card(checkpoint)
    named = card.get("task")
    if named and task and named != task:
        raise InputError(checkpoint, f"checkpoint is for task {named!r}, not {task!r}")
    name = named or task
    if not name:
        raise InputError(checkpoint, "the model card names no task; pass --task")
    try:
        t = get_task(str(name))
    except KeyError as exc:
        raise InputError(checkpoint, str(exc.args[0])) from None
    missing = [h for h in ("load_sample", "to_tensors", "postprocess") if getattr(t, h, None) is None]
    if missing:
        raise RheumAIError(f"task {t.name} declares no predict-side hooks ({', '.join(missing)})")
    return t


DEFAULT_SALIENCY = "default"


def resolve_saliency(task: Task, method: str | None) -> str | None:
    """``"default"`` -> the task's first declared saliency method (the one that localises; None when the
    task has no saliency); any other value unchanged."""
    if method == DEFAULT_SALIENCY:
        return task.saliency_methods[0] if task.saliency_maps is not None and task.saliency_methods else None
    return method


def check_saliency(task: Task, method: str | None) -> str | None:
    """The resolved method (see :func:`resolve_saliency`); InputError (a ValueError) unless it is None
    or one the task's saliency hook accepts."""
    method = resolve_saliency(task, method)
    if not method:
        return method
    if task.saliency_maps is None or (task.saliency_methods and method not in task.saliency_methods):
        raise InputError(None, f"saliency method '{method}' unknown for task {task.name}; choose one of "
                               f"{', '.join(task.saliency_methods) or 'none (this task has no saliency)'}")
    return method


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    return {k: to_device(v, device) for k, v in x.items()}


def collate(items: Sequence[Any]) -> Any:
    """Stack unbatched inputs (Tensor or dict of Tensors) along a new batch axis."""
    if isinstance(items[0], torch.Tensor):
        return torch.stack(list(items))
    return {k: collate([it[k] for it in items]) for k in items[0]}


def study_key(inputs: Mapping[str, Any], roles: Sequence[str]) -> str:
    """A file-name-safe, collision-free key: ``inputs["id"]`` when given (checked, not rewritten),
    else the first input's file name plus a hash of every input's resolved path."""
    from ..paths import check_name

    if inputs.get("id") is not None:
        return check_name(inputs["id"], "study ID")
    paths = [inputs[r] for r in roles if isinstance(inputs.get(r), (str, Path))]
    if not paths:
        return "image"
    return study_stem(*paths)


def study_stem(*paths: str | Path) -> str:
    """``<name of the first file>_<8 hex of the resolved paths>``, only ``[A-Za-z0-9_.-]``."""
    name = Path(paths[0]).name
    for suf in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:80] or "study"
    digest = hashlib.sha1("\0".join(str(Path(p).resolve()) for p in paths).encode()).hexdigest()[:8]
    return f"{name}_{digest}"


@dataclass
class Prepared:
    """A study read and preprocessed, ready for the network (or the error that stopped it)."""

    key: str
    name: str
    inputs: Mapping[str, Any]
    sample: Any = None
    x: Any = None
    error: str | None = None
    seconds: float = 0.0


class Predictor:
    """A checkpoint loaded once for any number of studies of its task.

    checkpoint: a RheumAI checkpoint folder (pickles refused). device: "cpu", "cuda" or "auto".
    task: only for a card that names no task.
    """

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", task: str | None = None):
        self.checkpoint = Path(checkpoint)
        self.task = task_of(self.checkpoint, task)
        self.device = resolve_device(device)
        self.model, self.card = load_checkpoint(self.checkpoint, device=self.device)
        self.model.eval()
        self.model_id = str(self.card.get("model_id", "unknown"))
        thr = self.card.get("threshold")  # null for tasks without a decision threshold (regression)
        self.threshold = None if thr is None else float(thr)

    # -- inputs
    def inputs_of(self, study: Any) -> dict[str, Any]:
        """Study inputs as a dict; a bare path / Study / image is the single input of a one-input task."""
        if isinstance(study, Mapping):
            d = dict(study)
        elif len(self.task.roles) == 1:
            d = {self.task.roles[0]: study}
        else:
            raise InputError(None, f"task {self.task.name} needs the inputs {', '.join(self.task.roles)} "
                                   "(and the ROI / clinical values it declares) as a mapping")
        unknown = set(d) - {*self.task.roles, "roi", "clinical", "id", "series_uid"}
        if unknown:
            raise InputError(None, f"task {self.task.name} has no input {', '.join(sorted(unknown))} "
                                   f"(inputs: {', '.join(self.task.roles)}, roi, clinical)")
        return d

    def prepare(self, study: Any) -> Prepared:
        """Read + preprocess one study (safe to run in a worker thread); errors are captured."""
        t = time.perf_counter()
        try:
            inputs = self.inputs_of(study)
            key = study_key(inputs, self.task.roles)
        except InputError as exc:  # a row is still written, under a key that names nothing from the data
            bad = study if isinstance(study, Mapping) else {"id": study}
            key = "invalid_" + hashlib.sha1(repr(sorted(map(str, bad.items()))).encode()).hexdigest()[:12]
            return Prepared(key=key, name=repr(bad.get("id", study))[:120], inputs={}, error=f"{type(exc).__name__}: {exc}")
        first = next((inputs[r] for r in self.task.roles if inputs.get(r) is not None), None)
        name = str(inputs.get("id") or (first if isinstance(first, (str, Path)) else key))
        p = Prepared(key=key, name=name, inputs=inputs)
        try:
            p.sample = self.task.load_sample(inputs, self.card)
            p.x = self.task.to_tensors(p.sample, self.card)
        except Exception as exc:  # noqa: BLE001  reported per study by the caller
            p.error = f"{type(exc).__name__}: {exc}"
        p.seconds = time.perf_counter() - t
        return p

    # -- network
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Batched input -> {head: Tensor} (inference mode, network in eval mode)."""
        self.model.eval()
        with torch.inference_mode():
            if self.task.forward is not None:
                out = self.task.forward(self.model, batch)
            else:
                out = self.model(**batch) if isinstance(batch, dict) else self.model(batch)
        return out if isinstance(out, dict) else {"out": out}

    def run(self, prepared: Sequence[Prepared], saliency: str | None = DEFAULT_SALIENCY, target_layer: str | None = None,
            tta: int = 0, sanity: bool = False) -> list[PredictionResult]:
        """The network (+ saliency, TTA, sanity) on prepared studies, batched; no file is written."""
        saliency = resolve_saliency(self.task, saliency)
        t0 = time.perf_counter()
        batch = to_device(collate([p.x for p in prepared]), self.device)
        samples = [p.sample for p in prepared]
        maps: list[dict[str, RoleMap]] = [{} for _ in prepared]
        outputs = None
        if saliency:
            if self.task.saliency_maps is None:
                raise RheumAIError(f"task {self.task.name} declares no saliency maps; use --saliency none")
            outputs, maps = self.task.saliency_maps(self.model, batch, samples, self.card, saliency, target_layer)
            if outputs is not None and not isinstance(outputs, dict):
                outputs = {"out": outputs}
        if outputs is None:
            outputs = self.forward(batch)
        t1 = time.perf_counter()
        results = []
        for i, p in enumerate(prepared):
            one = {k: v[i].detach().float().cpu() for k, v in outputs.items()}
            values = self.task.postprocess(one, self.card, p.sample)
            sources = getattr(p.sample, "sources", None) or {}
            res = PredictionResult(task=self.task.name, model_id=self.model_id, values=values, sample=p.sample,
                                   sources=dict(sources), series_uid=getattr(p.sample, "series_uid", None),
                                   study_id=None if p.inputs.get("id") is None else str(p.inputs["id"]),
                                   saliency_method=saliency or None, maps=maps[i],
                                   target_layer=(target_layer or self.task.saliency_targets.get(
                                       self.task.roles[0])) if saliency in ("gradcam", "gradcampp") else None,
                                   source_images=dict(getattr(p.sample, "source_images", None) or {}))
            res.timings_s = {"read_preprocess": round(p.seconds, 4), "model": round((t1 - t0) / len(prepared), 4)}
            if tta or sanity:
                self._extras(res, p.x, tta, sanity, target_layer)
            results.append(res)
        return results

    def _extras(self, res: PredictionResult, x: Any, tta: int, sanity: bool, target_layer: str | None) -> None:
        """TTA and the saliency sanity checks: for single-tensor, one-logit networks."""
        if not isinstance(x, torch.Tensor):
            raise RheumAIError(f"--tta / --sanity need a single-tensor network input; task {self.task.name} has several")
        xb = x[None].to(self.device)
        t = time.perf_counter()
        if tta:
            from ..tta import tta_probabilities, tta_summary

            probs = tta_probabilities(self.model, xb, int(tta))
            res.tta = dict(tta_summary(probs), probabilities=probs.tolist())
        if sanity:
            m = next(iter(res.maps.values()), None)
            if m is None or m.input_map is None:
                raise ValueError("sanity checks need a saliency method")
            from ..sanity import run_sanity

            res.sanity = run_sanity(self.model, xb, m.input_map, res.saliency_method, target_layer)
        res.timings_s["tta_sanity"] = round(time.perf_counter() - t, 4)

    def predict(self, study: Any, saliency: str | None = DEFAULT_SALIENCY, target_layer: str | None = None, tta: int = 0,
                sanity: bool = False, series_uid: str | None = None) -> PredictionResult:
        """Predict one study; errors in the study raise (InputError names the file)."""
        if series_uid is not None and not isinstance(study, Mapping):
            study = {self.task.roles[0]: study, "series_uid": series_uid}
        saliency = check_saliency(self.task, saliency)
        if sanity and not saliency:
            raise ValueError("sanity checks need a saliency method")
        inputs = self.inputs_of(study)
        t = time.perf_counter()
        sample = self.task.load_sample(inputs, self.card)
        x = self.task.to_tensors(sample, self.card)
        p = Prepared(key=study_key(inputs, self.task.roles), name="", inputs=inputs, sample=sample, x=x,
                     seconds=time.perf_counter() - t)
        return self.run([p], saliency, target_layer, tta, sanity)[0]


# ---------------------------------------------------------------------------------- batches

def select_shard(items: Sequence[Any], shard: tuple[int, int] | None) -> list[Any]:
    """Items ``i, i + N, i + 2N ...`` of shard ``(i, N)`` (0-based i), or all of them."""
    if shard is None:
        return list(items)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be i/N with 0 <= i < N, got {i}/{n}")
    return list(items)[i::n]


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"i/N"`` (0-based) -> (i, N). ``"auto"``: from a SLURM job array (``SLURM_ARRAY_TASK_ID``
    minus ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``) or torchrun (``RANK`` of
    ``WORLD_SIZE``); ``env`` defaults to the process environment."""
    if not text:
        return None
    if text == "auto":
        import os

        e = os.environ if env is None else env
        if "SLURM_ARRAY_TASK_ID" in e and "SLURM_ARRAY_TASK_COUNT" in e:
            text = f"{int(e['SLURM_ARRAY_TASK_ID']) - int(e.get('SLURM_ARRAY_TASK_MIN', 0))}/{e['SLURM_ARRAY_TASK_COUNT']}"
        elif "RANK" in e and "WORLD_SIZE" in e:
            text = f"{e['RANK']}/{e['WORLD_SIZE']}"
        else:
            raise InputError(None, "--shard auto needs SLURM_ARRAY_TASK_ID + SLURM_ARRAY_TASK_COUNT (a SLURM job "
                                   "array) or RANK + WORLD_SIZE (torchrun) in the environment")
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(None, f"--shard must be i/N (0-based shard i of N), not {text!r}") from None
    select_shard([], (i, n))
    return i, n


def _prefetch(pred: Predictor, studies: Iterable[Any], workers: int, depth: int) -> Iterator[Prepared]:
    """Prepared studies in input order; up to ``depth`` are read ahead by ``workers`` threads."""
    if workers <= 0:
        for s in studies:
            yield pred.prepare(s)
        return
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rheumai-read") as pool:
        pending: list[cf.Future] = []
        it = iter(studies)
        for s in it:
            pending.append(pool.submit(pred.prepare, s))
            if len(pending) >= depth:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(pred.prepare, nxt))
            yield fut.result()


class _Writer:
    """Writes per-study files, row files and (at most every ``every_s`` seconds) the tables on a
    background thread, so the network never waits for the disk. Errors are recorded in the row."""

    def __init__(self, out: Path, meta: dict[str, Any], write: Callable[[PredictionResult, str], dict[str, Any]],
                 every_s: float = 1.0):
        self.out, self.meta, self.write, self.every_s = out, meta, write, every_s
        self.reader = W.RowReader(out)
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.rows: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._last = 0.0
        self.thread = threading.Thread(target=self._loop, name="rheumai-write", daemon=True)
        self.thread.start()

    def put(self, row: dict[str, Any], res: PredictionResult | None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((row, res))

    def _loop(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    break
                row, res = item
                if res is not None:
                    try:
                        files = self.write(res, row["key"])
                        row.update({k: v for k, v in files.items() if v})
                    except Exception as exc:  # noqa: BLE001  the study is reported, the batch goes on
                        row["error"] = f"{type(exc).__name__}: {exc}"
                row["finished"] = time.time()
                W.put_row(self.out, row)
                self.rows.append(row)
                if time.monotonic() - self._last >= self.every_s:
                    W.merge_tables(self.out, self.meta, self.reader)
                    self._last = time.monotonic()
        except BaseException as exc:  # noqa: BLE001  re-raised in the caller's thread
            self.error = exc

    def close(self) -> list[dict[str, Any]]:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return W.merge_tables(self.out, self.meta, self.reader)


def predict_batch(studies: Sequence[Any], checkpoint_dir: str | Path, out_dir: str | Path,
                  progress: Callable[[int, int, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, saliency: str | None = DEFAULT_SALIENCY,
                  write_volumes: bool = True, target_layer: str | None = None, tta: int = 0,
                  sanity: bool = False, scene: bool = False, fmt: str = "nii.gz", device: str = "cpu",
                  show_progress: bool = True, predictor: Predictor | None = None, task: str | None = None,
                  shard: tuple[int, int] | None = None, workers: int = 2, batch_size: int = 1,
                  montage: bool = True) -> list[dict[str, Any]]:
    """Predict many studies with the model loaded once, streaming (see module docstring).

    studies: paths / DICOM folders (single-input tasks) or study-input dicts. Results go to
    ``out_dir`` (layout: :mod:`rheumai.engine.write`); studies whose row exists without error for
    the same model are skipped (resume); a failing study gets a row with its ``error`` and the
    batch goes on. ``shard=(i, N)`` keeps every N-th study from the i-th. ``progress(i, n,
    study)`` after each study; ``should_stop()`` before each (cancel). Returns every row of
    ``out_dir`` (this run's, earlier runs' and concurrent runs').
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if scene:
        W.scene_writer()  # fail before the batch, not once per study
    pred = predictor or Predictor(checkpoint_dir, device=device, task=task)
    saliency = check_saliency(pred.task, saliency)
    meta = {"model_id": pred.model_id, "checkpoint": str(Path(pred.checkpoint).resolve()),
            "threshold": pred.threshold, "task": pred.task.name}
    done = {r["key"] for r in W.RowReader(out).read() if not r.get("error") and r.get("model_id") == pred.model_id}
    todo = select_shard(studies, shard)

    def write(res: PredictionResult, key: str) -> dict[str, Any]:
        return W.write_study(res, out, key, fmt=fmt, scene=scene, write_volume=write_volumes, montage=montage)

    writer = _Writer(out, meta, write)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"predict {pred.task.name}", unit="study", disable=not show_progress)
    count = 0

    def report(name: str) -> None:
        nonlocal count
        count += 1
        bar.update(1)
        if progress:
            progress(count, len(todo), name)

    def wanted() -> Iterator[Any]:
        for s in todo:
            if should_stop is not None and should_stop():
                tqdm.write("predict: stopped on request")
                return
            try:
                key = study_key(pred.inputs_of(s), pred.task.roles)
            except InputError:
                key = None  # prepare reports it
            if key in done:
                report(str(s))
                continue
            yield s

    group: list[Prepared] = []

    def flush() -> None:
        if not group:
            return
        try:
            results = pred.run(group, saliency, target_layer, tta, sanity)
            errors = [None] * len(group)
        except Exception as exc:  # noqa: BLE001
            results, errors = [None] * len(group), [f"{type(exc).__name__}: {exc}"] * len(group)
        for p, res, err in zip(group, results, errors):
            row = _row(pred, p, res, saliency, err)
            if row["error"]:
                tqdm.write(f"predict: skipped {p.name}: {row['error']}")
            writer.put(row, res)
            report(p.name)
        group.clear()

    try:
        for p in _prefetch(pred, wanted(), workers, depth=max(2, 2 * batch_size)):
            if p.error:
                row = _row(pred, p, None, saliency, p.error)
                tqdm.write(f"predict: skipped {p.name}: {p.error}")
                writer.put(row, None)
                report(p.name)
                continue
            group.append(p)
            if len(group) >= batch_size:
                flush()
        flush()
    finally:
        rows = writer.close()
        bar.close()
    return rows


def _row(pred: Predictor, p: Prepared, res: PredictionResult | None, saliency: str | None,
         error: str | None) -> dict[str, Any]:
    first = next((p.inputs[r] for r in pred.task.roles if isinstance(p.inputs.get(r), (str, Path))), None)
    row: dict[str, Any] = {"study": p.name, "key": p.key, "task": pred.task.name, "model_id": pred.model_id,
                           "threshold": pred.threshold, "saliency": saliency,
                           "source_path": None if first is None else str(Path(first).resolve()), "error": error}
    if res is not None:
        row.update({k: v for k, v in res.values.items() if not isinstance(v, (dict, list)) or k == "clinical_missing"})
        row.update(series_uid=res.series_uid, tta_mean=res.tta_mean, tta_std=res.tta_std,
                   sources=res.sources)
        if isinstance(row.get("clinical_missing"), list):
            row["clinical_missing"] = ";".join(row["clinical_missing"])
    return row
