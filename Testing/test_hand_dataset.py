"""Hand SvdH cohort loading: canonical frame, point mappings, joint crops, label-sheet errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from rheumai.errors import InputError
from rheumai.radiograph import radiograph_from_array
from rheumai.tasks.hand_svdh.dataset import (IGNORE, HandDataset, HandParams, JointDataset, LandmarkDataset,
                                             WholeHandDataset, crops, load_cohort, prepare)
from rheumai.tasks.hand_svdh.scoring import EROSION_MASK, JOINT_NAMES, JSN_MASK
from rheumai.tasks.hand_svdh.synth import make_cohort
from rheumai.tasks.hand_svdh.train import split_cases


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("hand_cohort")
    labels = make_cohort(out, n=6, seed=5)
    return labels, out / "landmarks.csv"


def test_load_cohort_truth_in_canonical_frame(cohort):
    labels, lms = cohort
    params = HandParams()
    cases = load_cohort(labels, params, lms)
    rows = {r["patient_id"]: r for r in csv.DictReader(open(labels))}
    pts = {}
    for r in csv.DictReader(open(lms)):
        pts.setdefault(r["patient_id"], []).append((float(r["x"]), float(r["y"])))
    assert len(cases) == 6
    for c in cases:
        assert (c.erosion[~EROSION_MASK] == IGNORE).all() and (c.jsn[~JSN_MASK] == IGNORE).all()
        assert c.total == float(rows[c.patient_id]["total"])
        assert c.prep.tf.flip_x == (rows[c.patient_id]["laterality"] == "R")
        # canonical points map back to the file's pixels exactly; thumb (IP1) right of PIP5 in the canonical frame
        np.testing.assert_allclose(c.prep.to_source(c.points_canon), pts[c.patient_id], atol=1e-9)
        assert c.points_canon[JOINT_NAMES.index("IP1"), 0] > c.points_canon[JOINT_NAMES.index("PIP5"), 0]
        np.testing.assert_allclose(c.prep.from_small(c.prep.to_small(c.points_canon)), c.points_canon, atol=1e-9)
        np.testing.assert_allclose(c.prep.from_hires(c.prep.to_hires(c.points_canon)), c.points_canon, atol=1e-9)
    s = WholeHandDataset(cases)[0]
    assert s["input"].shape == (1, 160, 128) and s["target"]["total"].ndim == 0
    lm = LandmarkDataset(cases, augment=True)[1]
    assert lm["target"]["landmarks"].shape == (22, 2)
    js = JointDataset(cases, params, jitter_mm=1.0, augment=True)
    assert len(js) == 6 * 22 and js[3]["input"]["x"].shape == (1, 32, 32)
    before = js._crops.copy()
    js.set_epoch(1)
    assert not np.array_equal(before, js._crops)  # new jitter each epoch
    assert js.unaugmented()._crops.shape == before.shape
    h = HandDataset(cases)[0]
    assert set(h["input"]) == {"small", "hires", "hspacing"} and h["target"]["landmarks"].shape == (22, 2)
    split = {k: [c.patient_id for c in v] for k, v in split_cases(cases, {"train_fraction": 0.5,
                                                                          "val_fraction": 0.0}, seed=0).items()}
    assert sorted(split["train"] + split["test"]) == sorted(c.patient_id for c in cases) and not split["val"]
    assert not set(split["train"]) & set(split["test"])


def test_crops_are_centred_and_physical():
    arr = np.zeros((100, 80), np.float32)
    arr[40, 30] = 1.0  # a bright dot at pixel (x=30, y=40)
    rad = radiograph_from_array(arr, spacing_mm=(0.5, 0.5), laterality="L")
    params = HandParams(hires_size=(100, 80), crop_mm=8.0, crop_px=17, p_low=0.0, p_high=100.0)
    prep = prepare(rad, params)
    c = crops(prep, np.array([[30.0, 40.0]]), params)[0]
    assert np.unravel_index(c.argmax(), c.shape) == (8, 8)
    # 8 mm over 17 px at 0.5 mm per pixel: the dot spreads over ~1 crop pixel each side
    assert c[8, 8] > c[8, 10] and c[8, 12] == 0


def test_label_sheet_errors_name_the_file(tmp_path, cohort):
    labels, _ = cohort
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,total\nP1,3\n")
    with pytest.raises(InputError, match="bad.csv.*file"):
        load_cohort(bad, HandParams())
    text = open(labels).read().splitlines()
    header = text[0].split(",")
    row = text[1].split(",")
    row[header.index("total")] = "999"
    row[header.index("file")] = str((labels.parent / row[header.index("file")]).resolve())
    (tmp_path / "big.csv").write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    with pytest.raises(InputError, match="outside 0..140"):
        load_cohort(tmp_path / "big.csv", HandParams())
