"""mSASSS corner rule, missing-corner handling, anatomy lists and plausibility flags."""

from __future__ import annotations

import numpy as np
import pytest

from rheumai.tasks.msasss.anatomy import VIEWS, check_points, disc_levels, point_names, scored_corners
from rheumai.tasks.msasss.scoring import corner_score, score_view, total_score


def test_corner_lists_match_the_msasss_definition():
    assert scored_corners("cervical")[0] == "C2 lower" and scored_corners("cervical")[-1] == "T1 upper"
    assert scored_corners("lumbar")[0] == "T12 lower" and scored_corners("lumbar")[-1] == "S1 upper"
    corners = [(view, c) for view in VIEWS for c in scored_corners(view)]
    assert len(corners) == 24 and len(set(corners)) == 24
    assert [lvl.name for lvl in disc_levels("cervical")][0] == "C2-C3"
    assert point_names("lumbar")[:3] == ["T12 upper", "T12 lower", "T12 centre"]


@pytest.mark.parametrize("findings, bridged, corner, expected", [
    ({}, False, "C4 upper", 0),
    ({"erosion": True}, False, "C4 upper", 1),
    ({"sclerosis": True}, False, "C4 upper", 1),
    ({"squaring": True}, False, "C4 upper", 1),
    ({"squaring": True}, False, "C2 lower", 0),           # squaring not scored at the end corners
    ({"squaring": True, "erosion": True}, False, "S1 upper", 1),
    ({"syndesmophyte": True, "erosion": True}, False, "L3 lower", 2),
    ({"syndesmophyte": True}, True, "L3 lower", 3),
    ({}, True, "L3 lower", 3),                            # a bridge scores both corners it joins
])
def test_corner_rule(findings, bridged, corner, expected):
    assert corner_score(findings, corner, bridged) == expected


def test_bridge_scores_both_corners_and_unscorable_is_none():
    s = score_view("cervical", {}, {"C4-C5": True}, scorable={"C6 upper": False})
    assert s["C4 lower"] == 3 and s["C5 upper"] == 3 and s["C5 lower"] == 0
    assert s["C6 upper"] is None


def _scores(cerv_missing=0, lumb_missing=0, value=2):
    out = {}
    for view, k in (("cervical", cerv_missing), ("lumbar", lumb_missing)):
        cs = scored_corners(view)
        out[view] = {c: (None if i < k else value) for i, c in enumerate(cs)}
    return out


def test_total_complete_imputed_and_refused():
    full = total_score(_scores())
    assert full["total"] == 48 and full["n_scored"] == 24 and full["complete"]
    some = total_score(_scores(cerv_missing=2))
    assert some["total"] == 48 and some["n_scored"] == 22 and not some["complete"]
    assert len(some["imputed"]) == 2 and some["views"]["cervical"]["n_missing"] == 2
    many = total_score(_scores(lumb_missing=4))
    assert many["total"] is None and many["views"]["cervical"]["subtotal"] == 24
    raw = total_score(_scores(lumb_missing=4), missing="none")
    assert raw["total"] == 24 + 16 and raw["partial"]
    with pytest.raises(ValueError, match="missing"):
        total_score(_scores(), missing="zero")


def _good_points(view="cervical"):
    pts = []
    for i in range(7):
        c = np.array([120.0 - 2 * i, 40.0 + 35 * i])
        pts += [c + [-12, -12], c + [-12, 12], c]
    return np.array(pts)


def test_plausible_points_pass_and_disorder_is_flagged():
    ok = check_points("cervical", _good_points(), (320, 256), (0.6, 0.6))
    assert ok["view_ok"] and not any(ok["corner_flags"].values())
    swapped = _good_points()
    swapped[[6, 7, 8]], swapped[[9, 10, 11]] = swapped[[9, 10, 11]].copy(), swapped[[6, 7, 8]].copy()
    bad = check_points("cervical", swapped, (320, 256), (0.6, 0.6))
    assert not bad["view_ok"] and any("out of order" in f for f in bad["view_flags"])
    flipped = _good_points()
    flipped[3], flipped[4] = flipped[4].copy(), flipped[3].copy()
    assert any("upper corner not above" in f for f in check_points("cervical", flipped, (320, 256), (0.6, 0.6))["view_flags"])
    outside = _good_points()
    outside[-2] = [120, 400]  # T1 lower is not scored; T1 upper moved out
    outside[-3] = [120, 330]
    res = check_points("cervical", outside, (320, 256), (0.6, 0.6))
    assert "outside the image" in res["corner_flags"]["T1 upper"]
    nan = _good_points()
    nan[0] = np.nan
    assert not check_points("cervical", nan, (320, 256), (0.6, 0.6))["view_ok"]


def test_unscored_end_corner_is_ignored_and_a_stray_corner_is_flagged_locally():
    pts = _good_points()
    pts[0] = [60.0, 5.0]  # C2 upper (no score) far off: nothing flagged
    res = check_points("cervical", pts, (320, 256), (0.6, 0.6))
    assert res["view_ok"] and not any(res["corner_flags"].values())
    pts = _good_points()
    pts[7] = pts[8] + [-40.0, 30.0]  # C4 lower drifts far from its centre
    res = check_points("cervical", pts, (320, 256), (0.6, 0.6))
    flagged = {c for c, f in res["corner_flags"].items() if f}
    assert res["view_ok"] and "C4 lower" in flagged and "C5 upper" not in flagged
