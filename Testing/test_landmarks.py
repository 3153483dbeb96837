"""Landmark helpers: heatmap targets, soft-argmax, loss, network shapes, mm errors, LPS mapping."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rheumai.engine.heads import KeypointsHead
from rheumai.landmarks import (LandmarkNet, heatmap_targets, keypoint_loss, lps_to_points, points_to_lps,
                               radial_errors_mm, soft_argmax)


def test_heatmap_targets_peak_and_invisible():
    hm = heatmap_targets(np.array([[10.0, 5.0], [np.nan, 3.0]]), (16, 20), sigma=1.5)
    assert hm.shape == (2, 16, 20)
    assert np.unravel_index(hm[0].argmax(), hm[0].shape) == (5, 10)  # (row, col) = (y, x)
    assert hm[0].max() == pytest.approx(1.0)
    assert not hm[1].any()


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_soft_argmax_recovers_subpixel_point(stride):
    true = np.array([[21.3, 9.6], [15.2, 26.7]])
    hm = heatmap_targets(true, (40 // stride, 40 // stride), sigma=2.0 / stride, stride=stride)
    logits = torch.from_numpy(np.log(hm + 1e-12))[None]
    xy = soft_argmax(logits, stride=stride)[0].numpy()
    assert np.abs(xy - true).max() < 0.15 * stride


def test_keypoint_loss_is_smaller_near_truth_and_ignores_invisible():
    true = torch.tensor([[[12.0, 7.0], [float("nan"), float("nan")]]])
    good = torch.from_numpy(np.log(heatmap_targets(np.array([[12.0, 7.0], [3.0, 3.0]]), (24, 24), 1.5) + 1e-6))[None]
    bad = torch.from_numpy(np.log(heatmap_targets(np.array([[3.0, 18.0], [12.0, 7.0]]), (24, 24), 1.5) + 1e-6))[None]
    assert keypoint_loss(good, true) < keypoint_loss(bad, true)
    nothing = torch.full((1, 1, 2), float("nan"))
    assert float(keypoint_loss(good[:, :1], nothing)) == 0.0


def test_landmark_net_shapes_and_bad_stride():
    net = LandmarkNet(5, channels=(4, 8, 16), out_stride=2)
    assert net(torch.zeros(2, 1, 32, 48)).shape == (2, 5, 16, 24)
    with pytest.raises(ValueError, match="power of two"):
        LandmarkNet(5, channels=(4, 8, 16), out_stride=3)


def test_landmark_net_learns_a_bright_square(one_torch_thread):
    """A few dozen Adam steps locate a bright square within 2 px (the pieces train together)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def batch(n):
        x = np.zeros((n, 1, 32, 32), np.float32)
        xy = rng.uniform(6, 25, (n, 1, 2))
        for i, (cx, cy) in enumerate(xy[:, 0]):
            x[i, 0, int(round(cy)) - 2:int(round(cy)) + 3, int(round(cx)) - 2:int(round(cx)) + 3] = 1.0
        return torch.from_numpy(x), torch.from_numpy(np.round(xy).astype(np.float32))

    net = LandmarkNet(1, channels=(8, 16, 32), out_stride=2)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(80):
        x, y = batch(16)
        loss = keypoint_loss(net(x), y, sigma=1.0, stride=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y = batch(32)
    with torch.no_grad():
        pred = soft_argmax(net(x), stride=2)
    err = (pred - y).norm(dim=-1).median()
    assert err < 2.0


def test_radial_errors_use_row_and_column_spacing():
    e = radial_errors_mm(np.array([[3.0, 4.0]]), np.array([[0.0, 0.0]]), spacing_mm=(0.5, 2.0))
    assert e[0] == pytest.approx(np.hypot(6.0, 2.0))
    # success rates and the median through the engine's keypoints report (a NaN target is not visible)
    pred = np.array([[[1.0, 0.0], [3.0, 0.0]], [[5.0, 0.0], [0.0, 0.0]]])
    s = KeypointsHead().report({"points": pred}, np.array([[[0.0, 0.0]] * 2, [[0.0, 0.0], [np.nan, np.nan]]]))
    assert s["n_points"] == 3 and s["success_2mm"]["value"] == pytest.approx(1 / 3)
    assert s["success_4mm"]["value"] == pytest.approx(2 / 3) and s["median_mm"]["value"] == 3.0


def test_points_lps_roundtrip_matches_simpleitk():
    img = sitk.Image(40, 30, 1, sitk.sitkFloat32)
    img.SetSpacing((0.7, 0.4, 1.0))
    img.SetOrigin((10.0, -5.0, 3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    xy = np.array([[0.0, 0.0], [12.5, 7.25], [39.0, 29.0]])
    lps = points_to_lps(img, xy)
    for p, q in zip(xy, lps):
        assert np.allclose(q, img.TransformContinuousIndexToPhysicalPoint((p[0], p[1], 0.0)))
    assert np.allclose(lps_to_points(img, lps), xy)
