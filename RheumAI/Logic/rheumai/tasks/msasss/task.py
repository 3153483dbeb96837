"""The mSASSS task declaration (Chen et al. 2024) for the registry."""

from __future__ import annotations

from typing import Any

from ..base import InputSpec, Task
from . import predict as P
from .model import build_model


def default_params() -> dict[str, Any]:
    return {"input_size": [160, 128], "crop_size": 48, "crop_side_factor": 0.9, "threshold": 0.5,
            "missing": "segment_mean", "max_missing_per_view": 3}


def default_architecture(**kw: Any) -> dict[str, Any]:
    from .train import TrainConfig

    return {**TrainConfig().system_architecture(), **kw}


TASK = Task(
    name="msasss",
    title="mSASSS: vertebral corners on lateral cervical and lumbar radiographs (AS)",
    description="Finds the anterior vertebral corners (heatmap landmarks with soft-argmax, refined per disc level, "
                "anatomy checks), classifies each disc-level crop per lesion type (erosion, sclerosis, squaring, "
                "syndesmophyte, bridging; DenseNet), scores the 24 corners 0-3 by the mSASSS rule with 'not scorable' "
                "kept apart, and sums the total (0-72) with the number of corners scored; an ordinal 0-3 head per "
                "corner is the alternative model. Corrected points re-score.",
    reference="Chen et al. 2024 (deep-learning mSASSS on lateral cervical and lumbar radiographs); mSASSS: "
              "Creemers et al., Ann Rheum Dis 2005",
    inputs=(InputSpec("cervical", "lateral cervical spine radiograph, C2 to T1 (DICOM CR / DX, PNG, JPEG, TIFF)",
                      sequence="radiograph", orientation="any", optional=True),
            InputSpec("lumbar", "lateral lumbar spine radiograph, T12 to S1 (DICOM CR / DX, PNG, JPEG, TIFF)",
                      sequence="radiograph", orientation="any", optional=True)),
    head="keypoints",
    preprocess=lambda inputs, params=None: P.load_sample(inputs),  # {"cervical": path, "lumbar": path} -> views
    build_model=build_model,
    default_architecture=default_architecture,
    default_params=default_params,
    metrics=("corner_accuracy", "corner_confusion_4x4", "lesion_accuracy_sensitivity_specificity",
             "keypoint_error_mm", "success_2mm_4mm", "total_mae", "icc", "bland_altman", "per_level"),
    outputs=("total mSASSS (0-72) with corners scored and the missing-corner rule", "cervical and lumbar subtotals",
             "per-corner table (score, lesion probabilities, status, reason)",
             "24 corner points per study as markups point lists (labels 'C2 lower' ..., status 'missing' where "
             "not scorable)"),
    api={"synth": "rheumai.tasks.msasss.synth:make_cohort",
         "train": "rheumai.tasks.msasss.train:train",
         "evaluate": "rheumai.tasks.msasss.evaluate:evaluate",
         "predict": "rheumai.api:predict",
         "rescore_points": "rheumai.tasks.msasss.predict:rescore_points",
         "scene": "rheumai.tasks.msasss.predict:write_scene",
         "demo": "rheumai.tasks.msasss.demo:run_demo"},
    load_sample=P.load_sample,
    to_tensors=P.to_tensors,
    forward=P.forward,
    postprocess=P.postprocess,
)
