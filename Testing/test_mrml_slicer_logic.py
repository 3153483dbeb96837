"""RheumAI.py's own logic class (RheumAILogic) on slicer-core: background prediction through the
worker process, blocking (scripts) and polled by a timer (the panel), with the result nodes made
in the caller's thread and the job's temporary folder removed.

slicer-core has MRML and ``slicer.util`` but not the Qt-based modules RheumAI.py imports at the top
(``qt``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``slicer.i18n``); the
fixture below puts minimal stand-ins for those in ``sys.modules`` for this test only. Everything
the tested methods do (MRML, worker process, files) is real; the widget needs the application.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
torch = pytest.importorskip("torch")

MODULE_PY = Path(__file__).resolve().parents[1] / "RheumAI" / "RheumAI.py"


class _Timer:
    """qt.QTimer stand-in: the test calls ``fire()`` where Qt's event loop would."""

    instances: list["_Timer"] = []

    def __init__(self) -> None:
        self.slot, self.active = None, False
        _Timer.instances.append(self)

    def setInterval(self, ms: int) -> None:  # noqa: N802 (Qt names)
        self.interval = ms

    def connect(self, signal: str, slot) -> None:
        self.slot = slot

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def fire(self) -> None:
        if self.active:
            self.slot()


class _Base:
    def __init__(self, *args, **kwargs) -> None:
        pass


@pytest.fixture
def rheumai_module(mrml, monkeypatch):
    qt = types.ModuleType("qt")
    qt.QTimer = _Timer
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = i18n.translate = lambda *a: a[-1]
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *a, **k: None
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (_Base,), {}))
    for name, mod in (("qt", qt), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", pnw),
                      ("slicer.ScriptedLoadableModule", slm)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: None, raising=False)
    spec = importlib.util.spec_from_file_location("RheumAI_under_test", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from rheumai.checkpoint import save_checkpoint
    from rheumai.tasks.cervical_ra.model import build_model, default_architecture
    from rheumai.tasks.cervical_ra.slices import SliceParams

    torch.manual_seed(0)
    arch = default_architecture(10, 6, (32, 32))
    card = {"task": "cervical_ra", "architecture": arch, "preprocessing": SliceParams(size=(32, 32)).to_dict(),
            "threshold": 0.5, "threshold_rule": "fixed", "training_data": {}, "metrics": {}, "model_id": "s-r10"}
    return save_checkpoint(tmp_path_factory.mktemp("slogic") / "model", build_model(arch), card)


def test_slicer_logic_predicts_in_the_worker_polled_by_the_panel_timer(rheumai_module, mrml, t2_crop_path, model):
    logic = rheumai_module.RheumAILogic()
    logs: list[str] = []
    logic.logCallback = logs.append
    volume = logic.console.loadVolume(t2_crop_path)
    inproc = logic.predict(volume, model, saliency=None)

    # the panel's way: returns at once, a timer polls, completedCallback gets the result with nodes
    done, progress = [], []
    worker = logic.predictStudy(model, {"t2_sag": volume}, saliency="gradcam", waitForCompletion=False,
                                progressCallback=lambda f, m: progress.append(f),
                                completedCallback=lambda r, e: done.append((r, e)))
    work = worker.work_dir
    assert (work / "input_t2_sag.nrrd").is_file() and logic.worker is worker  # the input, as NRRD
    with pytest.raises(RuntimeError, match="already running"):
        logic.predictStudy(model, {"t2_sag": volume}, waitForCompletion=False)
    timer = _Timer.instances[-1]
    deadline = time.monotonic() + 300
    while timer.active and time.monotonic() < deadline:
        timer.fire()
        time.sleep(0.05)
    ((result, error),) = done
    assert error is None and result["probability"] == pytest.approx(inproc["probability"], abs=1e-5)
    sal = mrml.scene.GetNodeByID(result["nodeIDs"]["saliency"])
    assert sal.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    for stage in ("[load model]", "[predict]", "[write]"):  # the worker's progress lines reach the log
        assert any(stage in line for line in logs), stage
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert not work.exists() and logic.worker is None


def test_slicer_logic_cancel_ends_the_job_and_removes_its_folder(rheumai_module, mrml, t2_crop_path, model):
    logic = rheumai_module.RheumAILogic()
    volume = logic.console.loadVolume(t2_crop_path)
    done = []
    worker = logic.predictStudy(model, {"t2_sag": volume}, saliency="occlusion", waitForCompletion=False,
                                completedCallback=lambda r, e: done.append((r, e)))
    work = worker.work_dir
    logic.cancel()
    assert worker.cancelled and worker.returncode is not None
    assert not work.exists() and logic.worker is None and done == []


def test_reload_drops_the_packages_then_reloads_the_module(rheumai_module, monkeypatch):
    calls = []
    monkeypatch.setattr(sys.modules["slicer.ScriptedLoadableModule"].ScriptedLoadableModuleWidget, "onReload",
                        lambda self: calls.append("module reloaded"), raising=False)
    widget = rheumai_module.RheumAIWidget()
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("rheumai", "rheumai_mrml")}
    assert "rheumai.io" in saved and "rheumai_mrml.logic" in saved
    try:
        widget.onReload()
        assert not [k for k in sys.modules if k.split(".")[0] in ("rheumai", "rheumai_mrml")]
        assert calls == ["module reloaded"]
    finally:
        sys.modules.update(saved)  # the rest of the session keeps its module objects


class _Ns:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _widget(module, logic, parameter_node):
    widget = module.RheumAIWidget()
    widget.logic = logic
    widget._tasks = {t["name"]: t for t in logic.listTasks()}
    widget._parameterNode = parameter_node
    widget.ui = _Ns(modelCardTextEdit=_Ns(plainText=""))
    return widget


def test_model_card_box_shows_the_path_the_signal_carries(rheumai_module, mrml, model, tmp_path):
    """The slot runs before the parameter node has the new path: it must use the signal's value."""
    logic = rheumai_module.RheumAILogic()
    stale = _Ns(modelPath="", task="negspa", inputVolume=None)
    widget = _widget(rheumai_module, logic, stale)
    widget.onModelChanged(str(model))
    assert widget.ui.modelCardTextEdit.plainText.startswith("Task: ")
    assert "s-r10" in widget.ui.modelCardTextEdit.plainText
    assert stale.task == "cervical_ra"  # the task selector follows the model's card
    widget.onModelChanged(str(tmp_path / "not-a-model"))  # shown in the box, not raised
    assert "not-a-model" in widget.ui.modelCardTextEdit.plainText
    widget.onModelChanged("")
    assert widget.ui.modelCardTextEdit.plainText == ""


def test_saliency_sliders_and_database_never_raise_into_the_console(rheumai_module, mrml, t2_crop_path):
    from rheumai.errors import InputError

    logic = rheumai_module.RheumAILogic()
    volume = logic.console.loadVolume(t2_crop_path)  # a volume without saliency
    widget = _widget(rheumai_module, logic, _Ns(modelPath="", task="cervical_ra", inputVolume=volume))
    widget.onOpacityChanged(0.3)
    widget.onLowerThresholdChanged(0.2)
    widget._parameterNode.inputVolume = None
    widget.onOpacityChanged(0.4)
    # no open DICOM database: a clear error (the slot shows it in a dialog), not an AttributeError
    assert getattr(slicer, "dicomDatabase", None) is None
    with pytest.raises(InputError, match="DICOM database is not open"):
        logic.dicomDatabaseFolder(str(t2_crop_path.parent))
