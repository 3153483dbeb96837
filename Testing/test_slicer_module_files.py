"""The Slicer extension's files: CMake lists vs files on disk, metadata, the .ui vs the parameter
node and the widget code, requirements, and the glue between the Slicer logic and the tested
console logic. Static checks (no Slicer application needed); the GUI itself needs a full Slicer.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "RheumAI"
MODULE_PY = MODULE / "RheumAI.py"
UI = MODULE / "Resources" / "UI" / "RheumAI.ui"


def _cmake_globs(text: str, work: Path) -> dict[str, list[str]]:
    """Run the module CMakeLists' file(GLOB...) commands with the real CMake (script mode) and
    return each variable's files, relative to the module folder."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    globs = re.findall(r"(file\(GLOB(?:_RECURSE)? (\w+) .*?\))", text, re.S)
    assert globs
    script = [f"set(CMAKE_CURRENT_SOURCE_DIR {MODULE.as_posix()})"]
    script += re.findall(r"^set\(MODULE_\w+_DIR .*?\)$", text, re.M)  # folders the globs use
    for cmd, _var in globs:
        script.append(cmd.replace(" CONFIGURE_DEPENDS", ""))  # not allowed in script mode
    script += [f'message("{var}=${{{var}}}")' for _cmd, var in globs]
    (work / "globs.cmake").write_text("\n".join(script))
    out = subprocess.run([cmake, "-P", str(work / "globs.cmake")], capture_output=True, text=True, check=True)
    found = dict(line.split("=", 1) for line in out.stderr.splitlines() if "=" in line)
    return {var: [f for f in found.get(var, "").split(";") if f] for _cmd, var in globs}


def test_cmake_installs_every_python_file_and_resource(tmp_path):
    text = (MODULE / "CMakeLists.txt").read_text()
    found = _cmake_globs(text, tmp_path)
    scripts = ["RheumAI.py"] + found["MODULE_PACKAGE_SCRIPTS"]
    assert "${MODULE_NAME}.py\n  ${MODULE_PACKAGE_SCRIPTS}" in text
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py")
               if "__pycache__" not in p.parts and p.relative_to(MODULE).parts[0] != "Resources"}
    assert set(scripts) == on_disk and len(scripts) == len(set(scripts))
    res_disk = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.relative_to(MODULE).parts[1] != "Screenshots"}
    assert set(found["MODULE_PYTHON_RESOURCES"]) == res_disk
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    # training configurations: configs/*.toml -> Resources/Configs in the build tree and the install
    configs = sorted(found["MODULE_CONFIGS"])
    assert configs == sorted(p.name for p in (ROOT / "configs").glob("*.toml")) and configs
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/Resources/Configs/${config} COPYONLY" in text
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources/Configs" in text


def test_training_configs_are_read_from_the_module_resources(tmp_path):
    import shutil

    from rheumai_mrml.resources import config_task, configs_dir, default_config, list_configs

    # source tree: the repository's configs/
    assert configs_dir(MODULE) == ROOT / "configs"
    assert set(list_configs(MODULE)) == {p.stem for p in (ROOT / "configs").glob("*.toml")}
    # installed extension (what the CMake lines above lay out): no configs/ beside the module
    installed = tmp_path / "lib" / "Slicer-5.12" / "qt-scripted-modules"
    (installed / "Resources" / "Configs").mkdir(parents=True)
    for p in (ROOT / "configs").glob("*.toml"):
        shutil.copy(p, installed / "Resources" / "Configs" / p.name)
    assert configs_dir(installed) == installed / "Resources" / "Configs"
    assert default_config(installed) == installed / "Resources" / "Configs" / "small_cpu.toml"
    # the Training panel offers the selected task's shipped configuration
    for task in ("negspa", "hand_svdh", "msasss"):
        path = default_config(installed, task)
        assert path == installed / "Resources" / "Configs" / f"{task}.toml" and config_task(path) == task
    assert config_task(default_config(installed, "cervical_ra")) == "cervical_ra"
    from rheumai.config import load_config

    for path in list_configs(installed).values():
        load_config(path)  # each shipped configuration parses
    with pytest.raises(FileNotFoundError, match="no training configurations"):
        configs_dir(tmp_path / "empty" / "module")


