"""mSASSS networks and heads (architectures are the model card's ``architecture`` dicts).

* ``landmarks``: :class:`rheumai.landmarks.LandmarkNet`, 21 heatmaps (7 vertebrae x upper corner,
  lower corner, centre) at ``out_stride`` on the letterboxed view: ``{"keypoints": (N, 21, h, w)}``.
* ``refine``: the same network on a disc-level crop, the level's two corners.
* ``lesions``: logits per corner slot (0 = top, 1 = bottom) of a disc-level crop: ``erosion``,
  ``sclerosis``, ``squaring``, ``syndesmophyte`` (N, 2), ``bridging`` (N, 1), ``not_scorable``
  (N, 2). ``paper``: one MONAI DenseNet-121 per output (224 px crops: ASSUMPTION, the size is not
  given here); ``demo``: one small DenseNet shared by all outputs on 48 px crops.
* ``ordinal``: the alternative, cumulative logits of a 0-3 score per slot ``ordinal`` (N, 2, 3)
  plus ``not_scorable`` (N, 2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.networks.nets import DenseNet, DenseNet121
from torch import nn

from ...engine.heads import BinaryHead, KeypointsHead, OrdinalHead
from ...landmarks import LandmarkNet
from .anatomy import N_POINTS, VIEWS
from .scoring import CORNER_LESIONS

LESION_OUTPUTS: dict[str, int] = {**{les: 2 for les in CORNER_LESIONS}, "bridging": 1, "not_scorable": 2}
ORDINAL_OUTPUTS: dict[str, int] = {"ordinal": 6, "not_scorable": 2}


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "landmarks": {"kind": "landmarks", "n_points": N_POINTS, "channels": [16, 32, 64, 128], "out_stride": 2,
                  "input_size": [160, 128], "sigma": 1.5},
    "refine": {"kind": "refine", "n_points": 2, "channels": [16, 32, 64], "out_stride": 2, "crop_size": 48,
               "sigma": 1.0, "side_factor": 1.1},
    "demo": {"backbone": "densenet", "shared": True, "crop_size": 48, "init_features": 16, "growth_rate": 12,
             "block_config": [4, 4, 4], "dropout": 0.1},
    "paper": {"backbone": "densenet121", "shared": False, "crop_size": 224}}


def architecture(kind: str, crop_models: str = "demo", **kw: Any) -> dict[str, Any]:
    """Default architecture of a network (``kind`` landmarks | refine | lesions | ordinal; the crop
    models' ``crop_models`` demo | paper), with ``kw`` applied."""
    if kind in ("lesions", "ordinal"):
        if crop_models not in ("demo", "paper"):
            raise ValueError(f"crop_models must be 'demo' or 'paper', not {crop_models!r}")
        return copy.deepcopy({"kind": kind, **ARCHITECTURES[crop_models], **kw})
    if kind not in ("landmarks", "refine"):
        raise ValueError(f"unknown mSASSS model kind {kind!r} (landmarks | refine | lesions | ordinal)")
    return copy.deepcopy({**ARCHITECTURES[kind], **kw})


def _backbone(arch: dict[str, Any], n_out: int) -> nn.Module:
    if arch["backbone"] == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=n_out, pretrained=False)
    if arch["backbone"] == "densenet":
        return DenseNet(spatial_dims=2, in_channels=1, out_channels=n_out, init_features=int(arch["init_features"]),
                        growth_rate=int(arch["growth_rate"]), block_config=tuple(arch["block_config"]),
                        dropout_prob=float(arch.get("dropout", 0.0)))
    raise ValueError(f"unknown crop backbone {arch['backbone']!r} (densenet121 | densenet)")


