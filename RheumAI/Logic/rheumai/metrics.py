"""Binary classification metrics with confidence intervals; pure functions on numpy arrays.

``y``: labels 0/1, ``p``: probabilities of class 1; positive when ``p >= threshold`` (scikit-learn's
``roc_curve``). Threshold metrics come from the confusion counts, so a published table checks alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

COUNT_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1")


def _check(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(int).ravel(), np.asarray(p, dtype=float).ravel()
    for bad, msg in ((y.shape != p.shape, f"labels ({y.size}) and probabilities ({p.size}) differ in length"),
                     (not set(np.unique(y)) <= {0, 1}, "labels must be 0/1"),
                     (not np.all(np.isfinite(p)), "probabilities contain NaN or inf")):
        if bad:
            raise ValueError(msg)
    return y, p


@dataclass(frozen=True)
class ThresholdRule:
    kind: str            # "youden" | "fixed" | "sensitivity"
    value: float | None  # fixed threshold, or minimum sensitivity

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_threshold_rule(rule: str | ThresholdRule) -> ThresholdRule:
    """``"youden"``, ``"fixed:0.5"`` (probability) or ``"sensitivity:0.75"`` (screening: the
    highest threshold whose sensitivity is at least 0.75, i.e. the most specific such cut-off)."""
    if isinstance(rule, ThresholdRule):
        return rule
    text = str(rule).strip().lower()
    if text == "youden":
        return ThresholdRule("youden", None)
    kind, _, value = text.partition(":")
    if kind in ("fixed", "sensitivity") and value:
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"threshold rule {rule!r}: {value!r} is not a number") from None
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"threshold rule {rule!r}: value must be in [0, 1]")
        return ThresholdRule(kind, v)
    raise ValueError(f"threshold rule {rule!r} not understood; use youden, fixed:<p> or sensitivity:<min>")


def choose_threshold(y: Any, p: Any, rule: str | ThresholdRule) -> float:
    """Operating threshold (probability) by ``rule``. Youden: the middle of the gap between the two
    neighbouring scores where Youden's J is maximal; sensitivity: the highest score that reaches it."""
    r = parse_threshold_rule(rule)
    if r.kind == "fixed":
        return float(r.value)  # type: ignore[arg-type]
    y, p = _check(y, p)
    if y.min() == y.max():
        raise ValueError(f"rule {r}: needs both classes in the labels")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # every distinct score is a candidate
    if r.kind == "youden":
        idx = int(np.argmax(tpr - fpr))  # ties: the first, i.e. the highest threshold
        lower = p[p < thr[idx]]  # every threshold in (next lower score, thr[idx]] classifies alike
        if lower.size and np.isfinite(thr[idx]):
            return float((thr[idx] + lower.max()) / 2)
    else:
        idx = int(np.flatnonzero(tpr >= r.value - 1e-12)[0])
    return float(min(thr[idx], 1.0))  # roc_curve's first threshold is +inf ("nobody positive")


def delong_auc_variance(y: Any, p: Any) -> tuple[float, float]:
    """AUC and its DeLong variance (DeLong et al. 1988; midrank form, Sun & Xu 2014; in no library)."""
    y, p = _check(y, p)
    pos, neg = p[y == 1], p[y == 0]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        raise ValueError("DeLong needs at least two cases of each class")
    tx, ty = stats.rankdata(pos), stats.rankdata(neg)
    tz = stats.rankdata(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n          # per positive: fraction of negatives ranked below it
    v01 = 1.0 - (tz[m:] - ty) / m    # per negative: fraction of positives ranked above it
    return float(auc), float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)


