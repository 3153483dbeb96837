"""Binary classification metrics with confidence intervals; pure functions on numpy arrays.

``y`` holds true labels (0/1), ``p`` predicted probabilities of class 1. A case is called
positive when ``p >= threshold`` (scikit-learn's ``roc_curve`` convention). Point estimates come
from scikit-learn; intervals: Wilson for proportions (scipy), DeLong or stratified bootstrap for
the AUC, bootstrap for F1. Every threshold-dependent metric is derived from the confusion counts
(``metrics_from_counts``), so a published confusion matrix can be checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.metrics import (accuracy_score, brier_score_loss, confusion_matrix, f1_score, precision_score,
                             recall_score, roc_auc_score, roc_curve)

COUNT_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1")


def _check(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0/1")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or inf")
    return y, p


# ---------------------------------------------------------------- threshold rules

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
    """Operating threshold (probability) from labelled scores by the given rule. Youden: the
    middle of the gap between the two neighbouring scores where Youden's J is maximal;
    sensitivity: the highest score that reaches the sensitivity (the most specific cut-off)."""
    r = parse_threshold_rule(rule)
    if r.kind == "fixed":
        return float(r.value)  # type: ignore[arg-type]
    y, p = _check(y, p)
    if y.min() == y.max():
        raise ValueError(f"rule {r}: needs both classes in the labels")
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # every distinct score is a candidate
    if r.kind == "youden":
        idx = int(np.argmax(tpr - fpr))  # ties: the first, i.e. the highest threshold
        # every threshold in (next lower score, thr[idx]] classifies the data alike: take the middle
        # of that gap, not the edge that sits on one patient's probability
        lower = p[p < thr[idx]]
        if lower.size and np.isfinite(thr[idx]):
            return float((thr[idx] + lower.max()) / 2)
    else:
        idx = int(np.flatnonzero(tpr >= r.value - 1e-12)[0])
    return float(min(thr[idx], 1.0))  # roc_curve's first threshold is +inf ("nobody positive")


# ---------------------------------------------------------------- AUC and its CI

def delong_auc_variance(y: Any, p: Any) -> tuple[float, float]:
    """AUC and its DeLong variance (DeLong et al. 1988; fast midrank form, Sun & Xu 2014).

    Hand-written: scikit-learn, scipy and the other installed libraries have no DeLong. Checked
    against scikit-learn's AUC and against the bootstrap in the tests.
    """
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
    var = np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n
    return float(auc), float(var)


def bootstrap_indices(y: np.ndarray, n_boot: int, seed: int, stratified: bool = True) -> np.ndarray:
    """(n_boot, N) resampling indices; stratified keeps the class counts of ``y`` in each sample."""
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, y.size, size=(n_boot, y.size))
    parts = [rng.choice(np.flatnonzero(y == c), size=(n_boot, int((y == c).sum())), replace=True) for c in (0, 1)]
    return np.concatenate(parts, axis=1)


def auc_ci(y: Any, p: Any, method: str = "delong", alpha: float = 0.05, n_boot: int = 2000,
           seed: int = 0) -> dict[str, float]:
    """ROC AUC (scikit-learn) with a (1 - alpha) CI: DeLong (normal, clipped to [0, 1]) or
    stratified percentile bootstrap. Returns {"value", "lo", "hi", "method"}."""
    y, p = _check(y, p)
    auc = float(roc_auc_score(y, p))
    if method == "delong":
        _, var = delong_auc_variance(y, p)
        if var == 0.0:
            method = "delong (zero variance: the classes do not overlap)"
        z = stats.norm.ppf(1 - alpha / 2)
        lo, hi = auc - z * np.sqrt(var), auc + z * np.sqrt(var)
    elif method == "bootstrap":
        # Stratified by hand: scipy.stats.bootstrap cannot stratify, and an unstratified resample
        # with a single class has no AUC.
        idx = bootstrap_indices(y, n_boot, seed)
        boots = np.array([roc_auc_score(y[i], p[i]) for i in idx])
        lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    else:
        raise ValueError(f"AUC CI method {method!r}: delong or bootstrap")
    return {"value": auc, "lo": float(max(lo, 0.0)), "hi": float(min(hi, 1.0)), "method": method}


# ---------------------------------------------------------------- counts and derived metrics

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


def arrays_from_counts(tp: int, fn: int, fp: int, tn: int) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) with exactly these confusion counts (to feed scikit-learn)."""
    y_true = np.array([1] * tp + [1] * fn + [0] * fp + [0] * tn, dtype=int)
    y_pred = np.array([1] * tp + [0] * fn + [1] * fp + [0] * tn, dtype=int)
    return y_true, y_pred


