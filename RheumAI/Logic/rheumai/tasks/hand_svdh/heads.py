"""The task's heads, built on the engine's (``rheumai.engine.heads``).

Per-joint grades are ordinal, but not every SvdH area is scored for both features (JSN is not
scored at IP1, CMC1, the carpal bones, radius and ulna; erosion not at CMC3-5, STT, CSL and the
radiocarpal joint). :class:`MaskedOrdinalHead` is the engine's ordinal (CORAL) head that leaves
targets < 0 (:data:`~.dataset.IGNORE`) out of the loss, the score and the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ...engine.heads import Head, OrdinalHead, make_head
from .scoring import MAX_EROSION, MAX_JSN


@dataclass
class MaskedOrdinalHead(OrdinalHead):
    """Ordinal head (cumulative logits (N, K-1)) ignoring targets < 0."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = target >= 0
        if not bool(keep.any()):
            return output.sum() * 0.0
        k = torch.arange(self.n_classes - 1, device=output.device)
        levels = (target[keep].long().unsqueeze(1) > k).float()
        return F.binary_cross_entropy_with_logits(output[keep].float(), levels)

    def _keep(self, pred: dict[str, np.ndarray], target: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        t = np.asarray(target)
        keep = t >= 0
        return {k: v[keep] for k, v in pred.items()}, t[keep]

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        return super().score(*self._keep(pred, target))

    def report(self, pred: dict[str, np.ndarray], target: np.ndarray, **kw: Any) -> dict[str, Any]:
        return super().report(*self._keep(pred, target), **kw)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["kind"] = "ordinal"  # rebuilt as the engine's ordinal head: decoding is identical
        return d


def whole_heads(n_classes: int, total_scale: float, class_weight: float = 0.3) -> dict[str, Head]:
    """Heads of the whole-hand network: total (regression, smooth L1 on total / scale) + class."""
    return {"total": make_head("regression", name="total", loss_kind="smooth_l1", scale=float(total_scale)),
            "class": make_head("ordinal", name="class", n_classes=int(n_classes), weight=class_weight)}


def joint_heads() -> dict[str, Head]:
    return {"erosion": MaskedOrdinalHead(name="erosion", n_classes=MAX_EROSION + 1),
            "jsn": MaskedOrdinalHead(name="jsn", n_classes=MAX_JSN + 1)}


def landmark_heads(n_points: int, sigma: float, stride: int) -> dict[str, Head]:
    return {"landmarks": make_head("keypoints", name="landmarks", n_points=n_points, sigma=sigma, stride=stride)}
