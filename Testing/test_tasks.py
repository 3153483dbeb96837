"""Task registry: both seed systems are declared, the cervical task delegates to the shared core."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from rheumai.io import read_study
from rheumai.tasks.cervical_ra.slices import SliceParams, select_slices
from rheumai.tasks import Task, get_task, list_tasks, register_task
from rheumai.tasks.base import InputSpec


def test_both_tasks_listed_and_json_describable():
    names = [t.name for t in list_tasks()]
    assert names[:2] == ["cervical_ra", "negspa"]
    for t in list_tasks():
        d = json.loads(json.dumps(t.describe()))
        assert d["name"] == t.name and d["inputs"] and d["head"] in ("binary", "regression", "ordinal", "keypoints")
    spa = get_task("negspa")
    assert spa.roles == ("t1", "t2", "stir")
    assert spa.roi is not None and spa.roi.kind == "box"
    assert {"crp", "inflammatory_back_pain", "age", "sex", "disease_duration"} <= {c.name for c in spa.clinical}
    assert set(spa.saliency_targets) == {"t1", "t2", "stir"}


def test_unknown_task_and_duplicate_registration():
    with pytest.raises(KeyError, match="cervical_ra"):
        get_task("no_such_task")
    cerv = get_task("cervical_ra")
    assert register_task(cerv) is cerv  # same object: no-op
    clone = Task(name="cervical_ra", title="x", description="x", reference="x",
                 inputs=(InputSpec("a", "a", "T1"),), head="binary", preprocess=cerv.preprocess,
                 build_model=cerv.build_model, default_architecture=cerv.default_architecture,
                 default_params=cerv.default_params)
    with pytest.raises(ValueError, match="already registered"):
        register_task(clone)
    with pytest.raises(ValueError, match="head"):
        Task(name="bad", title="", description="", reference="", inputs=(), head="softmax",
             preprocess=cerv.preprocess, build_model=cerv.build_model,
             default_architecture=cerv.default_architecture, default_params=cerv.default_params)


def test_cervical_preprocess_is_select_slices(t2_crop_path):
    task = get_task("cervical_ra")
    params = dict(task.default_params(), size=[64, 64], n_slices=6)
    got = task.preprocess({"t2_sag": str(t2_crop_path)}, params)
    ref = select_slices(read_study(t2_crop_path), SliceParams.from_dict(params))
    np.testing.assert_array_equal(got.array, ref.array)
    assert got.grid == ref.grid
    model = task.build_model(task.default_architecture(depth=18, input_size=(64, 64)))
    assert model(__import__("torch").from_numpy(got.array[None])).shape == (1, 1)


def test_entry_points_resolve():
    for t in list_tasks():
        for key in t.api:
            assert callable(t.entry(key)), (t.name, key)
    spa = get_task("negspa")
    assert get_task("cervical_ra").entry("train").__name__ == "train"
    with pytest.raises(KeyError):
        spa.entry("no_such_entry")


def test_tasks_command(capsys):
    from rheumai.tasks import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["tasks"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "cervical_ra" in out and "negspa" in out and "input stir" in out
    args = parser.parse_args(["tasks", "negspa", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "negspa"


def test_task_heads_are_the_engines() -> None:
    from rheumai.engine.heads import KINDS, BinaryHead
    from rheumai.tasks.base import HEADS

    assert set(HEADS) == set(KINDS)
    heads = get_task("cervical_ra").make_heads()
    assert list(heads) == ["out"] and isinstance(heads["out"], BinaryHead)
    t = get_task("negspa")
    custom = Task(name="t", title="t", description="t", reference="t", inputs=t.inputs, head="regression",
                  preprocess=t.preprocess, build_model=t.build_model, default_architecture=t.default_architecture,
                  default_params=t.default_params,
                  heads={"total": {"kind": "regression", "scale": 10.0}, "grade": {"kind": "ordinal", "n_classes": 4}})
    h = custom.make_heads()
    assert h["total"].scale == 10.0 and h["grade"].n_classes == 4 and h["grade"].name == "grade"
    with pytest.raises(ValueError, match="head kinds"):
        Task(name="t", title="t", description="t", reference="t", inputs=t.inputs, head="binary",
             preprocess=t.preprocess, build_model=t.build_model, default_architecture=t.default_architecture,
             default_params=t.default_params, heads={"seg": {"kind": "segmentation"}})


def test_evaluate_refuses_options_the_task_does_not_take(tmp_path, monkeypatch):
    """`rheumai evaluate --alpha ...` on a task whose evaluator has no such option: a clear
    error naming the checkpoint, not a TypeError."""
    import rheumai.engine.predict as engine_predict
    from rheumai.engine.run import evaluate
    from rheumai.errors import InputError

    calls = []

    def task_evaluate(model, manifest, out_dir, *, split="test", show_progress=True):
        calls.append(split)
        return {"split": split}

    class FakeTask:
        name = "fake"

        def entry(self, name):
            assert name == "evaluate"
            return task_evaluate

    monkeypatch.setattr(engine_predict, "task_of", lambda model, task=None: FakeTask())
    assert evaluate(tmp_path / "model", "m.csv", tmp_path / "out", split="all") == {"split": "all"}
    with pytest.raises(InputError, match=r"model.*evaluation takes no option\(s\) alpha, seed"):
        evaluate(tmp_path / "model", "m.csv", tmp_path / "out", alpha=0.1, seed=1)
    assert calls == ["all"]
