"""Render a saved RheumAI result scene to PNG off-screen: what Slicer's slice views show.

The slice images come from Slicer's own ``vtkMRMLSliceLogic`` (the same reslicing, window/level,
colour table, threshold and foreground blending as the application's Red / Green views), read
from the scene file with ``slicer-core``; VTK draws them off-screen with the colour legend and
the result of the scene's table. Used for the Extensions Index screenshot when the application is
not available:

    python -m rheumai_mrml.render scene.mrb screenshot.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import slicer
import vtk

from rheumai.atomic import atomic_path

from .scene import load_scene
from .tables import table_rows

VIEWS = (("Red", "Sagittal"), ("Green", "Coronal"))


def _role(scene: Any, role: str) -> Any:
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute("RheumAI.Role") == role:
            return node
    return None


def slice_view_rgba(ctx: Any, layout: str, orientation: str, size: tuple[int, int]) -> vtk.vtkImageData:
    """RGBA image (width x height) of one slice view, as the application's slice logic blends it."""
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(ctx.app_logic)
    logic.SetMRMLScene(ctx.scene)
    node = logic.AddSliceNode(layout)
    node.SetOrientation(orientation)
    node.SetDimensions(size[0], size[1], 1)
    logic.FitSliceToAll()
    conn = logic.GetImageDataConnection()
    producer = conn.GetProducer()
    producer.Update()
    out = vtk.vtkImageData()
    out.DeepCopy(producer.GetOutputDataObject(conn.GetIndex()))
    return out


def render_scene_png(scene_path: str | Path, out_png: str | Path, view_size: tuple[int, int] = (560, 560),
                     views: Sequence[tuple[str, str]] = VIEWS, title: str = "RheumAI") -> Path:
    """Render the scene's slice views side by side with the saliency legend and the result text."""
    ctx = load_scene(scene_path)
    try:
        scene = ctx.scene
        images = [slice_view_rgba(ctx, layout, orientation, view_size) for layout, orientation in views]
        width, height = view_size[0] * len(views), view_size[1] + 70
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        window.SetSize(width, height)
        renderers = []
        for i, img in enumerate(images):
            ren = vtk.vtkRenderer()
            renderers.append(ren)
            ren.SetViewport(i / len(views), 0.0, (i + 1) / len(views), view_size[1] / height)
            ren.SetBackground(0, 0, 0)
            actor = vtk.vtkImageActor()
            actor.GetMapper().SetInputData(img)
            ren.AddActor(actor)
            ren.GetActiveCamera().ParallelProjectionOn()
            ren.ResetCamera()
            ren.GetActiveCamera().SetParallelScale(img.GetDimensions()[1] / 2.0)
            label = vtk.vtkTextActor()
            label.SetInput(f"{views[i][1].lower()} (Slicer {views[i][0]} view)")
            label.GetTextProperty().SetFontSize(14)
            label.GetTextProperty().SetColor(0.9, 0.9, 0.9)
            label.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
            label.GetPositionCoordinate().SetValue(0.015, 0.015)
            ren.AddViewProp(label)
            window.AddRenderer(ren)
        top = vtk.vtkRenderer()
        top.SetViewport(0.0, view_size[1] / height, 1.0, 1.0)
        top.SetBackground(0.12, 0.12, 0.14)
        text = vtk.vtkTextActor()
        text.SetInput(_summary(scene, title))
        text.GetTextProperty().SetFontSize(16)
        text.GetTextProperty().SetColor(1, 1, 1)
        text.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        text.GetPositionCoordinate().SetValue(0.01, 0.3)
        top.AddViewProp(text)
        window.AddRenderer(top)
        saliency = _role(scene, "saliency")
        if saliency is not None and saliency.GetDisplayNode() is not None:
            bar = vtk.vtkScalarBarActor()
            lut = vtk.vtkLookupTable()
            lut.DeepCopy(saliency.GetDisplayNode().GetColorNode().GetLookupTable())
            lut.SetTableRange(0.0, 1.0)
            bar.SetLookupTable(lut)
            bar.SetTitle("Saliency")
            bar.SetNumberOfLabels(3)
            bar.SetLabelFormat("%.1f")
            bar.SetOrientationToVertical()
            bar.SetPosition(0.9, 0.1)
            bar.SetWidth(0.08)
            bar.SetHeight(0.8)
            renderers[-1].AddViewProp(bar)
        window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(window)
        grab.ReadFrontBufferOff()
        grab.Update()
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            writer = vtk.vtkPNGWriter()
            writer.SetFileName(str(tmp))
            writer.SetInputConnection(grab.GetOutputPort())
            writer.Write()
        window.Finalize()
        return out
    finally:
        ctx.close()


def _summary(scene: Any, title: str) -> str:
    table = _role(scene, "result")
    if table is None:
        return title
    (row,) = table_rows(table)[:1] or [{}]
    parts = [f"{title}: {row.get('study', '')}"]
    if "probability" in row:
        parts.append(f"probability {row['probability']:.3f}")
    if "label" in row and "threshold" in row:
        parts.append(f"class {row['label']} at threshold {row['threshold']:.2f}")
    if row.get("model_id"):
        parts.append(f"model {row['model_id']}")
    if row.get("saliency"):
        parts.append(f"saliency {row['saliency']}")
    return "   ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rheumai_mrml.render", description=__doc__.splitlines()[0])
    ap.add_argument("scene", help=".mrb or .mrml written by RheumAI")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--size", type=int, nargs=2, default=(560, 560), metavar=("W", "H"), help="pixels per view")
    a = ap.parse_args(argv)
    print(render_scene_png(a.scene, a.out, tuple(a.size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
