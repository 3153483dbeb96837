"""Predict-side hooks for :class:`rheumai.engine.predict.Predictor` (see tasks/base.py).

``load_sample`` reads the views; ``to_tensors`` gives each view's bone-bright array and spacing;
``forward`` runs the networks of :class:`.predict.MsasssSystem` (landmarks, refinement, crop
classifiers) and returns raw tensors per view: ``points_<view>`` (B, 21, 2) pixels,
``confidence_<view>`` (B, 21), ``levels_<view>`` (B, 6, 11) probabilities (erosion, sclerosis,
squaring, syndesmophyte per slot, bridging, scorable per slot) and ``ordinal_<view>`` (B, 6, 2);
``postprocess`` applies the anatomy checks, the corner rule and the totals, and adds the corner
points in LPS. The engine predicts one study per batch here (views differ in size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk
import torch

from ...radiograph import Radiograph
from .anatomy import VIEWS, check_points, disc_levels, point_names
from .console import _read, corner_table, study_values
from .predict import MsasssSystem, classify_levels, locate, score_levels, view_points_lps
from .scoring import CORNER_LESIONS, total_score

_SLOTS = [(les, s) for les in CORNER_LESIONS for s in (0, 1)] + [("bridging", 0), ("scorable", 0), ("scorable", 1)]


@dataclass
class MsasssSample:
    """One study: radiographs per view, their source paths and images (for the writers)."""

    rads: dict[str, Radiograph]
    sources: dict[str, str] = field(default_factory=dict)
    source_images: dict[str, sitk.Image] = field(default_factory=dict)
    series_uid: str | None = None


def load_sample(inputs: Mapping[str, Any], card: dict[str, Any]) -> MsasssSample:
    rads = _read(inputs)
    return MsasssSample(rads, {v: r.path for v, r in rads.items()}, {v: r.image for v, r in rads.items()})


def to_tensors(sample: MsasssSample, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for v, r in sample.rads.items():
        out[v] = torch.from_numpy(np.ascontiguousarray(r.array, np.float32))
        out[f"{v}_spacing"] = torch.tensor(r.spacing_mm, dtype=torch.float64)
    return out


def forward(model: MsasssSystem, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for v in VIEWS:
        if v not in batch:
            continue
        for b in range(batch[v].shape[0]):
            arr = batch[v][b].cpu().numpy()
            sp = tuple(float(s) for s in batch[f"{v}_spacing"][b])
            pts, conf = locate(model, arr, sp, v)
            levels = classify_levels(model, arr, sp, v, pts)
            lv = np.array([[lev["lesions"][k][s] if k in CORNER_LESIONS else
                            (lev["bridging"] if k == "bridging" else lev["scorable"][s]) for k, s in _SLOTS]
                           for lev in levels])
            ord = (np.array([lev["ordinal"]["score"] for lev in levels]) if "ordinal" in levels[0]
                   else np.full((6, 2), -1))
            for key, val in ((f"points_{v}", pts), (f"confidence_{v}", conf), (f"levels_{v}", lv),
                             (f"ordinal_{v}", ord)):
                out.setdefault(key, []).append(torch.as_tensor(np.asarray(val, np.float64)))
    return {k: torch.stack(v) for k, v in out.items()}


def _levels(view: str, lv: np.ndarray, ord: np.ndarray) -> list[dict[str, Any]]:
    res = []
    for i, lvl in enumerate(disc_levels(view)):
        vals = dict(zip(_SLOTS, lv[i].tolist()))
        d = {"level": lvl.name, "corners": list(lvl.corners),
             "lesions": {les: [vals[(les, 0)], vals[(les, 1)]] for les in CORNER_LESIONS},
             "bridging": vals[("bridging", 0)], "scorable": [vals[("scorable", 0)], vals[("scorable", 1)]]}
        if (ord[i] >= 0).all():
            d["ordinal"] = {"score": [int(x) for x in ord[i]]}
        res.append(d)
    return res


def postprocess(outputs: Mapping[str, torch.Tensor], card: dict[str, Any], sample: MsasssSample) -> dict[str, Any]:
    """One study's raw outputs -> corner scores, flags, totals, LPS points (JSON-able)."""
    views = {}
    for v, rad in sample.rads.items():
        pts = outputs[f"points_{v}"].numpy()
        conf = outputs[f"confidence_{v}"].numpy()
        check = check_points(v, pts, rad.array.shape, rad.spacing_mm, confidence=conf)
        levels = _levels(v, outputs[f"levels_{v}"].numpy(), outputs[f"ordinal_{v}"].numpy())
        scored = score_levels(v, levels, check)
        views[v] = {"view": v, "points_xy": pts.tolist(), "point_names": point_names(v), "confidence": conf.tolist(),
                    "check": check, "levels": levels, **scored}
    result: dict[str, Any] = {"views": views, "total": total_score({v: r["scores"] for v, r in views.items()})}
    if all(r.get("ordinal_scores") for r in views.values()):
        result["total_ordinal"] = total_score({v: r["ordinal_scores"] for v, r in views.items()})
    result["points"] = {v: view_points_lps(sample.rads[v].image, r) for v, r in views.items()}
    result["corner_table"] = corner_table(result)
    result.update(study_values(result))
    return result
