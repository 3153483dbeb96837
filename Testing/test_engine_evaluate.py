"""Evaluation by head: one pass, one report per head, files written, numbers match the heads'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from rheumai.engine.evaluate import evaluate_heads
from rheumai.engine.heads import make_head, regression_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 40):
        g = np.random.default_rng(0)
        self.x = g.normal(size=(n, 3)).astype(np.float32)
        self.pts = g.uniform(4, 12, size=(n, 2, 2)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        return {"input": torch.from_numpy(x),
                "target": {"risk": torch.tensor(float(x[0] > 0)), "score": torch.tensor(3 * x[1] + 0.3),
                           "grade": torch.tensor(int(np.digitize(x[2], [-0.5, 0.5]))),
                           "points": torch.from_numpy(self.pts[i])},
                "id": f"C{i}"}


class Oracle(nn.Module):
    """Outputs close to the truth (heatmaps peaked at the true points, offset by one pixel in x)."""

    def __init__(self, data: Data):
        super().__init__()
        self.data = data
        self.lookup = {tuple(np.round(x, 5)): i for i, x in enumerate(data.x)}

    def forward(self, x: torch.Tensor) -> dict:
        idx = [self.lookup[tuple(np.round(r, 5))] for r in x.numpy()]
        yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        pts = torch.from_numpy(self.data.pts[idx]) + torch.tensor([1.0, 0.0])
        hm = -((xx - pts[..., 0, None, None]) ** 2 + (yy - pts[..., 1, None, None]) ** 2) / 2.0
        return {"risk": 4 * x[:, 0:1], "score": 3 * x[:, 1] + 0.3 + 0.1 * x[:, 2], "points": hm,
                "grade": torch.stack([-x[:, 2] * 5, torch.zeros(len(x)), x[:, 2] * 5], 1)}


def test_one_report_per_head_and_files(tmp_path: Path) -> None:
    data = Data()
    heads = {"risk": make_head("binary", name="risk"), "score": make_head("regression", name="score"),
             "grade": make_head("multiclass", name="grade", n_classes=3),
             "points": make_head("keypoints", name="points", n_points=2)}
    reps = evaluate_heads(Oracle(data), data, heads, out_dir=tmp_path, n_boot=50,
                          report_kw={"risk": {"threshold": 0.5}, "points": {"spacing_mm": (0.5, 0.5)}},
                          context={"split": "test"})
    assert reps["risk"]["auc"]["value"] == 1.0 and reps["grade"]["accuracy"]["value"] > 0.6
    ref = regression_report(3 * data.x[:, 1] + 0.3 + 0.1 * data.x[:, 2], 3 * data.x[:, 1] + 0.3, n_boot=50)
    assert reps["score"]["rmse"]["value"] == pytest.approx(ref["rmse"]["value"], rel=1e-5)
    assert reps["points"]["mean_mm"]["value"] == pytest.approx(0.5, abs=0.02)   # one pixel at 0.5 mm
    assert reps["points"]["success_2mm"]["value"] == 1.0
    preds = pd.read_csv(tmp_path / "predictions.csv")
    assert len(preds) == 40 and preds["id"].tolist()[:2] == ["C0", "C1"]
    assert {"risk_probability", "risk_true", "score_value", "grade_class", "points_p1_y", "points_p1_y_true"} <= set(preds)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["reports"]["score"]["pcc"]["value"] == pytest.approx(reps["score"]["pcc"]["value"])
    md = (tmp_path / "report.md").read_text()
    for text in ("Head 'score' (regression)", "ICC(A,1)", "quadratic-weighted kappa", "success within 2 mm",
                 "truth \\ predicted", "split: test"):
        assert text in md, text


def test_estimates_with_negative_bounds_print_unambiguously():
    from rheumai.engine.evaluate import _fmt

    assert _fmt({"value": -2.488, "lo": -5.187, "hi": 0.211}) == "-2.488 (-5.187 to 0.211)"
    assert _fmt({"value": 0.9, "lo": 0.8, "hi": 0.95}) == "0.900 (0.800-0.950)"
    assert _fmt({"value": float("nan"), "lo": None, "hi": None}) == "-"
