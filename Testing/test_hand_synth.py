"""Hand SvdH: scoring definitions and the procedural radiograph generator (known truth)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from rheumai.radiograph import read_radiograph
from rheumai.tasks.hand_svdh.scoring import (EROSION_MASK, JOINT_NAMES, JSN_MASK, MAX_TOTAL, joint_table,
                                             severity_class, totals)
from rheumai.tasks.hand_svdh.synth import (JIDX, SynthParams, build_anatomy, draw_grades, make_cohort, make_hand,
                                           render)


def test_svdh_areas_and_classes():
    assert EROSION_MASK.sum() == 16 and JSN_MASK.sum() == 15 and MAX_TOTAL == 140
    assert len(JOINT_NAMES) == len(set(JOINT_NAMES)) == 22
    np.testing.assert_array_equal(severity_class([0, 4.9, 5, 14, 15, 59, 60, 140]), [0, 0, 1, 1, 2, 3, 4, 4])
    np.testing.assert_array_equal(severity_class([3, 10], edges=(10,)), [0, 1])
    with pytest.raises(ValueError):
        severity_class(3, edges=(10, 5))
    e = np.where(EROSION_MASK, 5, 0)
    j = np.where(JSN_MASK, 4, 0)
    t = totals(e + 1, j + 1)  # unscored areas do not count, whatever they hold
    assert t["total"] == 140 and t["erosion"] == 16 * 6 and t["jsn"] == 15 * 5 or t["total"] == MAX_TOTAL + 31
    rows = joint_table(e, j)
    assert rows[JIDX["CMC3"]]["erosion"] is None and rows[JIDX["IP1"]]["jsn"] is None


def test_grades_follow_severity_and_masks():
    rng = np.random.default_rng(0)
    low = [totals(*draw_grades(rng, 0.0))["total"] for _ in range(50)]
    high = [totals(*draw_grades(rng, 1.0))["total"] for _ in range(50)]
    assert np.mean(low) < 5 and np.mean(high) > 60
    e, j = draw_grades(rng, 0.8)
    assert (e[~EROSION_MASK] == 0).all() and (j[~JSN_MASK] == 0).all()
    assert e.max() <= 5 and j.max() <= 4 and e.min() >= 0


def _gap_width(jsn_grade: int) -> int:
    """Samples (0.05 mm apart) of low density between metacarpal 3 and its proximal phalanx."""
    jsn = np.zeros(22, int)
    jsn[JIDX["MCP3"]] = jsn_grade
    A = build_anatomy(np.random.default_rng(1), np.zeros(22, int), jsn, ring=False)
    bones = {b["name"]: b for b in A.bones}
    p0, p1 = bones["MC3"]["p0"], bones["MC3"]["p1"]
    axis = (p1 - p0) / np.linalg.norm(p1 - p0)
    s = np.arange(-5.0, 8.0, 0.05)  # mm beyond the metacarpal's segment end, along its axis
    U, V = (p1[0] + s * axis[0])[None], (p1[1] + s * axis[1])[None]
    dens = render(A, U, V, np.random.default_rng(0), 0.0)[0]
    return int((dens < 0.25).sum())  # soft tissue alone is ~0.18 here, bone along the axis > 0.4


def test_narrowing_closes_the_joint_space_and_erosion_removes_bone():
    widths = [_gap_width(g) for g in range(5)]
    assert widths[0] > widths[1] > widths[2] > widths[3] > widths[4] and widths[4] == 0, widths
    ero5 = np.zeros(22, int)
    ero5[JIDX["MCP3"]] = 5
    normal = build_anatomy(np.random.default_rng(1), np.zeros(22, int), np.zeros(22, int), ring=False)
    eroded = build_anatomy(np.random.default_rng(1), ero5, np.zeros(22, int), ring=False)
    assert sum(len(b["bites"]) for b in eroded.bones) >= 2 and sum(len(b["bites"]) for b in normal.bones) == 0
    # the defects remove bone: less density around MCP3 than in the intact hand
    c = eroded.points["MCP3"]
    uu, vv = np.meshgrid(np.linspace(c[0] - 8, c[0] + 8, 64), np.linspace(c[1] - 8, c[1] + 8, 64))
    rng = np.random.default_rng(0)
    assert render(eroded, uu, vv, rng, 0.0).sum() < 0.97 * render(normal, uu, vv, rng, 0.0).sum()


def test_make_hand_geometry_and_mirroring():
    p = SynthParams(ring_fraction=0.0)
    left = make_hand(np.random.default_rng(3), p, severity=0.5, laterality="L")
    right = make_hand(np.random.default_rng(3), p, severity=0.5, laterality="R")
    np.testing.assert_allclose(right.array, left.array[:, ::-1])
    np.testing.assert_allclose(right.points_xy[:, 0], p.shape[1] - 1 - left.points_xy[:, 0])
    H, W = p.shape
    assert left.array.shape == (H, W) and 0 <= left.array.min() and left.array.max() <= 1
    assert (left.points_xy[:, 0] > 0).all() and (left.points_xy[:, 0] < W).all()
    assert (left.points_xy[:, 1] > 0).all() and (left.points_xy[:, 1] < H).all()
    # landmarks sit on the hand: brighter than the background
    xs, ys = np.rint(left.points_xy).astype(int).T
    assert np.median(left.array[ys, xs]) > np.median(left.array[:20, :20]) + 0.1
    # in a left hand (canonical) the thumb (IP1) lies to the right of the little finger (PIP5)
    assert left.points_xy[JIDX["IP1"], 0] > left.points_xy[JIDX["PIP5"], 0]


def test_make_cohort_writes_dicom_cr_and_consistent_sheets(tmp_path):
    labels = make_cohort(tmp_path, n=4, seed=2)
    rows = list(csv.DictReader(open(labels)))
    lms = list(csv.DictReader(open(tmp_path / "landmarks.csv")))
    assert len(rows) == 4 and len(lms) == 4 * 22
    for r in rows:
        e = np.array([int(r[f"ero_{n}"]) if r[f"ero_{n}"] != "" else 0 for n in JOINT_NAMES])
        j = np.array([int(r[f"jsn_{n}"]) if r[f"jsn_{n}"] != "" else 0 for n in JOINT_NAMES])
        assert int(r["total"]) == e.sum() + j.sum() and int(r["class"]) == severity_class(int(r["total"]))
        assert r["ero_CMC3"] == "" and r["jsn_IP1"] == ""
        rad = read_radiograph(tmp_path / r["file"])
        assert rad.laterality == r["laterality"] and rad.meta["Modality"] == "CR"
        assert rad.spacing_mm[0] == pytest.approx(float(r["spacing_mm"]), abs=1e-4)
        assert rad.spacing_source in ("PixelSpacing", "ImagerPixelSpacing")
        assert rad.array.shape == SynthParams().shape
