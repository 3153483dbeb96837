"""The engine's predictor: task from the card, batching and streaming give the same numbers,
shards, study tables and command-line inputs with clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rheumai.errors import InputError, RheumAIError


@pytest.fixture(scope="module")
def ckpt(make_cervical_checkpoint) -> Path:
    return make_cervical_checkpoint(3, "eng")


@pytest.fixture(scope="module")
def studies(tmp_path_factory, t2_crop_path, t2_path) -> list[str]:
    d = tmp_path_factory.mktemp("st")
    out = []
    for i, src in enumerate([t2_crop_path, t2_path, t2_crop_path, t2_path]):
        p = d / f"s{i}.nii.gz"
        shutil.copyfile(src, p)
        out.append(str(p))
    return out


def test_api_load_takes_the_model_keyword(ckpt):
    from rheumai import api

    pred = api.load(model=ckpt, device="cpu")
    assert pred.task.name == "cervical_ra" and pred.model_id == "eng"


def test_batched_and_streamed_equal_one_by_one(ckpt, studies, tmp_path, one_torch_thread):
    """batch_size 3 with two reader threads gives the probabilities and maps of one study at a
    time without threads (BatchNorm in eval mode: no batch coupling)."""
    from rheumai.engine.predict import Predictor, predict_batch

    pred = Predictor(ckpt)
    assert pred.task.name == "cervical_ra" and pred.model_id == "eng"
    single = {s: pred.predict(s, saliency="gradcam") for s in studies}
    rows = predict_batch(studies, ckpt, tmp_path / "b", predictor=pred, batch_size=3, workers=2,
                         montage=False, show_progress=False, saliency="gradcam")
    assert [r["study"] for r in rows] == studies  # table in input order
    for r in rows:
        assert r["probability"] == pytest.approx(single[r["study"]].probability, abs=1e-5)
        saved = json.loads(Path(r["result_file"]).read_text())
        assert saved["task"] == "cervical_ra" and saved["saliency"] == "gradcam"
    import SimpleITK as sitk

    vol = sitk.GetArrayFromImage(sitk.ReadImage(rows[1]["saliency_file"]))
    ref = sitk.GetArrayFromImage(single[studies[1]].saliency_volume)
    np.testing.assert_allclose(vol, ref, atol=1e-5)


def test_default_saliency_is_the_tasks_first_method(ckpt, studies):
    """No method named: the task's first declared method (cervical: smoothed gradient x input, the one
    that localises), never the coarse Grad-CAM; a task without saliency maps gets none."""
    from rheumai.engine.predict import Predictor, resolve_saliency
    from rheumai.tasks import get_task

    pred = Predictor(ckpt)
    assert pred.task.saliency_methods[0] == "gradxinput_smooth"
    res = pred.predict(studies[0])
    assert res.saliency_method == "gradxinput_smooth" and res.saliency_volume is not None
    assert resolve_saliency(get_task("negspa"), "default") == "gradcam"
    assert resolve_saliency(get_task("cervical_ra"), None) is None


def test_task_from_card_and_refusals(ckpt, tmp_path):
    from rheumai.engine.predict import Predictor, parse_shard, select_shard, task_of

    assert task_of(ckpt).name == "cervical_ra"
    with pytest.raises(InputError, match="not 'negspa'"):
        task_of(ckpt, "negspa")
    card = json.loads((Path(ckpt) / "model_card.json").read_text())
    other = tmp_path / "unknown"
    shutil.copytree(ckpt, other)
    (other / "model_card.json").write_text(json.dumps(dict(card, task="no_such_task")))
    with pytest.raises(InputError, match="unknown task 'no_such_task'"):
        Predictor(other)
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    assert select_shard(list("abcdefg"), (1, 3)) == ["b", "e"]
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
                                "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)
    assert parse_shard("auto", {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    with pytest.raises(InputError, match="SLURM"):
        parse_shard("auto", {})
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises((InputError, ValueError)):
            parse_shard(bad)
    with pytest.raises(ValueError, match="saliency method"):
        Predictor(ckpt).predict(str(tmp_path), saliency="nonsense")


def test_study_table_and_cli_inputs(tmp_path):
    from rheumai.engine.batch import inputs_from_args, read_study_table
    from rheumai.tasks import get_task

    spa = get_task("negspa")
    (tmp_path / "img").mkdir()
    (tmp_path / "clinical.csv").write_text("patient_id,crp,uveitis\nP1,12,no\n")
    table = tmp_path / "cohort.csv"
    table.write_text("patient_id,t1,t2,stir,box,label\nP1,img/t1.nii.gz,img/t2.nii.gz,/abs/stir.nii.gz,img/box.json,1\n"
                     "P2,img/a.nii.gz,img/b.nii.gz,img/c.nii.gz,img/box.json,0\n")
    rows = read_study_table(table, spa)
    assert rows[0]["id"] == "P1" and rows[0]["t1"] == str((tmp_path / "img" / "t1.nii.gz").resolve())
    assert rows[0]["stir"] == "/abs/stir.nii.gz" and rows[0]["roi"].endswith("box.json")
    assert rows[0]["clinical"] == {"crp": "12", "uveitis": "no"} and "clinical" not in rows[1]
    table.write_text("patient_id,t1,t2\nP1,a,b\n")
    with pytest.raises(InputError, match="stir.*roi"):
        read_study_table(table, spa)
    table.write_text("patient_id,t1,t2,stir,roi\nP1,a,b,c,d\nP1,a,b,c,d\n")
    with pytest.raises(InputError, match="twice"):
        read_study_table(table, spa)
    d = inputs_from_args(spa, ["t1=a", "t2=b", "stir=c"], "box.json", ["crp=3"], "S1")
    assert d == {"t1": "a", "t2": "b", "stir": "c", "roi": "box.json", "clinical": {"crp": "3"}, "id": "S1"}
    with pytest.raises(InputError, match="needs --input for stir"):
        inputs_from_args(spa, ["t1=a", "t2=b"], "box.json", [])
    with pytest.raises(InputError, match="needs --roi"):
        inputs_from_args(spa, ["t1=a", "t2=b", "stir=c"], None, [])
    with pytest.raises(InputError, match="no clinical variable hla"):
        inputs_from_args(spa, ["t1=a", "t2=b", "stir=c"], "b.json", ["hla=1"])
    with pytest.raises(InputError, match="NAME=VALUE"):
        inputs_from_args(spa, ["t1"], None, [])
    with pytest.raises(InputError, match="takes no --roi"):
        inputs_from_args(get_task("cervical_ra"), ["t2_sag=x"], "box.json", [])


def test_tta_needs_single_tensor_input():
    from types import SimpleNamespace

    from rheumai.engine.predict import Predictor

    fake = Predictor.__new__(Predictor)
    fake.task = SimpleNamespace(name="negspa")
    with pytest.raises(RheumAIError, match="single-tensor"):
        fake._extras(None, {"x": torch.zeros(1)}, tta=2, sanity=False, target_layer=None)
