"""Cervical RA on the engine's binary recipe: config sections, cached slice stacks, transforms.

Cache arrays: ``<stem>.npy`` float32 (C, H, W), C = sagittal slices (patient right -> left),
H = superior -> inferior, W = anterior -> posterior, read with ``np.load(mmap_mode="r")``.
Defaults follow the paper (ResNet-101, random init; the engine's BCE, Adam 1e-4, batch 4,
100 epochs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from monai.transforms import (CenterScaleCrop, Compose, RandAdjustContrast, RandFlip, RandLambda,
                              RandScaleCrop, RandScaleIntensity, RandShiftIntensity, Resize)
from monai.utils import convert_to_tensor

from ...config import TrainConfig, option
from ...engine.networks import RESNET_DEPTHS
from ...engine.train import Prepared, Recipe, Stage
from ...errors import InputError
from .model import FAMILIES, build_model, default_architecture
from .slices import SliceParams


@dataclass
class ModelConfig:
    """Network: MONAI ResNet (spatial_dims=2) or slice attention, slices as channels, one logit."""

    family: str = option("resnet", FAMILIES)
    depth: int = option(101, RESNET_DEPTHS)
    in_channels: int = 6
    conv1_t_stride: int = 2
    input_size: list[int] = field(default_factory=list)  # (H, W) px; empty = the cached arrays' size

    def check(self, src: str | None) -> None:
        if self.input_size and (len(self.input_size) != 2 or min(self.input_size) < 16):
            raise InputError(src, f"[model] input_size must be [H, W] >= 16 px, got {self.input_size}")


@dataclass
class AugmentConfig:
    """Training-only MONAI transforms on (C, H, W). crop: "none" | "center" (also at inference) |
    "random_center" (size in [crop_fraction, 1]) | "random" (crop_fraction at a random place), then
    resized to input_size; flip_axes 0 = H, 1 = W; flip_channels_prob mirrors left-right."""

    enabled: bool = True
    crop: str = option("random_center", ("none", "center", "random_center", "random"))
    crop_fraction: float = 0.85
    flip_prob: float = 0.5
    flip_axes: list[int] = field(default_factory=lambda: [1])
    flip_channels_prob: float = 0.0
    contrast_prob: float = 0.5
    contrast_gamma: list[float] = field(default_factory=lambda: [0.8, 1.25])
    scale_intensity_prob: float = 0.5
    scale_intensity_factor: float = 0.1   # multiply by 1 + U(-f, f)
    shift_intensity_prob: float = 0.5
    shift_intensity_offset: float = 0.1   # add U(-o, o) (intensities are normalised to ~[0, 1])

    def check(self, src: str | None) -> None:
        if not 0.1 <= self.crop_fraction <= 1.0:
            raise InputError(src, "[augment] crop_fraction must be in [0.1, 1]")
        if any(ax not in (0, 1) for ax in self.flip_axes):
            raise InputError(src, "[augment] flip_axes: in-plane axes only, 0 (H) and/or 1 (W)")


def load_array(path: str | Path, expect_channels: int | None = None) -> np.ndarray:
    """Memory-mapped (C, H, W) float32 array; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "cached slice array not found (manifest cache_file + '.npy')")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(path, f"not a readable .npy array: {exc}") from None
    if arr.ndim != 3 or arr.dtype != np.float32:
        raise InputError(path, f"expected float32 (C, H, W), got {arr.dtype} {arr.shape}")
    if expect_channels is not None and arr.shape[0] != expect_channels:
        raise InputError(path, f"has {arr.shape[0]} slices, the model expects {expect_channels}")
    return arr


def _reverse_channels(img: torch.Tensor) -> torch.Tensor:
    """A left-right mirror: the channels are sagittal slices right -> left."""
    return torch.flip(img, dims=[0])


def build_train_transform(aug: AugmentConfig, input_size: Sequence[int]) -> Compose:
    """Random augmentation on a (C, H, W) tensor, ending at ``input_size`` (H, W)."""
    if not aug.enabled:
        return build_eval_transform(aug.crop, aug.crop_fraction, input_size)
    f = aug.crop_fraction
    t: list[Any] = {"center": [CenterScaleCrop(roi_scale=f)],
                    "random_center": [RandScaleCrop(f, 1.0, random_center=False, random_size=True)],  # f..1
                    "random": [RandScaleCrop(f, random_center=True, random_size=False)]}.get(aug.crop, [])
    t.append(Resize(spatial_size=tuple(input_size), mode="bilinear", anti_aliasing=False))
    t += [RandFlip(prob=aug.flip_prob, spatial_axis=ax) for ax in aug.flip_axes]
    if aug.flip_channels_prob > 0:
        t.append(RandLambda(_reverse_channels, prob=aug.flip_channels_prob))
    if aug.contrast_prob > 0:
        t.append(RandAdjustContrast(prob=aug.contrast_prob, gamma=tuple(aug.contrast_gamma), retain_stats=True))
    if aug.scale_intensity_prob > 0:
        t.append(RandScaleIntensity(factors=aug.scale_intensity_factor, prob=aug.scale_intensity_prob))
    if aug.shift_intensity_prob > 0:
        t.append(RandShiftIntensity(offsets=aug.shift_intensity_offset, prob=aug.shift_intensity_prob))
    return Compose(t)


def build_eval_transform(crop: str, crop_fraction: float, input_size: Sequence[int]) -> Compose:
    """Inference transform: the fixed centre crop (crop="center" only), then resize to ``input_size``."""
    t: list[Any] = [CenterScaleCrop(roi_scale=crop_fraction)] if crop == "center" and crop_fraction < 1.0 else []
    return Compose(t + [Resize(spatial_size=tuple(input_size), mode="bilinear", anti_aliasing=False)])


