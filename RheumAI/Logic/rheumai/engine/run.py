"""One entry for training and evaluating any task: the task comes from the config or the model card."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

from ..config import DEFAULT_TASK, TrainConfig, load_config, read_toml
from ..errors import InputError


def config_task(config: TrainConfig | str | Path | Mapping[str, Any], task: str | None = None) -> str:
    """The task a config trains: its ``task`` key, else ``task``, else cervical_ra."""
    if isinstance(config, TrainConfig):
        return config.task
    named = config.get("task") if isinstance(config, Mapping) else read_toml(config).get("task")
    if named and task and named != task:
        raise InputError(None if isinstance(config, Mapping) else config,
                         f"the config trains task {named!r}, not {task!r}: drop --task or use another config")
    return str(named or task or DEFAULT_TASK)


def train(config: TrainConfig | str | Path | Mapping[str, Any], manifest: str | Path | None = None,
          out_dir: str | Path | None = None, *, task: str | None = None, **kw: Any) -> Any:
    """Train the config's task (keywords: resume, progress, should_stop, show_progress)."""
    from ..tasks import get_task

    name = config_task(config, task)
    t = get_task(name)
    if t.recipe and not isinstance(config, (TrainConfig, Mapping)):
        config = load_config(config, task=name)  # a file without a task key trains ``--task``
    elif isinstance(config, Mapping) and "task" not in config:
        config = {**config, "task": name}
    if out_dir is None:
        raise InputError(None if isinstance(config, (TrainConfig, Mapping)) else config, "no output folder given")
    return t.entry("train")(config, manifest, out_dir, **kw)


def evaluate(model: str | Path, manifest: str | Path, out_dir: str | Path, **kw: Any) -> dict[str, Any]:
    """Evaluate a checkpoint with its task's evaluator (keywords: split, show_progress; binary
    tasks also threshold_rule, external, recalibrate_out, ...)."""
    from .predict import task_of

    task = task_of(model)
    fn = task.entry("evaluate")
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise InputError(model, f"task {task.name}'s evaluation takes no option(s) {', '.join(unknown)}")
    return fn(model, manifest, out_dir, **kw)
