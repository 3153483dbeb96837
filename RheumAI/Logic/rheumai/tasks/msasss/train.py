"""Training the mSASSS system on the shared engine (``rheumai.engine.fit``), one stage at a time.

Stages: (1) coarse landmarks on the letterboxed view; (2) corner refinement on disc-level crops
cut from jittered true points (jitter of the size of the coarse error); (3) the per-lesion
classifiers on crops cut from slightly jittered true points, with the paper's imbalance handling
(:func:`.dataset.imbalance_indices`: negatives reduced to 3 per positive, positives repeated);
(4) optionally the ordinal 0-3 alternative on the same crops. Vertical flips swap the corner
labels (:class:`.dataset.LevelCropDataset`). The four networks are saved as one checkpoint
(:class:`.predict.MsasssSystem`, safetensors + model card naming the task).

With ``arch["shared"] = False`` (the paper's configuration: one DenseNet-121 per lesion) each
lesion network is fitted on its own with its own balanced index; the demo's shared small
DenseNet is fitted once with "any finding in the crop" as the positive class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ...checkpoint import save_checkpoint
from ...engine.fit import fit
from .anatomy import VIEWS
from .dataset import LandmarkDataset, LevelCropDataset, ViewRecord, crop_targets, imbalance_indices
from .model import CropNet, build_model, crop_architecture, landmark_architecture, make_heads
from .predict import MsasssSystem, refine_architecture
from .scoring import CORNER_LESIONS, SQUARING_NOT_SCORED


@dataclass
class StageConfig:
    """Engine settings of one stage (mapped onto :class:`rheumai.engine.fit.FitConfig`)."""

    epochs: int = 8
    batch_size: int = 16
    lr: float = 3e-3
    scheduler: str = "onecycle"
    weight_decay: float = 1e-4
    optimizer: str = "adamw"

    def fit_config(self, seed: int) -> dict[str, Any]:
        return {**asdict(self), "seed": seed, "bn_recalibration": "final", "select": "last", "device": "auto"}


@dataclass
class TrainConfig:
    """The whole run; ``config`` "demo" (small networks, CPU minutes) or "paper" (DenseNet-121 per lesion)."""

    config: str = "demo"
    seed: int = 0
    landmarks: StageConfig = field(default_factory=lambda: StageConfig(epochs=8, batch_size=16, lr=3e-3))
    refine: StageConfig = field(default_factory=lambda: StageConfig(epochs=4, batch_size=32, lr=3e-3))
    lesions: StageConfig = field(default_factory=lambda: StageConfig(epochs=12, batch_size=32, lr=3e-3))
    ordinal: StageConfig | None = field(default_factory=lambda: StageConfig(epochs=8, batch_size=32, lr=3e-3))
    landmark_arch: dict[str, Any] = field(
        default_factory=lambda: landmark_architecture(channels=[16, 32, 64, 128, 128]))
    refine_arch: dict[str, Any] = field(default_factory=refine_architecture)
    refine_jitter: tuple[float, float, float] = (4.0, 10.0, 0.15)
    crop_jitter: tuple[float, float, float] = (1.0, 5.0, 0.06)
    neg_per_pos: float = 3.0
    pos_repeat: int = 1
    max_pos_weight: float = 10.0
    show_progress: bool = False  # tqdm bars per stage
    separate_views: bool = False  # crop models per view (cervical, lumbar) instead of one for both

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Unaugmented(Dataset):
    """The same samples without augmentation (for the engine's BatchNorm recalibration)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        aug = self.ds.augment
        self.ds.augment = False
        try:
            return self.ds[i]
        finally:
            self.ds.augment = aug


class _Indexed(Subset):
    """A subset that keeps ``augment`` of the dataset it indexes reachable."""

    @property
    def augment(self) -> bool:
        return self.dataset.augment

    @augment.setter
    def augment(self, v: bool) -> None:
        self.dataset.augment = v


class _OneOutput(nn.Module):
    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__()
        self.name, self.net = name, net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.net(x)}


