"""Task registry: ``list_tasks()`` / ``get_task(name)`` / ``register_task(task)``.

Built-in tasks are imported on first use; other packages add tasks through the ``rheumai.tasks``
entry-point group or :func:`register_task`. The name -> Task table is the one piece of module state.
"""

from __future__ import annotations

from importlib import metadata

from .base import ClinicalVar, InputSpec, RoiSpec, Task, load_ref

__all__ = ["Task", "InputSpec", "ClinicalVar", "RoiSpec", "register_task", "get_task", "list_tasks",
           "BUILTIN_TASKS", "ENTRY_POINT_GROUP"]

# name -> "module:attribute" of the Task object (imported lazily).
BUILTIN_TASKS = {
    "cervical_ra": "rheumai.tasks.cervical_ra.task:TASK",
    "negspa": "rheumai.tasks.negspa.task:TASK",
    "hand_svdh": "rheumai.tasks.hand_svdh.task:TASK",
    "msasss": "rheumai.tasks.msasss.task:TASK",
}
ENTRY_POINT_GROUP = "rheumai.tasks"

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    """Add ``task`` to the registry; re-registering the same object is a no-op."""
    if not isinstance(task, Task):
        raise TypeError(f"expected a rheumai.tasks.Task, got {type(task).__name__}")
    if _REGISTRY.get(task.name, task) is not task and not replace:
        raise ValueError(f"a different task named {task.name!r} is already registered (pass replace=True)")
    _REGISTRY[task.name] = task
    return task


def _load_all() -> None:
    for name, ref in BUILTIN_TASKS.items():
        if name not in _REGISTRY:
            register_task(load_ref(ref))
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            register_task(ep.load())


def list_tasks() -> list[Task]:
    """All known tasks, built-in first, in registration order."""
    _load_all()
    return list(_REGISTRY.values())


def get_task(name: str) -> Task:
    """The task called ``name``; KeyError listing the known names otherwise."""
    if name not in _REGISTRY:
        _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}") from None
