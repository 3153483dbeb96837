"""Prediction for every task (console entry point): the engine's predictor and writers.

``Predictor(checkpoint)`` reads the task from the model card and runs that task's declared
preprocessing, network, decoding and saliency (:mod:`rheumai.engine.predict`); ``write_outputs``
writes one study's files and ``predict_batch`` a whole list, streaming, resumable and safe under
concurrent runs (:mod:`rheumai.engine.write`).
"""

from __future__ import annotations

from .engine.predict import PredictionResult, Predictor, RoleMap, predict_batch, study_stem
from .engine.write import scene_writer
from .engine.write import write_study as write_outputs

__all__ = ["Predictor", "PredictionResult", "RoleMap", "predict_batch", "study_stem", "scene_writer", "write_outputs"]
