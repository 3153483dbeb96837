"""One predictor for every task: study -> task preprocessing -> network -> head decode -> saliency.

``Predictor(checkpoint)`` loads the network once and runs the predict hooks of the task its card
names (:class:`rheumai.tasks.base.Task`). Study inputs: ``{role: path | Study | image, "roi",
"clinical", "id", "series_uid"}``; a single-input task also takes the study alone.
:func:`predict_batch` streams: worker threads read ahead while the network runs and a writer thread
writes files and tables (:mod:`rheumai.engine.write`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import hashlib
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import default_collate

from ..checkpoint import load_checkpoint, read_card
from ..errors import InputError, RheumAIError
from ..paths import check_name
from ..tasks import Task, get_task
from ..tta import tta_probabilities
from . import write as W


@dataclass
class RoleMap:
    """Saliency of one input role. grid: float32 map in [0, 1] on the task's sampling grid;
    images / overlay: (K, H, W) slices and map for the montage; input_map: the map on the network
    input (sanity checks); to_source: grid -> image in the role's source geometry (LPS), run on
    first use of :attr:`volume` (in batches: on the writer thread)."""

    role: str
    grid: np.ndarray
    images: np.ndarray
    overlay: np.ndarray
    titles: list[str] | None = None
    input_map: np.ndarray | None = None
    to_source: Callable[[np.ndarray], sitk.Image] | None = field(default=None, repr=False)

    @functools.cached_property
    def volume(self) -> sitk.Image | None:
        return None if self.to_source is None else self.to_source(self.grid)


@dataclass
class PredictionResult:
    """One study: ``values`` from the task's postprocess (JSON-able), saliency maps per role; the
    sample's sources, series UID and source images (LPS) by role. Shortcuts: the binary head's
    values, and the first role's source, image and map."""

    task: str
    model_id: str
    values: dict[str, Any]
    sample: Any
    study_id: str | None = None
    saliency_method: str | None = None
    target_layer: str | None = None
    maps: dict[str, RoleMap] = field(default_factory=dict)
    tta: dict[str, Any] | None = None
    sanity: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)

    sources = property(lambda self: dict(getattr(self.sample, "sources", None) or {}))
    series_uid = property(lambda self: getattr(self.sample, "series_uid", None))
    source_images = property(lambda self: dict(getattr(self.sample, "source_images", None) or {}))
    probability = property(lambda self: float(self.values["probability"]))
    label = property(lambda self: int(self.values["label"]))
    threshold = property(lambda self: float(self.values["threshold"]))
    tta_mean = property(lambda self: None if self.tta is None else self.tta["mean"])
    tta_std = property(lambda self: None if self.tta is None else self.tta["std"])
    source_path = property(lambda self: next(iter(self.sources.values()), None))
    source_image = property(lambda self: next(iter(self.source_images.values()), None))
    selection = property(lambda self: getattr(self.sample, "selection", self.sample))  # cervical: SliceSelection
    saliency_volume = property(lambda self: next((m.volume for m in self.maps.values()), None))
    saliency_grid = property(lambda self: next((m.grid for m in self.maps.values()), None))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no arrays or images)."""
        describe = getattr(self.sample, "describe", None)
        return dict(self.values, task=self.task, model_id=self.model_id, study_id=self.study_id,
                    sources=self.sources, source_path=self.source_path, series_uid=self.series_uid,
                    saliency=self.saliency_method, target_layer=self.target_layer, saliency_roles=list(self.maps),
                    tta=self.tta, tta_mean=self.tta_mean, tta_std=self.tta_std, sanity=self.sanity,
                    sample=describe() if describe else None, timings_s=self.timings_s)


def task_of(checkpoint: str | Path, task: str | None = None) -> Task:
    """The registered task the checkpoint's card names (``task`` only for a card naming none; a
    contradicting ``task`` is refused)."""
    named = read_card(checkpoint).get("task")
    if named and task and named != task:
        raise InputError(checkpoint, f"checkpoint is for task {named!r}, not {task!r}")
    if not (named or task):
        raise InputError(checkpoint, "the model card names no task; pass --task")
    try:
        t = get_task(str(named or task))
    except KeyError as exc:
        raise InputError(checkpoint, str(exc.args[0])) from None
    missing = [h for h in ("load_sample", "to_tensors", "postprocess") if getattr(t, h, None) is None]
    if missing:
        raise RheumAIError(f"task {t.name} declares no predict-side hooks ({', '.join(missing)})")
    return t


def resolve_saliency(task: Task, method: str | None) -> str | None:
    """``"default"`` -> the task's first declared method (None when it has none); InputError (a
    ValueError) for a method the task's saliency hook does not accept."""
    if method == "default":
        return task.saliency_methods[0] if task.saliency_maps is not None and task.saliency_methods else None
    if method and (task.saliency_maps is None or (task.saliency_methods and method not in task.saliency_methods)):
        raise InputError(None, f"saliency method '{method}' unknown for task {task.name}; choose one of "
                               f"{', '.join(task.saliency_methods) or 'none (this task has no saliency)'}")
    return method