def _any_finding(ds: LevelCropDataset) -> np.ndarray:
    pos = []
    for k in range(len(ds)):
        t = ds.targets(k)
        v = np.concatenate([t[les] for les in (*CORNER_LESIONS, "bridging")])
        pos.append(bool(np.nansum(v) > 0) or bool((t["not_scorable"] > 0).any()))
    return np.array(pos)


def _positive(ds: LevelCropDataset, name: str) -> np.ndarray:
    out = []
    for k in range(len(ds)):
        t = ds.targets(k)
        v = t[name]
        out.append(bool(np.nansum(v) > 0))
    return np.array(out)


def _set_pos_weights(heads: dict[str, Any], ds: LevelCropDataset, idx: np.ndarray, cap: float) -> None:
    """BCE ``pos_weight`` of each binary head = sqrt(negatives / positives) among the sampled crops (capped):
    the lesion types stay rare inside the balanced "any finding" sample of a shared network."""
    counts: dict[str, list[float]] = {}
    for k in idx:
        t = ds.targets(int(k))
        for name in heads:
            if name in t and name != "ordinal":
                v = t[name]
                counts.setdefault(name, []).extend(v[np.isfinite(v)].tolist())
    for name, vals in counts.items():
        pos = float(np.sum(vals))
        if pos > 0 and hasattr(heads[name], "pos_weight"):
            w = np.sqrt((len(vals) - pos) / pos)  # square root: the full ratio over-calls (measured)
            heads[name].pos_weight = float(np.clip(w, 1.0, cap))


