"""Output heads: loss, decode, validation score and report with CIs per kind (``make_head(kind, **kw)``).

Shapes (N = batch): ``binary`` (N,) or (N, 1) logits, target 0/1; ``regression`` (N,) in the
task's unit; ``ordinal`` (N, K-1) cumulative logits log-odds(y > k) (CORAL); ``multiclass`` (N, K)
logits; ``keypoints`` (N, P, h, w) heatmap logits at ``stride``, target (N, P, 2) (x, y) input
pixels (NaN: not visible). ``score`` is what the training loop maximises (``score_name``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from scipy import stats
from scipy.special import expit
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score
from torch import nn
from torch.nn import functional as F

from ..landmarks import keypoint_loss, radial_errors_mm, soft_argmax
from ..metrics import binary_report, wilson_ci


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(np.float64)


def _flat(output: torch.Tensor) -> torch.Tensor:
    return output.reshape(output.shape[0]) if output.dim() == 2 and output.shape[1] == 1 else output


def _est(value: float, ci: Sequence[float], **extra: Any) -> dict[str, Any]:
    return {"value": float(value), "lo": float(ci[0]), "hi": float(ci[1]), **extra}


def _boot(fn: Callable[..., float], arrays: Sequence[np.ndarray], n_boot: int, alpha: float,
          seed: int) -> dict[str, Any]:
    """``fn(*arrays)`` with its percentile bootstrap CI, resampling cases (unstratified)."""
    n = arrays[0].shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(max(n_boot, 0) if n > 1 else 0, n))
    vals = np.array([fn(*(a[i] for a in arrays)) for i in idx], dtype=float)
    vals = vals[np.isfinite(vals)]
    ci = np.quantile(vals, [alpha / 2, 1 - alpha / 2]) if vals.size else (np.nan, np.nan)
    return _est(fn(*arrays), ci, method="bootstrap")


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a - b)))


def _qwk(pred: np.ndarray, true: np.ndarray, n_classes: int) -> float:
    """Quadratic-weighted kappa; NaN when predictions and truth hold one class together."""
    if np.unique(np.r_[pred, true]).size < 2:
        return float("nan")
    return float(cohen_kappa_score(true, pred, labels=list(range(n_classes)), weights="quadratic"))


@dataclass
class Head:
    """Base class: ``name`` (key in the model output / sample target), ``weight`` (loss weight)."""

    name: str = "out"
    weight: float = 1.0
    kind: ClassVar[str] = ""
    score_name: ClassVar[str] = ""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        raise NotImplementedError

    def report(self, pred: dict[str, np.ndarray], target: np.ndarray, alpha: float = 0.05, n_boot: int = 1000,
               seed: int = 0, **kw: Any) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able head entry for the model card."""
        return {**asdict(self), "kind": self.kind, "score_name": self.score_name}


