"""Networks of the hand SvdH task (ordinal outputs are CORAL cumulative logits, engine ordinal heads).

:class:`WholeHandNet` (the paper's path): ResNet (MONAI) or :class:`MobileNetV2` backbone, pooled,
``total`` (B, 1) = one-hand total / ``total_scale`` and severity ``class`` (B, n_classes - 1).
:class:`JointScorer`: a small MONAI ResNet on a joint crop + a joint embedding -> ``erosion`` (B, 5)
and ``jsn`` (B, 4). MONAI has no MobileNetV2 and torchvision does not import beside the pinned
torch, so :class:`MobileNetV2` re-implements Sandler et al. 2018 in plain torch layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import ResNet

from ...engine.heads import CoralLayer
from .scoring import MAX_EROSION, MAX_JSN, MAX_TOTAL

BACKBONES = ("resnet", "mobilenetv2")
_RESNET_LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def _divisible(v: float, d: int = 8) -> int:
    return max(d, int(v + d / 2) // d * d)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor (Sandler et al., CVPR 2018), 2D, ``in_channels`` input.

    ``features`` ends with the 1x1 expansion to ``out_channels``; stages are named ``stage1`` ..
    ``stage5`` (strides 2, 4, 8, 16, 32) so Grad-CAM can target them. Output (B, C, H/32, W/32).
    """

    # (expansion t, channels c, repeats n, stride s) from the paper's Table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, in_channels: int = 1, width: float = 1.0, last_channels: int = 1280) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin),
                                  nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = []
        for t, c, n, s in self.SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                blocks.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        # stages by output stride: blocks [0:1] /2, [1:3] /4, [3:6] /8, [6:13] /16, [13:17] /32
        self.stage1, self.stage2, self.stage3 = nn.Sequential(*blocks[0:1]), nn.Sequential(*blocks[1:3]), \
            nn.Sequential(*blocks[3:6])
        self.stage4, self.stage5 = nn.Sequential(*blocks[6:13]), nn.Sequential(*blocks[13:])
        self.out_channels = last_channels
        self.head_conv = nn.Sequential(nn.Conv2d(cin, self.out_channels, 1, bias=False),
                                       nn.BatchNorm2d(self.out_channels), nn.ReLU6(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4, self.stage5):
            x = stage(x)
        return self.head_conv(x)

    def block_groups(self) -> list[nn.Module]:
        """Modules from input to output, for "last blocks" fine-tuning."""
        return [self.stem, self.stage1, self.stage2, self.stage3, self.stage4, self.stage5, self.head_conv]


class _ResNetFeatures(ResNet):
    """MONAI ResNet (2D, basic blocks) returning the layer4 feature map (B, C, h, w)."""

    def __init__(self, depth: int, widths: list[int], in_channels: int) -> None:
        super().__init__("basic", _RESNET_LAYERS[depth], widths, spatial_dims=2, n_input_channels=in_channels,
                         conv1_t_size=7, conv1_t_stride=2, feed_forward=False)
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def block_groups(self) -> list[nn.Module]:
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]


def build_backbone(arch: dict[str, Any]) -> nn.Module:
    family = arch.get("backbone", "resnet")
    if family == "resnet":
        depth = int(arch.get("depth", 18))
        if depth not in _RESNET_LAYERS:
            raise ValueError(f"resnet depth must be one of {sorted(_RESNET_LAYERS)}, not {depth}")
        return _ResNetFeatures(depth, list(arch.get("widths", [16, 32, 64, 128])), int(arch.get("in_channels", 1)))
    if family == "mobilenetv2":
        return MobileNetV2(int(arch.get("in_channels", 1)), float(arch.get("width", 0.5)),
                           int(arch.get("last_channels", 256)))
    raise ValueError(f"backbone must be one of {BACKBONES}, not {family!r}")


