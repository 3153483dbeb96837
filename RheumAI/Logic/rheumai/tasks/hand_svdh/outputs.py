"""The hand SvdH task's files beside the engine's (``rheumai predict`` / ``rheumai.api``): the
per-joint table and a Slicer scene with the landmarks as a labelled point list.

Per radiograph ``<key>``: ``<key>.json`` (values), ``<key>_joints.csv`` (per-joint grades and
points), ``<key>_saliency.nrrd`` (one-slice map in [0, 1] on the radiograph's grid) and with
``scene=True`` ``<key>.mrb`` (radiograph, saliency, result table, landmark point list, per-joint
table; needs slicer-core).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ...atomic import atomic_path, write_json, write_text
from ...paths import safe_child
from .predict import ROLE

TABLE_KEYS = ("total", "class", "class_name", "joint_total", "joint_erosion", "joint_jsn", "laterality",
              "mirrored", "spacing_calibrated", "spacing_source", "landmarks_source")


def result_from(res: Any) -> dict[str, Any]:
    """A PredictionResult of this task as {values, points_lps, labels, saliency, source, ...}."""
    v = dict(res.values)
    m = res.maps.get(ROLE)
    return {"values": v, "points_lps": np.asarray(v["landmarks_lps"], float), "labels": list(v["landmark_labels"]),
            "saliency": None if m is None else m.volume, "source": res.source_images.get(ROLE),
            "source_path": res.source_path, "model_id": res.model_id}


def write_result(out_dir: str | Path, key: str, result: dict[str, Any], scene: bool = False) -> dict[str, str]:
    """Write one radiograph's files (see module docstring); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v = result["values"]
    files = {"joints_file": str(write_text(safe_child(out, key, "_joints.csv", what="study key"),
                                           pd.DataFrame(v["joints"]).to_csv(index=False)))}
    if result.get("saliency") is not None:
        path = safe_child(out, key, "_saliency.nrrd", what="study key")
        with atomic_path(path) as tmp:
            sitk.WriteImage(result["saliency"], str(tmp), useCompression=True)
        files["saliency_file"] = str(path)
    src = {"source_path": result.get("source_path"), "model_id": result.get("model_id")}
    if scene:
        from rheumai_mrml.radiograph_scene import write_radiograph_scene

        files["scene_file"] = str(write_radiograph_scene(
            safe_child(out, key, ".mrb", what="study key"), result["source"], result.get("saliency"),
            {**{k: v.get(k) for k in TABLE_KEYS}, "study": key, **src}, points_lps=result["points_lps"],
            labels=result["labels"], rows=v["joints"], rows_name="SvdH joints"))
    path = safe_child(out, key, ".json", what="study key")
    files["result_file"] = str(write_json(path, {**v, **src, "files": files}))
    return files
