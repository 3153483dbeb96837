"""What the Slicer panel shows for a task, read from the task declaration (no Qt, no MRML).

The widget builds its Predict inputs from :func:`task_fields`: one node selector per input role
(a scalar volume; a radiograph is a one-slice volume), a markups ROI selector when the task
declares a box ROI, and one form row per clinical variable. :func:`clinical_values` checks the
form's text before it reaches the model. Adding a task to the registry adds its panel; the module
file holds no task-specific code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from rheumai.errors import InputError

NODE_CLASSES = {"volume": "vtkMRMLScalarVolumeNode", "roi": "vtkMRMLMarkupsROINode",
                "points": "vtkMRMLMarkupsFiducialNode"}
BINARY_CHOICES = ("", "yes", "no")


@dataclass(frozen=True)
class Field:
    """One input row of the panel.

    kind: "volume" | "roi" | "clinical"; key: input role, "roi", or the clinical variable name;
    node_class: the MRML class of a node selector (None for clinical rows); choices: the levels of
    a binary / categorical variable ("" first = not given); unit / range: of a continuous one.
    """

    kind: str
    key: str
    label: str
    tooltip: str
    node_class: str | None = None
    optional: bool = False
    choices: tuple[str, ...] = ()
    unit: str = ""
    range: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def task_fields(task: Mapping[str, Any]) -> list[Field]:
    """The panel rows of a task (``Task.describe()``): inputs, then ROI, then clinical variables."""
    out: list[Field] = []
    for spec in task["inputs"]:
        radiograph = str(spec.get("sequence", "")).lower() == "radiograph"
        what = "radiograph (one-slice volume)" if radiograph else f"{spec.get('sequence', '')} volume".strip()
        accepts = f"; also accepted: {', '.join(spec['accepts'])}" if spec.get("accepts") else ""
        out.append(Field("volume", spec["role"], f"{spec['role']}:", f"{spec['description']} - {what}{accepts}",
                         NODE_CLASSES["volume"], bool(spec.get("optional"))))
    roi = task.get("roi")
    if roi:
        if roi.get("kind") != "box":
            raise InputError(None, f"task {task['name']}: the panel shows box ROIs only, not {roi.get('kind')!r}")
        out.append(Field("roi", "roi", "Box ROI:", f"{roi['description']} (markups ROI; its axis-aligned extent "
                                                   "is used)", NODE_CLASSES["roi"]))
    for var in task.get("clinical") or ():
        kind = var["kind"]
        choices = BINARY_CHOICES if kind == "binary" else ("", *var.get("levels", ())) if kind == "categorical" else ()
        unit = var.get("unit") or ""
        rng = tuple(var["range"]) if var.get("range") else None
        tip = var["description"] + (f" ({unit})" if unit else "") + (f", {rng[0]:g}-{rng[1]:g}" if rng else "")
        out.append(Field("clinical", var["name"], f"{var['name'].replace('_', ' ')}:", tip + "; empty = not known",
                         optional=True, choices=choices, unit=unit, range=rng))
    return out


def clinical_values(task: Mapping[str, Any], form: Mapping[str, str]) -> dict[str, Any]:
    """Clinical values from the panel's text (empty = not known, left out): binary yes/no (also
    1/0, true/false), categorical one of the levels, continuous a number within the declared
    range. InputError names the variable and what is wrong."""
    specs = {f.key: f for f in task_fields(task) if f.kind == "clinical"}
    unknown = set(form) - set(specs)
    if unknown:
        raise InputError(None, f"task {task['name']} has no clinical variable {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for name, raw in form.items():
        text = str(raw if raw is not None else "").strip()
        if not text:
            continue
        f = specs[name]
        if f.choices and f.choices != BINARY_CHOICES:
            if text not in f.choices:
                raise InputError(None, f"clinical variable {name}: {text!r} is not one of {', '.join(f.choices[1:])}")
            out[name] = text
        elif f.choices == BINARY_CHOICES:
            low = text.lower()
            if low not in ("yes", "no", "1", "0", "true", "false", "m", "f", "male", "female"):
                raise InputError(None, f"clinical variable {name}: {text!r} is not yes / no")
            out[name] = text
        else:
            try:
                value = float(text)
            except ValueError:
                raise InputError(None, f"clinical variable {name}: {text!r} is not a number") from None
            if not math.isfinite(value) or (f.range and not f.range[0] <= value <= f.range[1]):
                raise InputError(None, f"clinical variable {name}: {value:g} {f.unit} is outside "
                                       f"{f.range[0]:g}-{f.range[1]:g}" if f.range else f"clinical variable {name}: "
                                       f"{text!r} is not a finite number")
            out[name] = value
    return out


def path_text(value: Any) -> str:
    """A path setting as the text of a path field: "" when unset (never ".", which is what
    ``str(pathlib.Path(""))`` gives)."""
    text = "" if value is None else str(value)
    return "" if text in ("", ".") else text


_NOT_SHOWN = {"task", "model_id", "study", "study_id", "source_path", "series_uid", "saliency", "target_layer",
              "saliency_note", "label"}


def result_text(values: Mapping[str, Any], max_items: int = 4) -> str:
    """One line for the panel: probability, class and threshold for a binary head, else the
    first scalar outputs (score, class name ...) in the task's order; then the model id."""
    if "probability" in values and values.get("probability") is not None:
        text = f"Probability {float(values['probability']):.3f}"
        if values.get("label") is not None:
            text += f", class {values['label']}"
        if values.get("threshold") is not None:
            text += f" (threshold {float(values['threshold']):.3f})"
    else:
        parts = [f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                 for k, v in values.items() if k not in _NOT_SHOWN and isinstance(v, (int, float, str))
                 and not isinstance(v, bool) and not k.endswith(("_path", "_source", "_uid"))]
        text = ", ".join(parts[:max_items]) or "done"
    return text + (f"; model {values['model_id']}" if values.get("model_id") else "")
