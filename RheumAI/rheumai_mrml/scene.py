"""Result scene for 3D Slicer, written with Slicer's own MRML library (``slicer-core``).

``write_result_scene`` builds a scene with the study as background volume, the saliency as a
coloured foreground overlay (colour table + colour legend, slice views set to show it), a table of
the result, all results under the study in the subject hierarchy, and saves it with the scene's
own writer: ``.mrb`` (one zip file, ``vtkMRMLScene.WriteToMRB``) or ``.mrml`` with its data files
beside it (storage nodes + ``vtkMRMLScene.Commit``). The scene's version string is set to the
targeted Slicer release, so Slicer opens it as one of its own.

``new_scene`` gives a scene with the application-free logics that Slicer's application would set
(application, colours, subject hierarchy, volumes, markups, tables, data I/O cache): used to write
and to read back scenes here and by the pytest fixture.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk
import slicer
import vtk

from rheumai.errors import InputError

from .hierarchy import place_under
from .nodes import volume_node_from_image
from .overlay import show_saliency
from .tables import results_table

# The newest Slicer release (git tag v5.12.3). slicer-core's own version (5.12.4.0) is a package
# version, not a Slicer release: a scene claiming it would name an application that does not exist.
DEFAULT_SLICER_VERSION = "5.12.3"

# Slicer's revision is its commit count plus fixed offsets (Slicer's CMakeLists.txt,
# Slicer_WC_COMMIT_COUNT_OFFSET); measured on the Slicer git tags. A scene whose revision is <= 0
# is treated as a legacy scene (e.g. models assumed in RAS), so a real revision must be written.
KNOWN_REVISIONS = {"5.8.0": 33216, "5.8.1": 33241, "5.10.0": 34045, "5.12.0": 34621, "5.12.3": 34627}


def scene_version_string(slicer_version: str = DEFAULT_SLICER_VERSION, revision: int | None = None) -> str:
    """``"Slicer <major>.<minor>.<patch> <revision>"``, the format Slicer writes in .mrml files.

    Without ``revision`` the version must be a Slicer release listed in ``KNOWN_REVISIONS`` (a
    written scene names an application that exists); with it, any version is accepted.
    """
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", slicer_version.strip())
    if not m:
        raise ValueError(f"slicer_version must look like 5.12.3, got {slicer_version!r}")
    if revision is None:
        if slicer_version.strip() not in KNOWN_REVISIONS:
            raise ValueError(f"Slicer {slicer_version} is not a known release ({', '.join(KNOWN_REVISIONS)}); "
                             "pass revision= to name another build")
        revision = KNOWN_REVISIONS[slicer_version.strip()]
    if int(revision) <= 0:
        raise ValueError("revision must be > 0 (Slicer treats revision 0 as a legacy scene)")
    return f"Slicer {slicer_version.strip()} {int(revision)}"


@dataclass
class MRMLContext:
    """A scene with the logics Slicer's application would attach (kept alive by this object)."""

    scene: Any
    app_logic: Any
    logics: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None

    def close(self) -> None:
        self.scene.Clear(1)
        if self.cache_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


def new_scene(cache_dir: str | Path | None = None, slicer_version: str = DEFAULT_SLICER_VERSION) -> MRMLContext:
    """A vtkMRMLScene with application, colour, subject-hierarchy, volumes, markups and tables
    logics and a data I/O cache (needed to read .mrb files), without any Qt application.

    The scene's version string is set to ``slicer_version`` (slicer-core's own, "slicer-core
    4.0.0 0", would make Slicer warn about another application and treat the scene as legacy)."""
    scene = slicer.vtkMRMLScene()
    scene.SetVersion(scene_version_string(slicer_version))
    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="rheumai-mrml-cache-"))
    cache_manager = slicer.vtkCacheManager()
    cache_manager.SetRemoteCacheDirectory(str(cache))
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache_manager)
    scene.SetCacheManager(cache_manager)
    scene.SetDataIOManager(io_manager)

    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    logics: dict[str, Any] = {"cache_manager": cache_manager, "io_manager": io_manager}
    # vtkSlicerColorLogic (the Colors module's) needs the application's share folder, so it is not
    # set; its static AddDefaultColorLegendDisplayNode works without an instance, and the one node
    # class it would register is registered here.
    legend_class = slicer.vtkMRMLColorLegendDisplayNode()
    scene.RegisterNodeClass(legend_class)
    for module, cls in (("Volumes", "vtkSlicerVolumesLogic"),
                        ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
                        ("Markups", "vtkSlicerMarkupsLogic"), ("Tables", "vtkSlicerTablesLogic")):
        logic = getattr(slicer, cls)()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(module, logic)
        logics[module] = logic
    return MRMLContext(scene=scene, app_logic=app, logics=logics,
                       cache_dir=None if cache_dir else str(cache))


def build_result_scene(scene: Any, source: sitk.Image, saliency: sitk.Image | None, result: dict,
                       name: str | None = None, opacity: float = 0.5) -> dict[str, Any]:
    """Add the result nodes to ``scene``: background, saliency overlay, table, hierarchy.

    Returns {"source", "saliency", "table", "legend", "views"} (nodes; saliency/legend may be None).
    """
    name = name or _name_from(result)
    src = volume_node_from_image(scene, source, name)
    src.SetAttribute("RheumAI.Role", "input")
    sal_node = legend = None
    views: list = []
    if saliency is not None:
        sal_node = volume_node_from_image(scene, _as_float(saliency), f"{name} saliency")
        sal_node.SetAttribute("RheumAI.Role", "saliency")
        method = (result.get("saliency_method") or result.get("saliency") or "")
        if isinstance(method, str) and method:
            sal_node.SetAttribute("RheumAI.SaliencyMethod", method)
        shown = show_saliency(src, sal_node, opacity=opacity, create_views=True)
        legend, views = shown["legend"], shown["views"]
    else:
        from .overlay import set_slice_viewer_layers

        views = set_slice_viewer_layers(scene, src, None, 0.0, create_views=True)
    table = results_table(scene, dict(result, study=result.get("study") or name), name=f"{name} result")
    table.SetAttribute("RheumAI.Role", "result")
    place_under(src, [n for n in (sal_node, table) if n is not None])
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    if selection is not None:
        selection.SetActiveVolumeID(src.GetID())
        selection.SetSecondaryVolumeID(sal_node.GetID() if sal_node else None)
        selection.SetActiveTableID(table.GetID())
    return {"source": src, "saliency": sal_node, "table": table, "legend": legend, "views": views}


