"""Predict-side hooks of the hand SvdH task (:class:`rheumai.engine.predict.Predictor`), re-scoring.

Network input ``{"small", "hires", "hspacing"[, "points"]}`` (see :class:`.model.HandSvdHNet`;
``points`` when re-scoring from corrected landmarks). ``postprocess`` values: ``total`` (whole-hand
regression, 0-140, the paper's path), ``class`` / ``class_name`` / ``class_probabilities``,
``joint_total`` / ``joint_erosion`` / ``joint_jsn`` (sums of the per-joint grades), ``joints``
(per-joint table, points in pixels of the file and LPS mm), ``landmarks_lps`` (K, 3) LPS mm with
``landmark_labels``. Saliency: Grad-CAM of the total on a backbone layer, mapped back through the
letterbox and the mirroring onto the radiograph's own one-slice geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ...landmarks import lps_to_points, points_to_lps
from ...radiograph import Radiograph, as_radiograph
from .dataset import HandParams, Prepared, prepare
from .scoring import (DEFAULT_CLASS_NAMES, EROSION_MASK, JOINT_NAMES, JSN_MASK, MAX_EROSION, MAX_JSN, MAX_TOTAL,
                      joint_table)

ROLE = "hand"
SALIENCY_METHODS = ("gradcam", "gradcampp")


@dataclass
class HandSample:
    """A prepared radiograph (``prep``) and where it came from."""

    prep: Prepared
    points_canon: np.ndarray | None = None  # corrected landmarks (K, 2) canonical full-res px, or None

    @property
    def sources(self) -> dict[str, str | None]:
        return {ROLE: self.prep.rad.path or None}

    @property
    def series_uid(self) -> str | None:
        return self.prep.rad.meta.get("SeriesInstanceUID")

    @property
    def source_images(self) -> dict[str, sitk.Image]:
        return {ROLE: self.prep.rad.image}

    def describe(self) -> dict[str, Any]:
        r = self.prep.rad
        return {"shape": list(r.array.shape), "spacing_mm": list(r.spacing_mm), "spacing_calibrated":
                r.spacing_calibrated, "spacing_source": r.spacing_source, "laterality": r.laterality,
                "mirrored": self.prep.tf.flip_x, "photometric": r.photometric}


def params_of(card: Mapping[str, Any]) -> HandParams:
    return HandParams.from_dict(card.get("preprocessing") or card["architecture"].get("preprocessing", {}))


def load_sample(inputs: Mapping[str, Any], card: dict[str, Any]) -> HandSample:
    """``inputs["hand"]``: a radiograph file (DICOM CR / DX, PNG / JPEG / TIFF), a
    :class:`~rheumai.radiograph.Radiograph` or a one-slice sitk image (bone bright)."""
    return HandSample(prepare(as_radiograph(inputs[ROLE]), params_of(card)))


def to_tensors(sample: HandSample, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    p = sample.prep
    x = {"small": torch.from_numpy(p.small)[None], "hires": torch.from_numpy(p.hires)[None],
         "hspacing": torch.tensor(p.hspacing_mm, dtype=torch.float32)}
    if sample.points_canon is not None:
        x["points"] = torch.as_tensor(p.to_hires(sample.points_canon), dtype=torch.float32)
    return x


def postprocess(outputs: dict[str, torch.Tensor], card: dict[str, Any], sample: HandSample) -> dict[str, Any]:
    """One study's scores, class, per-joint table and landmarks (see module docstring)."""
    p = sample.prep
    names = list(card.get("class_names") or DEFAULT_CLASS_NAMES)
    from ...engine.heads import make_head

    scale = float(card["architecture"]["whole"]["total_scale"])
    total = float(np.clip(float(outputs["total"].reshape(-1)[0]) * scale, 0.0, MAX_TOTAL))
    c = outputs["class"].reshape(1, -1)
    dec = make_head("ordinal", n_classes=c.shape[1] + 1).decode(c)
    probs, cls = dec["probabilities"][0], int(dec["class"][0])
    ero = make_head("ordinal", n_classes=MAX_EROSION + 1).decode(outputs["erosion"])["class"] * EROSION_MASK
    jsn = make_head("ordinal", n_classes=MAX_JSN + 1).decode(outputs["jsn"])["class"] * JSN_MASK
    pts_canon = p.from_hires(outputs["points"].numpy())
    pts_src = p.to_source(pts_canon)
    lps = points_to_lps(p.rad.image, pts_src)
    je, jj = int(ero.sum()), int(jsn.sum())
    return {"total": round(total, 2), "class": cls, "class_name": names[cls] if cls < len(names) else str(cls),
            "class_probabilities": [round(float(v), 4) for v in probs],
            "class_edges": list(params_of(card).class_edges),
            "joint_total": je + jj, "joint_erosion": je, "joint_jsn": jj,
            "joints": joint_table(ero, jsn, pts_src, lps),
            "landmarks_lps": lps.round(3).tolist(), "landmark_labels": list(JOINT_NAMES),
            "landmarks_source": "corrected" if sample.points_canon is not None else "predicted",
            "laterality": p.rad.laterality, "mirrored": bool(p.tf.flip_x),
            "spacing_calibrated": p.rad.spacing_calibrated, "spacing_source": p.rad.spacing_source,
            "summary": f"SvdH total {total:.1f} ({names[cls] if cls < len(names) else cls}); sum of joints {je + jj}",
            "label": cls}


