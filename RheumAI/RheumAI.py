"""RheumAI: rheumatology imaging AI in 3D Slicer (cervical RA deformity prediction from sagittal T2 MRI).

Thin Slicer layer: the Qt widget and a Logic facade. All MRML work lives in ``rheumai_mrml``
(tested with pytest on slicer-core) and all imaging / AI work in ``rheumai`` (Logic/rheumai), so
the console API below is the same code the tests run:

    import RheumAI
    logic = RheumAI.RheumAILogic()
    result = logic.predict(volumeNode, "/models/cervical_ra", createNodes=True)

Heavy jobs (dataset building, training, batch prediction, batch slice selection) run in a
background PythonSlicer process (``Resources/Scripts/rheumai_worker.py``); the GUI stays live.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLTableNode)

# The rheumai package (no Slicer, no Qt) sits in Logic/ beside this file; rheumai_mrml beside it.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.join(_MODULE_DIR, "Logic"), _MODULE_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SALIENCY_METHODS = ["gradcam", "gradcampp", "occlusion", "gradxinput", "none"]
# Packages Slicer already ships or PyTorchUtils manages: never reinstalled by this module.
NEVER_REINSTALL = ["torch", "torchvision", "SimpleITK", "numpy", "vtk"]
SAMPLE_URL = "https://raw.githubusercontent.com/RheumAI/SlicerRheumAI/main/Testing/Data/cervical_t2_sag/t2.nii.gz"
SAMPLE_SHA256 = "0eb96b3322c5282c8cbc912286cbdd86028ca8aa6b1498cbe43f5cb2babcd380"


#
# RheumAI
#


class RheumAI(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RheumAI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["RheumAI team"]
        self.parent.helpText = _("""
Rheumatology imaging AI: predicts cervical spine deformity in rheumatoid arthritis from a sagittal
T2 MRI (6 mid-sagittal slices, 1 mm, ResNet), shows Grad-CAM saliency over the study, builds
training datasets from DICOM exports and trains models in a background process.
Research use only, not for clinical decisions.
""")
        self.parent.acknowledgementText = _("""
