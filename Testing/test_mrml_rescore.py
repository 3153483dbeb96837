"""Re-scoring from corrected point lists through the console logic, for every task that declares
``rescore_points`` (mSASSS corners, hand SvdH landmarks), on real slicer-core nodes: predict, move a
point / mark one missing in the point list, re-score, check the values and the table nodes."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
torch = pytest.importorskip("torch")

from rheumai.errors import InputError  # noqa: E402
from rheumai.radiograph import read_radiograph  # noqa: E402
from rheumai.tasks import get_task  # noqa: E402
from rheumai_mrml.landmark_scene import read_landmarks  # noqa: E402
from rheumai_mrml.logic import RheumAIConsoleLogic  # noqa: E402
from rheumai_mrml.nodes import volume_node_from_image  # noqa: E402
from rheumai_mrml.scene import new_scene  # noqa: E402
from rheumai_mrml.tables import table_rows  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def logic():
    ctx = new_scene()
    try:
        yield RheumAIConsoleLogic(ctx.scene)
    finally:
        ctx.close()


def _table(logic, node_id):
    rows = table_rows(logic.scene.GetNodeByID(node_id))
    assert len(rows) == 1
    return rows[0]


def _move(node, index, delta_lps):
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(index, p)
    node.SetNthControlPointPosition(index, p[0] - delta_lps[0], p[1] - delta_lps[1], p[2] + delta_lps[2])


def test_both_tasks_declare_the_entry_point():
    for name in ("msasss", "hand_svdh"):
        assert callable(get_task(name).entry("rescore_points"))


@pytest.fixture(scope="module")
def msasss_model(tmp_path_factory):
    from rheumai.tasks.msasss.dataset import load_cohort
    from rheumai.tasks.msasss.synth import make_cohort
    from rheumai.tasks.msasss.train import train

    root = tmp_path_factory.mktemp("msasss_rescore")
    make_cohort(root / "cohort", n=3, seed=5)
    records = load_cohort(root / "cohort")
    small = {"init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1], "crop_size": 32}
    stage = {"epochs": 1, "batch_size": 8, "lr": 1e-3}
    config = {"task": "msasss", "separate_views": True, "split": [0.67, 0.33, 0.0],
              "landmarks": {**stage, "arch": {"channels": [4, 8, 16], "input_size": [64, 48]}},
              "refine": {**stage, "arch": {"channels": [4, 8], "crop_size": 32}},
              "lesions": {**stage, "arch": small}, "ordinal": {**stage, "arch": small}}
    folder = train(config, root / "cohort" / "studies.csv", root / "run", show_progress=False).checkpoint
    return records, folder


def test_msasss_rescore_from_point_lists(logic, msasss_model):
    records, folder = msasss_model
    pid = records[0].patient_id
    inputs = {r.view: volume_node_from_image(logic.scene, read_radiograph(r.path).image, f"{pid} {r.view}")
              for r in records if r.patient_id == pid}
    assert set(inputs) == {"cervical", "lumbar"}
    before = logic.predictStudy(folder, inputs, createNodes=True, saliency=None)
    ids = before["nodeIDs"]
    lists = {v: logic.scene.GetNodeByID(ids[f"points {v}"]) for v in inputs}
    assert before["corners_scored"] + before["corners_missing"] == 24
    # Place every corner at its true position (the tiny model's own points fail the anatomy checks).
    from rheumai.landmarks import points_to_lps
    from rheumai.tasks.msasss.anatomy import point_names

    truth = {r.view: points_to_lps(read_radiograph(r.path).image, r.points_xy) for r in records if r.patient_id == pid}

    def place(lists, centres_only=False):
        for view, lps in truth.items():
            names, node = point_names(view), lists[view]
            labels = read_landmarks(node)["labels"]
            for i, label in enumerate([] if centres_only else labels):
                p = lps[names.index(label)]
                node.SetNthControlPointPosition(i, -p[0], -p[1], p[2])
            for name, p in zip(names, lps):  # the view's other landmarks (centres) as extra points
                if name not in labels:
                    node.AddControlPoint(-p[0], -p[1], p[2], name)

    place(lists)
    placed = logic.rescoreFromPointLists(folder, inputs, lists)
    lists = {v: logic.scene.GetNodeByID(placed["nodeIDs"][f"points {v}"]) for v in inputs}
    scored = [(v, p["label"]) for v in inputs for p in placed["points"][v]["points"] if p["status"] == "ok"]
    assert scored and placed["corners_scored"] == len(scored)
    before = placed
    place(lists)
    view, gone = scored[0]
    node = lists[view]
    labels = read_landmarks(node)["labels"]
    node.SetNthControlPointPositionMissing(labels.index(gone))

    after = logic.rescoreFromPointLists(folder, inputs, lists)
    assert after["views"][view]["scores"][gone] is None
    assert "marked missing" in after["views"][view]["not_scorable"][gone]
    # (a corner marked missing keeps the model's position for the anatomy checks, which may flag more)
    assert after["corners_scored"] < before["corners_scored"]
    assert after["landmarks_source"] == "corrected" and after["task"] == "msasss"
    assert {p["label"]: p for p in after["points"][view]["points"]}[gone]["status"] == "missing"
    # The result table (same node) and the per-corner table hold the new values.
    new_ids = after["nodeIDs"]
    assert new_ids["table"] == ids["table"]
    assert int(_table(logic, new_ids["table"])["corners_scored"]) == after["corners_scored"]
    corners = table_rows(logic.scene.GetNodeByID(new_ids["rows:corner_table"]))
    hit = [r for r in corners if r["view"] == view and r["corner"] == gone]
    assert len(hit) == 1 and hit[0]["status"] == "missing" and hit[0]["score"] in ("", None)
    assert sum(1 for r in corners if r["status"] == "ok") == after["corners_scored"]
    # The re-created point list shows the corner as missing; a moved corner is scored where it was put.
    node = logic.scene.GetNodeByID(new_ids[f"points {view}"])
    back = read_landmarks(node)
    assert back["status"][back["labels"].index(gone)] == "missing"
    lists = {v: logic.scene.GetNodeByID(new_ids[f"points {v}"]) for v in inputs}
    place(lists, centres_only=True)
    other = next(lb for v, lb in scored if v == view and lb != gone) if len(scored) > 1 else None
    other = other or back["labels"][0]
    _move(node, back["labels"].index(other), (1.5, -0.5, 0.0))
    moved = read_landmarks(node)["lps"][back["labels"].index(other)]
    again = logic.rescoreFromPointLists(folder, inputs, lists)
    np.testing.assert_allclose({p["label"]: p for p in again["points"][view]["points"]}[other]["lps"], moved,
                               atol=1e-3)
    assert int(_table(logic, again["nodeIDs"]["table"])["corners_scored"]) == again["corners_scored"]

@pytest.fixture(scope="module")
def hand_model(tmp_path_factory):
    from rheumai.tasks.hand_svdh.dataset import HandParams, load_cohort
    from rheumai.tasks.hand_svdh.synth import make_cohort
    from rheumai.tasks.hand_svdh.train import train_hand, load_config

    tiny = load_config({"whole": {"epochs": 1, "batch_size": 4}, "landmarks": {"epochs": 1, "batch_size": 4},
                        "joints": {"epochs": 1, "batch_size": 32}, "data": {"train_fraction": 1.0}})
    root = tmp_path_factory.mktemp("hand_rescore")
    labels = make_cohort(root / "cohort", n=6, seed=1)
    cases = load_cohort(labels, HandParams(), root / "cohort" / "landmarks.csv")
    ckpt = train_hand(cases[:4], root / "run", tiny, show_progress=False)
    return cases, ckpt


def test_hand_rescore_from_point_lists(logic, hand_model):
    from rheumai.landmarks import points_to_lps

    cases, ckpt = hand_model
    case = cases[5]
    inputs = {"hand": volume_node_from_image(logic.scene, case.prep.rad.image, "hand")}
    before = logic.predictStudy(ckpt, inputs, createNodes=True, saliency=None)
    ids = before["nodeIDs"]
    node = logic.scene.GetNodeByID(ids["landmarks"])
    assert read_landmarks(node)["labels"] == before["landmark_labels"]
    # Put every landmark at its true place (far from the untrained model's guesses).
    true_lps = points_to_lps(case.prep.rad.image, case.prep.to_source(case.points_canon))
    for i, p in enumerate(true_lps):
        node.SetNthControlPointPosition(i, -p[0], -p[1], p[2])

    after = logic.rescoreFromPointLists(ckpt, inputs, {"hand": node})
    assert after["landmarks_source"] == "corrected" and after["task"] == "hand_svdh"
    np.testing.assert_allclose(np.array(after["landmarks_lps"]), true_lps, atol=1e-2)
    assert after["total"] == before["total"]  # the whole-hand path does not use the points
    j0 = after["joints"][0]
    np.testing.assert_allclose([j0["L"], j0["P"], j0["S"]], true_lps[0], atol=1e-2)
    new_ids = after["nodeIDs"]
    assert new_ids["table"] == ids["table"]
    assert _table(logic, new_ids["table"])["landmarks_source"] == "corrected"
    joints = table_rows(logic.scene.GetNodeByID(new_ids["rows:joints"]))
    assert len(joints) == 22
    np.testing.assert_allclose([joints[0]["L"], joints[0]["P"]], true_lps[0, :2], atol=1e-2)
    np.testing.assert_array_equal([r["erosion"] for r in joints],
                                  [np.nan if j["erosion"] is None else j["erosion"] for j in after["joints"]])
    back = read_landmarks(logic.scene.GetNodeByID(new_ids["landmarks"]))
    np.testing.assert_allclose(back["lps"], true_lps, atol=1e-2)

    # A landmark marked missing is refused with the point's name (every joint crop needs its point).
    back_node = logic.scene.GetNodeByID(new_ids["landmarks"])
    back_node.SetNthControlPointPositionMissing(3)
    with pytest.raises(InputError, match=back["labels"][3]):
        logic.rescoreFromPointLists(ckpt, inputs, {"hand": back_node})
    with pytest.raises(InputError, match="inputs hand"):
        logic.rescoreFromPointLists(ckpt, inputs, {"lumbar": back_node})