def eval_transform_from_card(card: dict[str, Any]) -> Compose:
    """A checkpoint's inference transform (card ``input_transform``)."""
    frac = float(card.get("input_transform", {}).get("center_crop_fraction", 1.0))
    return build_eval_transform("center" if frac < 1.0 else "none", frac, card["architecture"]["input_size"])


class SliceStackDataset(torch.utils.data.Dataset):
    """Manifest rows -> engine samples {"input": float32 (C, H', W'), "target": {"out": label},
    "id": patient_id}. Random transforms are re-seeded per item from (seed, epoch, index), so
    resumed and distributed runs see exactly the samples of one uninterrupted run."""

    def __init__(self, rows: pd.DataFrame, transform: Compose, seed: int = 0, expect_channels: int | None = None):
        self.paths = rows["array_path"].tolist()
        self.labels = rows["label"].to_numpy(dtype=np.float32)
        self.patient_ids = rows["patient_id"].astype(str).tolist()
        self.transform, self.seed, self.epoch, self.expect_channels = transform, int(seed), 0, expect_channels
        for p in self.paths:  # fail early, naming the file, not in a worker mid-epoch
            load_array(p, expect_channels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = torch.from_numpy(np.array(load_array(self.paths[i], self.expect_channels), dtype=np.float32))
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + self.epoch * 10_007 + i) % (2**32 - 1))
        # a plain tensor: MetaTensor's torch-function hook slows the network ~2x
        x = convert_to_tensor(self.transform(x), dtype=torch.float32, track_meta=False).contiguous()
        return {"input": x, "target": {"out": torch.tensor(self.labels[i])}, "id": self.patient_ids[i]}


def prepare(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, info: dict[str, Any]) -> Prepared:
    """One stage: the whole network, [train] lr and epochs."""
    mc, seed = cfg.model, cfg.train.seed
    prep = info.get("preprocessing")
    if not isinstance(prep, dict):
        raise InputError(Path(train_df["array_path"].iloc[0]).parent.parent / "dataset.json",
                         "needs a 'preprocessing' entry (SliceParams.to_dict()) for the model card")
    first = load_array(train_df["array_path"].iloc[0], mc.in_channels)
    size = tuple(mc.input_size) if mc.input_size else tuple(first.shape[1:])
    arch = default_architecture(mc.depth, mc.in_channels, size, mc.conv1_t_stride, family=mc.family)
    crop = cfg.augment.crop_fraction if cfg.augment.crop == "center" else 1.0
    card = {"architecture": arch, "preprocessing": prep,
            "input_transform": {"center_crop_fraction": crop, "resize": "bilinear", "input_size": list(size),
                                "layout": "(C, H, W): C sagittal slices right->left, H superior->inferior, "
                                          "W anterior->posterior"}}
    return Prepared(
        build_model(arch), SliceStackDataset(train_df, build_train_transform(cfg.augment, size), seed, mc.in_channels),
        eval_dataset(val_df, card) if len(val_df) else None, eval_dataset(train_df, card),
        [Stage("train", cfg.train.epochs, cfg.train.lr)], card,
        f"{mc.family} depth {mc.depth}, input {mc.in_channels}x{size[0]}x{size[1]},")


def eval_dataset(rows: pd.DataFrame, card: dict[str, Any]) -> SliceStackDataset:
    channels = int(card["architecture"]["in_channels"])
    return SliceStackDataset(rows, eval_transform_from_card(card), expect_channels=channels)


RECIPE = Recipe("cervical_ra", {"model": ModelConfig, "augment": AugmentConfig}, prepare, eval_dataset,
                "sigmoid(logit) = probability of the outcome (deformity); positive when probability >= threshold")


def write_toy_cohort(folder: str | Path, n_train: int = 24, n_val: int = 8, n_test: int = 8, size: int = 32,
                     channels: int = 6, positive_fraction: float = 0.5, seed: int = 0) -> Path:
    """A small learnable cohort in the manifest format (tests, smoke runs); returns ``manifest.csv``.
    Not imaging data: smooth noise in [0, 1]; positives carry a bright Gaussian blob (radius
    ~size/8) at a random in-plane place in the middle channels."""
    folder = Path(folder)
    (folder / "cache").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        n_pos = max(1, int(round(positive_fraction * n))) if n else 0
        for label in rng.permutation(np.array([1] * n_pos + [0] * (n - n_pos))):
            pid = f"P{len(rows):04d}"
            arr = 0.3 + 0.1 * rng.standard_normal((channels, size, size)).astype(np.float32)
            if label:
                cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
                arr[channels // 2 - 1: channels // 2 + 1] += 0.6 * blob
            np.save(folder / "cache" / f"{pid}.npy", np.clip(arr, 0, 1).astype(np.float32))
            (folder / "cache" / f"{pid}.json").write_text(json.dumps({"toy": True}))
            rows.append({"patient_id": pid, "split": split, "fold": -1, "site": "toy", "label": int(label),
                         "outcome": "yes" if label else "no", "cache_file": f"cache/{pid}"})
    pd.DataFrame(rows).sort_values("patient_id").to_csv(folder / "manifest.csv", index=False)
    params = SliceParams(n_slices=channels, size=(size, size)).to_dict()
    (folder / "dataset.json").write_text(json.dumps({"preprocessing": params, "toy": True}, indent=2))
    return folder / "manifest.csv"