Method: Lebouille-Veldman et al. 2025 (cervical RA deformity prediction). Sample study: NeuroPoly
Spinal Cord Toolbox testing data (MIT licence).
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the sample sagittal cervical T2 study in the Sample Data module."""
    import SampleData

    iconsPath = os.path.join(_MODULE_DIR, "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="RheumAI", sampleName="RheumAICervicalT2",
        thumbnailFileName=os.path.join(iconsPath, "RheumAI.png"),
        uris=SAMPLE_URL, fileNames="RheumAICervicalT2.nii.gz",
        checksums=f"SHA256:{SAMPLE_SHA256}", nodeNames="RheumAICervicalT2")


#
# Parameter node: every panel setting, saved with the scene
#


@parameterNodeWrapper
class RheumAIParameterNode:
    # Dataset
    dicomFolder: Path
    useDicomDatabase: bool = False
    labelsCsv: Path
    datasetOutDir: Path
    minFollowupDays: Annotated[int, WithinRange(0, 10000)] = 1000
    trainFraction: Annotated[float, WithinRange(0.05, 1.0)] = 0.6
    datasetReport: str = ""
    # Training
    trainConfig: Path
    trainManifest: Path
    trainOutDir: Path
    # Slice selection
    inputVolume: vtkMRMLScalarVolumeNode
    nSlices: Annotated[int, WithinRange(1, 64)] = 6
    sliceSpacing: Annotated[float, WithinRange(0.1, 10.0)] = 1.0
    sliceHeight: Annotated[int, WithinRange(8, 2048)] = 512
    sliceWidth: Annotated[int, WithinRange(8, 2048)] = 512
    useCenterPoint: bool = False
    centerPoint: vtkMRMLMarkupsFiducialNode
    slicesVolume: vtkMRMLScalarVolumeNode
    slabRoi: vtkMRMLMarkupsROINode
    # Predict
    modelPath: Path
    device: Annotated[str, Choice(["cpu", "cuda"])] = "cpu"
    resultText: str = ""
    resultTable: vtkMRMLTableNode
    batchInput: Path
    batchOutDir: Path
    # Saliency
    saliencyMethod: Annotated[str, Choice(SALIENCY_METHODS)] = "gradcam"
    targetLayer: str = ""
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    lowerThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.05
    saliencyVolume: vtkMRMLScalarVolumeNode


def _path(p: Any) -> str | None:
    """A parameter path as text, None when unset (the wrapper's empty Path is '.')."""
    s = str(p) if p is not None else ""
    return None if s in ("", ".") else s


#
# RheumAIWidget
#


class RheumAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads the parameter node, calls RheumAILogic, shows progress and results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runningButton = None  # the Apply button currently acting as Cancel
        self._runningText = ""

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RheumAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.centerPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RheumAILogic()
        self.logic.logCallback = self.addLog

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.buildDatasetButton.connect("clicked(bool)", self.onBuildDataset)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.selectSlicesButton.connect("clicked(bool)", self.onSelectSlices)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.predictBatchButton.connect("clicked(bool)", self.onPredictBatch)
        self.ui.computeSaliencyButton.connect("clicked(bool)", self.onPredict)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.centerPointSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                            self.ui.centerPlaceWidget.setCurrentNode)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()
            self.onModelChanged()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if not p or self._runningButton is not None:
            return
        hasVolume, hasModel = bool(p.inputVolume), bool(_path(p.modelPath))
        self.ui.selectSlicesButton.enabled = hasVolume
        self.ui.predictButton.enabled = hasVolume and hasModel
        self.ui.computeSaliencyButton.enabled = hasVolume and hasModel and p.saliencyMethod != "none"
        self.ui.predictBatchButton.enabled = hasModel and bool(_path(p.batchInput)) and bool(_path(p.batchOutDir))
        hasDicom = bool(_path(p.dicomFolder)) or p.useDicomDatabase
        self.ui.buildDatasetButton.enabled = hasDicom and bool(_path(p.labelsCsv)) and bool(_path(p.datasetOutDir))
        self.ui.trainButton.enabled = bool(_path(p.trainConfig)) and bool(_path(p.trainManifest))

    # -------------------------------------------------------------- log and progress
    def addLog(self, text: str) -> None:
        self.ui.statusLabel.text = text.splitlines()[0][:120] if text else ""
        self.ui.logTextEdit.appendPlainText(text)
        slicer.app.processEvents()

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{message[:60]}  %p%"

    # -------------------------------------------------------------- Apply <-> Cancel
    def _startBackground(self, button, job: Callable[..., Any], **kwargs) -> None:
        """Run a background job: the button becomes Cancel until the process ends."""
        if self._runningButton is not None:
            if button is self._runningButton:
                self.logic.cancel()
                self._onBackgroundDone(None, None, cancelled=True)
            return
        self._runningButton, self._runningText = button, button.text
        button.text = _("Cancel")
        for b in (self.ui.buildDatasetButton, self.ui.trainButton, self.ui.predictBatchButton,
                  self.ui.selectSlicesButton, self.ui.predictButton, self.ui.computeSaliencyButton):
            b.enabled = b is button
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        try:
            job(waitForCompletion=False, progressCallback=self.onProgress,
                completedCallback=self._onBackgroundDone, **kwargs)
        except Exception as exc:
            self._onBackgroundDone(None, str(exc))

    def _onBackgroundDone(self, result: Any, error: str | None, cancelled: bool = False) -> None:
        button, self._runningButton = self._runningButton, None
        if button is not None:
            button.text = self._runningText
        self._updateButtons()
        if cancelled:
            self.ui.progressBar.value = 0
            self.addLog(_("Cancelled: the background process and its children were ended."))
            return
        if error:
            self.addLog(_("Failed: {error}").format(error=error))
            return
        self.ui.progressBar.value = 100
        self._showJobResult(result)

    def _showJobResult(self, result: Any) -> None:
        if isinstance(result, dict) and "manifest" in result and "flow" in result:
            flowText = Path(result["paths"].get("txt", "")).read_text() if result["paths"].get("txt") else ""
            self._parameterNode.datasetReport = flowText or str(result["split_counts"])
            self._parameterNode.trainManifest = Path(result["manifest"])
            self.addLog(_("Dataset: {n} patients included; manifest {m}").format(n=result["n_included"],
                                                                              m=result["manifest"]))
        elif isinstance(result, dict) and "checkpoint" in result:
            if result.get("checkpoint"):
                self._parameterNode.modelPath = Path(result["checkpoint"])
            self.addLog(_("Training finished: {r}").format(r={k: result.get(k) for k in
                                                             ("checkpoint", "best_epoch", "best_val_auc", "threshold")}))
        elif isinstance(result, dict) and "rows" in result:
            n_err = sum(1 for r in result["rows"] if r.get("error"))
            self.addLog(_("Batch finished: {n} studies, {e} failed; {f}").format(
                n=len(result["rows"]), e=n_err, f=result.get("predictions_csv", "")))

    # -------------------------------------------------------------- panels
    def onBuildDataset(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        dicomFolder = self.logic.dicomDatabaseFolder() if p.useDicomDatabase else _path(p.dicomFolder)
        self._startBackground(self.ui.buildDatasetButton, self.logic.buildDataset, dicomFolder=dicomFolder,
                              labelsCsv=_path(p.labelsCsv), outDir=_path(p.datasetOutDir),
                              rules={"min_followup_days": p.minFollowupDays},
                              split={"train_fraction": p.trainFraction},
                              params=self._sliceParams())

    def onTrain(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        self._startBackground(self.ui.trainButton, self.logic.train, configPath=_path(p.trainConfig),
                              manifestPath=_path(p.trainManifest), outDir=_path(p.trainOutDir))

    def onPredictBatch(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        self._startBackground(self.ui.predictBatchButton, self.logic.predictBatch, pathsOrFolder=_path(p.batchInput),
                              modelPath=_path(p.modelPath), outDir=_path(p.batchOutDir),
                              saliency=self._saliency(), device=p.device)

    def onSelectSlices(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Slice selection failed."), waitCursor=True):
            out = self.logic.selectSlices(p.inputVolume, self._sliceParams(), createNodes=True,
                                          centerRAS=self._centerRAS())
            p.slicesVolume, p.slabRoi = out["slicesNode"], out["roiNode"]
            self.addLog(_("Slab centre (RAS mm): {c}").format(c=[round(v, 1) for v in out["slab_center_ras"]]))

    def onPredict(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Prediction failed."), waitCursor=True):
            # One study: fast enough to run in-process (a forward and a backward pass).
            res = self.logic.predict(p.inputVolume, _path(p.modelPath), createNodes=True,
                                     saliency=self._saliency(), targetLayer=p.targetLayer or None,
                                     device=p.device, opacity=p.opacity, lowerThreshold=p.lowerThreshold)
            ids = res["nodeIDs"]
            p.resultTable = slicer.mrmlScene.GetNodeByID(ids["table"])
            p.slabRoi = slicer.mrmlScene.GetNodeByID(ids["slab"])
            if "saliency" in ids:
                p.saliencyVolume = slicer.mrmlScene.GetNodeByID(ids["saliency"])
            p.resultText = _("Probability {p:.3f}, class {c} (threshold {t:.3f}, model {m})").format(
                p=res["probability"], c=res["label"], t=res["threshold"], m=res["model_id"])
            self.addLog(p.resultText)

    def onModelChanged(self, *args) -> None:
        path = _path(self._parameterNode.modelPath) if self._parameterNode else None
        if not path:
            self.ui.modelCardTextEdit.plainText = ""
            return
        try:
            self.ui.modelCardTextEdit.plainText = self.logic.modelCardText(path)
        except Exception as exc:  # shown, not raised: the user is still choosing
            self.ui.modelCardTextEdit.plainText = str(exc)

    def onOpacityChanged(self, value: float) -> None:
        p = self._parameterNode
        if p and p.inputVolume and p.saliencyVolume:
            self.logic.setSaliencyOpacity(p.inputVolume, value)

    # -------------------------------------------------------------- helpers
    def _ensureRequirements(self) -> bool:
        try:
            self.logic.setupPythonRequirements()
            return True
        except Exception as exc:
            slicer.util.errorDisplay(_("RheumAI needs additional Python packages: {e}").format(e=exc))
            return False

    def _saliency(self) -> str | None:
        m = self._parameterNode.saliencyMethod
        return None if m == "none" else m

    def _sliceParams(self) -> dict:
        p = self._parameterNode
        return {"n_slices": p.nSlices, "spacing_mm": p.sliceSpacing, "size": [p.sliceHeight, p.sliceWidth]}

    def _centerRAS(self) -> list[float] | None:
        p = self._parameterNode
        if not p.useCenterPoint or not p.centerPoint or p.centerPoint.GetNumberOfControlPoints() < 1:
            return None
        pos = [0.0, 0.0, 0.0]
        p.centerPoint.GetNthControlPointPositionWorld(0, pos)
        return pos


#
# RheumAILogic
#


class RheumAILogic(ScriptedLoadableModuleLogic):
    """Console API. In-process: selectSlices, predict (returns plain dicts; nodes only if asked).
    Background process (waitForCompletion=True blocks, as scripts want): buildDataset, train,
    predictBatch. The MRML work is ``rheumai_mrml.logic.RheumAIConsoleLogic`` (pytest-covered)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from rheumai_mrml.logic import RheumAIConsoleLogic

        self.console = RheumAIConsoleLogic(slicer.mrmlScene)
        self.worker = None
        self.logCallback: Callable[[str], None] | None = None
        self._timer = None

    def getParameterNode(self):
        return RheumAIParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # -------------------------------------------------------------- dependencies
    def setupPythonRequirements(self, askConfirmation: bool = True) -> None:
        """Install what ``Resources/requirements.txt`` lists, after asking; never at import.

        PyTorch comes from the PyTorch extension (PyTorchUtils.installTorch); SimpleITK, numpy and
        torch are never reinstalled while installing the others (MONAI and friends).
        """
        from rheumai_mrml.logic import missing_requirements

        requirements = self.resourcePath("requirements.txt")
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("RheumAI needs the PyTorch extension: install it from the Extensions Manager.")
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            self.log(_("Installing PyTorch (this may take several minutes)..."))
            if torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=">=2.2") is None:
                raise RuntimeError("PyTorch installation was cancelled or failed.")
        missing = missing_requirements(requirements, skip=NEVER_REINSTALL)
        if not missing:
            return
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+
            # skip_in_testing: a self-test (askConfirmation=False) must install what it needs.
            packaging.pip_ensure(missing, skip_packages=NEVER_REINSTALL, prompt_install=askConfirmation,
                                 requester="RheumAI", skip_in_testing=askConfirmation)
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("RheumAI needs additional Python packages. Install them now? (network needed, a few minutes)"),
                _("RheumAI - Install Python packages"), detailedText="\n".join(missing)):
            raise RuntimeError("Installation of Python packages was declined.")
        for requirement in missing:
            # --no-deps: their dependencies are torch / numpy / SimpleITK, which must stay as they are.
            slicer.util.pip_install(f"{requirement} --no-deps" if requirement.lower().startswith("monai")
                                    else requirement)

    def resourcePath(self, name: str) -> str:
        return os.path.join(_MODULE_DIR, "Resources", name)

    def dicomDatabaseFolder(self) -> str:
        """The files folder of Slicer's DICOM database (indexed like any DICOM export)."""
        db = slicer.dicomDatabase
        if not db or not db.isOpen:
            raise RuntimeError("Slicer's DICOM database is not open (open the DICOM module first).")
        return os.path.join(db.databaseDirectory, "dicom")

    # -------------------------------------------------------------- in-process
    def selectSlices(self, volumeNode, params=None, createNodes: bool = True, centerRAS=None, **overrides) -> dict:
        return self.console.selectSlices(volumeNode, params, createNodes=createNodes, centerRAS=centerRAS,
                                         **overrides)

    def predict(self, volumeNodeOrPath, modelPath, createNodes: bool = False, saliency: str | None = "gradcam",
                targetLayer: str | None = None, device: str = "cpu", tta: int = 0, opacity: float = 0.5,
                lowerThreshold: float | None = 0.05) -> dict:
        return self.console.predict(volumeNodeOrPath, modelPath, createNodes=createNodes, saliency=saliency,
                                    targetLayer=targetLayer, device=device, tta=tta, opacity=opacity,
                                    lowerThreshold=lowerThreshold)

    def setSaliencyOpacity(self, inputNode, opacity: float) -> None:
        self.console.setSaliencyOpacity(inputNode, opacity)

    def listTasks(self) -> list:
        """Registered tasks (rheumai.tasks registry), e.g. to fill a task selector."""
        return self.console.listTasks()

    def modelCardText(self, modelPath) -> str:
        """The model card as text, headed by the registered task it was trained for."""
        from rheumai_mrml.logic import model_card_text

        try:
            task = self.console.taskOfModel(modelPath)
            head = f"Task: {task['title']} ({task['name']})"
        except KeyError as exc:  # a card naming a task this installation does not register
            head = f"Task: not registered here ({exc})"
        return head + "\n" + model_card_text(self.console.modelCard(modelPath))

    # -------------------------------------------------------------- background process
    def buildDataset(self, dicomFolder, labelsCsv, outDir, waitForCompletion: bool = True,
                     progressCallback=None, completedCallback=None, **options):
        """Index + labels + cohort + split + cache + manifest + inclusion flow, in a worker process."""
        args = {"dicom_folder": str(dicomFolder), "labels_csv": str(labelsCsv), "out_dir": str(outDir), **options}
        return self._run("build_dataset", args, waitForCompletion, progressCallback, completedCallback)

    def train(self, configPath, manifestPath, outDir, waitForCompletion: bool = True, resume: bool = False,
              progressCallback=None, completedCallback=None):
        """Train from a TOML config and a manifest in a worker process; returns the TrainResult dict."""
        args = {"config": str(configPath), "manifest": str(manifestPath) if manifestPath else None,
                "out_dir": str(outDir) if outDir else None, "resume": resume}
        return self._run("train", args, waitForCompletion, progressCallback, completedCallback)

    def predictBatch(self, pathsOrFolder, modelPath, outDir, waitForCompletion: bool = True,
                     progressCallback=None, completedCallback=None, saliency: str | None = "gradcam",
                     device: str = "cpu", tta: int = 0):
        """Predict many studies in a worker process; returns the rows (also in outDir/predictions.csv)."""
        from rheumai_mrml.logic import find_studies

        args = {"studies": find_studies(pathsOrFolder), "checkpoint": str(modelPath), "out_dir": str(outDir),
                "saliency": saliency, "device": device, "tta": tta}
        out = self._run("predict_batch", args, waitForCompletion, progressCallback, completedCallback)
        return out["rows"] if waitForCompletion else out

    def selectSlicesBatch(self, pathsOrFolder, outDir, params=None, workers: int = 1,
                          waitForCompletion: bool = True, progressCallback=None, completedCallback=None):
        """Slice selection of many studies (saved as .npy + .json) in a worker process."""
        from rheumai_mrml.logic import find_studies, slice_params

        args = {"inputs": find_studies(pathsOrFolder), "out_dir": str(outDir),
                "params": slice_params(params).to_dict(), "workers": workers}
        return self._run("select", args, waitForCompletion, progressCallback, completedCallback)

    def cancel(self) -> None:
        """End the running background job and every process it started."""
        if self.worker is not None:
            self.worker.cancel()
            if self._timer is not None:
                self._timer.stop()
            self.worker = None

    def _run(self, job, args, waitForCompletion, progressCallback, completedCallback):
        from rheumai_mrml.process import WorkerEvent, WorkerProcess

        if self.worker is not None and not self.worker.finished:
            raise RuntimeError("a RheumAI background job is already running")
        self.worker = WorkerProcess(job, args, env=slicer.util.startupEnvironment())
        self.log(f"Starting background job {job}: {' '.join(self.worker.command)}")

        def onOutput(item):
            if isinstance(item, WorkerEvent):
                if item.progress is not None and progressCallback:
                    progressCallback(item.progress, item.message or item.stage)
                if item.message:
                    self.log(f"[{item.stage}] {item.message}")
            else:
                self.log(item)

        if waitForCompletion:
            try:
                return self.worker.start().wait(on_output=onOutput)
            finally:
                self.worker = None

        worker = self.worker.start()

        def poll():
            for item in worker.poll():
                onOutput(item)
            if worker.finished or worker.cancelled:
                self._timer.stop()
                if self.worker is worker:
                    self.worker = None
                if completedCallback and not worker.cancelled:
                    try:
                        completedCallback(worker.outcome(), None)
                    except Exception as exc:
                        completedCallback(None, str(exc))

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", poll)
        self._timer.start()
        return worker


#
# RheumAITest
#


class RheumAITest(ScriptedLoadableModuleTest):
    """Loads the sample study, runs slice selection, Predict and Saliency with a small real model
    (random weights, built here), and checks the nodes. The MRML code it calls is the code the
    pytest suite covers on slicer-core; this test adds the real application around it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RheumAI_PredictAndSaliency()
        self.setUp()
        self.test_RheumAI_BackgroundSelection()

    def _sampleStudy(self):
        local = Path(_MODULE_DIR).parent / "Testing" / "Data" / "cervical_t2_sag" / "t2.nii.gz"
        if os.environ.get("RHEUMAI_TEST_DATA"):
            local = Path(os.environ["RHEUMAI_TEST_DATA"]) / "cervical_t2_sag" / "t2.nii.gz"
        if local.is_file():
            return slicer.util.loadVolume(str(local)), str(local)
        import SampleData

        registerSampleData()
        node = SampleData.downloadSample("RheumAICervicalT2")
        return node, node.GetStorageNode().GetFileName()

    def _tinyModel(self, folder: Path) -> Path:
        import torch

        from rheumai.checkpoint import save_checkpoint
        from rheumai.models import build_model, default_architecture
        from rheumai.slices import SliceParams

        torch.manual_seed(0)
        arch = default_architecture(10, 6, (64, 64))
        card = {"task": "cervical_ra", "architecture": arch, "preprocessing": SliceParams(size=(64, 64)).to_dict(),
                "threshold": 0.5, "threshold_rule": "fixed", "training_data": {"n_train": 0}, "metrics": {},
                "model_id": "selftest-resnet10-64"}
        return save_checkpoint(folder / "model", build_model(arch), card)

    def test_RheumAI_PredictAndSaliency(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Loading sample study")
        volume, _sourcePath = self._sampleStudy()
        logic = RheumAILogic()
        logic.setupPythonRequirements(askConfirmation=False)
        model = self._tinyModel(Path(tempfile.mkdtemp(prefix="rheumai-test-")))

        self.delayDisplay("Slice selection")
        sel = logic.selectSlices(volume, {"size": [64, 64]}, createNodes=True)
        self.assertEqual(sel["selection"].array.shape, (6, 64, 64))
        self.assertTrue(sel["roiNode"].IsA("vtkMRMLMarkupsROINode"))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(sel["slicesNode"]), sel["selection"].array)

        self.delayDisplay("Predict with Grad-CAM saliency")
        res = logic.predict(volume, model, createNodes=True, saliency="gradcam", opacity=0.4)
        self.assertTrue(0.0 <= res["probability"] <= 1.0)
        self.assertEqual(res["label"], int(res["probability"] >= 0.5))
        sal = slicer.mrmlScene.GetNodeByID(res["nodeIDs"]["saliency"])
        self.assertEqual(sal.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m1)
        sal.GetIJKToRASMatrix(m2)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(m1), slicer.util.arrayFromVTKMatrix(m2), atol=1e-6)
        composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), sal.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), volume.GetID())
        self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.4)
        table = slicer.mrmlScene.GetNodeByID(res["nodeIDs"]["table"])
        self.assertAlmostEqual(table.GetTable().GetColumnByName("probability").GetValue(0), res["probability"], places=5)
        sh = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(sal)), sh.GetItemByDataNode(volume))
        self.delayDisplay("Test passed")

    def test_RheumAI_BackgroundSelection(self):
        import tempfile

        volume, path = self._sampleStudy()
        logic = RheumAILogic()
        out = tempfile.mkdtemp(prefix="rheumai-test-")
        result = logic.selectSlicesBatch([path], out, {"size": [64, 64]}, waitForCompletion=True)
        self.assertEqual(result["n_ok"], 1)
        self.delayDisplay("Background test passed")