def study_key(inputs: Mapping[str, Any], roles: Sequence[str]) -> str:
    """File-name-safe, collision-free key: ``inputs["id"]`` (checked, not rewritten), else
    :func:`study_stem` of the inputs given as paths, else ``"image"``."""
    if inputs.get("id") is not None:
        return check_name(inputs["id"], "study ID")
    paths = [inputs[r] for r in roles if isinstance(inputs.get(r), (str, Path))]
    return study_stem(*paths) if paths else "image"


def study_stem(*paths: str | Path) -> str:
    """``<first file's name without image suffix>_<8 hex of the resolved paths>``, only ``[A-Za-z0-9_.-]``."""
    name = re.sub(r"\.(nii\.gz|nii|nrrd|nhdr|mha|mhd)$", "", Path(paths[0]).name, flags=re.I)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:80] or "study"
    digest = hashlib.sha1("\0".join(str(Path(p).resolve()) for p in paths).encode()).hexdigest()[:8]
    return f"{name}_{digest}"


@dataclass
class Prepared:
    """A study read and preprocessed for the network, or the error that stopped it."""

    key: str
    name: str
    inputs: Mapping[str, Any]
    sample: Any = None
    x: Any = None
    error: Exception | None = None
    seconds: float = 0.0


class Predictor:
    """A checkpoint (folder; pickles refused) loaded once for any number of studies of its task.
    device: "cpu", "cuda" or "auto"; task: only for a card that names none."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", task: str | None = None):
        self.checkpoint = Path(checkpoint)
        self.task = task_of(self.checkpoint, task)
        auto = str(device) == "auto"
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RheumAIError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        self.model, self.card = load_checkpoint(self.checkpoint, device=self.device)
        self.model.eval()
        self.model_id = str(self.card.get("model_id", "unknown"))
        thr = self.card.get("threshold")  # null for tasks without a decision threshold
        self.threshold = None if thr is None else float(thr)

    def inputs_of(self, study: Any) -> dict[str, Any]:
        """Study inputs as a dict; a bare path / Study / image is the input of a one-input task."""
        roles = self.task.roles
        if not isinstance(study, Mapping) and len(roles) != 1:
            raise InputError(None, f"task {self.task.name} needs the inputs {', '.join(roles)} "
                                   "(and the ROI / clinical values it declares) as a mapping")
        d = dict(study) if isinstance(study, Mapping) else {roles[0]: study}
        unknown = set(d) - {*roles, "roi", "clinical", "id", "series_uid"}
        if unknown:
            raise InputError(None, f"task {self.task.name} has no input {', '.join(sorted(unknown))} "
                                   f"(inputs: {', '.join(roles)}, roi, clinical)")
        return d

    def prepare(self, study: Any) -> Prepared:
        """Read + preprocess one study (safe in a worker thread); errors are captured, not raised."""
        try:
            inputs = self.inputs_of(study)
            key = study_key(inputs, self.task.roles)
        except InputError as exc:  # still reported, under a key that names nothing from the data
            bad = study if isinstance(study, Mapping) else {"id": study}
            key = "invalid_" + hashlib.sha1(repr(sorted(map(str, bad.items()))).encode()).hexdigest()[:12]
            return Prepared(key, repr(bad.get("id", study))[:120], {}, error=exc)
        first = next((inputs[r] for r in self.task.roles if inputs.get(r) is not None), None)
        name = str(inputs.get("id") or (first if isinstance(first, (str, Path)) else key))
        t = time.perf_counter()
        try:
            sample = self.task.load_sample(inputs, self.card)
            x = self.task.to_tensors(sample, self.card)
        except Exception as exc:  # noqa: BLE001  reported per study by the caller
            return Prepared(key, name, inputs, error=exc)
        return Prepared(key, name, inputs, sample, x, seconds=time.perf_counter() - t)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Batched input -> {head: Tensor} (inference mode); a bare Tensor is the head ``"out"``."""
        self.model.eval()
        with torch.inference_mode():
            out = (self.task.forward(self.model, batch) if self.task.forward is not None
                   else self.model(**batch) if isinstance(batch, dict) else self.model(batch))
        return out if isinstance(out, dict) else {"out": out}

    def run(self, prepared: Sequence[Prepared], saliency: str | None = "default", target_layer: str | None = None,
            tta: int = 0, sanity: bool = False) -> list[PredictionResult]:
        """The network (+ saliency, TTA, sanity) on prepared studies as one batch; writes nothing."""
        saliency = resolve_saliency(self.task, saliency)
        t0 = time.perf_counter()
        batch = default_collate([p.x for p in prepared])
        batch = {k: v.to(self.device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(self.device)
        outputs, maps = None, [{} for _ in prepared]
        if saliency:
            outputs, maps = self.task.saliency_maps(self.model, batch, [p.sample for p in prepared], self.card,
                                                    saliency, target_layer)
            outputs = {"out": outputs} if isinstance(outputs, torch.Tensor) else outputs
        outputs = outputs or self.forward(batch)
        seconds = (time.perf_counter() - t0) / len(prepared)
        cam = saliency in ("gradcam", "gradcampp")
        layer = (target_layer or self.task.saliency_targets.get(self.task.roles[0])) if cam else None
        results = []
        for i, p in enumerate(prepared):
            values = self.task.postprocess({k: v[i].detach().float().cpu() for k, v in outputs.items()}, self.card,
                                           p.sample)
            res = PredictionResult(self.task.name, self.model_id, values, p.sample,
                                   None if p.inputs.get("id") is None else str(p.inputs["id"]), saliency or None,
                                   layer, maps[i],
                                   timings_s={"read_preprocess": round(p.seconds, 4), "model": round(seconds, 4)})
            if tta or sanity:
                self._extras(res, p.x, tta, sanity, target_layer)
            results.append(res)
        return results

    def _extras(self, res: PredictionResult, x: Any, tta: int, sanity: bool, target_layer: str | None) -> None:
        """TTA and the saliency sanity checks (single-tensor, one-logit networks)."""
        if not isinstance(x, torch.Tensor):
            raise RheumAIError(f"--tta / --sanity need a single-tensor network input; task {self.task.name} "
                               "has several")
        xb = x[None].to(self.device)
        t = time.perf_counter()
        if tta:
            p = tta_probabilities(self.model, xb, int(tta))
            res.tta = {"n": int(p.size), "mean": float(p.mean()), "std": float(p.std()), "min": float(p.min()),
                       "max": float(p.max()), "probabilities": p.tolist()}
        if sanity:
            m = next(iter(res.maps.values()), None)
            if m is None or m.input_map is None:
                raise ValueError("sanity checks need a saliency method")
            from ..sanity import run_sanity

            res.sanity = run_sanity(self.model, xb, m.input_map, res.saliency_method, target_layer)
        res.timings_s["tta_sanity"] = round(time.perf_counter() - t, 4)

    def predict(self, study: Any, saliency: str | None = "default", target_layer: str | None = None, tta: int = 0,
                sanity: bool = False, series_uid: str | None = None) -> PredictionResult:
        """Predict one study; errors in the study raise (InputError names the file)."""
        if series_uid is not None and not isinstance(study, Mapping):
            study = {self.task.roles[0]: study, "series_uid": series_uid}
        saliency = resolve_saliency(self.task, saliency)  # refused before the study is read
        if sanity and not saliency:
            raise ValueError("sanity checks need a saliency method")
        p = self.prepare(study)
        if p.error is not None:
            raise p.error
        return self.run([p], saliency, target_layer, tta, sanity)[0]


def select_shard(items: Sequence[Any], shard: tuple[int, int] | None) -> list[Any]:
    """Items ``i, i + N, i + 2N ...`` of shard ``(i, N)`` (0-based i), or all of them."""
    if shard is None:
        return list(items)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be i/N with 0 <= i < N, got {i}/{n}")
    return list(items)[i::n]


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"i/N"`` (0-based) -> (i, N). ``"auto"``: a SLURM job array (``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``) or torchrun (``RANK`` of ``WORLD_SIZE``)."""
    if not text:
        return None
    e = os.environ if env is None else env
    if text == "auto" and "SLURM_ARRAY_TASK_ID" in e and "SLURM_ARRAY_TASK_COUNT" in e:
        text = f"{int(e['SLURM_ARRAY_TASK_ID']) - int(e.get('SLURM_ARRAY_TASK_MIN', 0))}/{e['SLURM_ARRAY_TASK_COUNT']}"
    elif text == "auto" and "RANK" in e and "WORLD_SIZE" in e:
        text = f"{e['RANK']}/{e['WORLD_SIZE']}"
    elif text == "auto":
        raise InputError(None, "--shard auto needs SLURM_ARRAY_TASK_ID + SLURM_ARRAY_TASK_COUNT (a SLURM job "
                               "array) or RANK + WORLD_SIZE (torchrun) in the environment")
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(None, f"--shard must be i/N (0-based shard i of N), not {text!r}") from None
    select_shard([], (i, n))
    return i, n


def _read_ahead(pred: Predictor, studies: Iterable[Any], workers: int, depth: int) -> Iterator[Prepared]:
    """Prepared studies in input order; up to ``depth`` are read ahead by ``workers`` threads."""
    if workers <= 0:
        yield from map(pred.prepare, studies)
        return
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="rheumai-read") as pool:
        pending: collections.deque[cf.Future] = collections.deque()
        for s in studies:
            pending.append(pool.submit(pred.prepare, s))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def predict_batch(studies: Sequence[Any], checkpoint_dir: str | Path, out_dir: str | Path,
                  progress: Callable[[int, int, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, saliency: str | None = "default",
                  write_volumes: bool = True, target_layer: str | None = None, tta: int = 0,
                  sanity: bool = False, scene: bool = False, fmt: str = "nii.gz", device: str = "cpu",
                  show_progress: bool = True, predictor: Predictor | None = None, task: str | None = None,
                  shard: tuple[int, int] | None = None, workers: int = 2, batch_size: int = 1,
                  montage: bool = True) -> list[dict[str, Any]]:
    """Predict many studies with the model loaded once, streaming (see module docstring).

    studies: paths / DICOM folders (single-input tasks) or study-input dicts; outputs in ``out_dir``
    (layout: :mod:`rheumai.engine.write`). Resumable: a study whose row exists without error for
    the same model is skipped; a failing study gets a row with its ``error`` and the batch goes on.
    ``shard=(i, N)``: every N-th study from the i-th. ``progress(i, n, study)`` after each study,
    ``should_stop()`` before each (cancel). Returns every row of ``out_dir`` (this run's, earlier
    and concurrent runs').
    """
    from tqdm.auto import tqdm

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if scene:
        W.scene_writer()  # fail before the batch, not once per study
    pred = predictor or Predictor(checkpoint_dir, device=device, task=task)
    saliency = resolve_saliency(pred.task, saliency)
    meta = {"model_id": pred.model_id, "checkpoint": str(Path(pred.checkpoint).resolve()),
            "threshold": pred.threshold, "task": pred.task.name}
    reader = W.RowReader(out)
    done = {r["key"] for r in reader.read() if not r.get("error") and r.get("model_id") == pred.model_id}
    todo = select_shard(studies, shard)
    bar = tqdm(total=len(todo), desc=f"predict {pred.task.name}", unit="study", disable=not show_progress)
    writes: collections.deque[cf.Future] = collections.deque()
    last_merge, counter = 0.0, itertools.count(1)

    def write(row: dict[str, Any], res: PredictionResult | None) -> None:  # on the writer thread
        nonlocal last_merge
        if res is not None:
            try:
                files = W.write_study(res, out, row["key"], fmt=fmt, scene=scene, write_volume=write_volumes,
                                      montage=montage)
                row.update({k: v for k, v in files.items() if v})
            except Exception as exc:  # noqa: BLE001  the study is reported, the batch goes on
                row["error"] = _text(exc)
        row["finished"] = time.time()
        W.put_row(out, row)
        if time.monotonic() - last_merge >= 1.0:  # the tables at most once a second
            W.merge_tables(out, meta, reader)
            last_merge = time.monotonic()

    def done_with(name: str, p: Prepared | None = None, res: PredictionResult | None = None,
                  error: Exception | None = None) -> None:
        """Queue the study's row and files (p None: done in an earlier run); progress."""
        if p is not None:
            if error:
                tqdm.write(f"predict: skipped {p.name}: {_text(error)}")
            writes.append(writer.submit(write, _row(pred, p, res, saliency, error), res))
            if len(writes) > 8:  # bounded: the network never runs far ahead of the disk
                writes.popleft().result()
        bar.update(1)
        if progress:
            progress(next(counter), len(todo), name)

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
                done_with(str(s))
            else:
                yield s

    def flush(group: list[Prepared]) -> None:
        try:
            results, error = pred.run(group, saliency, target_layer, tta, sanity), None
        except Exception as exc:  # noqa: BLE001
            results, error = [None] * len(group), exc
        for p, res in zip(group, results):
            done_with(p.name, p, res, error)
        group.clear()

    group: list[Prepared] = []
    with cf.ThreadPoolExecutor(1, thread_name_prefix="rheumai-write") as writer:
        try:
            for p in _read_ahead(pred, wanted(), workers, depth=max(2, 2 * batch_size)):
                if p.error:
                    done_with(p.name, p, None, p.error)
                    continue
                group.append(p)
                if len(group) >= batch_size:
                    flush(group)
            if group:
                flush(group)
        finally:
            for f in writes:
                f.result()
            bar.close()
            rows = W.merge_tables(out, meta, reader)
    return rows


def _text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _row(pred: Predictor, p: Prepared, res: PredictionResult | None, saliency: str | None,
         error: Exception | None) -> dict[str, Any]:
    """The study's table row: scalar values (``clinical_missing`` joined by ';'), paths, error."""
    first = next((p.inputs[r] for r in pred.task.roles if isinstance(p.inputs.get(r), (str, Path))), None)
    row: dict[str, Any] = {"study": p.name, "key": p.key, "task": pred.task.name, "model_id": pred.model_id,
                           "threshold": pred.threshold, "saliency": saliency,
                           "source_path": None if first is None else str(Path(first).resolve()),
                           "error": error and _text(error)}
    if res is not None:
        row.update({k: v for k, v in res.values.items() if not isinstance(v, (dict, list))})
        if isinstance(res.values.get("clinical_missing"), list):
            row["clinical_missing"] = ";".join(res.values["clinical_missing"])
        row.update(series_uid=res.series_uid, tta_mean=res.tta_mean, tta_std=res.tta_std, sources=res.sources)
    return row
