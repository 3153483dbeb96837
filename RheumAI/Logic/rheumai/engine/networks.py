"""2D MONAI ResNets for the tasks' model builders (random initialisation; no weights downloaded)."""

from __future__ import annotations

import torch

RESNET_DEPTHS = (10, 18, 34, 50, 101, 152, 200)


def resnet2d(depth: int, in_channels: int, conv1_t_stride: int = 2, num_classes: int = 1,
             feed_forward: bool = True) -> torch.nn.Module:
    """MONAI ResNet-``depth``, ``spatial_dims=2``: (N, in_channels, H, W) -> (N, num_classes) logits, or
    with ``feed_forward=False`` the pooled features (N, 512 * block expansion)."""
    from monai.networks.nets import resnet as monai_resnet

    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth {depth} not available; choose one of {RESNET_DEPTHS}")
    return getattr(monai_resnet, f"resnet{depth}")(pretrained=False, spatial_dims=2, n_input_channels=in_channels,
                                                     conv1_t_stride=conv1_t_stride, num_classes=num_classes,
                                                     feed_forward=feed_forward)