def bootstrap_indices(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) stratified resampling indices: each sample keeps the class counts of ``y``."""
    rng = np.random.default_rng(seed)
    parts = [rng.choice(np.flatnonzero(y == c), size=(n_boot, int((y == c).sum())), replace=True) for c in (0, 1)]
    return np.concatenate(parts, axis=1)


def auc_ci(y: Any, p: Any, method: str = "delong", alpha: float = 0.05, n_boot: int = 2000,
           seed: int = 0) -> dict[str, float]:
    """ROC AUC with a (1 - alpha) CI: DeLong (normal, clipped to [0, 1]) or stratified percentile
    bootstrap (scipy's cannot stratify). Returns {"value", "lo", "hi", "method"}."""
    y, p = _check(y, p)
    auc = float(roc_auc_score(y, p))
    if method == "delong":
        _, var = delong_auc_variance(y, p)
        if var == 0.0:
            method = "delong (zero variance: the classes do not overlap)"
        half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(var)
        lo, hi = auc - half, auc + half
    elif method == "bootstrap":
        boots = np.array([roc_auc_score(y[i], p[i]) for i in bootstrap_indices(y, n_boot, seed)])
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    else:
        raise ValueError(f"AUC CI method {method!r}: delong or bootstrap")
    return {"value": auc, "lo": float(max(lo, 0.0)), "hi": float(min(hi, 1.0)), "method": method}


def wilson_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (NaN, NaN when n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def confusion_counts(y: Any, p: Any, threshold: float) -> dict[str, int]:
    """TP, FN, FP, TN at ``p >= threshold`` (scikit-learn ``confusion_matrix``)."""
    y, p = _check(y, p)
    tn, fp, fn, tp = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).ravel()
    return {"tp": int(tp), "fn": int(fn), "fp": int(fp), "tn": int(tn)}


def metrics_from_counts(tp: int, fn: int, fp: int, tn: int, alpha: float = 0.05, n_boot: int = 2000,
                        seed: int = 0) -> dict[str, dict[str, float]]:
    """Sensitivity, specificity, PPV, NPV, accuracy (Wilson CIs) and F1 (k = 2TP, n = 2TP + FP + FN;
    bootstrap CI) from counts, each {"value": k / n (NaN when n = 0), "lo", "hi", "k", "n"}."""
    tp, fn, fp, tn = (int(v) for v in (tp, fn, fp, tn))
    if min(tp, fn, fp, tn) < 0:
        raise ValueError("confusion counts must be >= 0")
    fractions = {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp), "ppv": (tp, tp + fp),
                 "npv": (tn, tn + fn), "accuracy": (tp + tn, tp + fn + fp + tn), "f1": (2 * tp, 2 * tp + fp + fn)}
    counts = np.array([tp, fn, fp, tn])
    out: dict[str, dict[str, float]] = {}
    for name, (k, n) in fractions.items():
        lo, hi = wilson_ci(k, n, alpha)
        if name == "f1" and n:  # percentile bootstrap over cases: multinomial resamples of the four counts
            draws = np.random.default_rng(seed).multinomial(sum(counts), counts / sum(counts), n_boot)
            b_tp, b_fn, b_fp, _ = draws.T
            denom = 2 * b_tp + b_fp + b_fn
            lo, hi = np.quantile(2 * b_tp[denom > 0] / denom[denom > 0], [alpha / 2, 1 - alpha / 2]).tolist()
        out[name] = {"value": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n}
    return out


