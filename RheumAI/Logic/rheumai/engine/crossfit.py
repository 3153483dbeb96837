"""Out-of-fold (OOF) selection of the epoch count and threshold when the validation split is too small.

k patient-level stratified folds over the training patients each score their held-out fold after
every epoch; the pooled probabilities choose the epochs and the threshold (``docs/ENGINE.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from ..metrics import bootstrap_indices, choose_threshold, parse_threshold_rule

RunFold = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class ThresholdChoice:
    """An operating threshold and how it was chosen. method: "validation" | "oof" | "fixed" | "default"
    (refused: too few cases); ci_lo / ci_hi: (1 - alpha) bootstrap percentile CI (None: not estimable)."""

    value: float
    rule: str
    method: str
    note: str
    n: int = 0
    n_positive: int = 0
    ci_lo: float | None = None
    ci_hi: float | None = None
    alpha: float = 0.05
    n_bootstrap: int = 0


def needs_oof(method: str, val_labels: Sequence[int], min_val_positives: int) -> tuple[bool, str]:
    """Whether to select by OOF. method: "auto" (OOF when validation has fewer than
    ``min_val_positives`` positives or negatives), "oof" or "validation"."""
    pos = int(np.sum(val_labels))
    neg = len(val_labels) - pos
    if method == "oof":
        return True, "out-of-fold selection requested"
    if method == "validation":
        return False, f"validation selection requested ({pos} positive / {neg} negative)"
    if min(pos, neg) < min_val_positives:
        return True, (f"validation split has {pos} positive / {neg} negative case(s), fewer than "
                      f"min_val_positives = {min_val_positives}")
    return False, f"validation split has {pos} positive / {neg} negative cases"


def patient_folds(labels: Sequence[int], groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold index (0..k'-1) per row: stratified by label, all rows of a patient (``groups``) in one
    fold; k' = min(k, positives, negatives). ValueError when fewer than 2 folds are possible."""
    y, g = np.asarray(labels, dtype=int), np.asarray(groups)
    patient_y = pd.Series(y).groupby(g).max()
    n_pos = int(patient_y.sum())
    n_neg = patient_y.size - n_pos
    if min(k, n_pos, n_neg) < 2:
        raise ValueError(f"out-of-fold selection needs >= 2 patients of each class in train, has {n_pos} "
                         f"positive / {n_neg} negative")
    folds = np.full(y.size, -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=min(k, n_pos, n_neg), shuffle=True, random_state=seed)
    for j, (_, hold) in enumerate(splitter.split(np.zeros(y.size), y, g)):
        folds[hold] = j
    return folds


def select_epoch(scores: np.ndarray, labels: Sequence[int],
                 smooth: int = 3) -> tuple[int, np.ndarray, np.ndarray]:
    """1-based epoch with the highest pooled OOF AUC averaged over a centred window of ``smooth``
    epochs (truncated at the ends); ties go to the earliest. Returns (epoch, AUC (E,), smoothed AUC (E,))."""
    auc = np.array([roc_auc_score(np.asarray(labels, dtype=int), s) for s in scores])
    h = max(int(smooth), 1) // 2
    sm = np.array([auc[max(0, e - h):e + h + 1].mean() for e in range(auc.size)])
    return int(np.argmax(sm)) + 1, auc, sm


def choose_threshold_with_ci(labels: Sequence[int], probs: Sequence[float], rule: str, method: str,
                             min_positives: int = 3, n_boot: int = 1000, alpha: float = 0.05,
                             seed: int = 0) -> ThresholdChoice:
    """Threshold by ``rule`` on (labels, probs) with its bootstrap CI; refuses (0.5, method
    "default") when either class has fewer than ``min_positives`` cases."""
    r = parse_threshold_rule(rule)
    y, p = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if r.kind == "fixed":
        return ThresholdChoice(float(r.value), str(r), "fixed", f"fixed by rule {r}", y.size, pos)
    if min(pos, neg) < min_positives:
        return ThresholdChoice(0.5, str(r), "default",
                               f"not chosen: {method} set has {pos} positive / {neg} negative case(s), fewer "
                               f"than {min_positives}; probability 0.5 used", y.size, pos)
    note = f"chosen by rule {r} on {method} predictions (n={y.size}, {pos} positive)"
    lo = hi = None
    if n_boot > 0:
        boots = [choose_threshold(y[i], p[i], r) for i in bootstrap_indices(y, n_boot, seed)]
        lo, hi = (float(v) for v in np.quantile(boots, [alpha / 2, 1 - alpha / 2]))
        note += f"; {100 * (1 - alpha):g}% bootstrap CI {lo:.3f}-{hi:.3f}"
    return ThresholdChoice(float(choose_threshold(y, p, r)), str(r), method, note, y.size, pos, lo, hi, alpha,
                           n_boot)


@dataclass
class OOFResult:
    """Pooled out-of-fold probabilities. scores: (E, N) per epoch, in the rows' order; folds: (N,)."""

    scores: np.ndarray
    labels: np.ndarray
    folds: np.ndarray


def crossfit(run_fold: RunFold, labels: Sequence[int], groups: Sequence[str], k: int = 5,
             seed: int = 0) -> OOFResult:
    """Run ``run_fold(j, train_rows, holdout_rows) -> (E, len(holdout_rows))`` probabilities for each
    patient-level stratified fold and pool the held-out probabilities (the fewest epochs of any fold)."""
    y = np.asarray(labels, dtype=int)
    folds = patient_folds(y, groups, k, seed)
    parts = []
    for j in range(int(folds.max()) + 1):
        hold = np.flatnonzero(folds == j)
        s = np.asarray(run_fold(j, np.flatnonzero(folds != j), hold), dtype=float)
        if s.ndim != 2 or s.shape[1] != hold.size:
            raise ValueError(f"run_fold({j}) returned shape {s.shape}, expected (epochs, {hold.size})")
        parts.append(s)
    scores = np.full((min(s.shape[0] for s in parts), y.size), np.nan)
    for j, s in enumerate(parts):
        scores[:, folds == j] = s[:scores.shape[0]]
    return OOFResult(scores, y, folds)