def metrics_from_counts(tp: int, fn: int, fp: int, tn: int, alpha: float = 0.05, n_boot: int = 2000,
                        seed: int = 0) -> dict[str, dict[str, float]]:
    """Sensitivity, specificity, PPV, NPV, accuracy (Wilson CIs) and F1 (bootstrap CI) from counts.

    Values come from scikit-learn on arrays rebuilt from the counts. Each entry is
    {"value", "lo", "hi", "k", "n"} (k/n = the proportion's numerator/denominator; for F1
    k = 2TP, n = 2TP + FP + FN). A metric with an empty denominator is NaN.
    """
    tp, fn, fp, tn = (int(v) for v in (tp, fn, fp, tn))
    if min(tp, fn, fp, tn) < 0:
        raise ValueError("confusion counts must be >= 0")
    yt, yp = arrays_from_counts(tp, fn, fp, tn)
    nan = float("nan")
    values = {
        "sensitivity": (recall_score(yt, yp, pos_label=1, zero_division=nan), tp, tp + fn),
        "specificity": (recall_score(yt, yp, pos_label=0, zero_division=nan), tn, tn + fp),
        "ppv": (precision_score(yt, yp, pos_label=1, zero_division=nan), tp, tp + fp),
        "npv": (precision_score(yt, yp, pos_label=0, zero_division=nan), tn, tn + fn),
        "accuracy": (accuracy_score(yt, yp) if yt.size else nan, tp + tn, yt.size),
        "f1": (f1_score(yt, yp, pos_label=1, zero_division=nan), 2 * tp, 2 * tp + fp + fn),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (value, k, n) in values.items():
        if name == "f1":
            lo, hi = _f1_bootstrap_ci(yt, yp, alpha, n_boot, seed)
        else:
            lo, hi = wilson_ci(k, n, alpha)
        out[name] = {"value": float(value), "lo": lo, "hi": hi, "k": int(k), "n": int(n)}
    return out


def _f1_bootstrap_ci(yt: np.ndarray, yp: np.ndarray, alpha: float, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap over cases (pairs). The per-resample F1 is 2TP / (2TP + FP + FN), the
    formula scikit-learn's f1_score evaluates, vectorised here because calling f1_score thousands
    of times is slow; the point estimate itself comes from f1_score."""
    if yt.size == 0 or (yt.sum() == 0 and yp.sum() == 0):
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, yt.size, size=(n_boot, yt.size))
    t, q = yt[idx], yp[idx]
    tp = (t & q).sum(1)
    denom = 2 * tp + ((1 - t) & q).sum(1) + (t & (1 - q)).sum(1)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    f1 = f1[np.isfinite(f1)]
    lo, hi = np.quantile(f1, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def compare_with_reported(counts: dict[str, int], reported: dict[str, float], tol: float = 0.005,
                          stated_positives: int | None = None) -> list[str]:
    """Discrepancies between values derived from a confusion matrix and those a paper reports.

    ``reported`` maps metric names (COUNT_METRICS) to published values, ``stated_positives`` the
    number of positives the text states. Returns human-readable lines; empty if consistent.
    """
    derived = metrics_from_counts(counts["tp"], counts["fn"], counts["fp"], counts["tn"], n_boot=10)
    lines = []
    if stated_positives is not None and counts["tp"] + counts["fn"] != stated_positives:
        lines.append(f"positives: TP {counts['tp']} + FN {counts['fn']} = {counts['tp'] + counts['fn']}, "
                     f"but the text states {stated_positives}")
    for name, value in reported.items():
        d = derived[name]["value"]
        if not abs(d - value) <= tol:
            lines.append(f"{name}: reported {value:.2f}, from the counts {derived[name]['k']}/"
                         f"{derived[name]['n']} = {d:.3f}")
    return lines


# ---------------------------------------------------------------- calibration

def calibration(y: Any, p: Any, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve (uniform bins; scikit-learn) and Brier score.

    Returns {"brier", "prob_pred", "prob_true", "bin_counts"} (empty bins omitted from the curve,
    bin_counts covers all n_bins bins over [0, 1]).
    """
    y, p = _check(y, p)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    counts, _ = np.histogram(p, bins=np.linspace(0.0, 1.0, n_bins + 1))
    return {"brier": float(brier_score_loss(y, p)), "prob_pred": prob_pred.tolist(),
            "prob_true": prob_true.tolist(), "bin_counts": counts.astype(int).tolist()}


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, float), 1e-12, 1 - 1e-12)
    return np.log(q / (1 - q))


