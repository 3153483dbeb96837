"""Predict one study of any registered task: inputs per role, ROI box, clinical values.

No MRML and no Qt: the Slicer module runs this in the background worker (inputs and outputs as
files) and the console logic runs it in-process; both then turn the :class:`StudyPrediction`
into nodes (``rheumai_mrml.logic``).

Study inputs follow the engine's convention: ``{role: path | Study | sitk.Image (LPS), "roi":
box, "clinical": {name: raw value}}``. A box is ``{"min_lps": [x, y, z], "max_lps": [...]}`` in
LPS mm (axis-aligned). The cervical task also takes ``center_lps``, the slab centre (LPS mm) that
Select slices honours, so Predict samples the same slab.

Which predictor runs: the engine's (``rheumai.api.load``: one Predictor for every task) when the
task declares its predict-side hooks (``Task.load_sample``), else the task's own console entry point
(``api["predictor"]``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import SimpleITK as sitk

from rheumai.errors import InputError

RESULT_FILE = "prediction.json"


@dataclass
class StudyPrediction:
    """One study's prediction, task-independent.

    values: JSON-able result (probability, label, threshold, model_id, task...); saliency: {role:
    map in [0, 1] in that role's source geometry (LPS)}; slab: the cervical selection grid as a
    dict (``Grid.to_dict()``) or None; box: the ROI box used ({"min_lps", "max_lps"}) or None.
    """

    task: str
    values: dict[str, Any]
    saliency: dict[str, sitk.Image] = field(default_factory=dict)
    slab: dict[str, Any] | None = None
    box: dict[str, Any] | None = None

    def save(self, out_dir: str | Path) -> Path:
        """Write ``prediction.json`` and ``saliency_<role>.nrrd`` (NRRD keeps the geometry) into
        ``out_dir``; returns the JSON path. Role names come from the task declaration and are
        checked to stay inside ``out_dir``."""
        from rheumai.atomic import atomic_path, write_json
        from rheumai.paths import safe_child

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for role, img in self.saliency.items():
            path = safe_child(out, f"saliency_{role}", ".nrrd", what="input role")
            with atomic_path(path) as tmp:
                sitk.WriteImage(img, str(tmp), useCompression=True)
            files[role] = path.name
        return write_json(out / RESULT_FILE, {"task": self.task, "values": self.values, "saliency_files": files,
                                              "slab": self.slab, "box": self.box})

    @classmethod
    def load(cls, out_dir: str | Path) -> "StudyPrediction":
        out = Path(out_dir)
        path = out / RESULT_FILE
        if not path.is_file():
            raise InputError(path, "prediction result not found")
        d = json.loads(path.read_text(encoding="utf-8"))
        from rheumai.paths import safe_child

        saliency = {role: sitk.ReadImage(str(safe_child(out, name, what="saliency file")))
                    for role, name in d.get("saliency_files", {}).items()}
        return cls(task=d["task"], values=d["values"], saliency=saliency, slab=d.get("slab"), box=d.get("box"))


class PredictorCache:
    """Loaded models keyed by checkpoint folder, device and the weights file's modification time
    and size: retraining into the same folder loads the new weights on the next prediction."""

    def __init__(self) -> None:
        self._items: dict[tuple, Any] = {}

    @staticmethod
    def key(model_path: str | Path, device: str) -> tuple:
        folder = Path(model_path).resolve()
        if folder.is_file():
            folder = folder.parent
        from rheumai.checkpoint import WEIGHTS, read_card

        card = read_card(folder)
        weights = folder / str(card.get("weights_file", WEIGHTS))
        try:
            st = os.stat(weights)
        except OSError:
            raise InputError(weights, "model weights not found") from None
        return (str(folder), str(device), st.st_mtime_ns, st.st_size)

    def get(self, model_path: str | Path, device: str = "cpu") -> Any:
        key = self.key(model_path, device)
        for old in [k for k in self._items if k[:2] == key[:2] and k != key]:
            del self._items[old]  # the folder's weights changed: drop the stale model
        if key not in self._items:
            self._items[key] = load_predictor(model_path, device)
        return self._items[key]

    def clear(self) -> None:
        self._items.clear()


def load_predictor(model_path: str | Path, device: str = "cpu") -> Any:
    """The predictor of a checkpoint's task (see the module docstring)."""
    from rheumai.checkpoint import read_card
    from rheumai.tasks import get_task

    task = get_task(str(read_card(Path(model_path)).get("task", "cervical_ra")))
    if getattr(task, "load_sample", None) is not None:
        from rheumai.api import load

        return load(model_path, device=device)
    return task.entry("predictor")(model_path, device)


def task_name_of(predictor: Any) -> str:
    task = getattr(predictor, "task", None)
    if task is not None and hasattr(task, "name"):
        return str(task.name)
    return str(getattr(predictor, "card", {}).get("task", "cervical_ra"))


def predict_study(predictor: Any, study: Mapping[str, Any], saliency: str | None = "default",
                  target_layer: str | None = None, tta: int = 0) -> StudyPrediction:
    """Run ``predictor`` (from :func:`load_predictor`) on one study dict (module docstring)."""
    from rheumai.tasks import get_task

    task = get_task(task_name_of(predictor))
    study = dict(study)
    center = study.pop("center_lps", None)
    missing = [s.role for s in task.inputs if not s.optional and study.get(s.role) is None]
    if missing:
        raise InputError(None, f"task {task.name} needs the input(s) {', '.join(missing)}")
    if task.roi is not None and study.get("roi") is None:
        raise InputError(None, f"task {task.name} needs a {task.roi.kind} ROI: {task.roi.description}")
    roi = study.get("roi")
    box = _box_dict(roi) if roi is not None else None
    module = type(predictor).__module__
    if module.startswith("rheumai.engine"):
        if center is not None:
            prep = dict(predictor.card.get("preprocessing") or {})
            if "center_lps" not in prep:
                raise InputError(None, f"task {task.name} has no slab centre to set")
            predictor = copy.copy(predictor)  # same network, this call's slab centre
            predictor.card = dict(predictor.card, preprocessing=dict(prep, center_lps=[float(v) for v in center]))
        if study.get("roi") is not None:
            study["roi"] = box
        res = predictor.predict(study, saliency=saliency, target_layer=target_layer, tta=tta)
        return StudyPrediction(task.name, res.to_dict(), {r: m.volume for r, m in res.maps.items()
                                                          if m.volume is not None},
                               slab=_slab_of(res.sample), box=box)
    if task.name == "cervical_ra":
        (role,) = task.roles
        if center is not None:
            from rheumai.tasks.cervical_ra.slices import params_from

            predictor = copy.copy(predictor)  # same network, this call's slab centre
            predictor.params = params_from(predictor.params, center_lps=tuple(float(v) for v in center))
        res = predictor.predict(study[role], saliency=saliency, target_layer=target_layer, tta=tta)
        sal = {role: res.saliency_volume} if res.saliency_volume is not None else {}
        return StudyPrediction(task.name, res.to_dict(), sal, slab=res.selection.grid.to_dict())
    inputs = {r: study[r] for r in task.roles if study.get(r) is not None}
    if box is not None:
        inputs["box"] = box
    res = predictor.predict(inputs, study.get("clinical") or {}, saliency=bool(saliency))
    return StudyPrediction(task.name, res.to_dict(), dict(res.saliency_volumes), box=box)


def _slab_of(sample: Any) -> dict[str, Any] | None:
    """The sampling grid of a slab-based sample (the cervical SliceSelection) as a dict, or None."""
    for obj in (sample, getattr(sample, "selection", None)):
        grid = getattr(obj, "grid", None)
        if grid is not None and hasattr(grid, "to_dict"):
            return grid.to_dict()
    return None


def _box_dict(roi: Any) -> dict[str, Any]:
    """A box as {"min_lps", "max_lps"} from a dict / Box / file (``rheumai`` task box formats)."""
    if isinstance(roi, Mapping) and "min_lps" in roi:
        lo, hi = [float(v) for v in roi["min_lps"]], [float(v) for v in roi["max_lps"]]
    else:
        from rheumai.tasks.negspa.preprocess import as_box

        b = as_box(roi)
        lo, hi = list(b.min_lps), list(b.max_lps)
    if len(lo) != 3 or len(hi) != 3 or any(h <= low for low, h in zip(lo, hi)):
        raise InputError(None, f"box needs 3 min and 3 max LPS coordinates with max > min, got {lo}, {hi}")
    return {"min_lps": lo, "max_lps": hi}
