"""The cervical RA deformity task (Lebouille-Veldman et al. 2025): declaration (:mod:`.task`) and
prediction hooks (:mod:`.predict`); training is :func:`rheumai.train.train` on the engine."""

from .task import ROLE, TASK, default_params, preprocess

__all__ = ["TASK", "ROLE", "default_params", "preprocess"]
