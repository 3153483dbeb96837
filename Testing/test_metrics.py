"""Metric functions against scikit-learn / scipy, DeLong against the bootstrap, threshold rules,
calibration, and the paper's Table 2 confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (accuracy_score, brier_score_loss, confusion_matrix, f1_score, precision_score,
                             recall_score, roc_auc_score, roc_curve)

from rheumai.metrics import (auc_ci, binary_report, calibration, choose_threshold, confusion_counts,
                             delong_auc_variance, metrics_from_counts, parse_threshold_rule, wilson_ci)
from rheumai.report import counts_report


def _scores(n: int, seed: int, sep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    y[:2], y[2:4] = 1, 0
    z = rng.normal(size=n) + sep * y
    return y, 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_metrics_match_sklearn(seed: int) -> None:
    y, p = _scores(150, seed)
    thr = float(np.quantile(p, 0.6))
    yp = (p >= thr).astype(int)
    c = confusion_counts(y, p, thr)
    tn, fp, fn, tp = confusion_matrix(y, yp).ravel()
    assert c == {"tp": tp, "fn": fn, "fp": fp, "tn": tn}
    m = metrics_from_counts(**c)
    assert m["sensitivity"]["value"] == pytest.approx(recall_score(y, yp))
    assert m["specificity"]["value"] == pytest.approx(recall_score(y, yp, pos_label=0))
    assert m["ppv"]["value"] == pytest.approx(precision_score(y, yp))
    assert m["npv"]["value"] == pytest.approx(precision_score(y, yp, pos_label=0))
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, yp))
    assert m["f1"]["value"] == pytest.approx(f1_score(y, yp))
    for name, v in m.items():
        assert v["lo"] <= v["value"] <= v["hi"], name


def test_wilson_matches_closed_form() -> None:
    k, n = 9, 13
    z = stats.norm.ppf(0.975)
    ph = k / n
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    assert wilson_ci(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert all(np.isnan(wilson_ci(0, 0)))


def test_delong_auc_equals_sklearn_and_ci_agrees_with_bootstrap() -> None:
    y, p = _scores(200, 5, sep=1.2)
    auc, var = delong_auc_variance(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p))
    d = auc_ci(y, p, "delong")
    b = auc_ci(y, p, "bootstrap", n_boot=1000, seed=1)
    assert d["value"] == b["value"] == pytest.approx(auc)
    # DeLong's standard error and the bootstrap's spread describe the same sampling variability
    assert (d["hi"] - d["lo"]) == pytest.approx(b["hi"] - b["lo"], rel=0.2)
    assert abs(d["lo"] - b["lo"]) < 0.03 and abs(d["hi"] - b["hi"]) < 0.03


def test_delong_variance_with_ties_matches_bootstrap_variance() -> None:
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60, int), np.zeros(90, int)]
    p = np.round(rng.random(150) * 0.6 + 0.3 * y, 1)  # coarse scores: many ties
    _, var = delong_auc_variance(y, p)
    idx = [np.r_[rng.choice(60, 60), 60 + rng.choice(90, 90)] for _ in range(1500)]
    boot = np.array([roc_auc_score(y[i], p[i]) for i in idx])
    assert np.sqrt(var) == pytest.approx(boot.std(), rel=0.15)


def test_threshold_rules() -> None:
    y, p = _scores(300, 7, sep=1.5)
    fpr, tpr, thr = roc_curve(y, p)
    t = choose_threshold(y, p, "youden")
    j = recall_score(y, p >= t) + recall_score(y, p >= t, pos_label=0) - 1
    assert j == pytest.approx(np.max(tpr - fpr))
    for s in (0.5, 0.75, 0.9):
        t = choose_threshold(y, p, f"sensitivity:{s}")
        assert recall_score(y, p >= t) >= s
        # the most specific such threshold: the next higher score misses the target
        higher = p[p > t]
        if higher.size:
            assert recall_score(y, p >= higher.min()) < s
    assert choose_threshold(y, p, "fixed:0.3") == 0.3
    assert str(parse_threshold_rule("Sensitivity:0.75")) == "sensitivity:0.75"
    for bad in ("median", "fixed:", "fixed:1.5", "sensitivity:x"):
        with pytest.raises(ValueError):
            parse_threshold_rule(bad)
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.ones(5), np.linspace(0, 1, 5), "youden")


def test_calibration_matches_sklearn() -> None:
    y, p = _scores(400, 11)
    c = calibration(y, p, n_bins=5)
    assert c["brier"] == pytest.approx(brier_score_loss(y, p))
    assert sum(c["bin_counts"]) == 400 and len(c["bin_counts"]) == 5
    # each curve point: mean predicted and observed rate of one non-empty bin
    b = np.minimum((p * 5).astype(int), 4)
    nonempty = [k for k in range(5) if (b == k).any()]
    assert c["prob_true"] == pytest.approx([y[b == k].mean() for k in nonempty])
    assert c["prob_pred"] == pytest.approx([p[b == k].mean() for k in nonempty])


def test_binary_report_is_consistent() -> None:
    y, p = _scores(120, 4)
    r = binary_report(y, p, 0.4, n_boot=200)
    c = r["counts"]
    assert sum(c.values()) == r["n"] == 120 and c["tp"] + c["fn"] == r["n_positive"]
    assert r["auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    one_class = binary_report(np.zeros(10), np.linspace(0, 1, 10), 0.5, n_boot=50)
    assert np.isnan(one_class["auc"]["value"]) and np.isnan(one_class["metrics"]["sensitivity"]["value"])


# The paper (Lebouille-Veldman et al. 2025) reports on 67 test patients: accuracy 0.84, AUC 0.82,
# sensitivity 0.75, specificity 0.87, PPV 0.56, NPV 0.92, and states 12 positives; its Table 2
# gives TP 9, FN 4, FP 7, TN 47. 9 + 4 = 13 positives, not 12; sensitivity from the counts is
# 9/13 = 0.69 (0.75 = 9/12 matches the text, not the table), and F1 from the counts is
# 18/29 = 0.62. Specificity, PPV, NPV and accuracy do follow from the table.
PAPER_COUNTS = {"tp": 9, "fn": 4, "fp": 7, "tn": 47}
PAPER_REPORTED = {"accuracy": 0.84, "sensitivity": 0.75, "specificity": 0.87, "ppv": 0.56, "npv": 0.92}


def test_paper_table2_derived_values_and_inconsistency(tmp_path) -> None:
    r = counts_report(PAPER_COUNTS, PAPER_REPORTED, stated_positives=12, out_dir=tmp_path,
                      title="Lebouille-Veldman 2025, Table 2")
    m = r["metrics"]
    assert sum(PAPER_COUNTS.values()) == 67
    assert m["sensitivity"]["value"] == pytest.approx(9 / 13)
    assert m["specificity"]["value"] == pytest.approx(47 / 54)
    assert m["ppv"]["value"] == pytest.approx(9 / 16)
    assert m["npv"]["value"] == pytest.approx(47 / 51)
    assert m["accuracy"]["value"] == pytest.approx(56 / 67)
    assert m["f1"]["value"] == pytest.approx(18 / 29)
    assert round(m["f1"]["value"], 2) == 0.62
    # the rounded values the paper prints that its counts support
    for name in ("specificity", "ppv", "npv", "accuracy"):
        assert round(m[name]["value"], 2) == PAPER_REPORTED[name]
    issues = r["discrepancies"]
    assert len(issues) == 2
    assert any("13" in s and "12" in s for s in issues)           # positives
    assert any(s.startswith("sensitivity") and "9/13" in s for s in issues)
    # with 12 positives (FN 3, 66 patients) the sensitivity would be the reported 0.75
    assert metrics_from_counts(9, 3, 7, 47)["sensitivity"]["value"] == pytest.approx(0.75)
    text = (tmp_path / "counts_report.md").read_text()
    assert "Inconsistencies" in text and "TP 9" in text and "0.621" in text
    assert (tmp_path / "counts_metrics.csv").read_text().count("\n") == 7


def test_youden_threshold_sits_in_the_middle_of_the_gap() -> None:
    y = np.array([0, 0, 0, 1, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.8, 0.9])
    # J is maximal for any threshold in (0.5, 0.6]: the midpoint, not the lowest positive's 0.6
    assert choose_threshold(y, p, "youden") == pytest.approx(0.55)
    assert choose_threshold([0, 1], [0.2, 0.7], "youden") == pytest.approx(0.45)
