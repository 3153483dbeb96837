"""Plot chart nodes over table columns (Slicer's Plots module data: chart -> series -> table).

A chart is saved with the scene as MRML XML (title, axis titles, series references) and its
values live in the table node it plots (saved as TSV by the table storage node). Works with the
real Slicer and with ``slicer-core``; inside Slicer the widget shows a chart with
``slicer.modules.plots.logic().ShowChartInLayout(chart)``.
"""

from __future__ import annotations

from typing import Sequence

import slicer

# Matplotlib's "tab10" colours: distinguishable series, the same in every chart.
SERIES_COLORS = ((0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
                 (0.58, 0.404, 0.741), (0.549, 0.337, 0.294))


def line_chart(scene: "slicer.vtkMRMLScene", table: "slicer.vtkMRMLTableNode", x: str, ys: Sequence[str],
               title: str, x_title: str = "", y_title: str = "", name: str | None = None,
               dashed: Sequence[str] = ()) -> "slicer.vtkMRMLPlotChartNode":
    """A chart with one line series per column in ``ys`` against column ``x`` of ``table``.

    Columns in ``dashed`` are drawn dashed (reference lines such as the ROC diagonal). Missing
    columns raise KeyError naming them."""
    names = {table.GetTable().GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())}
    absent = [c for c in (x, *ys) if c not in names]
    if absent:
        raise KeyError(f"table '{table.GetName()}' has no column(s) {absent}; it has {sorted(names)}")
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name or title)
    chart.SetTitle(title)
    chart.SetXAxisTitle(x_title or x)
    chart.SetYAxisTitle(y_title)
    chart.SetLegendVisibility(len(ys) > 1)
    for i, y in enumerate(ys):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{chart.GetName()} {y}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(x)
        series.SetYColumnName(y)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)  # x/y line (Plots module "Line")
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash if y in dashed
                            else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
        series.SetColor(*SERIES_COLORS[i % len(SERIES_COLORS)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


def chart_series(chart: "slicer.vtkMRMLPlotChartNode") -> list["slicer.vtkMRMLPlotSeriesNode"]:
    """The series of a chart, in order."""
    return [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