def test_license_and_screenshot_for_the_extensions_index():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "Apache-2.0" in (ROOT / "pyproject.toml").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_[A-Z]+)\s+"([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text()))
    prefix = "https://raw.githubusercontent.com/RheumAI/SlicerRheumAI/main/"
    for url in meta["EXTENSION_SCREENSHOTURLS"].split() + [meta["EXTENSION_ICONURL"]]:
        assert url.startswith(prefix), url
        png = (ROOT / url[len(prefix):]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", url


def test_extension_metadata_is_complete():
    text = (ROOT / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_[A-Z]+)\s+"([^"]*)"\)', text))
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert meta.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} missing"
    assert "PyTorch" in meta["EXTENSION_DEPENDS"].split()
    assert meta["EXTENSION_ICONURL"].endswith("RheumAI/Resources/Icons/RheumAI.png")
    assert "add_subdirectory(RheumAI)" in text and "find_package(Slicer REQUIRED)" in text

    entry = json.loads((MODULE / "RheumAI.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # catalog entry schema v1.0.2
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert "PyTorch" in entry["build_dependencies"]
    assert entry["scm_url"].removesuffix(".git") == meta["EXTENSION_HOMEPAGE"]
    assert 1 <= entry["tier"] <= 5

    icon = (MODULE / "Resources" / "Icons" / "RheumAI.png").read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(icon[16:20], "big") == int.from_bytes(icon[20:24], "big") == 128


def test_requirements_have_lower_bounds_and_leave_torch_and_simpleitk_alone():
    from packaging.requirements import Requirement

    lines = [ln.split("#")[0].strip() for ln in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln]
    assert len(reqs) >= 5
    for r in reqs:
        assert any(s.operator == ">=" for s in r.specifier), f"{r} has no >= bound"
        assert not r.extras, f"{r}: extras may pull torch / SimpleITK"
    names = {r.name.lower() for r in reqs}
    assert "monai" in names
    assert not names & {"torch", "torchvision", "simpleitk", "slicer", "slicer-core", "numpy", "vtk"}


# ------------------------------------------------------------------ RheumAI.py, .ui, parameter node

def _module_ast() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not in RheumAI.py")


def _parameter_fields() -> dict[str, str]:
    cls = _class(_module_ast(), "RheumAIParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _param_name(w: ET.Element) -> str | None:
    for p in w.findall("property"):
        if p.get("name") == "SlicerParameterName":
            return p.findtext("string")
    return None


ACCEPTS = {  # parameter type -> widget classes parameterNodeWrapper can connect it to
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "bool": {"QCheckBox", "ctkCheckBox"},
    "int": {"QSpinBox", "QSlider", "ctkSliderWidget", "QDoubleSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "choice": {"QComboBox", "ctkComboBox"},
}


def test_ui_parameter_names_match_the_parameter_node():
    fields = _parameter_fields()
    widgets = _ui_widgets()
    connected = {}
    for name, w in widgets.items():
        param = _param_name(w)
        if param is None:
            continue
        assert param in fields, f"widget {name}: SlicerParameterName {param!r} is not a parameter"
        assert param not in connected, f"{param} connected twice"
        connected[param] = w
        ann, cls = fields[param], w.get("class")
        if "Choice(" in ann:
            kind = "choice"
        elif ann.startswith("vtkMRML"):
            types = [s.text for s in w.iter("string")]
            assert cls == "qMRMLNodeComboBox" and ann in types, f"{param}: {cls} with {types}"
            continue
        else:
            kind = re.sub(r"Annotated\[(\w+),.*", r"\1", ann)
        assert cls in ACCEPTS[kind], f"{param} ({ann}) cannot be shown by a {cls}"
    # every parameter the user sets has a widget; the rest are result nodes kept for scene reload,
    # the task (its combo box is filled from the registry) and the path fields, bound by the widget
    # so that an unset path shows an empty field (parameterNodeWrapper's Path shows ".")
    tree = _module_ast()
    (path_fields,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                      and ast.unparse(n.targets[0]) == "PATH_FIELDS"]
    for param, widget in path_fields.items():
        assert fields[param] == "str" and widgets[widget].get("class") == "ctkPathLineEdit", param
        assert any(p.get("name") == "settingKey" for p in widgets[widget].findall("property")), widget  # history
    unconnected = set(fields) - set(connected)
    assert unconnected == {"slicesVolume", "slabRoi", "resultTable", "saliencyVolume", "task"} | set(path_fields)
    for panel in ("datasetCollapsibleButton", "taskCollapsibleButton", "sliceSelectionCollapsibleButton",
                  "predictCollapsibleButton", "saliencyCollapsibleButton"):
        assert widgets[panel].get("class") == "ctkCollapsibleButton"


def test_widget_code_uses_only_widgets_of_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    widgets = set(_ui_widgets())
    assert used and used <= widgets, f"not in RheumAI.ui: {sorted(used - widgets)}"


def test_module_file_structure_and_no_install_at_import():
    tree = _module_ast()
    for name in ("RheumAI", "RheumAIWidget", "RheumAILogic", "RheumAITest", "RheumAIParameterNode"):
        _class(tree, name)
    bases = {c.name: [ast.unparse(b) for b in c.bases] for c in tree.body if isinstance(c, ast.ClassDef)}
    assert bases["RheumAILogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["RheumAITest"] == ["ScriptedLoadableModuleTest"]
    # heavy or optional packages are imported inside functions only
    top_imports = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_imports.add((node.module or "").split(".")[0])
    assert top_imports <= {"__future__", "logging", "os", "sys", "pathlib", "typing", "qt", "vtk", "slicer", "ctk"}
    source = MODULE_PY.read_text()
    assert "pip_ensure(" in source and "pip_install(" in source and "installTorch(" in source
    assert "confirmOkCancelDisplay(" in source


def _calls_on(tree: ast.AST, owner: str) -> list[tuple[str, set[str]]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and ast.unparse(node.func.value) == owner:
            out.append((node.func.attr, {k.arg for k in node.keywords if k.arg}))
    return out


def test_slicer_logic_calls_the_console_logic_with_valid_arguments():
    pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
    from rheumai_mrml.logic import RheumAIConsoleLogic

    calls = _calls_on(_class(_module_ast(), "RheumAILogic"), "self.console")
    assert {m for m, _ in calls} >= {"selectSlices", "predict", "setSaliencyOpacity", "modelCard"}
    for method, keywords in calls:
        fn = getattr(RheumAIConsoleLogic, method, None)
        assert fn is not None, f"RheumAIConsoleLogic has no {method}"
        params = inspect.signature(fn).parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        assert has_var_kw or keywords <= set(params), f"{method}: unknown keywords {keywords - set(params)}"


def test_widget_calls_the_slicer_logic_with_valid_arguments():
    tree = _module_ast()
    logic = _class(tree, "RheumAILogic")
    methods = {f.name: f for f in logic.body if isinstance(f, ast.FunctionDef)}
    calls = _calls_on(_class(tree, "RheumAIWidget"), "self.logic")
    assert calls
    for method, keywords in calls:
        assert method in methods, f"widget calls RheumAILogic.{method}, which does not exist"
        args = methods[method].args
        names = {a.arg for a in args.args + args.kwonlyargs}
        assert args.kwarg is not None or keywords <= names, f"{method}: unknown keywords {keywords - names}"
    # background jobs: the widget passes them as callables to _startBackground
    refs = set(re.findall(r"self\.logic\.(\w+)", MODULE_PY.read_text()))
    assert {"buildDataset", "train", "predictBatch", "predictStudy", "cancel"} <= refs <= \
        set(methods) | {"logCallback", "console"}
    from rheumai_mrml.logic import RheumAIConsoleLogic

    for method, keywords in _calls_on(_class(tree, "RheumAIWidget"), "self.logic.console"):
        params = inspect.signature(getattr(RheumAIConsoleLogic, method)).parameters
        assert keywords <= set(params), f"console.{method}: unknown keywords {keywords - set(params)}"
    for name in ("buildDataset", "train", "predictBatch", "selectSlicesBatch", "predictStudy"):
        names = {a.arg for a in methods[name].args.args}
        assert {"waitForCompletion", "progressCallback", "completedCallback"} <= names


def test_worker_jobs_match_the_protocol():
    from rheumai_mrml.process import JOBS

    tree = ast.parse((MODULE / "Resources" / "Scripts" / "rheumai_worker.py").read_text())
    (table,) = [n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "JOBS"]
    jobs = [k.value for k in table.keys]
    assert sorted(jobs) == sorted(JOBS)
    logic_jobs = set(re.findall(r'self\._run\("(\w+)"', MODULE_PY.read_text()))
    assert logic_jobs == set(JOBS) - {"predict"}  # predict: PredictJob, through the console logic
    assert "self.console.startPredictStudy(" in MODULE_PY.read_text()


def test_readme_console_example_matches_the_logic():
    readme = (ROOT / "README.md").read_text()
    if "RheumAILogic()" not in readme:
        pytest.skip("README has no console example yet")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "RheumAILogic()" in b]
    assert blocks
    tree = _module_ast()
    methods = {f.name: f for f in _class(tree, "RheumAILogic").body if isinstance(f, ast.FunctionDef)}
    for block in blocks:
        for method, keywords in _calls_on(ast.parse(block), "logic"):
            assert method in methods, f"README calls RheumAILogic.{method}, which does not exist"
            args = methods[method].args
            names = {a.arg for a in args.args + args.kwonlyargs}
            assert args.kwarg is not None or keywords <= names, f"README {method}: unknown {keywords - names}"
