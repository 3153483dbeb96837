"""Cohort manifest -> torch Dataset of cached slice stacks (engine sample dicts) and transforms.

Arrays are the contract's cache format: ``<stem>.npy`` float32 (C, H, W) with C = sagittal slices
(patient right -> left), H = superior -> inferior, W = anterior -> posterior. They are read with
``np.load(mmap_mode="r")`` (the ``.npy`` that ``SliceSelection.save`` writes; the geometry ``.json``
is not needed to train).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import (CenterScaleCrop, Compose, RandAdjustContrast, RandFlip, RandomizableTransform,
                              RandScaleCrop, RandScaleIntensity, RandShiftIntensity, Resize)

from .config import AugmentConfig
from .errors import InputError

REQUIRED_COLUMNS = ("patient_id", "split", "label", "cache_file")
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- manifest

def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and check ``manifest.csv``; adds ``array_path`` (absolute ``<stem>.npy``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "split": str, "cache_file": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(path, f"not a readable CSV: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; has {list(df.columns)}")
    if df["patient_id"].duplicated().any():
        dup = df.loc[df["patient_id"].duplicated(), "patient_id"].tolist()[:5]
        raise InputError(path, f"patient_id not unique (one row per patient): {dup}")
    bad_split = sorted(set(df["split"].dropna()) - set(SPLITS))
    if bad_split or df["split"].isna().any():
        raise InputError(path, f"split must be one of {SPLITS}; found {bad_split or 'empty cells'}")
    labels = pd.to_numeric(df["label"], errors="coerce")
    if labels.isna().any() or not set(labels.unique()) <= {0, 1}:
        rows = df.loc[labels.isna() | ~labels.isin([0, 1]), "patient_id"].tolist()[:5]
        raise InputError(path, f"label must be 0 or 1; bad rows (patient_id): {rows}")
    df["label"] = labels.astype(int)
    if df["cache_file"].isna().any():
        raise InputError(path, f"empty cache_file for {df.loc[df['cache_file'].isna(), 'patient_id'].tolist()[:5]}")
    df["array_path"] = [str(path.parent / stem) + ".npy" for stem in df["cache_file"]]
    return df


def read_dataset_info(manifest_path: str | Path) -> dict[str, Any]:
    """``dataset.json`` beside the manifest ({} when absent)."""
    p = Path(manifest_path).parent / "dataset.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(p, f"not valid JSON: {exc}") from None


def preprocessing_from_dataset(manifest_path: str | Path) -> dict[str, Any]:
    """The SliceParams dict the cache was built with (dataset.json ``preprocessing``)."""
    info = read_dataset_info(manifest_path)
    for key in ("preprocessing", "slice_params", "params"):
        if isinstance(info.get(key), dict):
            return info[key]
    raise InputError(Path(manifest_path).parent / "dataset.json",
                     "needs a 'preprocessing' entry (SliceParams.to_dict()) for the model card; "
                     f"found keys {sorted(info)}" if info else "missing: it records the SliceParams the model card must carry")


def split_train_val(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train and validation rows. Uses the manifest's ``val`` rows if any, otherwise carves a
    stratified (by label) validation set of ``val_fraction`` of the train patients (one row per
    patient, so the split is at patient level). Returns (train, val, how)."""
    from sklearn.model_selection import train_test_split

    train = df[df["split"] == "train"]
    val = df[df["split"] == "val"]
    if len(val):
        return train.reset_index(drop=True), val.reset_index(drop=True), "manifest"
    if val_fraction <= 0:
        return train.reset_index(drop=True), val.reset_index(drop=True), "none"
    n_val = max(2, int(round(val_fraction * len(train))))
    strat = train["label"] if train["label"].value_counts().min() >= 2 else None
    tr, va = train_test_split(train, test_size=n_val, stratify=strat, random_state=seed)
    how = f"carved from train (val_fraction={val_fraction}, stratified, seed={seed})"
    return tr.sort_values("patient_id").reset_index(drop=True), va.sort_values("patient_id").reset_index(drop=True), how


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


# ---------------------------------------------------------------- transforms

class RandChannelReverse(RandomizableTransform):
    """Reverse the channel order with probability ``prob``: a left-right mirror of the patient,
    since channels are sagittal slices from right to left. (MONAI's flips act on spatial axes
    only, hence this small class.)"""

    def __init__(self, prob: float = 0.5):
        RandomizableTransform.__init__(self, prob)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        self.randomize(None)
        return torch.flip(img, dims=[0]) if self._do_transform else img


