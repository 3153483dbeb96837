"""Test-time augmentation: the probability's mean and spread over plausible input variations.

On x (N, C, H, W) = (slices right -> left, superior -> inferior, anterior -> posterior): a
left-right mirror (reversed channel order; the cervical spine is near-symmetric about the
mid-sagittal plane) and intensity gain and gamma in [0.9, 1.1]. No in-plane flips: a sagittal
image flipped A-P or S-I is not anatomy the network saw. Hand-written rather than MONAI random
transforms so that the n variants are deterministic for a seed and run as batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Augmentation:
    """One deterministic variant: mirror (reverse channels), gain and gamma on intensities."""

    mirror: bool = False
    gain: float = 1.0
    gamma: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flip(x, dims=[1]) if self.mirror else x
        return (y.clamp_min(0).pow(self.gamma) if self.gamma != 1.0 else y) * self.gain


def augmentations(n: int, seed: int = 0) -> list[Augmentation]:
    """``n`` variants: the identity, the mirror, then random gain / gamma (mirrored every other one)."""
    rng = np.random.default_rng(seed)
    out = [Augmentation(), Augmentation(mirror=True)][:max(n, 0)]
    while len(out) < n:
        out.append(Augmentation(bool(len(out) % 2), float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1))))
    return out


def tta_probabilities(model: torch.nn.Module, x: torch.Tensor, n: int, seed: int = 0) -> np.ndarray:
    """Probabilities (n,) of the first class for the ``n`` variants of one input x (1, C, H, W):
    sigmoid of a single logit, else softmax; batches of 4 under inference mode."""
    augs = augmentations(n, seed)
    probs = []
    with torch.inference_mode():
        for i in range(0, len(augs), 4):
            logits = model(torch.cat([a.apply(x) for a in augs[i:i + 4]]))
            p = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1)[:, 0]
            probs.append(p.float().cpu().numpy())
    return np.concatenate(probs) if probs else np.zeros(0, np.float32)