def train_landmarks(train: Sequence[ViewRecord], val: Sequence[ViewRecord], out_dir: Path, cfg: TrainConfig,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> nn.Module:
    arch = cfg.landmark_arch
    shape = tuple(arch["input_size"])
    model = build_model(arch)
    res = fit(model, LandmarkDataset(train, shape, augment=True, seed=cfg.seed), LandmarkDataset(val, shape),
              make_heads("landmarks", arch), cfg.landmarks.fit_config(cfg.seed), out_dir / "landmarks",
              progress=progress, show_progress=cfg.show_progress, recal_ds=LandmarkDataset(train, shape),
              desc="landmarks")
    return res.model


def train_refine(train: Sequence[ViewRecord], val: Sequence[ViewRecord], out_dir: Path, cfg: TrainConfig,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> nn.Module:
    arch = cfg.refine_arch
    net_arch = {**arch, "kind": "landmarks"}
    model = build_model(net_arch)
    size, side = int(arch["crop_size"]), float(arch["side_factor"])

    class _Refine(LevelCropDataset):
        def __getitem__(self, k: int) -> dict[str, Any]:
            s = super().__getitem__(k)
            s["target"] = {"keypoints": s["target"]["corners"]}
            return s

    kw = dict(size=size, jitter=cfg.refine_jitter, flip=True, side_factor=side)
    tr = _Refine(train, augment=True, seed=cfg.seed, **kw)
    va = _Refine(val, augment=True, seed=cfg.seed + 1, **kw)  # jittered like the coarse points at predict time
    res = fit(model, tr, va, make_heads("landmarks", {**net_arch}), cfg.refine.fit_config(cfg.seed),
              out_dir / "refine", progress=progress, show_progress=cfg.show_progress, recal_ds=_Unaugmented(tr),
              desc="refine")
    return res.model


def train_crop_model(kind: str, train: Sequence[ViewRecord], val: Sequence[ViewRecord], out_dir: Path,
                     cfg: TrainConfig, arch: dict[str, Any] | None = None,
                     progress: Callable[[dict[str, Any]], None] | None = None) -> CropNet:
    """The lesion classifiers (``kind`` "lesions") or the ordinal alternative ("ordinal")."""
    arch = arch or crop_architecture(kind, cfg.config)
    stage = cfg.lesions if kind == "lesions" else cfg.ordinal
    if stage is None:
        raise ValueError(f"no stage configuration for {kind}")
    model = CropNet(arch)
    heads = make_heads(kind, arch)
    size = int(arch["crop_size"])
    tr = LevelCropDataset(train, size=size, augment=True, jitter=cfg.crop_jitter, seed=cfg.seed)
    va = LevelCropDataset(val, size=size)
    rng = np.random.default_rng(cfg.seed)
    if model.shared:
        idx = imbalance_indices(_any_finding(tr), rng, cfg.neg_per_pos, cfg.pos_repeat)
        _set_pos_weights(heads, tr, idx, cfg.max_pos_weight)
        fit(model, _Indexed(tr, idx.tolist()), va, heads, {**stage.fit_config(cfg.seed), "monitor": next(iter(heads))},
            out_dir / kind, progress=progress, show_progress=cfg.show_progress, recal_ds=_Unaugmented(tr), desc=kind)
        return model
    for name, net in model.nets.items():  # the paper: one classifier per lesion, each balanced on its own
        one = _OneOutput(name, net)
        sub = {name: heads[name]} if name in heads else {name: heads["ordinal"]}
        pos = _positive(tr, name) if name != "ordinal" else _any_finding(tr)
        idx = imbalance_indices(pos, rng, cfg.neg_per_pos, cfg.pos_repeat)
        fit(one, _Indexed(tr, idx.tolist()), va, sub, stage.fit_config(cfg.seed), out_dir / f"{kind}_{name}",
            progress=progress, show_progress=cfg.show_progress, recal_ds=_Unaugmented(tr), desc=f"{kind}:{name}")
    return model


def system_architecture(cfg: TrainConfig, with_ordinal: bool = True) -> dict[str, Any]:
    return {"kind": "system", "separate_views": cfg.separate_views, "landmarks": cfg.landmark_arch,
            "refine": cfg.refine_arch,
            "lesions": crop_architecture("lesions", cfg.config),
            "ordinal": crop_architecture("ordinal", cfg.config) if with_ordinal and cfg.ordinal is not None else None}


def train_system(train: Sequence[ViewRecord], val: Sequence[ViewRecord], out_dir: str | Path,
                 cfg: TrainConfig | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[MsasssSystem, Path]:
    """Train all stages and save the checkpoint to ``out_dir/model``; returns (system, folder)."""
    import time

    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    arch = system_architecture(cfg)
    system = MsasssSystem(arch)
    timings = {}
    def crops(kind: str) -> nn.Module:
        if not cfg.separate_views:
            return train_crop_model(kind, train, val, out, cfg, arch[kind], progress)
        return nn.ModuleDict({v: train_crop_model(kind, [r for r in train if r.view == v],
                                                  [r for r in val if r.view == v], out / v, cfg, arch[kind], progress)
                              for v in VIEWS})

    for name, fn in (("landmarks", lambda: train_landmarks(train, val, out, cfg, progress)),
                     ("refine", lambda: train_refine(train, val, out, cfg, progress)),
                     ("lesions", lambda: crops("lesions")),
                     ("ordinal", lambda: crops("ordinal"))):
        if name == "ordinal" and arch["ordinal"] is None:
            continue
        t = time.perf_counter()
        trained = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        getattr(system, name).load_state_dict(trained.state_dict())
        if log:
            log(f"  {name}: trained in {timings[name]:.0f} s")
    system.eval()
    card = {"task": "msasss", "architecture": arch, "heads": {"landmarks": "keypoints", "lesions": "binary per lesion",
                                                              "ordinal": "ordinal 0-3 per corner"},
            "preprocessing": {"input_size": arch["landmarks"]["input_size"], "normalise": "percentile 1-99",
                              "crop": "disc level, side 0.9 x centre distance, 48 px, z-score"},
            "threshold": 0.5, "threshold_rule": "fixed:0.5",
            "scoring": {"squaring_not_scored": sorted(SQUARING_NOT_SCORED), "missing": "segment_mean, <= 3 per view"},
            "training_data": {"views": len(train), "val_views": len(val)}, "train_config": cfg.to_dict(),
            "timings_s": timings}
    folder = save_checkpoint(out / "model", system, card)
    return system, folder