def build_train_transform(aug: AugmentConfig, input_size: Sequence[int]) -> Compose:
    """Random augmentation on a (C, H, W) tensor, ending at ``input_size`` (H, W)."""
    if not aug.enabled:
        return build_eval_transform(aug.crop, aug.crop_fraction, input_size)
    t: list[Any] = []
    if aug.crop == "center":
        t.append(CenterScaleCrop(roi_scale=aug.crop_fraction))
    elif aug.crop == "random_center":
        t.append(RandScaleCrop(roi_scale=aug.crop_fraction, max_roi_scale=1.0, random_center=False, random_size=True))
    elif aug.crop == "random":
        t.append(RandScaleCrop(roi_scale=aug.crop_fraction, random_center=True, random_size=False))
    t.append(Resize(spatial_size=tuple(input_size), mode="bilinear", anti_aliasing=False))
    for ax in aug.flip_axes:
        t.append(RandFlip(prob=aug.flip_prob, spatial_axis=ax))
    if aug.flip_channels_prob > 0:
        t.append(RandChannelReverse(prob=aug.flip_channels_prob))
    if aug.contrast_prob > 0:
        t.append(RandAdjustContrast(prob=aug.contrast_prob, gamma=tuple(aug.contrast_gamma), retain_stats=True))
    if aug.scale_intensity_prob > 0:
        t.append(RandScaleIntensity(factors=aug.scale_intensity_factor, prob=aug.scale_intensity_prob))
    if aug.shift_intensity_prob > 0:
        t.append(RandShiftIntensity(offsets=aug.shift_intensity_offset, prob=aug.shift_intensity_prob))
    return Compose(t)


def build_eval_transform(crop: str, crop_fraction: float, input_size: Sequence[int]) -> Compose:
    """Deterministic inference transform: the fixed centre crop (only for crop="center"), then
    resize to ``input_size``. The model card stores these, see ``eval_transform_from_card``."""
    t: list[Any] = []
    if crop == "center" and crop_fraction < 1.0:
        t.append(CenterScaleCrop(roi_scale=crop_fraction))
    t.append(Resize(spatial_size=tuple(input_size), mode="bilinear", anti_aliasing=False))
    return Compose(t)


def eval_transform_from_card(card: dict[str, Any]) -> Compose:
    """Inference transform for a checkpoint (for predict): card ``input_transform``."""
    it = card.get("input_transform", {})
    return build_eval_transform("center" if it.get("center_crop_fraction", 1.0) < 1.0 else "none",
                                float(it.get("center_crop_fraction", 1.0)), card["architecture"]["input_size"])


# ---------------------------------------------------------------- dataset and sampler

class SliceStackDataset(torch.utils.data.Dataset):
    """Manifest rows -> engine samples {"input": x float32 (C, H', W'), "target": {"out": y float32
    scalar}, "id": patient_id}.

    Random transforms are re-seeded per item from (seed, epoch, index), so augmentation does not
    depend on worker count, process rank or interruption: a resumed or distributed run sees
    exactly the same augmented samples as a single uninterrupted one.
    """

    def __init__(self, rows: pd.DataFrame, transform: Compose, seed: int = 0, expect_channels: int | None = None):
        self.paths = rows["array_path"].tolist()
        self.labels = rows["label"].to_numpy(dtype=np.float32)
        self.patient_ids = rows["patient_id"].astype(str).tolist()
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.expect_channels = expect_channels
        for p in self.paths:  # fail early, naming the file, not in a worker mid-epoch
            load_array(p, expect_channels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = torch.from_numpy(np.array(load_array(self.paths[i], self.expect_channels), dtype=np.float32))
        seed = (self.seed * 1_000_003 + self.epoch * 10_007 + i) % (2**32 - 1)
        self.transform.set_random_state(seed=seed)
        x = self.transform(x)
        if isinstance(x, MetaTensor):  # plain tensor: MetaTensor's torch-function hook slows the network ~2x
            x = x.as_tensor()
        x = torch.as_tensor(x, dtype=torch.float32).contiguous()
        return {"input": x, "target": {"out": torch.tensor(self.labels[i])}, "id": self.patient_ids[i]}


# ---------------------------------------------------------------- toy cohort (tests, smoke runs)

def write_toy_cohort(folder: str | Path, n_train: int = 24, n_val: int = 8, n_test: int = 8, size: int = 32,
                     channels: int = 6, positive_fraction: float = 0.5, seed: int = 0) -> Path:
    """Write a small learnable cohort in the manifest format and return ``manifest.csv``.

    Not imaging data: each case is smooth noise in [0, 1]; positives carry a bright Gaussian blob
    (radius ~size/8) at a random in-plane position in the middle channels. For tests and quick
    end-to-end runs of train/evaluate; realistic synthetic MRI belongs to the dataset tools.
    """
    folder = Path(folder)
    (folder / "cache").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    k = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        n_pos = max(1, int(round(positive_fraction * n))) if n else 0
        labels = np.array([1] * n_pos + [0] * (n - n_pos))
        rng.shuffle(labels)
        for label in labels:
            pid = f"P{k:04d}"
            k += 1
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
    params = {"n_slices": channels, "spacing_mm": 1.0, "size": [size, size], "center_lps": None, "lr_mm": None,
              "frame": "acquisition", "interpolator": "linear", "norm": "percentile", "norm_lower": 1.0,
              "norm_upper": 99.0}
    (folder / "dataset.json").write_text(json.dumps({"preprocessing": params, "toy": True}, indent=2))
    return folder / "manifest.csv"
