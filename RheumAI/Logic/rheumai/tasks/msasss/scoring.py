"""The mSASSS corner rule and totals.

Per anterior corner: 3 = bridging syndesmophyte (a bridge scores both corners it joins), 2 =
syndesmophyte, 1 = erosion, sclerosis or squaring, 0 = none (the highest finding wins). A corner
that cannot be read (not visible, implant, implausible landmarks) is ``None`` ("not scorable"),
never 0. ASSUMPTION (the paper's text is not available here): squaring, a finding of the whole
anterior border, is not scored at the four corners whose vertebra lies outside the scored range
and is only partly read (:data:`SQUARING_NOT_SCORED`). Missing corners (Ramiro et al.'s cohort
convention, the default): within a view up to ``max_missing`` (3) are imputed by the mean of its
scored corners; with more the view's subtotal, and so the total, is not computed.
``missing="none"`` sums the scored corners only and marks the total partial.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .anatomy import VIEWS, disc_levels, scored_corners

LESIONS = ("erosion", "sclerosis", "squaring", "syndesmophyte", "bridging")
CORNER_LESIONS = ("erosion", "sclerosis", "squaring", "syndesmophyte")  # findings of one corner
SQUARING_NOT_SCORED = frozenset({"C2 lower", "T1 upper", "T12 lower", "S1 upper"})
MISSING_METHODS = ("segment_mean", "none")


def corner_score(findings: Mapping[str, bool], corner: str, bridged: bool) -> int:
    """Score 0-3 of one scorable corner from its findings and whether its disc level is bridged."""
    if bridged or findings.get("bridging", False):
        return 3
    if findings.get("syndesmophyte", False):
        return 2
    squaring = findings.get("squaring", False) and corner not in SQUARING_NOT_SCORED
    if findings.get("erosion", False) or findings.get("sclerosis", False) or squaring:
        return 1
    return 0


def score_view(view: str, findings: Mapping[str, Mapping[str, bool]], bridged: Mapping[str, bool],
               scorable: Mapping[str, bool] | None = None) -> dict[str, int | None]:
    """Scores of the 12 corners of a view.

    findings: {corner: {lesion: bool}} for the corner lesions; bridged: {disc level name
    ("C2-C3"): bool}; scorable: {corner: bool} (missing entries count as scorable).
    """
    out: dict[str, int | None] = {}
    for lvl in disc_levels(view):
        for c in lvl.corners:
            if scorable is not None and not scorable.get(c, True):
                out[c] = None
            else:
                out[c] = corner_score(findings.get(c, {}), c, bool(bridged.get(lvl.name, False)))
    return out


def total_score(scores: Mapping[str, Mapping[str, int | None]], missing: str = "segment_mean",
                max_missing: int = 3) -> dict[str, Any]:
    """Total mSASSS (0-72) from {view: {corner: score | None}} with the missing-corner rule (module doc).

    Returns total (float | None), per-view subtotals, n_scored, n_missing, the method, whether
    the total is complete (all 24 scored) and which corners were imputed with what value.
    """
    if missing not in MISSING_METHODS:
        raise ValueError(f"missing must be one of {MISSING_METHODS}, not {missing!r}")
    views: dict[str, Any] = {}
    imputed: dict[str, float] = {}
    n_scored = n_missing = 0
    total: float | None = 0.0
    for view in VIEWS:
        vs = scores.get(view, {})
        vals = {c: vs.get(c) for c in scored_corners(view)}
        got = [v for v in vals.values() if v is not None]
        miss = [c for c, v in vals.items() if v is None]
        n_scored += len(got)
        n_missing += len(miss)
        if missing == "none":
            sub: float | None = float(sum(got))
        elif not miss:
            sub = float(sum(got))
        elif len(miss) <= max_missing and got:
            mean = float(np.mean(got))
            imputed.update({f"{view}:{c}": mean for c in miss})
            sub = float(sum(got)) + mean * len(miss)
        else:
            sub = None
        views[view] = {"subtotal": sub, "n_scored": len(got), "n_missing": len(miss), "missing": miss}
        total = None if (total is None or sub is None) else total + sub
    return {"total": total, "views": views, "n_scored": n_scored, "n_missing": n_missing, "missing_method": missing,
            "max_missing_per_view": max_missing, "complete": n_missing == 0, "imputed": imputed,
            "partial": missing == "none" and n_missing > 0}
