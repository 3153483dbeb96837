"""Console API, the same for every task (Slicer's Python console, scripts, notebooks).

::

    from rheumai import api
    res = api.predict("run/model", "t2.nii.gz", out_dir="pred")                # cervical RA
    res = api.predict("spa/run/model", {"t1": "t1.nii.gz", "t2": "t2.nii.gz", "stir": "stir.nii.gz",
                                        "roi": "box.json", "clinical": {"crp": 12}}, out_dir="pred")
    run = api.train("configs/negspa.toml", "cohort/manifest.csv", "run")    # task from the config
    api.evaluate(run.checkpoint, "cohort/manifest.csv", "eval")             # task from the card

Results: :class:`rheumai.engine.predict.PredictionResult`; files as in :mod:`rheumai.engine.write`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from .engine.predict import PredictionResult, Predictor, predict_batch, study_key, task_of
from .engine.run import evaluate, train
from .engine.write import merge_folders, write_study


__all__ = ["load", "predict", "predict_many", "read_studies", "merge", "train", "evaluate"]


def load(model: str | Path, device: str = "cpu", task: str | None = None) -> Predictor:
    """The checkpoint loaded for its task (keep it to predict many studies without reloading)."""
    return Predictor(model, device=device, task=task)


merge = merge_folders  # merge(sources, out_dir): several prediction folders (shards) into one; every row


def predict(model: str | Path | Predictor, study: Any, out_dir: str | Path | None = None,
            saliency: str | None = "default", device: str = "cpu", tta: int = 0, sanity: bool = False,
            scene: bool = False, task: str | None = None) -> PredictionResult:
    """Predict one study (a path / image for single-input tasks, else a dict of inputs); with
    ``out_dir`` its files are written there too (``res.files``)."""
    pred = model if isinstance(model, Predictor) else load(model, device, task)
    res = pred.predict(study, saliency=saliency, tta=tta, sanity=sanity)
    if out_dir is not None:
        res.files = write_study(res, out_dir, study_key(pred.inputs_of(study), pred.task.roles), scene=scene)
    return res


def predict_many(model: str | Path | Predictor, studies: Sequence[Any], out_dir: str | Path,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, **options: Any) -> list[dict[str, Any]]:
    """:func:`rheumai.engine.predict.predict_batch` (resumable, streamed; options: saliency,
    tta, sanity, scene, fmt, shard=(i, N), workers, batch_size, device, task)."""
    pred = model if isinstance(model, Predictor) else None
    ckpt = pred.checkpoint if pred else model
    return predict_batch(studies, ckpt, out_dir, progress=progress, should_stop=should_stop, predictor=pred,
                         show_progress=False, **options)


def read_studies(table: str | Path, model: str | Path, task: str | None = None) -> list[dict[str, Any]]:
    """The study inputs of a study table (CSV) for the model's task (:mod:`rheumai.engine.batch`)."""
    from .engine.batch import read_study_table

    return read_study_table(table, task_of(model, task))
