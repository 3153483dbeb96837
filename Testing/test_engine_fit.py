"""The engine's loop on a task it was not written for: dict inputs, two heads, hooks, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from rheumai.engine.fit import FitConfig, fit, predict
from rheumai.engine.heads import make_head
from rheumai.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Toy(torch.utils.data.Dataset):
    """x (4,) and a clinical vector (2,) -> value = x0 + 2 x1 (regression), class = bucket of x2 (3 classes)."""

    def __init__(self, n: int, seed: int):
        g = np.random.default_rng(seed)
        self.x = g.normal(size=(n, 4)).astype(np.float32)
        self.c = g.normal(size=(n, 2)).astype(np.float32)
        self.value = (self.x[:, 0] + 2 * self.x[:, 1]).astype(np.float32)
        self.cls = np.digitize(self.x[:, 2], [-0.5, 0.5])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input": {"x": torch.from_numpy(self.x[i]), "clinical": torch.from_numpy(self.c[i])},
                "target": {"value": torch.tensor(self.value[i]), "grade": torch.tensor(int(self.cls[i]))},
                "id": f"S{i:03d}"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1))
        self.value = nn.Linear(32, 1)
        self.grade = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor) -> dict:
        h = self.trunk(torch.cat([x, clinical], 1))
        return {"value": self.value(h), "grade": self.grade(h)}


HEADS = {"value": make_head("regression", name="value"), "grade": make_head("multiclass", name="grade", n_classes=3)}


def _cfg(**kw) -> FitConfig:
    base = dict(epochs=6, batch_size=16, lr=1e-2, seed=2, device="cpu", eval_batch_size=64, monitor="grade")
    base.update(kw)
    return FitConfig(**base)


def test_two_heads_learn_and_select_on_the_monitored_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    events: list[dict] = []
    res = fit(model, Toy(96, 0), Toy(48, 1), HEADS, _cfg(), tmp_path, progress=events.append)
    assert res.score_name == "accuracy" and res.epochs_run == 6 and not model.training
    acc = [h["val_accuracy"] for h in res.history]
    assert res.best_epoch == 1 + int(np.argmax(acc)) and res.best_score == max(acc)
    assert res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]
    assert sum(e["stage"] == "step" for e in events) == 6 * 6
    assert list(pd.read_csv(tmp_path / "history.csv").columns) == \
        ["epoch", "train_loss", "val_loss", "val_accuracy", "best_val_accuracy", "lr"]
    # the model holds the best epoch's weights; its validation outputs are returned decoded-ready
    out, tgt, ids = predict(model, Toy(48, 1), torch.device("cpu"), HEADS, 64)
    torch.testing.assert_close(out["grade"], res.val_outputs["grade"])
    assert ids[:2] == ["S000", "S001"] and HEADS["grade"].score(HEADS["grade"].decode(out["grade"]),
                                                                tgt["grade"].numpy()) == res.best_score
    assert HEADS["value"].report(HEADS["value"].decode(out["value"]), tgt["value"].numpy(), n_boot=50)["pcc"]["value"] > 0.8


def test_params_and_train_mode_hooks_and_batch_transform(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    frozen = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    seen: list[float] = []

    def transform(batch: dict, gen: torch.Generator, epoch: int) -> dict:
        noise = torch.rand(1, generator=gen)
        seen.append(float(noise))
        return {**batch, "input": {**batch["input"], "x": batch["input"]["x"] + 0.01 * noise}}

    for p in model.trunk.parameters():
        p.requires_grad_(False)
    res = fit(model, Toy(32, 0), None, HEADS, _cfg(epochs=2, bn_recalibration="none"), tmp_path,
              params=list(model.value.parameters()) + list(model.grade.parameters()),
              train_mode=lambda m: (m.train(), m.trunk.eval()), batch_transform=transform)
    assert res.weights == "last" and res.best_epoch is None
    for k, v in model.trunk.state_dict().items():  # frozen trunk in eval mode: weights and BN statistics kept
        assert torch.equal(v, frozen[k]), k
    again: list[float] = []
    torch.manual_seed(0)
    fit(Net(), Toy(32, 0), None, HEADS, _cfg(epochs=2), tmp_path / "b",
        batch_transform=lambda b, g, e: (again.append(float(torch.rand(1, generator=g))), b)[1])
    assert again == seen  # per-step generators: the same draws whatever the model


def test_resume_with_more_epochs_matches_one_run_and_config_changes_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref_model = Net()
    ref = fit(ref_model, Toy(64, 0), Toy(32, 1), HEADS, _cfg(epochs=4, select="last"), tmp_path / "ref",
              config_record={"task": {"lr_note": "a"}})
    torch.manual_seed(0)
    m = Net()
    fit(m, Toy(64, 0), Toy(32, 1), HEADS, _cfg(epochs=2, select="last"), tmp_path / "run",
        config_record={"task": {"lr_note": "a"}})
    with pytest.raises(InputError, match="--resume"):
        fit(Net(), Toy(64, 0), Toy(32, 1), HEADS, _cfg(epochs=4, select="last"), tmp_path / "run")
    with pytest.raises(InputError, match="lr_note"):
        fit(Net(), Toy(64, 0), Toy(32, 1), HEADS, _cfg(epochs=4, select="last"), tmp_path / "run", resume=True,
            config_record={"task": {"lr_note": "b"}})
    torch.manual_seed(123)  # a resumed run restores every random state itself
    m2 = Net()
    res = fit(m2, Toy(64, 0), Toy(32, 1), HEADS, _cfg(epochs=4, select="last"), tmp_path / "run", resume=True,
              config_record={"task": {"lr_note": "a"}})
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    for a, b in zip(res.history, ref.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_fit_config_from_a_dict_and_errors(tmp_path: Path) -> None:
    c = FitConfig.from_any({"epochs": 3, "optimizer": "adamw", "scheduler": "onecycle", "select": "best_val_auc"})
    assert c.select == "best" and c.optimizer == "adamw"
    with pytest.raises(ValueError, match="unknown fit setting"):
        FitConfig.from_any({"epoch": 3})
    with pytest.raises(ValueError, match="scheduler"):
        FitConfig.from_any({"scheduler": "step"})
    with pytest.raises(KeyError, match="other"):  # a head the model does not output
        fit(Net(), Toy(16, 0), None, {"value": HEADS["value"], "other": make_head("binary", name="other")},
            _cfg(epochs=1, monitor="value"), tmp_path)
    with pytest.raises(ValueError, match="monitor"):
        fit(Net(), Toy(16, 0), None, HEADS, _cfg(epochs=1, monitor="total"), tmp_path)
    res = fit(Net(), Toy(32, 0), Toy(16, 1), HEADS, {"epochs": 2, "scheduler": "onecycle", "optimizer": "adamw",
                                                      "lr": 1e-2, "device": "cpu", "monitor": "grade"}, tmp_path / "s")
    assert res.history[0]["lr"] != res.history[1]["lr"]  # the schedule moves the learning rate
