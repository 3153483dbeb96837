"""The cervical RA task (Lebouille-Veldman et al. 2025), declared for the registry.

Input: one sagittal T2 series; network input (C, H, W) = (6 slices right -> left, superior -> inferior,
anterior -> posterior), 1 mm, 512 x 512 (:mod:`.slices`); one logit (deformity at follow-up).
"""

from __future__ import annotations

from typing import Any, Mapping

import SimpleITK as sitk

from ...io import Study
from ...saliency import METHODS as SALIENCY_METHODS
from ..base import InputSpec, Task
from . import predict as _predict
from .model import build_model, default_architecture
from .predict import ROLE
from .slices import SliceParams, SliceSelection


def preprocess(study_inputs: Mapping[str, Any] | Study | sitk.Image | str,
               params: Mapping[str, Any] | SliceParams | None = None) -> SliceSelection:
    """``select_slices`` on the sagittal T2: ``study_inputs`` is {"t2_sag": Study | image | path}
    (or that one value); ``params`` a SliceParams or its dict. The selection's ``to_source`` maps
    (C, H, W) maps back into the series' grid."""
    inputs = study_inputs if isinstance(study_inputs, Mapping) else {ROLE: study_inputs}
    p = params.to_dict() if isinstance(params, SliceParams) else dict(params or {})
    return _predict.load_sample(inputs, {"preprocessing": p}).selection


TASK = Task(
    name="cervical_ra",
    title="Cervical RA deformity (sagittal T2 MRI)",
    description="Predicts development of cervical spine deformity (atlanto-axial / subaxial subluxation, "
                "basilar invagination) at follow-up in rheumatoid arthritis from a baseline sagittal T2 MRI.",
    reference="Lebouille-Veldman et al. 2025 (6 mid-sagittal slices, 1 mm, 512x512; ResNet-101; BCE; Adam 1e-4)",
    inputs=(InputSpec(ROLE, "sagittal T2-weighted cervical spine", sequence="T2", orientation="sagittal"),),
    head="binary",
    preprocess=preprocess,
    build_model=build_model,
    default_architecture=default_architecture,
    default_params=SliceParams().to_dict,
    saliency_targets={ROLE: "layer4"},
    outputs=("probability", "label", "threshold", "saliency volume (source geometry)", "montage PNG", "scene"),
    api={"train": "rheumai.engine.train:train", "evaluate": "rheumai.engine.evaluate:evaluate",
         "predict": "rheumai.engine.predict:Predictor", "predict_batch": "rheumai.engine.predict:predict_batch",
         "build_dataset": "rheumai.dataset.build:build_dataset",
         "synth": "rheumai.tasks.cervical_ra.synth:generate_cohort", "demo": "rheumai.tasks.cervical_ra.demo:run_demo"},
    cli_modules=("rheumai.tasks.cervical_ra.cli", "rheumai.dataset.cli"),
    load_sample=_predict.load_sample,
    to_tensors=_predict.to_tensors,
    postprocess=_predict.postprocess,
    saliency_maps=_predict.saliency_maps,
    saliency_methods=SALIENCY_METHODS,
    recipe="rheumai.tasks.cervical_ra.train:RECIPE",
)
