"""NegSpA-AI on the engine's binary recipe (Lu et al.): config sections and two training stages.

1. ``image``: the three ResNet branches + image-only head, BCE on the patient logit (max over the
joint halves), MixCut and random left/right swaps of the halves, [train] epochs and lr;
2. ``fusion``: branches frozen (BatchNorm statistics too), clinical MLP + fusion head, [fusion] epochs and lr.
The cohort: ``rheumai dataset build --task negspa --images cohort.csv --clinical clinical.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ...config import TrainConfig, option
from ...engine.networks import RESNET_DEPTHS
from ...engine.train import Prepared, Recipe, Stage
from ...errors import InputError
from .clinical import NAMES, ClinicalEncoder
from .mixcut import mixcut
from .model import build_model, default_architecture, pack
from .preprocess import ROLES, NegSpaParams

def _load(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cached sample unreadable ({exc}); rebuild the dataset") from None


class NegSpaDataset(torch.utils.data.Dataset):
    """Engine samples: {"input": {"x": packed images float32 (S*2*C, H, W) (:func:`.model.pack`),
    "clinical": float32 (D,)}, "target": {"out": label float32}, "id": patient_id}."""

    def __init__(self, df: pd.DataFrame, encoder: ClinicalEncoder):
        self.df = df.reset_index(drop=True)
        self.clinical = encoder.encode(self.df.reindex(columns=list(NAMES)))
        self.labels = self.df["label"].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict[str, Any]:
        arr = _load(Path(self.df.at[i, "array_path"]))
        x = pack(torch.from_numpy(arr.astype(np.float32))[None])[0]
        return {"input": {"x": x, "clinical": torch.from_numpy(self.clinical[i])},
                "target": {"out": torch.tensor(self.labels[i])}, "id": str(self.df.at[i, "patient_id"])}


@dataclass
class ModelConfig:
    depth: int = option(50, RESNET_DEPTHS)  # ResNet depth per branch
    shared_backbone: bool = False           # one ResNet for the three sequences


@dataclass
class AugmentConfig:
    mixcut_alpha: float = 1.0       # Beta(alpha, alpha); 0 = off (image stage only)
    mixcut_prob: float = 0.5


@dataclass
class FusionConfig:
    """The second stage: clinical MLP + fusion head, branches frozen."""

    epochs: int = option(20, lo=1)
    lr: float = 1e-3


def _image_stage(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    model.mode = "image"
    return list(model.branches.parameters()) + list(model.image_head.parameters())


def _fusion_stage(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    model.mode = "fusion"
    for p in model.branches.parameters():
        p.requires_grad_(False)
    return list(model.clinical_mlp.parameters()) + list(model.fusion_head.parameters())


def _frozen_branches(model: torch.nn.Module) -> None:
    model.train()
    getattr(model, "module", model).branches.eval()  # frozen: keep the image stage's BatchNorm statistics


def _augment(mixcut_alpha: float, mixcut_prob: float) -> Callable[..., dict[str, Any]]:
    """Batch transform: random left/right swap of the joint halves, then MixCut (``mixcut_alpha`` > 0)."""

    def transform(batch: dict[str, Any], gen: torch.Generator, epoch: int) -> dict[str, Any]:
        x, y = batch["input"]["x"], batch["target"]["out"]
        n, _, h, w = x.shape
        x6 = x.view(n, len(ROLES), 2, -1, h, w).clone()
        swap = torch.rand(n, generator=gen) < 0.5  # anatomical L/R flip = swap the halves
        x6[swap] = x6[swap].flip(2)
        if mixcut_alpha > 0 and float(torch.rand(1, generator=gen)) < mixcut_prob:
            mc = mixcut(x6, y, mixcut_alpha, gen)
            x6, y = mc.images, mc.targets
        return {**batch, "input": {**batch["input"], "x": pack(x6)}, "target": {"out": y}}

    return transform


def prepare(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, info: dict[str, Any]) -> Prepared:
    encoder = ClinicalEncoder.fit(train_df.reindex(columns=list(NAMES)))
    ds_train = NegSpaDataset(train_df, encoder)
    _, _, c, h, w = _load(Path(ds_train.df.at[0, "array_path"]), "r").shape
    arch = default_architecture(depth=cfg.model.depth, n_slices=c, input_size=(h, w), clinical_dim=encoder.dim,
                                shared_backbone=cfg.model.shared_backbone)
    stages = [Stage("image", cfg.train.epochs, cfg.train.lr, _image_stage,
                    batch_transform=_augment(cfg.augment.mixcut_alpha, cfg.augment.mixcut_prob)),
              Stage("fusion", cfg.fusion.epochs, cfg.fusion.lr, _fusion_stage, _frozen_branches,
                    _augment(0.0, 0.0), bn_recalibration="none")]
    card = {"architecture": arch, "preprocessing": info.get("preprocessing", NegSpaParams().to_dict()),
            "clinical_encoder": encoder.to_dict(), "reference": "Lu et al., Quant Imaging Med Surg 2024 (NegSpA-AI)"}
    return Prepared(build_model(arch), ds_train, NegSpaDataset(val_df, encoder) if len(val_df) else None, ds_train,
                    stages, card, f"three ResNet-{cfg.model.depth} branches + clinical fusion, {c} slices {h}x{w},")


def eval_dataset(rows: pd.DataFrame, card: dict[str, Any]) -> NegSpaDataset:
    return NegSpaDataset(rows, ClinicalEncoder.from_dict(card["clinical_encoder"]))


RECIPE = Recipe("negspa", {"model": ModelConfig, "augment": AugmentConfig, "fusion": FusionConfig}, prepare,
                eval_dataset, "sigmoid(max over joint halves of the fusion logit) = probability of axial SpA; "
                              "positive when probability >= threshold")
