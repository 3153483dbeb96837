"""Test-time augmentation: mean and spread of the probability over plausible input variations.

Augmentations act on the network input x (N, C, H, W) = (slices right -> left, superior ->
inferior, anterior -> posterior):
  - left-right mirror: reversing the channel order (the slab seen from the other side; the
    cervical spine is near-symmetric about the mid-sagittal plane);
  - intensity: gain in [0.9, 1.1] and gamma in [0.9, 1.1] on the normalised [0, 1]-ish input
    (scanner / normalisation variation).
In-plane flips are *not* used: a sagittal image flipped anterior-posterior or superior-inferior
is not anatomy the network was trained on. Hand-written (a few tensor operations) rather than
MONAI random transforms so that the n variants are deterministic for a given seed and run as one
batch.
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
        if self.gamma != 1.0:
            y = y.clamp_min(0).pow(self.gamma)
        return y * self.gain if self.gain != 1.0 else y


def augmentations(n: int, seed: int = 0) -> list[Augmentation]:
    """``n`` variants: the identity first, then the mirror, then random gain/gamma (+/- mirror)."""
    if n < 1:
        return []
    rng = np.random.default_rng(seed)
    out = [Augmentation()]
    if n > 1:
        out.append(Augmentation(mirror=True))
    while len(out) < n:
        out.append(Augmentation(mirror=bool(len(out) % 2), gain=float(rng.uniform(0.9, 1.1)),
                                gamma=float(rng.uniform(0.9, 1.1))))
    return out


def tta_probabilities(model: torch.nn.Module, x: torch.Tensor, n: int, seed: int = 0,
                      batch_size: int = 4, class_idx: int = 0) -> np.ndarray:
    """Probabilities (n,) of class ``class_idx`` for the ``n`` variants of one input x (1, C, H, W).

    One output: sigmoid; several: softmax. Runs in batches of ``batch_size`` under inference mode.
    """
    augs = augmentations(n, seed)
    probs: list[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, len(augs), batch_size):
            xb = torch.cat([a.apply(x) for a in augs[i:i + batch_size]])
            logits = model(xb)
            p = torch.sigmoid(logits[:, class_idx]) if logits.shape[1] == 1 else torch.softmax(logits, 1)[:, class_idx]
            probs.append(p.float().cpu().numpy())
    return np.concatenate(probs) if probs else np.zeros(0, np.float32)


def tta_summary(probs: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation (population), min and max of the TTA probabilities."""
    p = np.asarray(probs, dtype=float)
    return {"n": int(p.size), "mean": float(p.mean()), "std": float(p.std()), "min": float(p.min()),
            "max": float(p.max())}