def calibration(y: Any, p: Any, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve (uniform bins; scikit-learn) and Brier score: {"brier", "prob_pred",
    "prob_true" (empty bins omitted), "bin_counts" (all n_bins bins over [0, 1])}."""
    y, p = _check(y, p)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    counts, _ = np.histogram(p, bins=np.linspace(0.0, 1.0, n_bins + 1))
    return {"brier": float(brier_score_loss(y, p)), "prob_pred": prob_pred.tolist(),
            "prob_true": prob_true.tolist(), "bin_counts": counts.astype(int).tolist()}


def _logit(p: Any) -> np.ndarray:
    return logit(np.clip(np.asarray(p, float), 1e-12, 1 - 1e-12))


def _logistic_fit(X: np.ndarray, y: np.ndarray, offset: np.ndarray, error: str) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood logistic regression ``logit P(y=1) = offset + X b`` (Newton-Raphson);
    returns b and its covariance (inverse Fisher information)."""
    beta = np.zeros(X.shape[1])
    for _ in range(100):
        mu = expit(offset + X @ beta)
        info = X.T @ (X * (mu * (1 - mu))[:, None]) + 1e-12 * np.eye(X.shape[1])
        step = np.linalg.solve(info, X.T @ (y - mu))
        beta += step
        if np.abs(step).max() < 1e-10:
            return beta, np.linalg.inv(info)
    raise ValueError(error)


def logistic_calibration(y: Any, p: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Calibration intercept and slope (Cox 1958; Van Calster et al. 2019) with Wald CIs.

    slope: b of ``logit P(y=1) = a + b logit(p)`` (1 ideal, < 1: predictions too extreme; that a is
    ``slope_model_intercept``, the pair :func:`recalibrate_probability` takes); intercept
    (calibration-in-the-large): a of ``logit P(y=1) = a + logit(p)`` (0 ideal, < 0: risks overestimated).
    """
    y, p = _check(y, p)
    if y.min() == y.max():
        raise ValueError("calibration intercept / slope need both classes")
    z = _logit(p)
    (a0, b), cov = _logistic_fit(np.stack([np.ones_like(z), z], axis=1), y, np.zeros_like(z),
                                 "calibration slope does not converge (the classes are separated by the predictions)")
    (a,), cov_a = _logistic_fit(np.ones((z.size, 1)), y, z, "calibration intercept does not converge")
    half = stats.norm.ppf(1 - alpha / 2) * np.sqrt([cov_a[0, 0], cov[1, 1], cov[0, 0]])
    return {**{k: {"value": float(v), "lo": float(v - h), "hi": float(v + h)}
               for k, v, h in zip(("intercept", "slope", "slope_model_intercept"), (a, b, a0), half)},
            "n": int(y.size), "method": "logistic recalibration, Wald CIs"}


def recalibrate_probability(p: Any, intercept: float, slope: float) -> np.ndarray:
    """``sigmoid(intercept + slope * logit(p))``: logistic recalibration of probabilities."""
    return expit(intercept + slope * _logit(p))


def apply_card_recalibration(p: Any, card: dict[str, Any]) -> np.ndarray:
    """Probabilities through the model card's logistic recalibration (``card["recalibration"]``:
    intercept, slope; written by external validation), unchanged when the card has none."""
    rc = card.get("recalibration")
    p = np.asarray(p, float)
    return p if not rc else recalibrate_probability(p, float(rc["intercept"]), float(rc["slope"]))


def binary_report(y: Any, p: Any, threshold: float, alpha: float = 0.05, auc_method: str = "delong",
                  n_boot: int = 2000, seed: int = 0, n_bins: int = 10) -> dict[str, Any]:
    """AUC (+CI), counts and count metrics (+CIs) at ``threshold``, ROC curve and calibration."""
    y, p = _check(y, p)
    counts, nan = confusion_counts(y, p, threshold), float("nan")
    out: dict[str, Any] = {
        "n": int(y.size), "n_positive": int(y.sum()), "n_negative": int((1 - y).sum()), "alpha": alpha,
        "threshold": float(threshold), "roc": None,
        "auc": {"value": nan, "lo": nan, "hi": nan, "method": "undefined (one class)"},
        "counts": counts, "metrics": metrics_from_counts(**counts, alpha=alpha, n_boot=n_boot, seed=seed),
        "calibration": calibration(y, p, n_bins)}
    if y.min() != y.max():
        method = auc_method if (auc_method != "delong" or min(y.sum(), (1 - y).sum()) >= 2) else "bootstrap"
        out["auc"] = auc_ci(y, p, method=method, alpha=alpha, n_boot=n_boot, seed=seed)
        fpr, tpr, thr = roc_curve(y, p)
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": np.minimum(thr, 1.0).tolist()}
    return out


def validation_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The model card's validation entry of a :func:`binary_report`: counts, AUC, Brier, count metrics."""
    return {"n": report["n"], "n_positive": report["n_positive"], "auc": report["auc"],
            "counts": report["counts"], "brier": report["calibration"]["brier"], **report["metrics"]}