def logistic_calibration(y: Any, p: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Calibration intercept and slope (Cox 1958; Van Calster et al. 2019) with Wald CIs.

    slope: b of ``logit P(y=1) = a + b * logit(p)`` (1 = ideal, < 1 = predictions too extreme);
    intercept ("calibration-in-the-large"): a of ``logit P(y=1) = a + logit(p)`` (slope fixed at
    1; 0 = ideal, < 0 = risks overestimated). Both by Newton-Raphson maximum likelihood; the
    standard errors from the inverse Fisher information. ``slope_model_intercept`` is the a of
    the first model, the pair used by :func:`recalibrate_probability`.
    """
    y, p = _check(y, p)
    if y.min() == y.max():
        raise ValueError("calibration intercept / slope need both classes")
    z = _logit(p)
    X = np.stack([np.ones_like(z), z], axis=1)
    beta = np.zeros(2)
    for _ in range(100):
        mu = expit(X @ beta)
        w = mu * (1 - mu)
        info = X.T @ (X * w[:, None])
        step = np.linalg.solve(info + 1e-12 * np.eye(2), X.T @ (y - mu))
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    else:
        raise ValueError("calibration slope does not converge (the classes are separated by the predictions)")
    cov = np.linalg.inv(info + 1e-12 * np.eye(2))
    a = 0.0
    for _ in range(100):
        mu = expit(a + z)
        info_a = float((mu * (1 - mu)).sum())
        step = float((y - mu).sum()) / max(info_a, 1e-12)
        a += step
        if abs(step) < 1e-10:
            break
    else:
        raise ValueError("calibration intercept does not converge")
    q = stats.norm.ppf(1 - alpha / 2)
    se_b, se_a0, se_a = float(np.sqrt(cov[1, 1])), float(np.sqrt(cov[0, 0])), float(1 / np.sqrt(max(info_a, 1e-12)))
    return {"intercept": {"value": float(a), "lo": float(a - q * se_a), "hi": float(a + q * se_a)},
            "slope": {"value": float(beta[1]), "lo": float(beta[1] - q * se_b), "hi": float(beta[1] + q * se_b)},
            "slope_model_intercept": {"value": float(beta[0]), "lo": float(beta[0] - q * se_a0),
                                      "hi": float(beta[0] + q * se_a0)},
            "n": int(y.size), "method": "logistic recalibration, Wald CIs"}


def recalibrate_probability(p: Any, intercept: float, slope: float) -> np.ndarray:
    """``sigmoid(intercept + slope * logit(p))``: logistic recalibration of probabilities."""
    return expit(intercept + slope * _logit(np.asarray(p, float)))


def apply_card_recalibration(p: Any, card: dict[str, Any]) -> np.ndarray:
    """Probabilities through the model card's logistic recalibration (``card["recalibration"]``:
    intercept, slope; written by external validation), unchanged when the card has none."""
    rc = card.get("recalibration")
    p = np.asarray(p, float)
    return p if not rc else recalibrate_probability(p, float(rc["intercept"]), float(rc["slope"]))


# ---------------------------------------------------------------- everything at once

def binary_report(y: Any, p: Any, threshold: float, alpha: float = 0.05, auc_method: str = "delong",
                  n_boot: int = 2000, seed: int = 0, n_bins: int = 10) -> dict[str, Any]:
    """AUC (+CI), counts and count metrics (+CIs) at ``threshold``, ROC curve and calibration."""
    y, p = _check(y, p)
    out: dict[str, Any] = {"n": int(y.size), "n_positive": int(y.sum()), "n_negative": int((1 - y).sum()),
                           "threshold": float(threshold), "alpha": alpha}
    if y.min() != y.max():
        method = auc_method if (auc_method != "delong" or min(y.sum(), (1 - y).sum()) >= 2) else "bootstrap"
        out["auc"] = auc_ci(y, p, method=method, alpha=alpha, n_boot=n_boot, seed=seed)
        fpr, tpr, thr = roc_curve(y, p)
        out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": np.minimum(thr, 1.0).tolist()}
    else:
        out["auc"] = {"value": float("nan"), "lo": float("nan"), "hi": float("nan"), "method": "undefined (one class)"}
        out["roc"] = None
    counts = confusion_counts(y, p, threshold)
    out["counts"] = counts
    out["metrics"] = metrics_from_counts(**counts, alpha=alpha, n_boot=n_boot, seed=seed)
    out["calibration"] = calibration(y, p, n_bins)
    return out
