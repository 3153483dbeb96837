"""Networks built from a model card's ``architecture`` dict.

Cervical RA task: MONAI ResNet with ``spatial_dims=2``; the six sagittal slices are the input
channels (C = patient right -> left), images are (H, W) = (superior -> inferior,
anterior -> posterior); the head gives one logit (sigmoid -> probability of deformity).
"""

from __future__ import annotations

from typing import Any

import torch

RESNET_DEPTHS = (10, 18, 34, 50, 101, 152, 200)


def default_architecture(depth: int = 101, in_channels: int = 6, input_size: tuple[int, int] = (512, 512),
                         conv1_t_stride: int = 2) -> dict[str, Any]:
    """The card's ``architecture`` entry (paper: ResNet-101, 6 channels, 512 x 512)."""
    return {"family": "resnet", "depth": int(depth), "in_channels": int(in_channels),
            "conv1_t_stride": int(conv1_t_stride), "num_outputs": 1,
            "input_size": [int(input_size[0]), int(input_size[1])], "spatial_dims": 2}


def build_model(architecture: dict[str, Any]) -> torch.nn.Module:
    """MONAI ResNet (2D, random initialisation) with the first convolution taking ``in_channels``.

    Input: float32 tensor (N, in_channels, H, W); output: (N, num_outputs) logits.
    """
    from monai.networks.nets import resnet as monai_resnet

    family = architecture.get("family")
    if family != "resnet":
        raise ValueError(f"architecture family {family!r} not supported (only 'resnet')")
    depth = int(architecture.get("depth", 101))
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth {depth} not available; choose one of {RESNET_DEPTHS}")
    if int(architecture.get("spatial_dims", 2)) != 2:
        raise ValueError("only 2D networks (spatial_dims=2) are supported")
    factory = getattr(monai_resnet, f"resnet{depth}")
    return factory(pretrained=False, spatial_dims=2,
                   n_input_channels=int(architecture.get("in_channels", 6)),
                   conv1_t_stride=int(architecture.get("conv1_t_stride", 2)),
                   num_classes=int(architecture.get("num_outputs", 1)))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
