"""The NegSpA-AI task declaration (Lu et al., QIMS 2024) for the registry."""

from __future__ import annotations

from ..base import InputSpec, RoiSpec, Task
from .clinical import CLINICAL_VARIABLES
from .model import build_model, default_architecture
from .preprocess import NegSpaParams, preprocess
from . import predict as _predict


TASK = Task(
    name="negspa",
    title="NegSpA-AI: HLA-B27-negative axial SpA (sacroiliac MRI + clinical)",
    description="Classifies HLA-B27-negative axial spondyloarthritis from T1W, T2W and fat-suppressed sacroiliac "
                "MRI (three ResNet branches, left/right joint halves, max over halves) fused with clinical SpA "
                "features; MixCut augmentation; two-stage training.",
    reference="Lu et al., Quant Imaging Med Surg 2024 (NegSpA-AI); code dump github.com/MedImgPro/ASMixCut",
    inputs=(InputSpec("t1", "T1-weighted sacroiliac MRI", sequence="T1", orientation="any"),
            InputSpec("t2", "T2-weighted sacroiliac MRI", sequence="T2", orientation="any"),
            InputSpec("stir", "fat-suppressed T2 (STIR / SPAIR) sacroiliac MRI", sequence="STIR", orientation="any",
                      accepts=("T2 fat-suppressed", "SPAIR", "SPIR", "Dixon water"))),
    head="binary",
    preprocess=preprocess,
    build_model=build_model,
    default_architecture=default_architecture,
    default_params=NegSpaParams().to_dict,
    roi=RoiSpec("box", "axis-aligned box around both sacroiliac joints (LPS mm)",
                formats=("JSON {min_lps, max_lps} or {center_lps, size_mm}", "Slicer markups ROI .mrk.json",
                         "CSV min_x..max_z or center_x..size_z")),
    clinical=CLINICAL_VARIABLES,
    saliency_targets={"t1": "layer4", "t2": "layer4", "stir": "layer4"},
    outputs=("probability", "label", "threshold", "probability per joint half (right, left)",
             "Grad-CAM volume per sequence (each in its own series' geometry)", "montage PNG per sequence"),
    api={"synth": "rheumai.tasks.negspa.synth:make_cohort",
         "build_dataset": "rheumai.dataset.build:build_image_dataset",
         "clinical_table": "rheumai.tasks.negspa.clinical:parse_table",
         "train": "rheumai.engine.train:train", "evaluate": "rheumai.engine.evaluate:evaluate",
         "predict": "rheumai.api:predict", "predict_batch": "rheumai.api:predict_many",
         "predictor": "rheumai.engine.predict:Predictor"},
    load_sample=_predict.load_sample,
    to_tensors=_predict.to_tensors,
    forward=_predict.forward,
    postprocess=_predict.postprocess,
    saliency_maps=_predict.saliency_maps,
    saliency_methods=_predict.SALIENCY_METHODS,
    recipe="rheumai.tasks.negspa.train:RECIPE",
)
