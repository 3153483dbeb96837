"""The hand radiograph SvdH task declaration for the registry."""

from __future__ import annotations

from typing import Any

from ..base import InputSpec, Task
from . import predict as P
from .dataset import HandParams
from .model import build_model, default_architecture


def default_params() -> dict[str, Any]:
    return HandParams().to_dict()


def preprocess(study_inputs: Any, params: dict[str, Any] | None = None) -> Any:
    """Study inputs (``{"hand": path}`` or a path) -> the prepared radiograph sample."""
    inputs = study_inputs if isinstance(study_inputs, dict) else {P.ROLE: study_inputs}
    return P.load_sample(inputs, {"preprocessing": params or default_params()})


TASK = Task(
    name="hand_svdh",
    title="Hand radiograph SvdH scoring: total score, severity class, per-joint erosion and narrowing",
    description="Predicts the van der Heijde modified Sharp score of one hand and wrist from a PA radiograph: "
                "the paper's whole-hand regression of the total plus a severity class head (ResNet or "
                "MobileNetV2, fine-tuning schemes, stacking ensemble, Grad-CAM), and a joint-level path "
                "(heatmap landmarks at the 22 SvdH areas, a crop per joint, erosion 0-5 and narrowing 0-4 heads, "
                "summed); landmarks can be corrected and the joints re-scored.",
    reference="Bo, Coates, Papiez et al. (whole-hand SvdH regression from hand radiographs); SvdH: van der Heijde, "
              "J Rheumatol 2000",
    inputs=(InputSpec(P.ROLE, "PA hand and wrist radiograph (DICOM CR / DX, PNG, JPEG, TIFF), one hand",
                      sequence="radiograph", orientation="any"),),
    head="regression",
    preprocess=preprocess,
    build_model=build_model,
    default_architecture=default_architecture,
    default_params=default_params,
    metrics=("pcc", "rmse", "mae", "icc", "bland_altman", "class_accuracy", "weighted_kappa", "class_mae",
             "confusion", "landmark_error_mm", "per_joint_mae"),
    saliency_targets={P.ROLE: "layer3"},
    outputs=("total (one-hand SvdH, 0-140)", "severity class", "per-joint erosion / JSN table",
             "landmark point list (22 SvdH areas, LPS)", "Grad-CAM map on the radiograph geometry"),
    api={"synth": "rheumai.tasks.hand_svdh.synth:make_cohort",
         "train": "rheumai.tasks.hand_svdh.train:train",
         "evaluate": "rheumai.tasks.hand_svdh.evaluate:evaluate",
         "load_config": "rheumai.tasks.hand_svdh.train:load_config",
         "pretrain": "rheumai.tasks.hand_svdh.train:pretrain_backbone",
         "ensemble": "rheumai.tasks.hand_svdh.ensemble:fit_stacking",
         "predict": "rheumai.api:predict", "predict_batch": "rheumai.api:predict_many",
         "rescore": "rheumai.tasks.hand_svdh.predict:rescore",
         "rescore_points": "rheumai.tasks.hand_svdh.predict:rescore_points",
         "demo": "rheumai.tasks.hand_svdh.demo:run_demo"},
    load_sample=P.load_sample,
    to_tensors=P.to_tensors,
    postprocess=P.postprocess,
    saliency_maps=P.saliency_maps,
    saliency_methods=P.SALIENCY_METHODS,
)