class CropNet(nn.Module):
    """Disc-level crop classifier returning a dict of logits (see module docstring)."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.outputs = dict(LESION_OUTPUTS if arch["kind"] == "lesions" else ORDINAL_OUTPUTS)
        self.shared = bool(arch.get("shared", True))
        if self.shared:
            self.net = _backbone(arch, sum(self.outputs.values()))
        else:
            self.nets = nn.ModuleDict({k: _backbone(arch, n) for k, n in self.outputs.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.shared:
            out = dict(zip(self.outputs, torch.split(self.net(x), list(self.outputs.values()), dim=1)))
        else:
            out = {k: net(x) for k, net in self.nets.items()}
        if "ordinal" in out:
            out["ordinal"] = out["ordinal"].reshape(-1, 2, 3)
        return out


class LandmarkModel(nn.Module):
    """:class:`LandmarkNet` returning ``{"keypoints": heatmap logits}``."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.net = LandmarkNet(int(arch["n_points"]), 1, tuple(arch["channels"]), int(arch["out_stride"]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"keypoints": self.net(x)}


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Network for a model card's ``architecture`` (kinds: system, landmarks, refine, lesions, ordinal)."""
    kind = arch.get("kind")
    if kind == "system":
        return MsasssSystem(arch)
    if kind in ("landmarks", "refine"):
        return LandmarkModel(arch)
    if kind in ("lesions", "ordinal"):
        return CropNet(arch)
    raise ValueError(f"unknown mSASSS model kind {kind!r} (system | landmarks | refine | lesions | ordinal)")


class MsasssSystem(nn.Module):
    """The networks of one checkpoint: ``arch`` = {"kind": "system", "landmarks", "refine", "lesions",
    "ordinal" (or None), "separate_views"}; with ``separate_views`` a crop model per view."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        self.arch = arch
        self.landmarks = build_model(arch["landmarks"])
        self.refine = build_model(arch["refine"])
        self.separate_views = bool(arch.get("separate_views", False))

        def crop_model(a: dict[str, Any]) -> nn.Module:
            return nn.ModuleDict({v: build_model(a) for v in VIEWS}) if self.separate_views else build_model(a)

        self.lesions = crop_model(arch["lesions"])
        self.ordinal = crop_model(arch["ordinal"]) if arch.get("ordinal") else None

    def crop_net(self, kind: str, view: str) -> nn.Module | None:
        """The ``lesions`` or ``ordinal`` network of a view (None: no ordinal model)."""
        net = getattr(self, kind)
        return net[view] if net is not None and self.separate_views else net


class _PerSlot:
    """For heads over the corner slots: output (N, S[, K-1]), target (N, S); NaN targets are left out."""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float().reshape(output.shape[:2])
        ok = torch.isfinite(t)
        return super().loss(output[ok], t[ok]) if bool(ok.any()) else output.sum() * 0.0  # type: ignore[misc]

    def score(self, pred: dict[str, np.ndarray], target: np.ndarray) -> float:
        t = np.asarray(target, float).reshape(-1)
        ok = np.isfinite(t)
        flat = {k: v.reshape(t.size, -1)[ok] for k, v in pred.items()}
        return super().score({k: v[:, 0] if v.shape[1] == 1 else v for k, v in flat.items()}, t[ok])  # type: ignore


@dataclass
class MaskedBinaryHead(_PerSlot, BinaryHead):
    """Binary head over per-slot logits (N, S) with targets (N, S); NaN targets are ignored."""


@dataclass
class SlotOrdinalHead(_PerSlot, OrdinalHead):
    """Ordinal head over slots: output (N, S, K-1), target (N, S); NaN targets are ignored."""

    def decode(self, output: torch.Tensor) -> dict[str, np.ndarray]:
        n, s, k = output.shape
        return {key: v.reshape(n, s, *v.shape[1:]) for key, v in super().decode(output.reshape(n * s, k)).items()}


def make_heads(kind: str, arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """Engine heads ({name: Head}) of an mSASSS model kind."""
    if kind in ("landmarks", "refine"):
        a = arch or architecture(kind)
        return {"keypoints": KeypointsHead(name="keypoints", n_points=int(a["n_points"]), sigma=float(a["sigma"]),
                                           stride=int(a["out_stride"]))}
    if kind == "lesions":
        return {k: MaskedBinaryHead(name=k) for k in LESION_OUTPUTS}
    if kind == "ordinal":
        return {"ordinal": SlotOrdinalHead(name="ordinal", n_classes=4),
                "not_scorable": MaskedBinaryHead(name="not_scorable", weight=0.5)}
    raise ValueError(f"unknown mSASSS model kind {kind!r}")
