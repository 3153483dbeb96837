"""NegSpA-AI on the engine's binary recipe: dataset cache, config sections, two training stages.

Dataset: :func:`build_dataset` preprocesses every study of a cohort CSV (patient_id, t1, t2, stir,
box, label, split) into ``cache/<patient_id>.npy/.json`` (:class:`NegSpaSample`) and writes
``manifest.csv`` (the contract's columns + the parsed clinical columns) and ``dataset.json``
(parameters, excluded studies with the reason). Re-running skips cached studies whose parameters
match; a study that fails is listed, not silently dropped.

Training (Lu et al.), two stages of :func:`rheumai.engine.train.train` (state in ``<out>/image/``
and ``<out>/fusion/``): 1. ``image``: the three ResNet branches + the image-only head, BCE on the
patient logit (max over the joint halves), MixCut (:mod:`.mixcut`) and a random left/right swap
of the halves as the batch transform, [train] epochs and lr; 2. ``fusion``: branches frozen
(BatchNorm statistics too), the clinical MLP + fusion head on unmixed images, [fusion] epochs and
lr. Selection, threshold with CI, card and evaluation are the engine's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ...atomic import write_json, write_text
from ...config import TrainConfig
from ...engine.train import Prepared, Recipe, Stage
from ...errors import InputError, RheumAIError
from ...paths import safe_child
from .clinical import NAMES, ClinicalEncoder, parse_table, read_clinical_csv
from .mixcut import mixcut
from .model import build_model, default_architecture, pack
from .preprocess import ROLES, NegSpaParams, preprocess
from .synth import read_cohort

TASK_NAME = "negspa"


# ---------------------------------------------------------------- dataset

def _params_hash(params: NegSpaParams) -> str:
    return hashlib.sha256(json.dumps(params.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def build_dataset(cohort_csv: str | Path, out_dir: str | Path, params: NegSpaParams | dict | None = None,
                  clinical_csv: str | Path | None = None, show_progress: bool = True) -> Path:
    """Preprocess a cohort into a cache + ``manifest.csv``; returns the manifest path.

    ``clinical_csv`` defaults to ``clinical.csv`` beside the cohort CSV when present; clinical
    columns may also sit in the cohort CSV itself.
    """
    p = params if isinstance(params, NegSpaParams) else NegSpaParams.from_dict(dict(params or {}))
    cohort_csv = Path(cohort_csv)
    df = read_cohort(cohort_csv)
    if clinical_csv is None and (cohort_csv.parent / "clinical.csv").is_file():
        clinical_csv = cohort_csv.parent / "clinical.csv"
    if clinical_csv is not None:
        clin = read_clinical_csv(clinical_csv)
        df = df.drop(columns=[c for c in NAMES if c in df.columns]).merge(clin, on="patient_id", how="left")
    else:
        df = pd.concat([df.drop(columns=[c for c in NAMES if c in df.columns]),
                        parse_table(df.astype(str).replace("nan", ""), cohort_csv)], axis=1)
    out = Path(out_dir)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    ph = _params_hash(p)
    rows, excluded = [], []
    for _, r in tqdm(df.iterrows(), total=len(df), desc="negspa dataset", disable=not show_progress):
        pid = str(r["patient_id"])
        stem = safe_child(out / "cache", pid, ".json", what="patient ID", source=cohort_csv).with_name(pid)
        meta = stem.with_name(pid + ".json")
        cached = meta.is_file() and stem.with_name(pid + ".npy").is_file() and \
            json.loads(meta.read_text()).get("params") == p.to_dict()
        if not cached:
            try:
                sample = preprocess({k: r[k] for k in ("t1", "t2", "stir", "box")}, p)
            except RheumAIError as exc:
                excluded.append({"patient_id": pid, "reason": str(exc)})
                print(f"negspa dataset: skipped {pid}: {exc}")
                continue
            sample.provenance["patient_id"] = pid
            sample.save(stem)
        rows.append({"patient_id": pid, "split": r.get("split", "train"), "fold": -1, "site": r.get("site", ""),
                     "label": int(r["label"]) if "label" in r and pd.notna(r["label"]) else -1,
                     "t1": r["t1"], "t2": r["t2"], "stir": r["stir"], "box": r["box"],
                     "cache_file": f"cache/{pid}", "params_hash": ph, **{c: r[c] for c in NAMES}})
    man = pd.DataFrame(rows).sort_values("patient_id")
    path = out / "manifest.csv"
    write_text(path, man.to_csv(index=False))
    write_json(out / "dataset.json", {"task": TASK_NAME, "preprocessing": p.to_dict(), "params_hash": ph,
                                      "cohort": str(cohort_csv),
                                      "clinical": None if clinical_csv is None else str(clinical_csv),
                                      "n": len(man), "excluded": excluded})
    return path


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
        path = Path(self.df.at[i, "array_path"])
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(path, f"cached sample unreadable ({exc}); rebuild the dataset") from None
        x = pack(torch.from_numpy(arr.astype(np.float32))[None])[0]
        return {"input": {"x": x, "clinical": torch.from_numpy(self.clinical[i])},
                "target": {"out": torch.tensor(self.labels[i])}, "id": str(self.df.at[i, "patient_id"])}


@dataclass
class ModelConfig:
    depth: int = 50                 # ResNet depth per branch
    shared_backbone: bool = False   # one ResNet for the three sequences

    def check(self, src: str | None) -> None:
        from ...engine.networks import RESNET_DEPTHS

        if self.depth not in RESNET_DEPTHS:
            raise InputError(src, f"[model] depth {self.depth} not a MONAI ResNet depth {RESNET_DEPTHS}")


@dataclass
class AugmentConfig:
    mixcut_alpha: float = 1.0       # Beta(alpha, alpha); 0 = off (image stage only)
    mixcut_prob: float = 0.5


@dataclass
class FusionConfig:
    """The second stage: clinical MLP + fusion head, branches frozen."""

    epochs: int = 20
    lr: float = 1e-3

    def check(self, src: str | None) -> None:
        if self.epochs < 1:
            raise InputError(src, "[fusion] epochs must be >= 1")


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


def _augment(mix: bool, mixcut_alpha: float, mixcut_prob: float) -> Callable[..., dict[str, Any]]:
    """Batch transform: random left/right swap of the joint halves, then (``mix``) MixCut."""

    def transform(batch: dict[str, Any], gen: torch.Generator, epoch: int) -> dict[str, Any]:
        x, y = batch["input"]["x"], batch["target"]["out"]
        n, _, h, w = x.shape
        x6 = x.view(n, len(ROLES), 2, -1, h, w).clone()
        swap = torch.rand(n, generator=gen) < 0.5  # anatomical L/R flip = swap the halves
        x6[swap] = x6[swap].flip(2)
        if mix and mixcut_alpha > 0 and float(torch.rand(1, generator=gen)) < mixcut_prob:
            mc = mixcut(x6, y, mixcut_alpha, gen)
            x6, y = mc.images, mc.targets
        return {**batch, "input": {**batch["input"], "x": pack(x6)}, "target": {"out": y}}

    return transform


def prepare(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, info: dict[str, Any]) -> Prepared:
    encoder = ClinicalEncoder.fit(train_df.reindex(columns=list(NAMES)))
    ds_train = NegSpaDataset(train_df, encoder)
    path = Path(ds_train.df.at[0, "array_path"])
    try:
        _, _, c, h, w = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cached sample unreadable ({exc}); rebuild the dataset") from None
    arch = default_architecture(depth=cfg.model.depth, n_slices=c, input_size=(h, w), clinical_dim=encoder.dim,
                                shared_backbone=cfg.model.shared_backbone)
    a = cfg.augment
    stages = [Stage("image", cfg.train.epochs, cfg.train.lr, _image_stage, None, _augment(True, a.mixcut_alpha,
                                                                                          a.mixcut_prob)),
              Stage("fusion", cfg.fusion.epochs, cfg.fusion.lr, _fusion_stage, _frozen_branches,
                    _augment(False, 0.0, 0.0), bn_recalibration="none")]
    card = {"architecture": arch, "preprocessing": info.get("preprocessing", NegSpaParams().to_dict()),
            "clinical_encoder": encoder.to_dict(), "reference": "Lu et al., Quant Imaging Med Surg 2024 (NegSpA-AI)"}
    return Prepared(build_model(arch), ds_train, NegSpaDataset(val_df, encoder) if len(val_df) else None, ds_train,
                    stages, card, f"three ResNet-{cfg.model.depth} branches + clinical fusion, {c} slices {h}x{w},")


def eval_dataset(rows: pd.DataFrame, card: dict[str, Any]) -> NegSpaDataset:
    return NegSpaDataset(rows, ClinicalEncoder.from_dict(card["clinical_encoder"]))


RECIPE = Recipe(TASK_NAME, {"model": ModelConfig, "augment": AugmentConfig, "fusion": FusionConfig}, prepare,
                eval_dataset, "sigmoid(max over joint halves of the fusion logit) = probability of axial SpA; "
                              "positive when probability >= threshold")
