"""MixCut for multi-sequence inputs: mixup inside one CutMix box shared by all sequences.

Reading of the published method (Lu et al., QIMS 2024, "ASMixCut" code dump on GitHub,
MedImgPro/ASMixCut, ``mixup.py: mixup_box`` and ``resnet_mixup.py``), stated because the dump is
incomplete:

* One batch permutation and one mixing coefficient ``lam ~ Beta(alpha, alpha)`` per batch.
* One CutMix box per batch, **shared by the three sequences** (T1, T2, fat-suppressed): the series
  are anatomically aligned, so the same box covers the same anatomy in each. The box has sides
  ``sqrt(1 - lam)`` times the image sides, at a uniformly random centre, clipped to the image.
* Inside the box the pixels are *blended* (mixup), not pasted (CutMix):
  ``x_box = lam * x + (1 - lam) * x[perm]``; outside the box ``x`` is unchanged.
* The dump's label weight, ``1 - box_area_fraction * lam`` for the original label, does not match
  this pixel mix (the partner contributes ``(1 - lam)`` inside the box, not ``lam``).

What we implement, so that the label matches the pixels: with ``A`` the *actual* (clipped) box
area fraction and ``m = 1 - lam`` the partner's share inside the box, the partner's share of the
whole image's pixel mass is ``w = m * A`` and the target is ``(1 - w) * y + w * y[perm]``.
The property ``mean(mix(zeros, ones)) == w`` is tested. Here the joint halves of a study are
treated like the sequences: both halves are mirrored to lateral -> medial, so they share the box
too. The box is in pixel (row, column) coordinates of the (H, W) inputs.

MixCut is applied in stage 1 only (image branches); stage 2 trains the clinical fusion on
unmixed images, because a blended image has no single patient's clinical vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixCutResult:
    """images: (N, ..., H, W) mixed; targets: (N,) float soft labels; perm: (N,) partner indices;
    box: (row0, row1, col0, col1) half-open pixel box; lam: the original's share inside the box;
    weight: the partner's share of total pixel mass (= (1 - lam) * box area fraction)."""

    images: torch.Tensor
    targets: torch.Tensor
    perm: torch.Tensor
    box: tuple[int, int, int, int]
    lam: float
    weight: float


def mixcut(images: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0,
           generator: torch.Generator | None = None) -> MixCutResult:
    """Mix a batch. ``images``: (N, ..., H, W) with every sequence / half / slice in the middle
    dimensions (all share the box); ``targets``: (N,) labels in [0, 1]. Deterministic for a seeded
    ``generator``. ``alpha`` <= 0 returns the batch unchanged (weight 0)."""
    n = images.shape[0]
    H, W = images.shape[-2:]
    y = targets.to(torch.float32)
    if alpha <= 0 or n < 2:
        return MixCutResult(images, y, torch.arange(n), (0, 0, 0, 0), 1.0, 0.0)
    lam = _beta_sample(alpha, generator)
    perm = torch.randperm(n, generator=generator)
    u = torch.rand(2, generator=generator)
    side = (1.0 - lam) ** 0.5
    ch, cw = float(u[0]) * H, float(u[1]) * W
    r0, r1 = int(max(0.0, ch - side * H / 2)), int(min(float(H), ch + side * H / 2))
    c0, c1 = int(max(0.0, cw - side * W / 2)), int(min(float(W), cw + side * W / 2))
    out = images.clone()
    if r1 > r0 and c1 > c0:
        region = (Ellipsis, slice(r0, r1), slice(c0, c1))
        out[region] = lam * images[region] + (1.0 - lam) * images[perm][region]
    area = (r1 - r0) * (c1 - c0) / float(H * W)
    w = (1.0 - lam) * area
    return MixCutResult(out, (1.0 - w) * y + w * y[perm], perm, (r0, r1, c0, c1), lam, w)


def _beta_sample(alpha: float, generator: torch.Generator | None) -> float:
    """lam ~ Beta(alpha, alpha) as the inverse CDF (scipy) of a uniform drawn from ``generator``
    (torch.distributions.Beta cannot take a generator, and reproducibility needs one)."""
    from scipy.stats import beta as sbeta

    u = float(torch.rand(1, generator=generator))
    return float(sbeta.ppf(min(max(u, 1e-6), 1 - 1e-6), alpha, alpha))
