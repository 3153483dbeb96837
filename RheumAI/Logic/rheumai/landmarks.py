"""Landmarks on radiographs: heatmap targets, a small heatmap network, soft-argmax, errors in mm.

A point is ``(x, y)`` in pixels of the array it was found in (x = column, y = row, centres at
integers: ``a[r, c]`` is the point ``(c, r)``). Heatmaps are ``(K, H, W)``, possibly at a stride
(``H = H_in / stride``); :func:`soft_argmax` maps back to input pixels. Physical points are LPS mm
of a one-slice 3D ``sitk.Image`` (what :mod:`rheumai.radiograph` reads).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional as F

from .geometry import Grid


def input_to_heatmap_xy(xy: np.ndarray | torch.Tensor, stride: int) -> np.ndarray | torch.Tensor:
    """Input-pixel (x, y) -> heatmap-pixel (x, y) for a heatmap at ``stride`` (centres aligned)."""
    return (xy + 0.5) / stride - 0.5


def _gaussians(pts: torch.Tensor, shape: Sequence[int], sigma: float) -> torch.Tensor:
    """Peak-1 Gaussians (..., K, H, W) centred at heatmap-pixel points (..., K, 2); NaN -> zeros."""
    h, w = int(shape[0]), int(shape[1])
    ys = torch.arange(h, dtype=pts.dtype, device=pts.device)
    xs = torch.arange(w, dtype=pts.dtype, device=pts.device)
    ok = torch.isfinite(pts).all(-1)
    p = torch.nan_to_num(pts)
    gx = torch.exp(-0.5 * ((xs - p[..., 0:1]) / sigma) ** 2)  # (..., K, W)
    gy = torch.exp(-0.5 * ((ys - p[..., 1:2]) / sigma) ** 2)  # (..., K, H)
    return gy[..., :, None] * gx[..., None, :] * ok[..., None, None]


def heatmap_targets(points_xy: np.ndarray | torch.Tensor, shape: Sequence[int], sigma: float,
                    stride: int = 1) -> np.ndarray:
    """Gaussian target heatmaps (K, H, W) float32, peak 1, from points (K, 2) (x, y) in input pixels;
    ``shape`` the heatmap's (H, W), ``sigma`` in heatmap pixels; a NaN point gives a zero channel.
    Sub-pixel centres (MONAI's ``GenerateHeatmap`` rounds them: up to ``stride / 2`` px of bias)."""
    pts = torch.as_tensor(np.asarray(points_xy.detach().cpu() if isinstance(points_xy, torch.Tensor)
                                     else points_xy, np.float64))
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be (K, 2) (x, y), got shape {tuple(pts.shape)}")
    return _gaussians(input_to_heatmap_xy(pts, stride), shape, sigma).numpy().astype(np.float32)


def soft_argmax(heatmaps: torch.Tensor, stride: int = 1, beta: float = 1.0) -> torch.Tensor:
    """Expected (x, y) of the spatial softmax of heatmap logits (B, K, H, W) -> (B, K, 2) in input pixels."""
    b, k, h, w = heatmaps.shape
    prob = torch.softmax(beta * heatmaps.reshape(b, k, h * w).float(), dim=-1).reshape(b, k, h, w)
    ys = torch.arange(h, dtype=prob.dtype, device=prob.device)
    xs = torch.arange(w, dtype=prob.dtype, device=prob.device)
    x = (prob.sum(2) * xs).sum(-1)
    y = (prob.sum(3) * ys).sum(-1)
    xy = torch.stack([x, y], -1)
    return (xy + 0.5) * stride - 0.5


def keypoint_loss(heatmaps: torch.Tensor, target_xy: torch.Tensor, sigma: float = 1.5, stride: int = 1,
                  coord_weight: float = 1.0) -> torch.Tensor:
    """Heatmap + coordinate loss for logits (B, K, H, W) and true points (B, K, 2) (input pixels):
    cross-entropy of the spatial softmax against the normalised Gaussian target (DSNT-style) plus
    the L1 error of the soft-argmax in heatmap pixels; NaN points (not visible) do not count."""
    b, k, h, w = heatmaps.shape
    tgt = _gaussians(input_to_heatmap_xy(target_xy.detach().float(), stride), (h, w), sigma).reshape(b, k, h * w)
    visible = torch.isfinite(target_xy).all(-1)  # (B, K)
    if not bool(visible.any()):
        return heatmaps.sum() * 0.0
    tgt = tgt / tgt.sum(-1, keepdim=True).clamp_min(1e-8)
    logp = torch.log_softmax(heatmaps.reshape(b, k, h * w).float(), -1)
    ce = -(tgt * logp).sum(-1)  # (B, K)
    pred = soft_argmax(heatmaps, stride)
    l1 = (pred - torch.nan_to_num(target_xy.float())).abs().sum(-1) / stride
    per = ce + coord_weight * l1
    return per[visible].mean()


class LandmarkNet(nn.Module):
    """A small U-Net (MONAI conv blocks): input (B, C, H, W), H and W divisible by
    ``2 ** (len(channels) - 1)``; output (B, n_points, H / out_stride, W / out_stride) heatmap logits
    (``out_stride`` a power of two below the deepest level; decode with :func:`soft_argmax`)."""

    def __init__(self, n_points: int, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 128),
                 out_stride: int = 1) -> None:
        super().__init__()
        levels = len(channels)
        out_level = int(round(np.log2(out_stride)))
        if 2 ** out_level != out_stride or not 0 <= out_level < levels:
            raise ValueError(f"out_stride must be a power of two below 2**{levels - 1}, got {out_stride}")
        self.n_points, self.out_stride = n_points, out_stride

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(Convolution(2, cin, cout, strides=stride, kernel_size=3, norm="batch", act="relu"),
                                 Convolution(2, cout, cout, kernel_size=3, norm="batch", act="relu"))

        self.down = nn.ModuleList([block(in_channels, channels[0])] +
                                  [block(channels[i - 1], channels[i], stride=2) for i in range(1, levels)])
        self.up = nn.ModuleList([block(channels[i] + channels[i - 1], channels[i - 1])
                                 for i in range(levels - 1, out_level, -1)])
        self.head = nn.Conv2d(channels[out_level], n_points, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for blk in self.down:
            x = blk(x)
            skips.append(x)
        x = skips.pop()
        for blk in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip], 1))
        return self.head(x)


def radial_errors_mm(pred_xy: np.ndarray, true_xy: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Euclidean distance in mm between (…, 2) (x, y) pixel points; ``spacing_mm`` is (row, col) mm."""
    d = np.asarray(pred_xy, float) - np.asarray(true_xy, float)
    return np.hypot(d[..., 0] * float(spacing_mm[1]), d[..., 1] * float(spacing_mm[0]))


def points_to_lps(image: sitk.Image, xy: np.ndarray) -> np.ndarray:
    """Pixel (x, y) points (N, 2) of a one-slice 3D image (slice 0) -> LPS mm (N, 3)."""
    xy = np.asarray(xy, float).reshape(-1, 2)
    return Grid.of(image).index_to_physical(np.column_stack([xy, np.zeros(len(xy))]))


def lps_to_points(image: sitk.Image, lps: np.ndarray) -> np.ndarray:
    """LPS mm points (N, 3) -> pixel (x, y) (N, 2) of a one-slice 3D image (the slice offset is dropped)."""
    return Grid.of(image).physical_to_index(np.asarray(lps, float).reshape(-1, 3))[:, :2]
