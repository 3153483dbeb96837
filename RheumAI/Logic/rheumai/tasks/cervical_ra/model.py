"""Cervical RA networks from a model card's ``architecture`` dict: input (N, C, H, W) = C sagittal
slices (right -> left), H superior -> inferior, W anterior -> posterior; one logit (deformity).

``family`` ``resnet``: the paper's design, the slices are the channels of one 2D MONAI ResNet (it
cannot say which slice holds the evidence). ``slice_attention``: one shared 2D ResNet encoder per
slice, gated attention pooling over the slices (Ilse et al., ICML 2018) and a linear layer; the
attention weights say which slice carried the decision, Grad-CAM at ``encoder.layer4`` is per slice.
"""

from __future__ import annotations

from typing import Any

import torch

from ...engine.networks import resnet2d

FAMILIES = ("resnet", "slice_attention")


def default_architecture(depth: int = 101, in_channels: int = 6, input_size: tuple[int, int] = (512, 512),
                         conv1_t_stride: int = 2, family: str = "resnet") -> dict[str, Any]:
    """The card's ``architecture`` entry (paper: ResNet-101, 6 channels, 512 x 512, family ``resnet``)."""
    if family not in FAMILIES:
        raise ValueError(f"architecture family {family!r} not supported; choose one of {FAMILIES}")
    return {"family": family, "depth": int(depth), "in_channels": int(in_channels),
            "conv1_t_stride": int(conv1_t_stride), "num_outputs": 1,
            "input_size": [int(input_size[0]), int(input_size[1])], "spatial_dims": 2,
            **({"attention_dim": 128} if family == "slice_attention" else {})}


class SliceAttentionNet(torch.nn.Module):
    """Shared 2D encoder per slice + gated attention pooling over slices + linear head.

    forward: x (N, C, H, W) -> logits (N, num_outputs). The encoder sees (N * C, 1, H, W); its
    pooled features (N, C, K) are weighted by a_c = softmax_c(w^T (tanh(V h_c) * sigmoid(U h_c)))
    and summed. ``last_attention`` holds the weights (N, C) of the latest forward pass (detached).
    """

    def __init__(self, depth: int = 18, n_slices: int = 6, conv1_t_stride: int = 2, attention_dim: int = 128,
                 num_outputs: int = 1) -> None:
        super().__init__()
        self.n_slices = int(n_slices)
        self.encoder = resnet2d(depth, 1, conv1_t_stride, feed_forward=False)
        k = 512 * type(self.encoder.layer4[-1]).expansion  # MONAI ResNet stage widths end at 512
        self.attn_v = torch.nn.Linear(k, attention_dim)
        self.attn_u = torch.nn.Linear(k, attention_dim)
        self.attn_w = torch.nn.Linear(attention_dim, 1)
        self.fc = torch.nn.Linear(k, num_outputs)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        if c != self.n_slices:
            raise ValueError(f"expected {self.n_slices} slices, got input of shape {tuple(x.shape)}")
        h = self.encoder(x.reshape(n * c, 1, *x.shape[2:])).reshape(n, c, -1)  # (N, C, K) slice features
        score = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        a = torch.softmax(score, dim=1)
        self.last_attention = a.detach()
        return self.fc((a.unsqueeze(-1) * h).sum(1))


def build_model(architecture: dict[str, Any]) -> torch.nn.Module:
    """Network for an ``architecture`` dict (random initialisation; no weights are downloaded).

    Input: float32 tensor (N, in_channels, H, W); output: (N, num_outputs) logits.
    """
    a = {**default_architecture(family=architecture.get("family")), **architecture}
    if int(a["spatial_dims"]) != 2:
        raise ValueError("only 2D networks (spatial_dims=2) are supported")
    depth, in_ch, stride, n_out = (int(a[k]) for k in ("depth", "in_channels", "conv1_t_stride",
                                                       "num_outputs"))
    if a["family"] == "slice_attention":
        return SliceAttentionNet(depth, in_ch, stride, int(a["attention_dim"]), n_out)
    return resnet2d(depth, in_ch, stride, n_out)