class WholeHandNet(nn.Module):
    """Whole-hand radiograph (B, 1, H, W) -> {"total": (B, 1) total / total_scale, "class": (B, K-1)
    cumulative logits (CORAL, engine ordinal head)}."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = build_backbone(arch)
        self.total_scale = float(arch.get("total_scale", MAX_TOTAL / 10))
        c = self.backbone.out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(float(arch.get("dropout", 0.0)))
        self.total = nn.Linear(c, 1)
        self.cls = CoralLayer(c, int(arch.get("n_classes", 5)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.pool(self.backbone(x)).flatten(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {"total": self.total(f), "class": self.cls(f)}

    def heads(self) -> list[nn.Module]:
        return [self.total, self.cls]


class JointScorer(nn.Module):
    """Joint crop (B, 1, c, c) + joint index (B,) -> {"erosion": (B, 5), "jsn": (B, 4)} cumulative
    logits (CORAL: logit_k = log-odds(grade > k); engine ordinal heads)."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        widths = list(arch.get("widths", [16, 32, 64, 96]))
        self.net = ResNet("basic", [1, 1, 1, 1], widths, spatial_dims=2, n_input_channels=1, conv1_t_size=3,
                          conv1_t_stride=int(arch.get("stem_stride", 2)), no_max_pool=True, feed_forward=False)
        n_joints = int(arch.get("n_joints", 22))
        self.embed = nn.Embedding(n_joints, widths[-1])
        self.erosion = CoralLayer(widths[-1], MAX_EROSION + 1)
        self.jsn = CoralLayer(widths[-1], MAX_JSN + 1)

    def forward(self, x: torch.Tensor, joint: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.net(x) * torch.sigmoid(self.embed(joint)) + self.embed(joint)
        f = torch.relu(f)
        return {"erosion": self.erosion(f), "jsn": self.jsn(f)}


class PooledLandmarkNet(nn.Module):
    """``rheumai.landmarks.LandmarkNet`` on the input average-pooled by ``in_pool``: heatmaps
    (B, K, H / stride, W / stride) with ``stride = in_pool * out_stride`` input pixels per cell."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        from ...landmarks import LandmarkNet

        self.in_pool = int(arch.get("in_pool", 1))
        self.stride = self.in_pool * int(arch.get("out_stride", 1))
        self.net = LandmarkNet(int(arch["n_points"]), channels=tuple(arch.get("channels", (8, 16, 32, 64))),
                               out_stride=int(arch.get("out_stride", 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_pool > 1:
            x = nn.functional.avg_pool2d(x, self.in_pool)
        return self.net(x)


class HandSvdHNet(nn.Module):
    """Both paths in one network (one checkpoint, one predictor pass).

    forward(small (B, 1, h, w), hires (B, 1, H, W), hspacing (B, 2) mm per hires px (row, col),
    points (B, K, 2) hires px or None) -> {"total" (B, 1), "class" (B, C-1), "heatmaps" (B, K, h', w'),
    "points" (B, K, 2) hires px, "erosion" (B, K, 5), "jsn" (B, K, 4)} (cumulative logits). Without ``points`` the
    joint crops are taken at the predicted landmarks (re-scoring passes corrected points).
    Sub-networks: ``whole`` (:class:`WholeHandNet`), ``landmarks`` (rheumai.landmarks.LandmarkNet
    on the small input) and ``joints`` (:class:`JointScorer`), each trained on its own.
    """

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        from .dataset import HandParams

        self.params = HandParams.from_dict(arch.get("preprocessing", {}))
        self.whole = WholeHandNet(arch["whole"])
        self.landmarks = PooledLandmarkNet(arch["landmarks"])
        self.joints = JointScorer(arch["joints"])

    def locate(self, small: torch.Tensor, hires_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps and landmark points (B, K, 2) in hires pixels (pixel centres aligned)."""
        from ...landmarks import soft_argmax

        hm = self.landmarks(small)
        xy = soft_argmax(hm, self.landmarks.stride)
        sy, sx = hires_shape[0] / small.shape[-2], hires_shape[1] / small.shape[-1]
        pts = torch.stack([(xy[..., 0] + 0.5) * sx - 0.5, (xy[..., 1] + 0.5) * sy - 0.5], -1)
        return hm, pts

    def score_joints(self, hires: torch.Tensor, points: torch.Tensor, hspacing: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        from .dataset import crop_batch

        B, K, _ = points.shape
        x = crop_batch(hires, points, hspacing, self.params).reshape(B * K, 1, self.params.crop_px,
                                                                    self.params.crop_px)
        joint = torch.arange(K, device=hires.device).repeat(B)
        out = self.joints(x, joint)
        return {k: v.reshape(B, K, -1) for k, v in out.items()}

    def forward(self, small: torch.Tensor, hires: torch.Tensor, hspacing: torch.Tensor,
                points: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hm, pts = self.locate(small, tuple(hires.shape[-2:]))
        pts = pts if points is None else points.to(pts.dtype)
        return {**self.whole(small), "heatmaps": hm, "points": pts, **self.score_joints(hires, pts, hspacing)}


def default_architecture(backbone: str = "resnet", **kw: Any) -> dict[str, Any]:
    """Model-card ``architecture`` of :class:`HandSvdHNet`: whole: quarter-width ResNet-18 (or
    MobileNetV2 x0.5) on 160 x 128; landmarks: 4-level U-Net on the input pooled by 2, heatmaps at
    stride 2 (4 input px per cell, soft-argmax); joints: one-block-per-stage ResNet on 32 x 32 crops."""
    from .dataset import HandParams
    from .scoring import JOINT_NAMES

    whole: dict[str, Any] = {"family": "hand_svdh_whole", "backbone": backbone, "in_channels": 1, "n_classes": 5,
                             "total_scale": float(MAX_TOTAL) / 10.0, "dropout": 0.0}
    if backbone == "resnet":
        whole.update(depth=18, widths=[16, 32, 64, 128])
    else:
        whole.update(width=0.5, last_channels=256)
    whole.update(kw)
    return {"family": "hand_svdh", "whole": whole,
            "landmarks": {"n_points": len(JOINT_NAMES), "channels": [8, 16, 32, 64], "in_pool": 2, "out_stride": 2,
                          "sigma": 1.0},
            "joints": {"family": "hand_svdh_joint", "widths": [16, 32, 64, 96], "stem_stride": 2,
                       "n_joints": len(JOINT_NAMES)},
            "preprocessing": HandParams().to_dict()}


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Network for a model-card architecture: the task network or a whole-hand network (ensembles)."""
    nets = {"hand_svdh": HandSvdHNet, "hand_svdh_whole": WholeHandNet}
    if arch.get("family", "hand_svdh") not in nets:
        raise ValueError(f"unknown hand_svdh architecture family {arch.get('family')!r}")
    return nets[arch.get("family", "hand_svdh")](arch)


FINETUNE_SCHEMES = ("whole", "last_blocks", "head_only")


def apply_finetune_scheme(model: WholeHandNet, scheme: str, n_last: int = 2) -> int:
    """Freeze parameters per fine-tuning scheme; returns the number of trainable parameters.

    whole: everything; last_blocks: the last ``n_last`` backbone block groups and the heads;
    head_only: the linear heads (BatchNorm running statistics still update in train mode).
    """
    if scheme not in FINETUNE_SCHEMES:
        raise ValueError(f"fine-tuning scheme must be one of {FINETUNE_SCHEMES}, not {scheme!r}")
    for p in model.parameters():
        p.requires_grad_(scheme == "whole")
    if scheme != "whole":
        train = list(model.heads())
        if scheme == "last_blocks":
            train += model.backbone.block_groups()[-n_last:]
        for m in train:
            for p in m.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