@dataclass
class BinaryHead(Head):
    """One logit; BCE with optional ``pos_weight`` (negatives / positives for balancing)."""

    pos_weight: float | None = None
    kind, score_name = "binary", "auc"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=output.device)
        return F.binary_cross_entropy_with_logits(_flat(output).float(), target.float(), pos_weight=pw)

    def decode(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        z = _np(_flat(output))
        return {"logit": z, "probability": expit(z)}

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        y = np.asarray(target).astype(int)
        return float(roc_auc_score(y, pred["probability"])) if y.min() != y.max() else float("nan")

    def report(self, pred: dict[str, np.ndarray], target: np.ndarray, alpha: float = 0.05, n_boot: int = 1000,
               seed: int = 0, threshold: float = 0.5, auc_method: str = "delong", n_bins: int = 10,
               **kw: Any) -> dict[str, Any]:
        return binary_report(np.asarray(target).astype(int), pred["probability"], threshold, alpha=alpha,
                             auc_method=auc_method, n_boot=n_boot, seed=seed, n_bins=n_bins)


def _icc_a1(a: np.ndarray, b: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """ICC(A,1) (two-way random, absolute agreement, single rater; McGraw & Wong 1996, case 2A)
    with its F-based CI, for two ratings (prediction, truth) per subject."""
    x = np.stack([a, b], axis=1)
    n, k = x.shape
    gm = x.mean()
    msr = k * ((x.mean(1) - gm) ** 2).sum() / (n - 1)
    msc = n * ((x.mean(0) - gm) ** 2).sum() / (k - 1)
    mse = ((x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + gm) ** 2).sum() / ((n - 1) * (k - 1))
    denom = msr + (k - 1) * mse + k * (msc - mse) / n
    icc = (msr - mse) / denom if denom > 0 else float("nan")
    if not (mse > 1e-12 * max(msr, 1e-300)) or not icc < 1.0:
        return float(icc), float("nan"), float("nan")  # perfect agreement: no F-based interval
    # McGraw & Wong (1996) eq. for ICC(A,1): approximate degrees of freedom v
    aa, bb = k * icc / (n * (1 - icc)), 1 + k * icc * (n - 1) / (n * (1 - icc))
    v = (aa * msc + bb * mse) ** 2 / ((aa * msc) ** 2 / (k - 1) + (bb * mse) ** 2 / ((n - 1) * (k - 1)))
    fl, fu = stats.f.ppf(1 - alpha / 2, n - 1, v), stats.f.ppf(1 - alpha / 2, v, n - 1)
    lo = n * (msr - fl * mse) / (fl * (k * msc + (k * n - k - n) * mse) + n * msr)
    hi = n * (fu * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fu * msr)
    return float(icc), float(lo), float(hi)


def regression_report(pred: np.ndarray, true: np.ndarray, alpha: float = 0.05, n_boot: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """Agreement of predictions with the truth (same unit): PCC, RMSE, MAE, ICC(A,1), Bland-Altman."""
    p, t = np.asarray(pred, float).ravel(), np.asarray(true, float).ravel()
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    n = p.size
    if n < 3:
        raise ValueError(f"regression report needs >= 3 cases with a value, has {n}")
    out: dict[str, Any] = {"n": int(n), "alpha": alpha}
    if np.std(p) > 0 and np.std(t) > 0:
        r = stats.pearsonr(p, t)  # |r| = 1: Fisher z is infinite, the interval is the point
        ci = r.confidence_interval(1 - alpha) if abs(r.statistic) < 1 - 1e-12 else (r.statistic, r.statistic)
        out["pcc"] = _est(r.statistic, ci, method="Fisher z", p_value=float(r.pvalue))
    else:
        out["pcc"] = _est(float("nan"), (float("nan"), float("nan")), method="constant predictions or truth")
    out["rmse"] = _boot(lambda a, b: float(np.sqrt(np.mean((a - b) ** 2))), (p, t), n_boot, alpha, seed)
    out["mae"] = _boot(_mae, (p, t), n_boot, alpha, seed)
    icc, lo, hi = _icc_a1(p, t, alpha)
    out["icc"] = _est(icc, (lo, hi), method="ICC(A,1) two-way random, absolute agreement "
                                            "(McGraw & Wong 1996)")
    d = p - t
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    z, tq = stats.norm.ppf(1 - alpha / 2), stats.t.ppf(1 - alpha / 2, n - 1)
    se_loa = sd * np.sqrt(3.0 / n)
    t_ci = lambda v, se: _est(v, (v - tq * se, v + tq * se))  # noqa: E731
    out["bland_altman"] = {
        "bias": t_ci(bias, sd / np.sqrt(n)), "sd_difference": sd,
        "loa_lower": t_ci(bias - z * sd, se_loa), "loa_upper": t_ci(bias + z * sd, se_loa),
        "method": "difference = prediction - truth; limits bias -/+ z * SD; CIs Bland & Altman 1999"}
    return out


def class_report(pred_class: np.ndarray, true_class: np.ndarray, n_classes: int, alpha: float = 0.05,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy (Wilson CI), quadratic-weighted kappa and MAE in classes (bootstrap CIs), confusion
    matrix (rows = truth, columns = prediction)."""
    p, t = np.asarray(pred_class).astype(int).ravel(), np.asarray(true_class).astype(int).ravel()
    labels = list(range(n_classes))
    k = int((p == t).sum())
    return {"n": int(p.size), "alpha": alpha,
            "accuracy": _est(k / p.size, wilson_ci(k, p.size, alpha), method="Wilson"),
            "kappa_quadratic": _boot(lambda a, b: _qwk(a, b, n_classes), (p, t), n_boot, alpha, seed),
            "mae_classes": _boot(_mae, (p, t), n_boot, alpha, seed),
            "confusion": confusion_matrix(t, p, labels=labels).tolist(), "classes": labels}


class CoralLayer(nn.Module):
    """Rank-consistent ordinal output (Cao et al. 2020, CORAL): one shared weight vector and K-1
    ordered-by-training biases; (N, F) -> (N, K-1) cumulative logits."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 1, bias=False)
        self.bias = nn.Parameter(torch.arange(n_classes - 1, 0, -1, dtype=torch.float32) / (n_classes - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.bias


@dataclass
class RegressionHead(Head):
    """One value; ``loss_kind`` "mse" | "l1" | "smooth_l1". ``scale``: targets are divided by it for the
    loss (and outputs multiplied by it when decoded), so the network works near unit range."""

    loss_kind: str = "mse"
    scale: float = 1.0
    kind, score_name = "regression", "neg_mae"

    def __post_init__(self) -> None:
        if self.loss_kind not in ("mse", "l1", "smooth_l1"):
            raise ValueError(f"regression loss {self.loss_kind!r}: mse, l1 or smooth_l1")

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}[self.loss_kind]
        return fn(_flat(output).float(), target.float() / self.scale)

    def decode(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        return {"value": _np(_flat(output)) * self.scale}

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        return -_mae(pred["value"], np.asarray(target, float))

    def report(self, pred: dict[str, np.ndarray], target: np.ndarray, alpha: float = 0.05, n_boot: int = 1000,
               seed: int = 0, **kw: Any) -> dict[str, Any]:
        return regression_report(pred["value"], target, alpha, n_boot, seed)


@dataclass
class _ClassHead(Head):
    """K classes 0..K-1, reported by :func:`class_report`; scored by accuracy."""

    n_classes: int = 2

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        return float(np.mean(pred["class"] == np.asarray(target).astype(int)))

    def report(self, pred: dict[str, np.ndarray], target: np.ndarray, alpha: float = 0.05, n_boot: int = 1000,
               seed: int = 0, **kw: Any) -> dict[str, Any]:
        return class_report(pred["class"], target, self.n_classes, alpha, n_boot, seed)


@dataclass
class OrdinalHead(_ClassHead):
    """K ordered classes 0..K-1 from K-1 cumulative logits (see the module docstring)."""

    kind, score_name = "ordinal", "kappa_quadratic"

    def __post_init__(self) -> None:
        if self.n_classes < 2:
            raise ValueError("ordinal head needs n_classes >= 2")

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        levels = (target.long().unsqueeze(1) > torch.arange(self.n_classes - 1, device=output.device)).float()
        return F.binary_cross_entropy_with_logits(output.float(), levels)  # levels (N, K-1): y > k

    def decode(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        gt = expit(_np(output))  # P(y > k), (N, K-1)
        le = np.pad(1.0 - gt, ((0, 0), (1, 1)), constant_values=((0, 0), (0, 1)))  # P(y <= k), from 0 to 1
        probs = np.diff(le, axis=1).clip(0.0)
        probs /= probs.sum(1, keepdims=True).clip(1e-12)
        return {"class": (gt >= 0.5).sum(1).astype(int), "probabilities": probs, "expected": gt.sum(1)}

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        """Quadratic-weighted kappa (accuracy when predictions and truth hold one class together)."""
        k = _qwk(pred["class"], np.asarray(target).astype(int), self.n_classes)
        return k if np.isfinite(k) else super().score(pred, target)


@dataclass
class MulticlassHead(_ClassHead):
    """K unordered classes, cross-entropy on (N, K) logits (optional per-class ``class_weights``)."""

    class_weights: list[float] | None = None
    kind, score_name = "multiclass", "accuracy"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = None if self.class_weights is None else torch.tensor(self.class_weights, device=output.device)
        return F.cross_entropy(output.float(), target.long(), weight=w)

    def decode(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        probs = _np(torch.softmax(output.float(), dim=1))
        return {"class": probs.argmax(1).astype(int), "probabilities": probs}


@dataclass
class KeypointsHead(Head):
    """P points from heatmap logits at ``stride``; ``sigma`` (heatmap pixels) of the target Gaussians."""

    n_points: int = 1
    sigma: float = 1.5
    stride: int = 1
    coord_weight: float = 1.0
    kind, score_name = "keypoints", "neg_mean_error_px"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return keypoint_loss(output, target, self.sigma, self.stride, self.coord_weight)

    def decode(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        return {"points": _np(soft_argmax(output.float(), self.stride))}

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        return -float(np.nanmean(np.linalg.norm(pred["points"] - np.asarray(target, float), axis=-1)))

    def report(self, pred: dict[str, np.ndarray], target: np.ndarray, alpha: float = 0.05, n_boot: int = 1000,
               seed: int = 0, spacing_mm: Sequence[float] | np.ndarray = (1.0, 1.0),
               **kw: Any) -> dict[str, Any]:
        """``spacing_mm``: (row, col) mm per input pixel, one pair or one per case (N, 2)."""
        pts, tgt = np.asarray(pred["points"], float), np.asarray(target, float)
        sp = np.broadcast_to(np.asarray(spacing_mm, float), (pts.shape[0], 2))
        err = np.stack([radial_errors_mm(p, t, s) for p, t, s in zip(pts, tgt, sp)])
        e = err[np.isfinite(err)]
        if not e.size:
            raise ValueError("keypoint report: no visible points")
        out: dict[str, Any] = {"n_points": int(e.size), "n_cases": int(pts.shape[0]), "alpha": alpha,
                               "mean_mm": _boot(np.mean, (e,), n_boot, alpha, seed),
                               "median_mm": _boot(np.median, (e,), n_boot, alpha, seed),
                               "per_point_mean_mm": np.nanmean(err, axis=0).tolist()}
        for t in (2.0, 4.0):
            k = int((e <= t).sum())
            out[f"success_{t:g}mm"] = _est(k / e.size, wilson_ci(k, e.size, alpha), method="Wilson")
        return out


HEADS = {"binary": BinaryHead, "regression": RegressionHead, "ordinal": OrdinalHead,
         "multiclass": MulticlassHead, "keypoints": KeypointsHead}
KINDS = tuple(HEADS)


def make_head(kind: str, **kw: Any) -> Head:
    """A head of ``kind`` (see :data:`KINDS`) with its options (``name``, ``weight``, ...)."""
    if kind not in HEADS:
        raise ValueError(f"head kind {kind!r}: one of {', '.join(KINDS)}")
    return HEADS[kind](**kw)


def head_from_card(entry: dict[str, Any]) -> Head:
    """Rebuild a head from its model-card entry (:meth:`Head.describe`)."""
    return make_head(entry["kind"], **{k: v for k, v in entry.items() if k not in ("kind", "score_name")})