def save_scene(scene: Any, out_path: str | Path) -> Path:
    """Save ``scene`` as ``.mrb`` or as ``.mrml`` + data files next to it, atomically.

    .mrb: written by ``WriteToMRB`` into a temporary folder beside the target, then renamed.
    .mrml: each storable node is written by its default storage node to ``<stem>_data/``, then
    the scene file is committed under a temporary name and renamed (data before scene file, so a
    reader never finds a scene pointing at missing data).
    """
    out = Path(out_path).absolute()
    suffix = out.suffix.lower()
    if suffix not in (".mrb", ".mrml"):
        raise InputError(out, "scene file name must end in .mrb or .mrml")
    out.parent.mkdir(parents=True, exist_ok=True)
    messages = slicer.vtkMRMLMessageCollection()
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    tmp: Path | None = None
    try:
        if suffix == ".mrb":
            tmp = tmpdir / out.name
            ok = scene.WriteToMRB(str(tmp), None, messages)
            _raise_if_failed(ok, messages, out)
            os.replace(tmp, out)
        else:
            data_dir = out.parent / f"{out.stem}_data"
            data_dir.mkdir(exist_ok=True)
            used: set[str] = set()
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode")):
                node = scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")
                if not node.GetSaveWithScene():
                    continue
                storage = node.GetStorageNode()
                if storage is None:
                    node.AddDefaultStorageNode()
                    storage = node.GetStorageNode()
                if storage is None:
                    continue
                ext = storage.GetDefaultWriteFileExtension()
                fname = _unique(_safe(node.GetName() or node.GetID()), ext, used)
                storage.SetFileName(str(data_dir / fname))
                if not storage.WriteData(node):
                    raise OSError(f"{data_dir / fname}: Slicer could not write node '{node.GetName()}'")
            # Same folder as the target: Commit writes data paths relative to the scene file; the
            # part before the first dot is kept, as Slicer derives the "<name>_Private" folder from it.
            tmp = out.parent / f"{out.stem}.tmp{os.getpid()}.mrml"
            scene.SetRootDirectory(str(out.parent))
            scene.SetURL(str(tmp))
            ok = scene.Commit(None, messages)
            _raise_if_failed(ok, messages, out)
            os.replace(tmp, out)
            scene.SetURL(str(out))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return out


def write_result_scene(out_path: str | Path, source: sitk.Image, saliency: sitk.Image | None, result: dict,
                       slicer_version: str = DEFAULT_SLICER_VERSION, opacity: float = 0.5) -> Path:
    """Write a Slicer scene (.mrb, or .mrml with data files) showing one prediction.

    source: the study (3D, LPS). saliency: map in [0, 1] in the source's geometry, or None.
    result: the prediction as a dict (``PredictionResult.to_dict()``), shown as a table.
    slicer_version: the Slicer release the scene declares (``Slicer 5.12.3 <revision>``).
    """
    ctx = new_scene(slicer_version=slicer_version)
    try:
        build_result_scene(ctx.scene, source, saliency, result, opacity=opacity)
        return save_scene(ctx.scene, out_path)
    finally:
        ctx.close()


def load_scene(path: str | Path, ctx: MRMLContext | None = None) -> MRMLContext:
    """Read a .mrml or .mrb file into a new (or the given) application-free scene."""
    path = Path(path).absolute()
    if not path.is_file():
        raise InputError(path, "scene file not found")
    ctx = ctx or new_scene()
    messages = slicer.vtkMRMLMessageCollection()
    if path.suffix.lower() == ".mrb":
        ok = ctx.scene.ReadFromMRB(str(path), False, messages)
    else:
        ctx.scene.SetURL(str(path))
        ok = ctx.scene.Import(messages)
    if not ok or messages.GetNumberOfMessagesOfType(vtk.vtkCommand.ErrorEvent):
        raise InputError(path, f"Slicer could not read the scene: {messages.GetAllMessagesAsString()}")
    return ctx


def _raise_if_failed(ok: Any, messages: Any, out: Path) -> None:
    if not ok or messages.GetNumberOfMessagesOfType(vtk.vtkCommand.ErrorEvent) > 0:
        raise OSError(f"{out}: Slicer could not write the scene: {messages.GetAllMessagesAsString()}")


def _as_float(image: sitk.Image) -> sitk.Image:
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def _name_from(result: dict) -> str:
    path = result.get("source_path")
    if path:
        base = Path(str(path)).name
        for suffix in (".nii.gz", ".nrrd", ".nii", ".mha"):
            if base.lower().endswith(suffix):
                return base[: -len(suffix)] or "Study"
        return base or "Study"
    return "Study"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "node"


def _unique(stem: str, ext: str, used: set[str]) -> str:
    fname, i = f"{stem}.{ext}", 1
    while fname.lower() in used:
        i += 1
        fname = f"{stem}_{i}.{ext}"
    used.add(fname.lower())
    return fname
