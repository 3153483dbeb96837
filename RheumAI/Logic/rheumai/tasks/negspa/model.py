"""Tri-input ResNet with clinical fusion (NegSpA-AI).

Input packed into one tensor (MONAI's Grad-CAM takes one): ``x`` float32 (N, S * 2 * C, H, W),
sequence-major (t1, t2, stir), then joint half (right, left), then slice (A -> P); ``clinical``
float32 (N, D) from :class:`~rheumai.tasks.negspa.clinical.ClinicalEncoder`. One MONAI ResNet
branch per sequence (``spatial_dims=2``, C channels, no classifier) encodes each half (halves folded
into the batch); separate weights per sequence (``shared_backbone=True``: one, as the published dump).
Heads, one logit per half: ``image`` (stage 1, linear on the sequence features) and ``fusion``
(stage 2, MLP on [features, clinical embedding]). The patient logit is the max over the halves
(either joint positive; the loss is on the patient, halves need no labels): ``forward`` returns
(N, 1), ``output="halves"`` (N, 2).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from ...engine.networks import resnet2d
from .preprocess import ROLES


def default_architecture(depth: int = 50, n_slices: int = 3, input_size: tuple[int, int] = (224, 224),
                         clinical_dim: int = 26, clinical_embed: int = 32, conv1_t_stride: int = 2,
                         shared_backbone: bool = False) -> dict[str, Any]:
    """The model card's ``architecture`` entry (default: ResNet-50 branches, 3 slices, 224 x 224)."""
    return {"family": "negspa_tri_resnet", "depth": int(depth), "roles": list(ROLES), "in_channels": int(n_slices),
            "n_halves": 2, "input_size": [int(input_size[0]), int(input_size[1])], "spatial_dims": 2,
            "conv1_t_stride": int(conv1_t_stride), "clinical_dim": int(clinical_dim),
            "clinical_embed": int(clinical_embed), "shared_backbone": bool(shared_backbone), "num_outputs": 1}


class TriInputResNet(nn.Module):
    """See the module docstring. ``mode``: "image" (stage 1 head) or "fusion" (stage 2 head)."""

    def __init__(self, architecture: dict[str, Any]):
        super().__init__()
        a = {**default_architecture(), **architecture}
        self.roles, self.c, self.n_halves = tuple(a["roles"]), int(a["in_channels"]), int(a["n_halves"])
        branch = partial(resnet2d, int(a["depth"]), self.c, int(a["conv1_t_stride"]), feed_forward=False)
        shared = branch() if a["shared_backbone"] else None
        self.branches = nn.ModuleDict({r: shared if shared is not None else branch() for r in self.roles})
        feat = 512 * type(self.branches[self.roles[0]].layer4[-1]).expansion  # MONAI ResNet stages end at 512
        d, e = int(a["clinical_dim"]), int(a["clinical_embed"])
        self.image_head = nn.Linear(feat * len(self.roles), 1)
        self.clinical_mlp = nn.Sequential(nn.Linear(d, e), nn.ReLU(inplace=True), nn.Linear(e, e),
                                          nn.ReLU(inplace=True))
        self.fusion_head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feat * len(self.roles) + e, 64),
                                         nn.ReLU(inplace=True), nn.Linear(64, 1))
        self.mode = "fusion"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, S*2*C, H, W) -> (N, 2, S * F) per-half concatenated sequence features."""
        n, _, h, w = x.shape
        x = x.view(n, len(self.roles), self.n_halves, self.c, h, w)
        feats = [self.branches[r](x[:, i].reshape(n * self.n_halves, self.c, h, w)) for i, r in enumerate(self.roles)]
        return torch.cat(feats, dim=1).view(n, self.n_halves, -1)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None, output: str = "patient",
                mode: str | None = None) -> torch.Tensor:
        mode = mode or self.mode
        f = self.features(x)
        if mode == "image":
            halves = self.image_head(f).squeeze(-1)
        elif mode == "fusion":
            if clinical is None:
                raise ValueError("the fusion head needs the clinical vector")
            emb = self.clinical_mlp(clinical).unsqueeze(1).expand(-1, self.n_halves, -1)
            halves = self.fusion_head(torch.cat([f, emb], dim=-1)).squeeze(-1)
        else:
            raise ValueError(f"mode must be 'image' or 'fusion', not {mode!r}")
        return halves if output == "halves" else halves.max(dim=1, keepdim=True).values


def build_model(architecture: dict[str, Any]) -> TriInputResNet:
    """The network of a NegSpA model card (random initialisation)."""
    if architecture.get("family") != "negspa_tri_resnet":
        raise ValueError(f"architecture family {architecture.get('family')!r} is not 'negspa_tri_resnet'")
    return TriInputResNet(architecture)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(N, S, 2, C, H, W) -> (N, S*2*C, H, W), the model's packed input."""
    return images.flatten(1, 3)
