"""mSASSS generator: truth geometry, planted lesions, label sheet and DICOM files that read back."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest

from rheumai.tasks.msasss.anatomy import disc_levels, point_index, scored_corners
from rheumai.tasks.msasss.dataset import load_cohort
from rheumai.tasks.msasss.scoring import score_view
from rheumai.tasks.msasss.synth import SynthParams, make_cohort, render_view


def _at(img, xy):
    return float(img[int(round(xy[1])), int(round(xy[0]))])


@pytest.mark.parametrize("view", ["cervical", "lumbar"])
def test_points_sit_on_the_vertebrae(view):
    img, truth = render_view(np.random.default_rng(3), view, 0.0, SynthParams(noise_range=(0.0, 0.001)))
    assert img.shape == (320, 256) and 0 <= img.min() and img.max() <= 1
    pts = truth.points_xy
    assert np.all(np.diff(pts[2::3, 1]) > 0)  # centres top to bottom
    for lvl in disc_levels(view):
        ca = pts[point_index(view, lvl.above, "centre")]
        cb = pts[point_index(view, lvl.below, "centre")]
        qa = pts[point_index(view, lvl.above, "lower")]
        qb = pts[point_index(view, lvl.below, "upper")]
        assert _at(img, ca) > _at(img, (ca + cb) / 2) + 0.1  # bone brighter than the disc between the bodies
        assert qa[0] < ca[0] and qb[1] > qa[1]  # anterior corners face image left; disc below the upper corner
    assert all(s == 0 for s in truth.scores.values())


def test_bridges_and_implants_show_in_the_image():
    rng = np.random.default_rng(0)
    found_bridge = found_implant = False
    for _ in range(12):
        img, truth = render_view(rng, "lumbar", 1.0, SynthParams(noise_range=(0.0, 0.001)), implant=True)
        assert sum(v is None for v in truth.scores.values()) == 2
        assert not all(truth.scorable[c] for c in disc_levels("lumbar")[0].corners) or truth.implant_level != "T12-L1"
        assert img.max() >= 0.99  # metal saturates
        found_implant = True
        pts = truth.points_xy
        bridged, open_ = [], []
        for lvl in disc_levels("lumbar"):
            if lvl.name == truth.implant_level:
                continue
            qa = pts[point_index("lumbar", lvl.above, "lower")]
            qb = pts[point_index("lumbar", lvl.below, "upper")]
            anterior = np.array([-1.8 / truth.spacing_mm[0], 0.0])  # ~1.8 mm in front of the corners
            path_min = min(_at(img, qa + s * (qb - qa) + anterior) for s in np.linspace(0.3, 0.7, 5))
            (bridged if truth.bridged[lvl.name] else open_).append(path_min)
            if truth.bridged[lvl.name]:
                assert truth.scores[lvl.corners[0]] == 3 and truth.scores[lvl.corners[1]] == 3
        if bridged and open_:
            assert min(bridged) > max(open_)  # bone runs across a bridged disc only
            found_bridge = True
            break
    assert found_bridge and found_implant


def test_cohort_files_labels_and_truth_read_back(tmp_path):
    summary = make_cohort(tmp_path, n=2, seed=1)
    assert summary["n_images"] == 4
    rows = list(csv.DictReader(open(tmp_path / "labels.csv")))
    assert len(rows) == 2 * 2 * 21 and sum(r["scored"] == "1" for r in rows) == 48
    ds = pydicom.dcmread(tmp_path / "dicom" / "MS0000_cervical.dcm")
    assert ds.Modality == "DX" and ds.PatientID == "MS0000" and float(ds.PixelSpacing[0]) > 0.5
    recs = load_cohort(tmp_path)
    assert len(recs) == 4 and {r.view for r in recs} == {"cervical", "lumbar"}
    for rec in recs:
        assert rec.points_xy.shape == (21, 2) and set(rec.scores) == set(scored_corners(rec.view))
        assert rec.spacing_mm[0] == pytest.approx(float(pydicom.dcmread(rec.path).PixelSpacing[0]))
        again = score_view(rec.view, rec.findings, rec.bridged, rec.scorable)
        assert again == rec.scores  # the sheet's scores follow the corner rule from its own findings
    totals = list(csv.DictReader(open(tmp_path / "totals.csv")))
    assert len(totals) == 2 and all(0 <= float(t["total"]) <= 72 for t in totals if t["total"])


def test_cohort_refuses_missing_sheet(tmp_path):
    from rheumai.errors import InputError

    with pytest.raises(InputError, match="studies.csv"):
        load_cohort(tmp_path)
