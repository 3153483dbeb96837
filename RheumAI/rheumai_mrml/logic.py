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

import SimpleITK as sitk

from rheumai.errors import InputError

from .hierarchy import place_under
from .nodes import image_from_volume_node, read_volume_node, volume_node_from_image
from .overlay import show_saliency
from .process import dataset_progress, dataset_summary, to_jsonable
from .slab import selection_volume, slab_roi
from .tables import results_table

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
    from rheumai.slices import SliceParams, params_from

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
    """A model card as a short human-readable summary (shown in the Predict panel)."""
    arch = card.get("architecture", {})
    prep = card.get("preprocessing", {})
    data = card.get("training_data", {})
    metrics = card.get("metrics", {})
    lines = [f"Model: {card.get('model_id', 'unknown')}  (task {card.get('task', '?')})",
             f"Network: {arch.get('family', '?')}{arch.get('depth', '')}, {arch.get('in_channels', '?')} channels, "
             f"input {arch.get('input_size', prep.get('size'))}",
             f"Input: {prep.get('n_slices', '?')} slices at {prep.get('spacing_mm', '?')} mm, "
             f"size {prep.get('size', '?')}, normalisation {prep.get('norm', '?')}",
             f"Threshold: {card.get('threshold')} ({card.get('threshold_rule', '?')})"]
    if data:
        lines.append("Training data: " + ", ".join(f"{k} {v}" for k, v in data.items()
                                                   if isinstance(v, (int, float, str))))
    scalar_metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if scalar_metrics:
        lines.append("Metrics: " + ", ".join(f"{k} {v:.3g}" for k, v in scalar_metrics.items()))
    return "\n".join(lines)


class RheumAIConsoleLogic:
    """The module's logic on an explicit MRML scene. See the module docstring."""

    def __init__(self, scene: Any):
        self.scene = scene
        self._predictors: dict[tuple[str, str], Any] = {}

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
        from rheumai.slices import select_slices

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
        """The loaded model (cached per checkpoint folder and device)."""
        from rheumai.predict import Predictor

        key = (str(Path(modelPath).resolve()), device)
        if key not in self._predictors:
            self._predictors[key] = Predictor(modelPath, device=device)
        return self._predictors[key]

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
                saliency: str | None = "gradcam", targetLayer: str | None = None, device: str = "cpu",
                tta: int = 0, opacity: float = 0.5, lowerThreshold: float | None = 0.05) -> dict[str, Any]:
        """Predict one study (volume node, path, or LPS image) with a RheumAI checkpoint folder.

        Returns ``PredictionResult.to_dict()`` (probability, label, threshold, model_id, ...).
        With createNodes: the input (a new node if a path was given), the saliency volume in the
        input's geometry shown as foreground (colour table + legend, ``opacity`` 0..1), a result
        table and the slab ROI, all under the input in the subject hierarchy; their node IDs are
        returned under "nodeIDs".
        """
        image, source_path, node = self.inputImage(volumeNodeOrPath)
        pred = self.predictor(modelPath, device)
        res = pred.predict(image, saliency=saliency, target_layer=targetLayer, tta=tta)
        res.source_path = res.source_path or source_path
        out = res.to_dict()
        if source_path:
            out["source_path"] = source_path
        if createNodes:
            out["nodeIDs"] = self.showResult(res, node or image, opacity=opacity, lowerThreshold=lowerThreshold,
                                             name=Path(source_path).name if source_path and node is None else None)
        return out

    def showResult(self, res: Any, inputNodeOrImage: Any, opacity: float = 0.5,
                   lowerThreshold: float | None = 0.05, name: str | None = None) -> dict[str, str]:
        """Create / update the result nodes of a PredictionResult under its input volume node."""
        node = inputNodeOrImage
        if isinstance(node, sitk.Image):
            node = volume_node_from_image(self.scene, node, _strip(name) if name else "Input")
        base = node.GetName()
        ids: dict[str, str] = {"input": node.GetID()}
        children = []
        table = results_table(self.scene, dict(res.to_dict(), study=base), name=f"{base} result",
                              node=self._child(node, "result"))
        table.SetAttribute("RheumAI.Role", "result")
        ids["table"] = table.GetID()
        children.append(table)
        if res.saliency_volume is not None:
            sal = volume_node_from_image(self.scene, res.saliency_volume, f"{base} saliency",
                                         node=self._child(node, "saliency"))
            sal.SetAttribute("RheumAI.Role", "saliency")
            sal.SetAttribute("RheumAI.SaliencyMethod", str(res.saliency_method))
            # create_views: a scene without slice views (slicer-core) gets Slicer's three, so a saved
            # scene opens with the overlay; inside Slicer the existing views are used.
            shown = show_saliency(node, sal, opacity=opacity, lower_threshold=lowerThreshold, create_views=True)
            ids["saliency"], ids["color"] = sal.GetID(), shown["color"].GetID()
            if shown["legend"] is not None:
                ids["legend"] = shown["legend"].GetID()
            children.append(sal)
        roi = slab_roi(self.scene, res.selection.grid, f"{base} slab", node=self._child(node, "slab"))
        roi.SetAttribute("RheumAI.Role", "slab")
        ids["slab"] = roi.GetID()
        children.append(roi)
        place_under(node, children)
        return ids

    def setSaliencyOpacity(self, inputNode: Any, opacity: float) -> None:
        """Change the foreground opacity (0..1) of the input's saliency overlay in all slice views."""
        sal = self._child(inputNode, "saliency")
        if sal is None:
            raise InputError(None, f"volume '{inputNode.GetName()}' has no RheumAI saliency")
        from .overlay import set_slice_viewer_layers

        set_slice_viewer_layers(self.scene, inputNode, sal, opacity)

    def predictBatch(self, pathsOrFolder: Any, modelPath: str | Path, outDir: str | Path,
                     progressCallback: ProgressCallback | None = None, saliency: str | None = "gradcam",
                     device: str = "cpu", tta: int = 0, shouldStop: Callable[[], bool] | None = None,
                     ) -> list[dict[str, Any]]:
        """Predict many studies (list, or a folder of image files / DICOM sub-folders) in this
        process; writes ``outDir/predictions.csv`` / ``.json``; resumes (done studies skipped).
        progressCallback(fraction 0..1, message). Returns one dict per study (rows with "error"
        for studies that failed)."""
        from rheumai.predict import predict_batch

        studies = find_studies(pathsOrFolder)

        def progress(i: int, n: int, study: str) -> None:
            if progressCallback:
                progressCallback(i / n if n else 1.0, f"{i}/{n} {Path(study).name}")

        return predict_batch(studies, modelPath, outDir, progress=progress, should_stop=shouldStop,
                             saliency=saliency, device=device, tta=tta, show_progress=False,
                             predictor=self.predictor(modelPath, device))

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
        """Train from a TOML config and a manifest in this process (see ``rheumai.train.train``).
        Returns the TrainResult as a dict (checkpoint folder, best epoch, val AUC, threshold)."""
        from rheumai.train import train

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


def _strip(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
