"""Console logic of the RheumAI module: everything the Slicer panel does, usable from a script.

``RheumAIConsoleLogic(scene)`` works on any MRML scene: Slicer's (``slicer.mrmlScene``) or one
from ``slicer-core`` (``rheumai_mrml.scene.new_scene().scene``). Methods return plain Python
results (dicts, lists); MRML nodes are created only when asked (``createNodes=True``).
In-process methods run in the calling thread; the Slicer module's ``RheumAILogic`` runs the long
ones (buildDataset, train, predictBatch) in a background worker process instead and offers
``waitForCompletion``. Geometry: images are LPS SimpleITK images; nodes are RAS (see ``nodes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from rheumai.errors import InputError

from .hierarchy import SOURCE_REFERENCE_ROLE, place_under
from .job_results import batch_nodes, dataset_nodes, training_nodes
from .nodes import image_from_volume_node, read_volume_node, volume_node_from_image
from .overlay import show_saliency
from .process import PredictJob, dataset_progress, dataset_summary, to_jsonable
from .roi import box_from_roi, roi_from_box
from .slab import grid_box_ras, roi_box_ras, selection_volume, slab_roi
from .tables import results_table, rows_table
from .task_predict import PredictorCache, StudyPrediction, predict_study

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
ProgressCallback = Callable[[float, str], None]  # (overall fraction 0..1, message)


def find_studies(paths_or_folder: str | Path | Sequence[str | Path]) -> list[str]:
    """A list of studies from a list (kept as given) or a folder: its image files, plus each
    sub-folder that holds DICOM files (``*.dcm`` or extension-less files), sorted by path."""
    if isinstance(paths_or_folder, (str, Path)):
        root = Path(paths_or_folder)
        if not root.is_dir():
            return [str(root)]
        studies = []
        for p in sorted(root.iterdir()):
            if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
                studies.append(str(p))
            elif p.is_dir() and any(f.is_file() and (f.suffix.lower() == ".dcm" or not f.suffix)
                                    for f in p.iterdir()):
                studies.append(str(p))
        if not studies:
            raise InputError(root, "holds no image files (.nii.gz, .nrrd, .mha...) and no DICOM sub-folders")
        return studies
    return [str(p) for p in paths_or_folder]


def slice_params(params: Any = None, **overrides: Any) -> Any:
    """SliceParams from None (the paper's), a dict (``SliceParams.to_dict()`` form) or SliceParams,
    with non-None ``overrides`` (n_slices, spacing_mm, size, center_lps...) applied."""
    from rheumai.tasks.cervical_ra.slices import SliceParams, params_from

    if params is None:
        base = SliceParams()
    elif isinstance(params, dict):
        base = SliceParams.from_dict(params)
    else:
        base = params
    return params_from(base, **overrides)


def missing_requirements(requirements_txt: str | Path, skip: Sequence[str] = ()) -> list[str]:
    """Requirements of a requirements.txt that the running Python does not satisfy (not installed,
    or installed at a version outside the specifier); names in ``skip`` are left out. Environment
    markers are honoured. Uses ``packaging`` and ``importlib.metadata`` only (no pip call)."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    skipped = {canonicalize_name(s) for s in skip}
    missing = []
    for line in Path(requirements_txt).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if canonicalize_name(req.name) in skipped or (req.marker is not None and not req.marker.evaluate()):
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(line)
    return missing


def model_card_text(card: dict[str, Any]) -> str:
    """A model card as a short human-readable summary (shown in the Predict panel), for any task:
    the network, the scalar preprocessing settings, the threshold, training counts and metrics."""
    arch = card.get("architecture", {})
    prep = card.get("preprocessing", {})
    data = card.get("training_data", {})
    metrics = card.get("metrics", {})

    def scalars(d: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()
                         if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                         or (isinstance(v, list) and len(v) <= 3 and all(isinstance(x, (int, float)) for x in v)))

    lines = [f"Model: {card.get('model_id', 'unknown')}  (task {card.get('task', '?')})",
             f"Network: {arch.get('family', '?')}{arch.get('depth', '')}"
             + (f", input {arch['input_size']}" if arch.get("input_size") else "")]
    if prep:
        lines.append("Preprocessing: " + scalars(prep))
    if card.get("threshold") is not None:
        lines.append(f"Threshold: {card.get('threshold')} ({card.get('threshold_rule', '?')})")
    if data:
        lines.append("Training data: " + scalars(data))
    flat_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for k, v in metrics.items():  # one level of nesting, e.g. {"validation": {"auc": ...}}
        if isinstance(v, dict):
            flat_metrics.update({f"{k} {kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
    if flat_metrics:
        lines.append("Metrics: " + scalars(flat_metrics))
    return "\n".join(lines)


class RheumAIConsoleLogic:
    """The module's logic on an explicit MRML scene. See the module docstring."""

    def __init__(self, scene: Any):
        self.scene = scene
        self.models = PredictorCache()

    # ------------------------------------------------------------------- inputs
    def inputImage(self, volumeNodeOrPath: Any) -> tuple[sitk.Image, str | None, Any]:
        """(LPS image, source path or None, volume node or None) of a node, a path or an image."""
        if isinstance(volumeNodeOrPath, sitk.Image):
            return volumeNodeOrPath, None, None
        if isinstance(volumeNodeOrPath, (str, Path)):
            from rheumai.io import read_study

            study = read_study(volumeNodeOrPath, require_modality=None)
            return study.image, str(volumeNodeOrPath), None
        node = volumeNodeOrPath
        if node is None or not hasattr(node, "IsA") or not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(None, f"expected a scalar volume node, a path or an image, got {type(node).__name__}")
        img = image_from_volume_node(node)
        return sitk.Cast(img, sitk.sitkFloat32), node.GetAttribute("RheumAI.SourcePath"), node

    def loadVolume(self, path: str | Path, name: str | None = None) -> Any:
        """Read an image file or DICOM folder into a new volume node (LPS -> RAS handled)."""
        return read_volume_node(self.scene, path, name)

    # ------------------------------------------------------------------- slice selection
    def selectSlices(self, volumeNode: Any, params: Any = None, createNodes: bool = True,
                     centerRAS: Sequence[float] | None = None, **overrides: Any) -> dict[str, Any]:
        """Select the task input from a volume node (or path / image).

        params: SliceParams, its dict, or None (the paper's: 6 slices, 1 mm, 512 x 512);
        ``overrides`` are SliceParams fields (n_slices, spacing_mm, size...). centerRAS: a point
        clicked in Slicer (RAS mm), used as the slab centre (converted to LPS).
        Returns {"selection": SliceSelection, "params": dict, "slab_center_lps": [x, y, z],
        "slab_center_ras": [...], "slicesNode", "roiNode"} (node entries only with createNodes).
        """
        from rheumai.tasks.cervical_ra.slices import select_slices

        if centerRAS is not None:
            r = [float(v) for v in centerRAS]
            overrides["center_lps"] = (-r[0], -r[1], r[2])
        p = slice_params(params, **overrides)
        image, source_path, node = self.inputImage(volumeNode)
        sel = select_slices(image, p, source_path=source_path)
        c = [float(v) for v in sel.slab_center]
        out: dict[str, Any] = {"selection": sel, "params": p.to_dict(), "slab_center_lps": c,
                               "slab_center_ras": [-c[0], -c[1], c[2]]}
        if createNodes:
            if node is None:
                node = volume_node_from_image(self.scene, image, Path(source_path).name if source_path else "Input")
            base = node.GetName()
            slices = selection_volume(self.scene, sel, f"{base} slices", node=self._child(node, "slices"))
            roi = slab_roi(self.scene, sel.grid, f"{base} slab", node=self._child(node, "slab"))
            for n, role in ((slices, "slices"), (roi, "slab")):
                n.SetAttribute("RheumAI.Role", role)
            place_under(node, [slices, roi])
            out.update(inputNode=node, slicesNode=slices, roiNode=roi)
        return out

    # ------------------------------------------------------------------- prediction
    def predictor(self, modelPath: str | Path, device: str = "cpu") -> Any:
        """The loaded model of a checkpoint folder, cached by folder, device and the weights file's
        modification time and size (retraining into the same folder is picked up)."""
        return self.models.get(modelPath, device)

    def listTasks(self) -> list[dict[str, Any]]:
        """The registered tasks (seed systems) as JSON-able declarations, for panels and scripts."""
        from rheumai.tasks import list_tasks

        return [t.describe() for t in list_tasks()]

    def taskOfModel(self, modelPath: str | Path) -> dict[str, Any]:
        """The registered task a checkpoint was trained for (its card's ``task``)."""
        from rheumai.tasks import get_task

        return get_task(str(self.modelCard(modelPath).get("task", "cervical_ra"))).describe()

    def modelCard(self, modelPath: str | Path) -> dict[str, Any]:
        """The model card of a checkpoint folder (read without loading the weights)."""
        from rheumai.checkpoint import read_card

        return read_card(Path(modelPath))

    def predict(self, volumeNodeOrPath: Any, modelPath: str | Path, createNodes: bool = False,
                saliency: str | None = "default", targetLayer: str | None = None, device: str = "cpu",
                tta: int = 0, opacity: float = 0.5, lowerThreshold: float | None = 0.05,
                centerRAS: Sequence[float] | None = None) -> dict[str, Any]:
        """Predict one study of a single-input task (volume node, path, or LPS image).

        centerRAS: the slab centre (RAS mm) as for :meth:`selectSlices`, so Predict samples the
        slab Select slices showed. Returns the prediction's values (probability, label,
        threshold, model_id, ...); with createNodes also "nodeIDs" (see :meth:`predictStudy`).
        """
        task = self.taskOfModel(modelPath)
        roles = [i["role"] for i in task["inputs"]]
        if len(roles) != 1:
            raise InputError(modelPath, f"the model is for task {task['name']}, which needs the inputs "
                                        f"{', '.join(roles)}: use predictStudy(modelPath, {{role: volume}}, ...)")
        return self.predictStudy(modelPath, {roles[0]: volumeNodeOrPath}, createNodes=createNodes, saliency=saliency,
                                 targetLayer=targetLayer, device=device, tta=tta, opacity=opacity,
                                 lowerThreshold=lowerThreshold, centerRAS=centerRAS)

    def predictStudy(self, modelPath: str | Path, inputs: dict[str, Any], roi: Any = None,
                     clinical: dict[str, Any] | None = None, createNodes: bool = False,
                     saliency: str | None = "default", targetLayer: str | None = None, device: str = "cpu",
                     tta: int = 0, opacity: float = 0.5, lowerThreshold: float | None = 0.05,
                     centerRAS: Sequence[float] | None = None) -> dict[str, Any]:
        """Predict one study of any registered task, in this process.

        inputs: {role: volume node | path | LPS image} for the roles the model's task declares;
        roi: a markups ROI node or a box {"min_lps", "max_lps"} (tasks with a box ROI); clinical:
        {variable: raw value} (tasks with clinical variables; missing ones are imputed by the
        model). With createNodes, every input gets a node (paths are loaded), each role's
        saliency is a volume under its input, the first input's saliency is shown over it, and
        the result table, the slab box (cervical) or the ROI box sit under the first input; their
        IDs are returned under "nodeIDs" ("inputs", "saliencyByRole", "table", "saliency",
        "slab" / "roi"...).
        """
        study, nodes, sources = self.studyInputs(inputs, roi, clinical, centerRAS)
        pred = predict_study(self.predictor(modelPath, device), study, saliency, targetLayer, tta)
        return self.finishPrediction(pred, nodes, sources, roi, createNodes, opacity, lowerThreshold, study)

    def rescoreFromPointLists(self, modelPath: str | Path, inputNodes: dict[str, Any],
                              pointListNodes: dict[str, Any], createNodes: bool = True) -> dict[str, Any]:
        """Re-score a study from corrected point lists, for any task whose declaration has the
        ``rescore_points`` entry point (``function(checkpoint, study, points) -> result dict``).

        inputNodes: {role: volume node | path | LPS image}; pointListNodes: {role: markups point
        list}, each control point's label naming the point and its position (RAS, sent as LPS) the
        corrected place; a point in Slicer's *position missing* state is sent as None (the task
        leaves it out or refuses it). Returns the result dict as :meth:`predictStudy` does; with
        createNodes the result table, point lists and row tables under the inputs are updated.
        """
        from rheumai.tasks import get_task

        from .landmark_scene import read_landmarks

        task = get_task(str(self.modelCard(modelPath).get("task", "cervical_ra")))
        if "rescore_points" not in task.api:
            raise InputError(modelPath, f"task {task.name} has no re-scoring from points")
        unknown = sorted(set(pointListNodes) - set(task.roles))
        if unknown:
            raise InputError(None, f"point lists for {unknown}: task {task.name} has the inputs "
                                   f"{', '.join(task.roles)}")
        points: dict[str, dict[str, Any]] = {}
        for role, node in pointListNodes.items():
            got = read_landmarks(node)
            points[role] = {label: (None if st == "missing" else tuple(float(c) for c in lps))
                            for label, lps, st in zip(got["labels"], got["lps"], got["status"])}
        study, nodes, sources = self.studyInputs(inputNodes)
        values = to_jsonable(task.entry("rescore_points")(modelPath, study, points))
        values.setdefault("task", task.name)
        values.setdefault("model_id", self.modelCard(modelPath).get("model_id"))
        return self.finishPrediction(StudyPrediction(task.name, values), nodes, sources, None, createNodes,
                                     0.5, None, study)

    def startPredictStudy(self, modelPath: str | Path, inputs: dict[str, Any], roi: Any = None,
                          clinical: dict[str, Any] | None = None, saliency: str | None = "default",
                          targetLayer: str | None = None, device: str = "cpu", tta: int = 0,
                          centerRAS: Sequence[float] | None = None, env: dict[str, str] | None = None) -> PredictJob:
        """:meth:`predictStudy` in the background worker process: returns the started job at once
        (poll ``job.worker``; ``job.worker.cancel()`` ends it), then :meth:`finishPredictStudy`
        in this thread once ``job.worker.finished``. The job's temporary folder is removed there."""
        study, nodes, sources = self.studyInputs(inputs, roi, clinical, centerRAS)
        job = PredictJob(modelPath, study, saliency, targetLayer, device, tta, env=env)
        job.context = {"nodes": nodes, "sources": sources, "roi": roi, "study": study}
        job.worker.start()
        return job

    def finishPredictStudy(self, job: PredictJob, createNodes: bool = True, opacity: float = 0.5,
                           lowerThreshold: float | None = 0.05) -> dict[str, Any]:
        """The result of a finished background prediction (nodes as in :meth:`predictStudy`);
        raises WorkerError if it failed or was cancelled. Removes the job's temporary folder."""
        try:
            pred = job.result()
            c = job.context
            return self.finishPrediction(pred, c["nodes"], c["sources"], c["roi"], createNodes, opacity,
                                         lowerThreshold, c["study"])
        finally:
            job.close()

    def studyInputs(self, inputs: dict[str, Any], roi: Any = None, clinical: dict[str, Any] | None = None,
                    centerRAS: Sequence[float] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(study dict for :func:`predict_study`, {role: node or None}, {role: source path or None})."""
        study: dict[str, Any] = {}
        nodes: dict[str, Any] = {}
        sources: dict[str, Any] = {}
        for role, value in inputs.items():
            image, source, node = self.inputImage(value)
            study[role], nodes[role], sources[role] = image, node, source
        if roi is not None:
            study["roi"] = box_from_roi(roi) if hasattr(roi, "IsA") else roi
        if clinical:
            study["clinical"] = dict(clinical)
        if centerRAS is not None:
            r = [float(v) for v in centerRAS]
            study["center_lps"] = [-r[0], -r[1], r[2]]
        return study, nodes, sources

    def finishPrediction(self, pred: StudyPrediction, nodes: dict[str, Any], sources: dict[str, Any], roi: Any,
                         createNodes: bool, opacity: float, lowerThreshold: float | None,
                         study: dict[str, Any] | None = None) -> dict[str, Any]:
        """The result dict of a StudyPrediction (from this process or the worker), with nodes if asked."""
        out = dict(pred.values)
        if pred.slab is not None:
            out["slab_grid"] = pred.slab  # the sampled slab (LPS grid), whichever predictor ran
        if pred.box is not None:
            out["box"] = pred.box
        first = next(iter(nodes), None)
        if first is not None and sources.get(first):
            out["source_path"] = sources[first]
        if createNodes:
            images = {r: (study or {}).get(r) for r in nodes}
            out["nodeIDs"] = self.showPrediction(pred, nodes, images, sources, roi if hasattr(roi, "IsA") else None,
                                                 opacity=opacity, lowerThreshold=lowerThreshold)
            if "warning" in out["nodeIDs"]:
                out["warnings"] = [out["nodeIDs"].pop("warning")]
        return out

    def showPrediction(self, pred: StudyPrediction, nodes: dict[str, Any], images: dict[str, Any] | None = None,
                       sources: dict[str, Any] | None = None, roiNode: Any = None, opacity: float = 0.5,
                       lowerThreshold: float | None = 0.05) -> dict[str, Any]:
        """Create / update the result nodes of a prediction under its input nodes (see predictStudy).

        An existing slab box (from Select slices) is never replaced by a different one: if the
        prediction sampled another slab, it gets its own ``prediction_slab`` box and a warning."""
        nodes = dict(nodes)
        for role, node in nodes.items():
            if node is None:
                image = (images or {}).get(role)
                if image is None:
                    raise InputError(None, f"no node and no image for input {role!r}")
                source = (sources or {}).get(role)
                nodes[role] = volume_node_from_image(self.scene, image, _strip(Path(source).name) if source else role)
                if source:
                    nodes[role].SetAttribute("RheumAI.SourcePath", str(source))
        roles = list(nodes)
        primary = nodes[roles[0]]
        base = primary.GetName()
        ids: dict[str, Any] = {"input": primary.GetID(), "inputs": {r: n.GetID() for r, n in nodes.items()},
                               "saliencyByRole": {}}
        table = results_table(self.scene, dict(pred.values, study=base), name=f"{base} result",
                              node=self._child(primary, "result"))
        table.SetAttribute("RheumAI.Role", "result")
        ids["table"] = table.GetID()
        children = [table]
        shown_order = [r for r in roles if r in pred.saliency and r != roles[0]] + \
                      ([roles[0]] if roles[0] in pred.saliency else [])
        for role in shown_order:  # the first input's overlay last: the views end on it
            node = nodes[role]
            sal = volume_node_from_image(self.scene, pred.saliency[role], f"{node.GetName()} saliency",
                                         node=self._child(node, "saliency"))
            sal.SetAttribute("RheumAI.Role", "saliency")
            sal.SetAttribute("RheumAI.SaliencyMethod", str(pred.values.get("saliency") or ""))
            # create_views: a scene without slice views (slicer-core) gets Slicer's three, so a saved
            # scene opens with the overlay; inside Slicer the existing views are used.
            shown = show_saliency(node, sal, opacity=opacity, lower_threshold=lowerThreshold, create_views=True)
            ids["saliencyByRole"][role] = sal.GetID()
            if role == roles[0]:
                ids["saliency"], ids["color"] = sal.GetID(), shown["color"].GetID()
                if shown["legend"] is not None:
                    ids["legend"] = shown["legend"].GetID()
            else:
                place_under(node, [sal])
        if roles[0] in pred.saliency:
            children.append(self.scene.GetNodeByID(ids["saliency"]))
        if pred.slab is not None:
            from rheumai.geometry import Grid

            grid = Grid.from_dict(pred.slab)
            slab = self._child(primary, "slab")
            if slab is not None and not _same_box(roi_box_ras(slab), grid_box_ras(grid)):
                ids["warning"] = (f"the prediction sampled another slab than the '{slab.GetName()}' box of Select "
                                  f"slices (other parameters or centre); it is shown as '{base} prediction slab'")
                role_name, slab = "prediction_slab", self._child(primary, "prediction_slab")
                name = f"{base} prediction slab"
            else:
                role_name, name = "slab", f"{base} slab"
            node = slab_roi(self.scene, grid, name, node=slab)
            node.SetAttribute("RheumAI.Role", role_name)
            ids["slab" if role_name == "slab" else "predictionSlab"] = node.GetID()
            children.append(node)
        for role_name, node in self._extraOutputs(pred.values, nodes, base).items():
            ids[role_name] = node.GetID()
            if node.GetNodeReferenceID(SOURCE_REFERENCE_ROLE) in (None, primary.GetID()):
                children.append(node)  # (outputs of another input are already under it)
        if roiNode is not None:
            ids["roi"] = roiNode.GetID()
        elif pred.box is not None:
            box = roi_from_box(self.scene, pred.box, f"{base} box", node=self._child(primary, "box"))
            box.SetAttribute("RheumAI.Role", "box")
            ids["roi"] = box.GetID()
            children.append(box)
        place_under(primary, children)
        return ids

    def _extraOutputs(self, values: dict[str, Any], nodes: dict[str, Any], base: str) -> dict[str, Any]:
        """Outputs a result table cannot show well, found by their shape (no task names here):

        * ``<name>_lps`` (N x 3 LPS mm) with ``<name>_labels`` (or the singular form), or a list of
          points ``{"label", "lps"[, "status", "reason"]}`` -> a labelled point list (e.g.
          landmarks, which the user may drag and have re-scored; "missing" points keep Slicer's
          position-missing state); such a list under an input role's key (``{"lumbar":
          {"points": [...]}}``) goes under that input;
        * a list of flat dicts (e.g. one row per joint) -> its own table.

        Nodes are reused (tables) or replaced (point lists) on re-runs; returned by role."""
        from .landmark_scene import add_landmarks

        primary = nodes[next(iter(nodes))]
        out: dict[str, Any] = {}
        groups: list[tuple[str, Any, list[dict[str, Any]]]] = []
        for key, value in values.items():
            if key.endswith("_lps") and _is_points(value):
                stem = key[: -len("_lps")]
                labels = values.get(f"{stem}_labels") or values.get(f"{stem.rstrip('s')}_labels") or \
                    [f"{stem} {i + 1}" for i in range(len(value))]
                groups.append((stem, primary, [{"label": str(lb), "lps": pt} for lb, pt in zip(labels, value)]))
            elif _is_point_dicts(value):
                groups.append((key, primary, value))
            elif isinstance(value, dict):
                for sub, v in value.items():
                    pts = v.get("points") if isinstance(v, dict) else v
                    if _is_point_dicts(pts):
                        groups.append((f"{key} {sub}", nodes.get(sub, primary), pts))
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value) \
                    and all(not isinstance(v, (dict, list)) for r in value for v in r.values()):
                node = rows_table(self.scene, value, name=f"{base} {key}", node=self._child(primary, f"rows:{key}"))
                node.SetAttribute("RheumAI.Role", f"rows:{key}")
                out[f"rows:{key}"] = node
        for name, parent, points in groups:
            old = self._child(parent, name)
            if old is not None:
                self.scene.RemoveNode(old)
            node = add_landmarks(self.scene, np.asarray([pt["lps"] for pt in points], dtype=float),
                                 [str(pt.get("label", i + 1)) for i, pt in enumerate(points)],
                                 [pt.get("status", "ok") for pt in points], [str(pt.get("reason") or "")
                                                                              for pt in points],
                                 name=f"{parent.GetName()} {name}")
            node.SetAttribute("RheumAI.Role", name)  # "landmarks": what the re-scoring tools look for
            if parent is not primary:
                place_under(parent, [node])
            out[name] = node
        return out

    def showResult(self, res: Any, inputNodeOrImage: Any, opacity: float = 0.5,
                   lowerThreshold: float | None = 0.05, name: str | None = None) -> dict[str, Any]:
        """Nodes for a cervical ``rheumai.engine.predict.PredictionResult`` under its input (node or image)."""
        node = inputNodeOrImage
        if isinstance(node, sitk.Image):
            node = volume_node_from_image(self.scene, node, _strip(name) if name else "Input")
        sal = {"t2_sag": res.saliency_volume} if res.saliency_volume is not None else {}
        pred = StudyPrediction("cervical_ra", res.to_dict(), sal, slab=res.selection.grid.to_dict())
        return self.showPrediction(pred, {"t2_sag": node}, opacity=opacity, lowerThreshold=lowerThreshold)

    def saliencyOf(self, inputNode: Any) -> Any:
        """The RheumAI saliency volume under ``inputNode``, or None (no node, or none computed)."""
        if inputNode is None or inputNode.GetScene() is not self.scene:
            return None
        return self._child(inputNode, "saliency")

    def setSaliencyOpacity(self, inputNode: Any, opacity: float) -> None:
        """Change the foreground opacity (0..1) of the input's saliency overlay in all slice views."""
        if not self.updateSaliencyDisplay(inputNode, opacity=opacity):
            raise InputError(None, f"volume '{inputNode.GetName() if inputNode else None}' has no RheumAI saliency")

    def updateSaliencyDisplay(self, inputNode: Any, opacity: float | None = None,
                              lowerThreshold: float | None = None) -> bool:
        """Live display update for the panel: foreground opacity (0..1) in every slice view and/or
        the lower threshold (saliency below it transparent) of the input's saliency overlay.
        Returns False, changing nothing, when the input has no saliency (the panel's sliders may
        move while another volume is selected)."""
        sal = self.saliencyOf(inputNode)
        if sal is None:
            return False
        from .overlay import set_slice_viewer_layers

        if lowerThreshold is not None:
            display = sal.GetScalarVolumeDisplayNode()
            if display is not None:
                display.SetApplyThreshold(True)
                display.SetThreshold(float(lowerThreshold), 1.0e6)
        if opacity is not None:
            set_slice_viewer_layers(self.scene, inputNode, sal, float(opacity))
        return True

    # ------------------------------------------------------------------- results of background jobs
    def showDatasetResult(self, summary: dict[str, Any], name: str = "Dataset") -> dict[str, str]:
        """Inclusion flow, excluded patients and split of a dataset build (its summary dict, or the
        ``flow`` in it) as table nodes; returns their IDs by role."""
        flow = summary.get("flow", summary)
        return {k: n.GetID() for k, n in dataset_nodes(self.scene, flow, name).items()}

    def showBatchResult(self, rows: Sequence[dict[str, Any]], name: str = "Batch predictions") -> dict[str, str]:
        """Batch prediction rows as one table node; returns its ID under "batch_predictions"."""
        return {k: n.GetID() for k, n in batch_nodes(self.scene, rows, name).items()}

    def showTrainingResult(self, result: dict[str, Any], name: str = "Training") -> dict[str, str]:
        """Training history (+ loss / AUC charts) and validation ROC (+ chart) as nodes."""
        return {k: n.GetID() for k, n in training_nodes(self.scene, result, name).items()}

    def predictBatch(self, pathsOrFolder: Any, modelPath: str | Path, outDir: str | Path,
                     progressCallback: ProgressCallback | None = None, saliency: str | None = "default",
                     device: str = "cpu", tta: int = 0, shouldStop: Callable[[], bool] | None = None,
                     createNodes: bool = False) -> list[dict[str, Any]]:
        """Predict many studies in this process, any task: a list or folder of studies (image
        files / DICOM sub-folders; single-input tasks) or a study table CSV (one column per input
        role, roi, clinical columns). Writes ``outDir/predictions.csv`` / ``.json``; resumes (done
        studies skipped). progressCallback(fraction 0..1, message). Returns one dict per study
        (rows with "error" for studies that failed); createNodes adds them as a table node."""
        from rheumai import api

        if isinstance(pathsOrFolder, (str, Path)) and str(pathsOrFolder).lower().endswith(".csv"):
            studies: list[Any] = api.read_studies(pathsOrFolder, modelPath)
        else:
            studies = find_studies(pathsOrFolder)

        def progress(i: int, n: int, study: Any) -> None:
            if progressCallback:
                progressCallback(i / n if n else 1.0, f"{i}/{n} {Path(str(study)).name}")

        predictor = self.predictor(modelPath, device)
        model = predictor if type(predictor).__module__.startswith("rheumai.engine") else modelPath
        rows = api.predict_many(model, studies, outDir, progress=progress, should_stop=shouldStop,
                                saliency=saliency, tta=tta, device=device)
        if createNodes:
            self.showBatchResult(rows)
        return rows

    # ------------------------------------------------------------------- dataset and training
    def buildDataset(self, dicomFolder: str | Path, labelsCsv: str | Path, outDir: str | Path,
                     progressCallback: ProgressCallback | None = None, **options: Any) -> dict[str, Any]:
        """Index a DICOM folder, apply the label sheet and cohort rules, split, cache, write the
        manifest and the inclusion flow (``outDir/flow.txt``). options: rules (CohortRules
        fields), split (SplitConfig fields), params (SliceParams dict), workers, index_path.
        Returns a summary dict (manifest path, counts, flow)."""
        from rheumai.dataset import CohortRules, SplitConfig, build_dataset, index_archive

        unknown = set(options) - {"rules", "split", "params", "workers", "index_path"}
        if unknown:
            raise TypeError(f"buildDataset: unknown options {sorted(unknown)}")
        out = Path(outDir)
        out.mkdir(parents=True, exist_ok=True)
        index_path = Path(options.get("index_path") or out / "index.sqlite")

        def progress(stage: str, done: int, total: int) -> None:
            if progressCallback:
                progressCallback(dataset_progress(stage, done, total), f"{stage} {done}/{total}")

        summary = index_archive(dicomFolder, index_path, progress=lambda s, d, t: progress("index", d, t))
        params = options.get("params")
        res = build_dataset(index_path, labelsCsv, out, rules=CohortRules(**(options.get("rules") or {})),
                            split_cfg=SplitConfig(**(options.get("split") or {})),
                            slice_params=slice_params(params), workers=int(options.get("workers", 1)),
                            progress=progress)
        return dataset_summary(res, summary)

    def train(self, configPath: str | Path, manifestPath: str | Path | None, outDir: str | Path | None,
              progressCallback: ProgressCallback | None = None, resume: bool = False,
              shouldStop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Train from a TOML config and a manifest in this process (``rheumai.api.train``: the task from the config).
        Returns the TrainResult as a dict (checkpoint folder, best epoch, val AUC, threshold)."""
        from rheumai.api import train

        def progress(ev: dict[str, Any]) -> None:
            if progressCallback and ev.get("epochs"):
                progressCallback(min(1.0, float(ev.get("epoch") or 0) / float(ev["epochs"])),
                                 f"epoch {ev.get('epoch')}/{ev['epochs']}"
                                 + (f", loss {ev['loss']:.4f}" if isinstance(ev.get("loss"), float) else ""))

        res = train(configPath, manifestPath, outDir, progress=progress, should_stop=shouldStop,
                    resume=resume, show_progress=False)
        return to_jsonable(res)

    # ------------------------------------------------------------------- helpers
    def _child(self, inputNode: Any, role: str) -> Any:
        """The existing result node of ``role`` under ``inputNode`` (reused on re-runs), or None."""
        if inputNode is None or isinstance(inputNode, sitk.Image):
            return None
        from .hierarchy import results_of

        for n in results_of(inputNode):
            if n is not None and n.GetAttribute("RheumAI.Role") == role:
                return n
        return None


def _is_points(value: Any) -> bool:
    """A list of N >= 1 points of 3 finite-or-NaN numbers (LPS mm)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, (list, tuple)) and len(p) == 3 and all(isinstance(c, (int, float)) for c in p) for p in value)


def _is_point_dicts(value: Any) -> bool:
    """A list of points as dicts with "lps" (3 numbers, LPS mm)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, dict) and _is_points([p.get("lps")]) for p in value)


def _same_box(a: tuple, b: tuple, tol_mm: float = 1e-3) -> bool:
    """Two (centre, axes, size) boxes (RAS) are the same box within ``tol_mm``."""
    return all(np.allclose(np.asarray(x), np.asarray(y), atol=tol_mm) for x, y in zip(a, b))


def _strip(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
