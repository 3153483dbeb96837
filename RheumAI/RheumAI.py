"""RheumAI: rheumatology imaging AI in 3D Slicer, for every task of the RheumAI task registry.

Thin Slicer layer: the Qt widget and a Logic facade. All MRML work lives in ``rheumai_mrml``
(tested with pytest on slicer-core) and all imaging / AI work in ``rheumai`` (Logic/rheumai), so
the console API below is the same code the tests run:

    import RheumAI
    logic = RheumAI.RheumAILogic()
    result = logic.predict(volumeNode, "/models/cervical_ra", createNodes=True)
    result = logic.predictStudy("/models/negspa", {"t1": t1, "t2": t2, "stir": stir}, roi=roiNode,
                                clinical={"crp": 12}, createNodes=True)

The panels are built from the task declaration (inputs per role, box ROI, clinical variables):
this file holds no task-specific code. All heavy work (prediction and saliency, batch
prediction, dataset building, training) runs in a background PythonSlicer process
(``Resources/Scripts/rheumai_worker.py``) with progress and Cancel; the GUI stays live.
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

# "default": the task's first declared method (cervical: smoothed gradient x input, which localises)
SALIENCY_METHODS = ["default", "gradxinput_smooth", "gradcam", "gradcampp", "occlusion", "gradxinput", "none"]
# Packages Slicer already ships or PyTorchUtils manages: never reinstalled by this module.
NEVER_REINSTALL = ["torch", "torchvision", "SimpleITK", "numpy", "vtk"]
# Python packages this module loads from its own folder: Reload drops them so edits take effect.
RELOADED_PACKAGES = ("rheumai", "rheumai_mrml")
SAMPLE_URL = "https://raw.githubusercontent.com/RheumAI/SlicerRheumAI/main/Testing/Data/cervical_t2_sag/t2.nii.gz"
SAMPLE_SHA256 = "0eb96b3322c5282c8cbc912286cbdd86028ca8aa6b1498cbe43f5cb2babcd380"
# Path settings (str, "" when unset) -> their ctkPathLineEdit (bound by the widget, so an unset
# path shows an empty field; parameterNodeWrapper's Path would show ".").
PATH_FIELDS = {"dicomFolder": "dicomFolderLineEdit", "labelsCsv": "labelsCsvLineEdit",
               "datasetOutDir": "datasetOutDirLineEdit", "trainConfig": "trainConfigLineEdit",
               "trainManifest": "trainManifestLineEdit", "trainOutDir": "trainOutDirLineEdit",
               "modelPath": "modelPathLineEdit", "batchInput": "batchInputLineEdit",
               "batchOutDir": "batchOutDirLineEdit"}
INPUT_REFERENCE = "RheumAIInput_"  # parameter node reference role of a task input: prefix + role
ROI_REFERENCE = "RheumAIRoi"
CLINICAL_PARAMETER = "RheumAIClinical_"  # parameter name of a clinical value: prefix + variable


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
Rheumatology imaging AI for every task of the RheumAI registry (cervical spine deformity in RA from
sagittal T2 MRI; NegSpA-AI from sacroiliac T1/T2/STIR MRI, a box ROI and clinical values; ...):
builds datasets from DICOM exports or Slicer's DICOM database, trains, predicts and explains in a
background process, and puts every result (tables, saliency overlays, charts) in the scene.
Research use only, not for clinical decisions.
""")
        self.parent.acknowledgementText = _("""
Methods: Lebouille-Veldman et al. 2025 (cervical RA deformity prediction); Lu et al. 2024
(NegSpA-AI). Sample study: NeuroPoly Spinal Cord Toolbox testing data (MIT licence).
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
    # Task (inputs per role, ROI and clinical values: node references / parameters of the raw
    # node, see INPUT_REFERENCE, ROI_REFERENCE, CLINICAL_PARAMETER)
    task: str = ""
    # Dataset
    dicomFolder: str = ""
    useDicomDatabase: bool = False
    labelsCsv: str = ""
    datasetOutDir: str = ""
    minFollowupDays: Annotated[int, WithinRange(0, 10000)] = 1000
    trainFraction: Annotated[float, WithinRange(0.05, 1.0)] = 0.6
    datasetReport: str = ""
    # Training
    trainConfig: str = ""
    trainManifest: str = ""
    trainOutDir: str = ""
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
    modelPath: str = ""
    device: Annotated[str, Choice(["cpu", "cuda"])] = "cpu"
    resultText: str = ""
    resultTable: vtkMRMLTableNode
    batchInput: str = ""
    batchOutDir: str = ""
    # Saliency
    saliencyMethod: Annotated[str, Choice(SALIENCY_METHODS)] = "default"
    targetLayer: str = ""
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    lowerThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.05
    saliencyVolume: vtkMRMLScalarVolumeNode


def _path(p: Any) -> str | None:
    """A path setting as text, None when unset."""
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
        self._tasks: dict[str, dict] = {}
        self._taskForm = None  # the widget holding the selected task's input rows
        self._inputSelectors: dict[str, Any] = {}
        self._roiSelector = None
        self._clinicalEditors: dict[str, Any] = {}
        self._taskUsesSlab = False  # the selected task samples a slab (Slice selection panel shown)
        self._updatingGui = False

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

        self._tasks = {t["name"]: t for t in self.logic.listTasks()}
        for name, task in self._tasks.items():
            self.ui.taskComboBox.addItem(task["title"], name)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskChanged)

        self.ui.buildDatasetButton.connect("clicked(bool)", self.onBuildDataset)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.selectSlicesButton.connect("clicked(bool)", self.onSelectSlices)
        self.ui.predictButton.connect("clicked(bool)", lambda: self.onPredict(self.ui.predictButton))
        self.ui.computeSaliencyButton.connect("clicked(bool)", lambda: self.onPredict(self.ui.computeSaliencyButton))
        self.ui.predictBatchButton.connect("clicked(bool)", self.onPredictBatch)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.centerPointSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                            self.ui.centerPlaceWidget.setCurrentNode)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.lowerThresholdSliderWidget.connect("valueChanged(double)", self.onLowerThresholdChanged)
        for param, widgetName in PATH_FIELDS.items():
            getattr(self.ui, widgetName).connect("currentPathChanged(QString)",
                                                 lambda path, param=param: self._onPathEdited(param, path))
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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onReload(self) -> None:
        """Reload the module and the rheumai / rheumai_mrml packages it loads from its folder
        (Slicer's reload re-reads only this file)."""
        if self.logic is not None:
            self.logic.cancel()
        for name in [m for m in sys.modules if m.split(".")[0] in RELOADED_PACKAGES]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.task or p.task not in self._tasks:
            p.task = next(iter(self._tasks), "")
        if not p.trainConfig:
            p.trainConfig = str(self.logic.defaultTrainingConfig(p.task))
        if not p.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                p.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()
            self.onModelChanged(self._parameterNode.modelPath)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if not p or self._updatingGui:
            return
        self._updatingGui = True
        try:
            for param, widgetName in PATH_FIELDS.items():
                widget, text = getattr(self.ui, widgetName), _path(getattr(p, param)) or ""
                if widget.currentPath != text:
                    widget.currentPath = text
            index = self.ui.taskComboBox.findData(p.task)
            if index >= 0 and index != self.ui.taskComboBox.currentIndex:
                self.ui.taskComboBox.currentIndex = index
            if self._taskForm is None or self._taskForm.property("RheumAITask") != p.task:
                self._buildTaskForm(p.task)
            self._updateTaskForm()
        finally:
            self._updatingGui = False
        self._updateButtons()

    def _onPathEdited(self, param: str, path: str) -> None:
        if self._parameterNode and not self._updatingGui and getattr(self._parameterNode, param) != path:
            setattr(self._parameterNode, param, path)

    # -------------------------------------------------------------- task panel (from the declaration)
    def onTaskChanged(self, index: int) -> None:
        name = self.ui.taskComboBox.itemData(index)
        if self._parameterNode and not self._updatingGui and name and self._parameterNode.task != name:
            self._parameterNode.task = name
            # a shipped configuration of the previous task gives way to the new task's
            if self.logic.isShippedTrainingConfig(self._parameterNode.trainConfig):
                self._parameterNode.trainConfig = str(self.logic.defaultTrainingConfig(name))

    def _buildTaskForm(self, taskName: str) -> None:
        """One node selector per input role, a markups ROI selector, one row per clinical value."""
        from rheumai_mrml.panel import task_fields

        if self._taskForm is not None:
            self._taskForm.setParent(None)
            self._taskForm.deleteLater()
        self._taskForm, self._inputSelectors, self._roiSelector, self._clinicalEditors = None, {}, None, {}
        task = self._tasks.get(taskName)
        if task is None:
            return
        form = qt.QWidget()
        form.setProperty("RheumAITask", taskName)
        layout = qt.QFormLayout(form)
        layout.setContentsMargins(0, 0, 0, 0)
        for field in task_fields(task):
            if field.kind in ("volume", "roi"):
                combo = slicer.qMRMLNodeComboBox()
                combo.nodeTypes = [field.node_class]
                combo.noneEnabled = True
                combo.addEnabled = field.kind == "roi"
                combo.renameEnabled = True
                combo.removeEnabled = False
                combo.selectNodeUponCreation = True
                combo.setMRMLScene(slicer.mrmlScene)
                combo.setToolTip(field.tooltip)
                if field.kind == "roi":
                    self._roiSelector = combo
                    place = slicer.qSlicerMarkupsPlaceWidget()
                    place.setMRMLScene(slicer.mrmlScene)
                    place.setToolTip(_("Click to place the box in a slice view."))
                    combo.connect("currentNodeChanged(vtkMRMLNode*)", place.setCurrentNode)
                    combo.connect("currentNodeChanged(vtkMRMLNode*)", self._onTaskInputChanged)
                    row = qt.QWidget()
                    box = qt.QHBoxLayout(row)
                    box.setContentsMargins(0, 0, 0, 0)
                    box.addWidget(combo)
                    box.addWidget(place)
                    layout.addRow(field.label, row)
                else:
                    self._inputSelectors[field.key] = combo
                    combo.connect("currentNodeChanged(vtkMRMLNode*)", self._onTaskInputChanged)
                    layout.addRow(field.label, combo)
            else:
                if field.choices:
                    editor = qt.QComboBox()
                    editor.addItems(list(field.choices))
                    editor.connect("currentIndexChanged(int)", self._onTaskInputChanged)
                else:
                    editor = qt.QLineEdit()
                    editor.placeholderText = field.unit or _("number")
                    editor.connect("editingFinished()", self._onTaskInputChanged)
                editor.setToolTip(field.tooltip)
                self._clinicalEditors[field.key] = editor
                layout.addRow(field.label, editor)
        self.ui.taskInputsFrame.layout().addWidget(form)
        self._taskForm = form
        # the slab panel belongs to tasks whose parameters are a slice selection
        params = task.get("default_params") or {}
        self._taskUsesSlab = {"n_slices", "spacing_mm", "size"} <= set(params)
        self.ui.sliceSelectionCollapsibleButton.visible = self._taskUsesSlab

    def _updateTaskForm(self) -> None:
        """Parameter node -> task rows (node references, clinical text)."""
        raw = self._parameterNode.parameterNode
        for i, (role, combo) in enumerate(self._inputSelectors.items()):
            node = self._parameterNode.inputVolume if i == 0 else raw.GetNodeReference(INPUT_REFERENCE + role)
            if combo.currentNode() is not node:
                combo.setCurrentNode(node)
        if self._roiSelector is not None:
            roi = raw.GetNodeReference(ROI_REFERENCE)
            if self._roiSelector.currentNode() is not roi:
                self._roiSelector.setCurrentNode(roi)
        for name, editor in self._clinicalEditors.items():
            text = raw.GetParameter(CLINICAL_PARAMETER + name) or ""
            if isinstance(editor, qt.QComboBox):
                editor.currentIndex = max(0, editor.findText(text))
            elif editor.text != text:
                editor.text = text

    def _onTaskInputChanged(self, *args) -> None:
        """Task rows -> parameter node (saved with the scene)."""
        if self._updatingGui or not self._parameterNode:
            return
        raw = self._parameterNode.parameterNode
        with slicer.util.NodeModify(raw):
            for i, (role, combo) in enumerate(self._inputSelectors.items()):
                node = combo.currentNode()
                if i == 0:
                    self._parameterNode.inputVolume = node
                raw.SetNodeReferenceID(INPUT_REFERENCE + role, node.GetID() if node else None)
            if self._roiSelector is not None:
                roi = self._roiSelector.currentNode()
                raw.SetNodeReferenceID(ROI_REFERENCE, roi.GetID() if roi else None)
            for name, editor in self._clinicalEditors.items():
                raw.SetParameter(CLINICAL_PARAMETER + name,
                                 editor.currentText if isinstance(editor, qt.QComboBox) else editor.text)

    def _taskInputs(self) -> tuple[dict, Any, dict]:
        """(inputs {role: node}, ROI node or None, clinical values) of the selected task; the
        clinical text is checked (InputError names the variable)."""
        from rheumai_mrml.panel import clinical_values

        inputs = {role: combo.currentNode() for role, combo in self._inputSelectors.items()}
        form = {name: (e.currentText if isinstance(e, qt.QComboBox) else e.text)
                for name, e in self._clinicalEditors.items()}
        task = self._tasks[self._parameterNode.task]
        roi = self._roiSelector.currentNode() if self._roiSelector is not None else None
        return inputs, roi, clinical_values(task, form)

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if not p or self._runningButton is not None:
            return
        hasModel = bool(_path(p.modelPath))
        hasInputs = bool(self._inputSelectors) and all(c.currentNode() for c in self._inputSelectors.values())
        hasRoi = self._roiSelector is None or self._roiSelector.currentNode() is not None
        self.ui.selectSlicesButton.enabled = bool(p.inputVolume)
        self.ui.predictButton.enabled = hasInputs and hasRoi and hasModel
        self.ui.computeSaliencyButton.enabled = hasInputs and hasRoi and hasModel and p.saliencyMethod != "none"
        self.ui.predictBatchButton.enabled = hasModel and bool(_path(p.batchInput)) and bool(_path(p.batchOutDir))
        hasDicom = bool(_path(p.dicomFolder)) or p.useDicomDatabase
        self.ui.buildDatasetButton.enabled = hasDicom and bool(_path(p.labelsCsv)) and bool(_path(p.datasetOutDir))
        self.ui.trainButton.enabled = bool(_path(p.trainConfig)) and bool(_path(p.trainManifest))

    # -------------------------------------------------------------- log and progress
    def addLog(self, text: str) -> None:
        self.ui.statusLabel.text = text.splitlines()[0][:120] if text else ""
        self.ui.logTextEdit.appendPlainText(text)

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{message[:60]}  %p%"

    # -------------------------------------------------------------- Apply <-> Cancel
    def _startBackground(self, button, job: Callable[..., Any], usedPaths: tuple = (), **kwargs) -> None:
        """Run a background job: the button becomes Cancel until the process ends."""
        if self._runningButton is not None:
            if button is self._runningButton:
                self.logic.cancel()
                self._onBackgroundDone(None, None, cancelled=True)
            return
        for widgetName in usedPaths:  # the path history of each field used
            getattr(self.ui, widgetName).addCurrentPathToHistory()
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
        with slicer.util.tryWithErrorDisplay(_("Showing the result failed."), waitCursor=True):
            self._showJobResult(result)

    def _showJobResult(self, result: Any) -> None:
        p = self._parameterNode
        if not isinstance(result, dict):
            return
        ids = result.get("nodeIDs") or {}
        if "manifest" in result and "flow" in result:
            txt = result.get("paths", {}).get("txt")
            p.datasetReport = Path(txt).read_text(encoding="utf-8") if txt and Path(txt).is_file() else ""
            p.trainManifest = str(result["manifest"])
            self._showTable(ids.get("dataset_flow"))
            self.addLog(_("Dataset: {n} patients included; manifest {m}").format(n=result["n_included"],
                                                                              m=result["manifest"]))
        elif "checkpoint" in result:
            if result.get("checkpoint"):
                p.modelPath = str(result["checkpoint"])
            self._showChart(ids.get("training_roc_chart") or ids.get("training_loss_chart"))
            self.addLog(_("Training finished: {r}").format(r={k: result.get(k) for k in
                                                             ("checkpoint", "best_epoch", "best_val_auc", "threshold")}))
        elif "rows" in result:
            n_err = sum(1 for r in result["rows"] if r.get("error"))
            self._showTable(ids.get("batch_predictions"))
            self.addLog(_("Batch finished: {n} studies, {e} failed; {f}").format(
                n=len(result["rows"]), e=n_err, f=result.get("predictions_csv", "")))
        elif ids.get("table"):  # one prediction, any task
            from rheumai_mrml.panel import result_text

            p.resultTable = slicer.mrmlScene.GetNodeByID(ids["table"])
            if ids.get("slab"):
                p.slabRoi = slicer.mrmlScene.GetNodeByID(ids["slab"])
            p.saliencyVolume = slicer.mrmlScene.GetNodeByID(ids["saliency"]) if ids.get("saliency") else None
            p.resultText = result_text(result)
            self.addLog(p.resultText)
            for warning in result.get("warnings", []):
                self.addLog(_("Note: {w}").format(w=warning))

    def _showTable(self, tableID: str | None) -> None:
        if tableID:
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(tableID)
            slicer.app.applicationLogic().PropagateTableSelection()

    def _showChart(self, chartID: str | None) -> None:
        if chartID:
            slicer.modules.plots.logic().ShowChartInLayout(slicer.mrmlScene.GetNodeByID(chartID))

    # -------------------------------------------------------------- panels
    def onBuildDataset(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Dataset building could not start."), waitCursor=True):
            dicomFolder = self.logic.dicomDatabaseFolder(_path(p.datasetOutDir)) if p.useDicomDatabase \
                else _path(p.dicomFolder)
            self._startBackground(self.ui.buildDatasetButton, self.logic.buildDataset, dicomFolder=dicomFolder,
                                  labelsCsv=_path(p.labelsCsv), outDir=_path(p.datasetOutDir),
                                  rules={"min_followup_days": p.minFollowupDays},
                                  split={"train_fraction": p.trainFraction}, params=self._sliceParams(),
                                  usedPaths=("dicomFolderLineEdit", "labelsCsvLineEdit", "datasetOutDirLineEdit"))

    def onTrain(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        self._startBackground(self.ui.trainButton, self.logic.train, configPath=_path(p.trainConfig),
                              manifestPath=_path(p.trainManifest), outDir=_path(p.trainOutDir),
                              usedPaths=("trainConfigLineEdit", "trainManifestLineEdit", "trainOutDirLineEdit"))

    def onPredictBatch(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        self._startBackground(self.ui.predictBatchButton, self.logic.predictBatch, pathsOrFolder=_path(p.batchInput),
                              modelPath=_path(p.modelPath), outDir=_path(p.batchOutDir),
                              saliency=self._saliency(), device=p.device,
                              usedPaths=("modelPathLineEdit", "batchInputLineEdit", "batchOutDirLineEdit"))

    def onSelectSlices(self) -> None:
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Slice selection failed."), waitCursor=True):
            out = self.logic.selectSlices(p.inputVolume, self._sliceParams(), createNodes=True,
                                          centerRAS=self._centerRAS())
            p.slicesVolume, p.slabRoi = out["slicesNode"], out["roiNode"]
            self.addLog(_("Slab centre (RAS mm): {c}").format(c=[round(v, 1) for v in out["slab_center_ras"]]))

    def onPredict(self, button) -> None:
        """Predict (and explain) the task's inputs in the background process."""
        if self._runningButton is button:
            self._startBackground(button, self.logic.predictStudy)  # acts as Cancel
            return
        if not self._ensureRequirements():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Prediction could not start."), waitCursor=True):
            inputs, roi, clinical = self._taskInputs()
            self._startBackground(button, self.logic.predictStudy, modelPath=_path(p.modelPath), inputs=inputs,
                                  roi=roi, clinical=clinical, createNodes=True, saliency=self._saliency(),
                                  targetLayer=p.targetLayer or None, device=p.device, opacity=p.opacity,
                                  lowerThreshold=p.lowerThreshold,
                                  centerRAS=self._centerRAS() if self._taskUsesSlab else None,
                                  usedPaths=("modelPathLineEdit",))

    def onModelChanged(self, path: Any = "") -> None:
        """The model card of the path the signal carries (the parameter node may not be updated yet);
        the task selector follows the card's task."""
        path = _path(path)
        if not path:
            self.ui.modelCardTextEdit.plainText = ""
            return
        try:
            self.ui.modelCardTextEdit.plainText = self.logic.modelCardText(path)
            task = self.logic.console.taskOfModel(path)["name"]
            if self._parameterNode and task in self._tasks and self._parameterNode.task != task:
                self._parameterNode.task = task
        except Exception as exc:  # shown, not raised: the user is still choosing
            self.ui.modelCardTextEdit.plainText = str(exc)

    def onOpacityChanged(self, value: float) -> None:
        p = self._parameterNode
        if p and p.inputVolume:
            self.logic.console.updateSaliencyDisplay(p.inputVolume, opacity=value)

    def onLowerThresholdChanged(self, value: float) -> None:
        p = self._parameterNode
        if p and p.inputVolume:
            self.logic.console.updateSaliencyDisplay(p.inputVolume, lowerThreshold=value)

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
    """Console API. In-process: selectSlices, predict / predictStudy (plain dicts; nodes only if
    asked). Background process (waitForCompletion=True blocks, as scripts want; False returns at
    once and calls completedCallback(result, error) in the GUI thread): predictStudy,
    buildDataset, train, predictBatch, selectSlicesBatch. Results of background jobs are put in
    the scene as nodes. The MRML work is ``rheumai_mrml.logic.RheumAIConsoleLogic`` (pytest-covered).
    """

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

    def defaultTrainingConfig(self, task: str = "cervical_ra") -> Path:
        """The shipped training configuration for ``task`` (Resources/Configs, see CMakeLists)."""
        from rheumai_mrml.resources import default_config

        return default_config(_MODULE_DIR, task)

    def isShippedTrainingConfig(self, path: str) -> bool:
        """Whether ``path`` is one of the shipped configurations (not the user's own)."""
        from rheumai_mrml.resources import list_configs

        return bool(path) and Path(path).resolve() in {c.resolve() for c in list_configs(_MODULE_DIR).values()}

    def dicomDatabaseFolder(self, outDir) -> str:
        """A folder of links to every file of Slicer's DICOM database, asked series by series
        through the database API (files imported by link live outside ``<database>/dicom``)."""
        from rheumai_mrml.dicom_db import database_of, link_database_files

        if not outDir:
            raise RuntimeError("Choose the dataset output folder first (the links are made there).")
        linked = link_database_files(database_of(slicer), outDir)
        self.log(f"Slicer DICOM database: {linked.n_files} files of {linked.n_series} series ({linked.how}s)"
                 + (f"; {len(linked.missing)} listed files are missing" if linked.missing else ""))
        return str(linked.folder)

    # -------------------------------------------------------------- in-process
    def selectSlices(self, volumeNode, params=None, createNodes: bool = True, centerRAS=None, **overrides) -> dict:
        return self.console.selectSlices(volumeNode, params, createNodes=createNodes, centerRAS=centerRAS,
                                         **overrides)

    def predict(self, volumeNodeOrPath, modelPath, createNodes: bool = False, saliency: str | None = "default",
                targetLayer: str | None = None, device: str = "cpu", tta: int = 0, opacity: float = 0.5,
                lowerThreshold: float | None = 0.05, centerRAS=None) -> dict:
        """One study of a single-input task, in this process (scripts; the panel uses predictStudy)."""
        return self.console.predict(volumeNodeOrPath, modelPath, createNodes=createNodes, saliency=saliency,
                                    targetLayer=targetLayer, device=device, tta=tta, opacity=opacity,
                                    lowerThreshold=lowerThreshold, centerRAS=centerRAS)

    def setSaliencyOpacity(self, inputNode, opacity: float) -> None:
        self.console.setSaliencyOpacity(inputNode, opacity)

    def listTasks(self) -> list:
        """Registered tasks (rheumai.tasks registry) as declarations, e.g. to fill a task selector."""
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
    def predictStudy(self, modelPath, inputs, roi=None, clinical=None, createNodes: bool = True,
                     saliency: str | None = "default", targetLayer: str | None = None, device: str = "cpu",
                     tta: int = 0, opacity: float = 0.5, lowerThreshold: float | None = 0.05, centerRAS=None,
                     waitForCompletion: bool = True, progressCallback=None, completedCallback=None):
        """Predict one study of any task (inputs {role: volume node}, roi: markups ROI node or
        box dict, clinical {variable: value}) in the worker process; the result dict, with nodes
        created under the inputs (see ``RheumAIConsoleLogic.predictStudy``)."""
        job = self.console.startPredictStudy(modelPath, inputs, roi=roi, clinical=clinical, saliency=saliency,
                                             targetLayer=targetLayer, device=device, tta=tta, centerRAS=centerRAS,
                                             env=slicer.util.startupEnvironment())
        self.log(f"Started prediction in a background process: {' '.join(job.worker.command)}")
        finish = lambda: self.console.finishPredictStudy(job, createNodes=createNodes, opacity=opacity,  # noqa: E731
                                                         lowerThreshold=lowerThreshold)
        return self._follow(job.worker, waitForCompletion, progressCallback, completedCallback, finish, job.close)

    def buildDataset(self, dicomFolder, labelsCsv, outDir, waitForCompletion: bool = True,
                     progressCallback=None, completedCallback=None, **options):
        """Index + labels + cohort + split + cache + manifest + inclusion flow, in a worker process;
        the flow, excluded patients and split become table nodes."""
        args = {"dicom_folder": str(dicomFolder), "labels_csv": str(labelsCsv), "out_dir": str(outDir), **options}
        return self._run("build_dataset", args, waitForCompletion, progressCallback, completedCallback,
                         lambda r: dict(r, nodeIDs=self.console.showDatasetResult(r)))

    def train(self, configPath, manifestPath, outDir, waitForCompletion: bool = True, resume: bool = False,
              progressCallback=None, completedCallback=None):
        """Train from a TOML config and a manifest in a worker process; returns the TrainResult dict
        (history and validation ROC also as tables and plot charts)."""
        args = {"config": str(configPath), "manifest": str(manifestPath) if manifestPath else None,
                "out_dir": str(outDir) if outDir else None, "resume": resume}
        return self._run("train", args, waitForCompletion, progressCallback, completedCallback,
                         lambda r: dict(r, nodeIDs=self.console.showTrainingResult(r)))

    def predictBatch(self, pathsOrFolder, modelPath, outDir, waitForCompletion: bool = True,
                     progressCallback=None, completedCallback=None, saliency: str | None = "default",
                     device: str = "cpu", tta: int = 0):
        """Predict many studies in a worker process: a folder / list of studies (single-input
        tasks) or a study table CSV (any task). Returns the rows (also outDir/predictions.csv and
        a table node)."""
        from rheumai_mrml.logic import find_studies

        args = {"checkpoint": str(modelPath), "out_dir": str(outDir), "saliency": saliency, "device": device,
                "tta": tta}
        if isinstance(pathsOrFolder, (str, Path)) and str(pathsOrFolder).lower().endswith(".csv"):
            args["table"] = str(pathsOrFolder)
        else:
            args["studies"] = find_studies(pathsOrFolder)
        out = self._run("predict_batch", args, waitForCompletion, progressCallback, completedCallback,
                        lambda r: dict(r, nodeIDs=self.console.showBatchResult(r["rows"])))
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
            self.worker.close()
            self.worker = None

    def _run(self, job, args, waitForCompletion, progressCallback, completedCallback, finish=None):
        from rheumai_mrml.process import WorkerProcess

        worker = WorkerProcess(job, args, env=slicer.util.startupEnvironment())
        self.log(f"Starting background job {job}: {' '.join(worker.command)}")
        worker.start()
        return self._follow(worker, waitForCompletion, progressCallback, completedCallback,
                            (lambda: finish(worker.outcome())) if finish else worker.outcome, worker.close)

    def _follow(self, worker, waitForCompletion, progressCallback, completedCallback, finish, close):
        """Stream a started worker's log and progress; ``finish()`` turns its outcome into the
        result (nodes are made there, in this thread); ``close()`` removes its temporary folder."""
        from rheumai_mrml.process import WorkerEvent

        if self.worker is not None and not self.worker.finished:
            close()
            raise RuntimeError("a RheumAI background job is already running")
        self.worker = worker

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
                worker.wait(on_output=onOutput)
                return finish()
            finally:
                close()
                self.worker = None

        def poll():
            for item in worker.poll():
                onOutput(item)
            if worker.finished or worker.cancelled:
                self._timer.stop()
                if self.worker is worker:
                    self.worker = None
                try:
                    if not worker.cancelled and completedCallback:
                        try:
                            result = finish()
                        except Exception as exc:
                            completedCallback(None, str(exc))
                        else:
                            completedCallback(result, None)
                finally:
                    close()

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
        self.setUp()
        self.test_RheumAI_BackgroundPredictAndPanel()

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
        from rheumai.tasks.cervical_ra.model import build_model, default_architecture
        from rheumai.tasks.cervical_ra.slices import SliceParams

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

    def test_RheumAI_BackgroundPredictAndPanel(self):
        """Predict in the worker process; the panel's task rows, model card and sliders."""
        import tempfile

        volume, _sourcePath = self._sampleStudy()
        logic = RheumAILogic()
        model = self._tinyModel(Path(tempfile.mkdtemp(prefix="rheumai-test-")))
        inproc = logic.predict(volume, model, saliency=None)
        res = logic.predictStudy(model, {"t2_sag": volume}, createNodes=True, saliency="gradcam",
                                 waitForCompletion=True)
        self.assertAlmostEqual(res["probability"], inproc["probability"], places=4)
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(res["nodeIDs"]["saliency"]))

        self.delayDisplay("Panel: task rows, model card from the chosen path, sliders")
        widget = slicer.modules.rheumai.widgetRepresentation().self()
        widget.ui.modelPathLineEdit.currentPath = str(model)
        self.assertIn("Task:", widget.ui.modelCardTextEdit.plainText)
        self.assertEqual(widget._parameterNode.task, "cervical_ra")
        self.assertEqual(list(widget._inputSelectors), ["t2_sag"])
        widget._parameterNode.inputVolume = volume
        widget.ui.opacitySliderWidget.value = 0.3  # no exception, with or without saliency
        widget.ui.lowerThresholdSliderWidget.value = 0.2
        plain = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, volume, "no saliency")
        widget._parameterNode.inputVolume = plain
        widget.ui.opacitySliderWidget.value = 0.6
        self.assertEqual(widget.ui.dicomFolderLineEdit.currentPath, "")
        self.delayDisplay("Background predict and panel test passed")

