"""MixCut for multi-sequence inputs: mixup inside one CutMix box shared by all sequences.

Our reading of the published code (Lu et al., QIMS 2024; MedImgPro/ASMixCut ``mixup.py: mixup_box``,
``resnet_mixup.py``; the dump is incomplete): one batch permutation, ``lam ~ Beta(alpha, alpha)`` and
one box per batch, shared by T1, T2 and the fat-suppressed series (aligned anatomy), with sides
``sqrt(1 - lam)`` times the image's at a uniform random centre, clipped; inside the box the pixels
are blended, ``lam * x + (1 - lam) * x[perm]``, not pasted. The dump's label weight
(``1 - box_fraction * lam``) does not match that pixel mix, so ours does: with ``A`` the clipped
box's area fraction, the partner's share of the pixel mass is ``w = (1 - lam) * A`` and the target
``(1 - w) * y + w * y[perm]`` (``mean(mix(zeros, ones)) == w`` is tested). Both joint halves
(mirrored lateral -> medial) share the box too; it is in (row, column) pixels of the (H, W) inputs.
Stage 1 only: a blended image has no single patient's clinical vector for the stage-2 fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import beta


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
    # lam ~ Beta(alpha, alpha) by the inverse CDF of a uniform from ``generator`` (torch's Beta takes none)
    lam = float(beta.ppf(min(max(float(torch.rand(1, generator=generator)), 1e-6), 1 - 1e-6), alpha, alpha))
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

