"""Heads: losses decrease toward the truth, decode inverts the encoding, reports match references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from rheumai.engine.heads import CoralLayer, head_from_card, make_head, regression_report


def test_make_head_kinds_and_card_round_trip() -> None:
    for kind, kw in (("binary", {}), ("regression", {"scale": 10.0}), ("ordinal", {"n_classes": 4}),
                     ("multiclass", {"n_classes": 3}), ("keypoints", {"n_points": 2, "stride": 2})):
        h = make_head(kind, name="x", **kw)
        assert h.kind == kind and head_from_card(h.describe()) == h
    with pytest.raises(ValueError, match="head kind"):
        make_head("segmentation")


def test_binary_head_matches_bce_and_auc() -> None:
    h = make_head("binary")
    out = torch.tensor([[2.0], [-1.0], [0.5]])
    y = torch.tensor([1.0, 0.0, 0.0])
    assert float(h.loss(out, y)) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y)))
    pred = h.decode(out)
    np.testing.assert_allclose(pred["probability"], 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5]))))
    assert h.score(pred, y.numpy()) == 1.0


def test_ordinal_head_decodes_its_own_targets_and_coral_learns() -> None:
    h = make_head("ordinal", n_classes=4)
    y = torch.tensor([0, 1, 2, 3])
    perfect = 20.0 * ((y[:, None] > torch.arange(3)).float() * 2 - 1)
    d = h.decode(perfect)
    assert d["class"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(d["probabilities"].sum(1), 1.0)
    assert d["probabilities"].argmax(1).tolist() == [0, 1, 2, 3]
    assert float(h.loss(perfect, y)) < 1e-6 < float(h.loss(-perfect, y))
    torch.manual_seed(0)
    x = torch.randn(200, 3)
    ytrue = torch.bucketize(x[:, 0] + 0.5 * x[:, 1], torch.tensor([-1.0, 0.0, 1.0]))
    layer = CoralLayer(3, 4)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        h.loss(layer(x), ytrue).backward()
        opt.step()
    pred = h.decode(layer(x))
    assert h.score(pred, ytrue.numpy()) > 0.9


def test_multiclass_and_class_report() -> None:
    h = make_head("multiclass", n_classes=3)
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    y = np.array([0, 1, 2, 2])
    pred = h.decode(logits)
    assert pred["class"].tolist() == [0, 1, 2, 0] and h.score(pred, y) == 0.75
    rep = h.report(pred, y, n_boot=50)
    assert rep["accuracy"]["value"] == 0.75 and rep["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert rep["kappa_quadratic"]["value"] == pytest.approx(cohen_kappa_score(y, pred["class"], weights="quadratic"))
    assert rep["mae_classes"]["value"] == 0.5
    assert rep["accuracy"]["lo"] < 0.75 < rep["accuracy"]["hi"]


def test_regression_report_against_references() -> None:
    rng = np.random.default_rng(1)
    t = rng.uniform(0, 100, 60)
    p = t + 3.0 + rng.normal(0, 5, 60)
    r = regression_report(p, t, n_boot=200)
    assert r["pcc"]["value"] == pytest.approx(np.corrcoef(p, t)[0, 1])
    assert r["pcc"]["lo"] < r["pcc"]["value"] < r["pcc"]["hi"]
    assert r["rmse"]["value"] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)))
    assert r["mae"]["lo"] < r["mae"]["value"] < r["mae"]["hi"]
    ba = r["bland_altman"]
    assert ba["bias"]["value"] == pytest.approx(np.mean(p - t)) and ba["bias"]["lo"] < 3.0 < ba["bias"]["hi"]
    assert ba["loa_upper"]["value"] == pytest.approx(np.mean(p - t) + 1.959964 * np.std(p - t, ddof=1), rel=1e-5)
    # ICC(A,1) against the two-way ANOVA worked by hand for these 6 subjects x 2 raters
    a = np.array([9, 6, 8, 7, 10, 6], float)
    b = np.array([2, 1, 4, 1, 5, 2], float)
    icc = regression_report(a, b, n_boot=0)["icc"]
    # row means 5.5 3.5 6 4 7.5 4; column means 7.667 2.5; grand mean 5.0833:
    # SSR 23.4167 (df 5), SSC 80.0833 (df 1), SSE 3.4167 (df 5)
    msr, msc, mse = 23.4166667 / 5, 80.0833333, 3.4166667 / 5
    ref = (msr - mse) / (msr + mse + 2 * (msc - mse) / 6)
    assert icc["value"] == pytest.approx(ref, rel=1e-6)
    assert icc["lo"] < icc["value"] < icc["hi"]
    same = regression_report(t, t + 0.0, n_boot=0)
    assert same["icc"]["value"] == pytest.approx(1.0) and same["mae"]["value"] == 0.0


def test_keypoints_head_decode_loss_and_report_in_mm() -> None:
    from rheumai.landmarks import heatmap_targets

    h = make_head("keypoints", n_points=2, stride=2, sigma=1.0)
    pts = np.array([[[10.0, 6.0], [20.0, 14.0]]])          # (N=1, P=2, (x, y)) input pixels
    # logits = log of the Gaussian: the spatial softmax is the normalised Gaussian, centred on the truth
    hm = torch.log(torch.from_numpy(heatmap_targets(pts[0], (16, 16), 1.0, stride=2))[None].double().clamp_min(1e-300))
    dec = h.decode(hm)["points"]
    np.testing.assert_allclose(dec, pts, atol=0.05)
    worse = torch.roll(hm, shifts=3, dims=-1)
    assert float(h.loss(hm, torch.from_numpy(pts))) < float(h.loss(worse, torch.from_numpy(pts)))
    pred = {"points": np.array([[[10.0, 6.0], [23.0, 14.0]], [[1.0, 1.0], [5.0, 9.0]]])}
    true = np.array([[[10.0, 7.0], [20.0, 14.0]], [[1.0, 1.0], [np.nan, np.nan]]])
    rep = h.report(pred, true, spacing_mm=(2.0, 0.5), n_boot=50)   # rows 2 mm, columns 0.5 mm
    assert rep["n_points"] == 3 and rep["per_point_mean_mm"][0] == pytest.approx(1.0)
    assert rep["mean_mm"]["value"] == pytest.approx((2.0 + 1.5 + 0.0) / 3)
    assert rep["success_2mm"]["value"] == 1.0 and rep["success_4mm"]["value"] == 1.0
    rep2 = h.report(pred, true, spacing_mm=np.array([[4.0, 4.0], [1.0, 1.0]]), n_boot=0)
    assert rep2["success_2mm"]["value"] == pytest.approx(1 / 3)