class _Total(torch.nn.Module):
    """The whole-hand total as a one-output network (for Grad-CAM)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.whole = net.whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.whole(x)["total"]


def saliency_maps(model: torch.nn.Module, batch: dict[str, torch.Tensor], samples: Sequence[HandSample],
                  card: dict[str, Any], method: str, target_layer: str | None
                  ) -> tuple[None, list[dict[str, Any]]]:
    """Grad-CAM (or ++) of the total on ``target_layer``; maps on each radiograph's geometry."""
    from ...engine.predict import RoleMap
    from ...saliency import gradcam_backward, normalize_max

    if method not in SALIENCY_METHODS:
        raise ValueError(f"saliency method {method!r} unknown for hand_svdh; choose one of {SALIENCY_METHODS}")
    layer = target_layer or ("stage4" if hasattr(model.whole.backbone, "stage4") else "layer3")
    _, cams = gradcam_backward(_Total(model), batch["small"], f"whole.backbone.{layer}", plusplus=method == "gradcampp")
    out = []
    for sample, cam in zip(samples, cams):
        m = normalize_max(cam.detach().cpu().numpy())[0]  # (1, H, W): one maximum per map

        def to_source(grid: np.ndarray, prep: Prepared = sample.prep) -> sitk.Image:
            return prep.rad.with_array(prep.small_map_to_source(grid))

        out.append({ROLE: RoleMap(role=ROLE, grid=m, images=sample.prep.small[None], overlay=m[None],
                                  input_map=m[None], to_source=to_source)})
    return None, out


def rescore(predictor: Any, radiograph: str | Path | Radiograph, points_lps: np.ndarray,
            saliency: str | None = None) -> Any:
    """Re-score one radiograph with user-corrected landmarks (K, 3) LPS mm, in :data:`JOINT_NAMES`
    order: the joint crops are taken at these points; the whole-hand total is unchanged.

    predictor: a :class:`rheumai.engine.predict.Predictor` (or a checkpoint folder).
    Returns the :class:`~rheumai.engine.predict.PredictionResult`.
    """
    from ...engine.predict import Prepared as EnginePrepared
    from ...engine.predict import Predictor

    pred = predictor if isinstance(predictor, Predictor) else Predictor(predictor)
    pts = np.asarray(points_lps, float)
    if pts.shape != (len(JOINT_NAMES), 3):
        raise ValueError(f"points_lps must be ({len(JOINT_NAMES)}, 3) LPS mm in the order {', '.join(JOINT_NAMES)}")
    sample = load_sample({ROLE: radiograph}, pred.card)
    sample.points_canon = sample.prep.from_source(lps_to_points(sample.prep.rad.image, pts))
    x = to_tensors(sample, pred.card)
    key = Path(sample.prep.rad.path).stem if sample.prep.rad.path else "radiograph"
    return pred.run([EnginePrepared(key=key, name=key, inputs={ROLE: radiograph}, sample=sample, x=x)],
                    saliency=saliency)[0]


def rescore_points(checkpoint: Any, study: Mapping[str, Any], points: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, Any]:
    """The task's ``rescore_points`` entry point: re-score from labelled landmarks.

    study: ``{"hand": path | Radiograph | sitk image}``; points: ``{"hand": {SvdH area label:
    (x, y, z) LPS mm}}`` with all 22 areas of :data:`JOINT_NAMES` placed (a missing one, None or
    NaN, is refused: every joint crop needs its point). Returns the prediction's JSON-able dict.
    """
    from ...errors import InputError

    extra = sorted(set(points) - {ROLE})
    if extra:
        raise InputError(None, f"hand_svdh has the input {ROLE!r} only, not {extra}")
    given = dict(points.get(ROLE) or {})
    unknown = sorted(set(given) - set(JOINT_NAMES))
    if unknown:
        raise InputError(None, f"{unknown} are not SvdH areas ({', '.join(JOINT_NAMES)})")
    absent = [n for n in JOINT_NAMES if given.get(n) is None or not np.isfinite(np.asarray(given[n], float)).all()]
    if absent:
        raise InputError(None, f"re-scoring needs all {len(JOINT_NAMES)} landmarks; place {', '.join(absent)}")
    if study.get(ROLE) is None:
        raise InputError(None, f"hand_svdh needs the input {ROLE!r}")
    pts = np.array([np.asarray(given[n], float).reshape(3) for n in JOINT_NAMES])
    return rescore(checkpoint, study[ROLE], pts).to_dict()
