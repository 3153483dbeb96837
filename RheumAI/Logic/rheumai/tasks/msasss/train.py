"""Training the mSASSS system on the engine (``rheumai.engine.fit``): one ``fit`` per stage.

Stages, each in its own folder under ``out_dir``: ``landmarks`` (coarse, on the letterboxed view);
``refine`` (the corners on disc-level crops cut from true points jittered by the size of the
coarse error, ``refine_jitter`` = (mm, deg, scale)); ``lesions`` (the per-lesion classifiers on
crops from slightly jittered true points, ``crop_jitter``, with the paper's imbalance handling:
:func:`.dataset.imbalance_indices`); ``ordinal`` (the 0-3 alternative, ``with_ordinal``). Vertical
flips swap the corner labels. With ``crop_models = "paper"`` (one DenseNet-121 per lesion) each
lesion network is fitted on its own balanced index; the ``demo`` crop model (one small DenseNet
shared by the outputs) once, with "any finding in the crop" as the positive class. The networks
are saved as one :class:`.model.MsasssSystem` checkpoint (``out_dir/model``). ``configs/msasss.toml``
holds the defaults; ``[<stage>.arch]`` overrides a stage's architecture.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from ...atomic import write_json
from ...checkpoint import find_training_state, save_checkpoint
from ...config import read_toml
from ...engine.fit import fit
from ...errors import InputError
from .anatomy import VIEWS
from .dataset import LandmarkDataset, LevelCropDataset, ViewRecord, cohort_split, imbalance_indices, load_cohort
from .model import CropNet, MsasssSystem, architecture, build_model, make_heads
from .scoring import CORNER_LESIONS, SQUARING_NOT_SCORED

STAGES = ("landmarks", "refine", "lesions", "ordinal")


@dataclass
class StageConfig:
    """Engine settings of one stage (:class:`rheumai.engine.fit.FitConfig`) + architecture overrides."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    scheduler: str = "onecycle"
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    arch: dict[str, Any] = field(default_factory=dict)

    def fit_config(self, seed: int) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "arch"}
        return {**d, "seed": seed, "bn_recalibration": "final", "select": "last", "device": "auto"}


@dataclass
class TrainConfig:
    """The whole run (``configs/msasss.toml``); ``split``: train / val / test fractions of the
    patients when the cohort table has no ``split`` column."""

    crop_models: str = "demo"
    seed: int = 0
    manifest: str = ""
    split: list[float] = field(default_factory=lambda: [0.6, 0.1, 0.3])
    separate_views: bool = False  # crop models per view (cervical, lumbar) instead of one for both
    with_ordinal: bool = True
    landmarks: StageConfig = field(default_factory=lambda: StageConfig(
        epochs=8, batch_size=16, arch={"channels": [16, 32, 64, 128, 128]}))
    refine: StageConfig = field(default_factory=lambda: StageConfig(epochs=4))
    lesions: StageConfig = field(default_factory=lambda: StageConfig(epochs=12))
    ordinal: StageConfig = field(default_factory=lambda: StageConfig(epochs=8))
    refine_jitter: list[float] = field(default_factory=lambda: [4.0, 10.0, 0.15])
    crop_jitter: list[float] = field(default_factory=lambda: [1.0, 5.0, 0.06])
    neg_per_pos: float = 3.0
    pos_repeat: int = 1
    max_pos_weight: float = 10.0

    def arch(self, stage: str) -> dict[str, Any]:
        """The architecture of a stage's network: its default with ``[<stage>.arch]`` applied."""
        default = architecture(stage, self.crop_models)
        over = getattr(self, stage).arch
        bad = sorted(set(over) - set(default) - {"kind"})
        if bad:
            raise ValueError(f"unknown key(s) {bad} in [{stage}.arch]; allowed: {sorted(set(default) - {'kind'})}")
        return {**default, **over, "kind": default["kind"]}

    def system_architecture(self) -> dict[str, Any]:
        return {"kind": "system", "separate_views": self.separate_views,
                **{s: self.arch(s) for s in STAGES[:3]}, "ordinal": self.arch("ordinal") if self.with_ordinal else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: Path | None = None) -> "TrainConfig":
        allowed = {f.name for f in fields(cls)}
        bad = sorted(set(d) - allowed)
        if bad:
            raise InputError(source, f"unknown key(s) {bad}; allowed: {sorted(allowed)}")
        kw = dict(d)
        try:
            for s in set(STAGES) & set(d):
                if not isinstance(d[s], Mapping):
                    raise ValueError(f"[{s}] must be a table")
                unknown = sorted(set(d[s]) - {f.name for f in fields(StageConfig)})
                if unknown:
                    raise ValueError(f"unknown key(s) {unknown} in [{s}]")
                base = getattr(cls(), s)
                kw[s] = replace(base, **{**d[s], "arch": {**base.arch, **d[s].get("arch", {})}})
            cfg = cls(**kw)
            if len(cfg.split) != 3 or min(cfg.split) < 0 or abs(sum(cfg.split) - 1) > 1e-6:
                raise ValueError(f"split must be three fractions (train, val, test) summing to 1, not {cfg.split}")
            cfg.system_architecture()
        except (TypeError, ValueError) as exc:
            raise InputError(source, str(exc)) from None
        return cfg


def load_config(config: str | Path | Mapping[str, Any]) -> tuple[TrainConfig, Path | None]:
    """A TOML file (``task = "msasss"``) or a mapping of the same -> (config, file or None)."""
    source = Path(config) if isinstance(config, (str, Path)) else None
    d = read_toml(source) if source is not None else dict(config)
    task = d.pop("task", "msasss")
    if task != "msasss":
        raise InputError(source, f"the config is for task {task!r}, not msasss")
    return TrainConfig.from_dict(d, source), source


@dataclass
class TrainResult:
    checkpoint: Path | None  # None when stopped before the end (continue with resume=True)
    out_dir: Path
    stopped: bool = False


class _Stopped(Exception):
    pass


@dataclass
class Run:
    """What every stage's ``fit`` shares: the config, the output folder and the caller's hooks."""

    cfg: TrainConfig
    out: Path
    resume: bool = False
    progress: Callable[[dict[str, Any]], None] | None = None
    should_stop: Callable[[], bool] | None = None
    show_progress: bool = False

    def fit(self, stage: str, folder: str, model: nn.Module, train: Any, val: Any, heads: dict[str, Any],
            **kw: Any) -> nn.Module:
        out = self.out / folder
        progress = self.progress
        res = fit(model, train, val, heads, {**getattr(self.cfg, stage).fit_config(self.cfg.seed), **kw}, out,
                  progress=None if progress is None else (lambda d: progress({**d, "part": folder})),
                  should_stop=self.should_stop, resume=self.resume and find_training_state(out / "state") is not None,
                  show_progress=self.show_progress, desc=folder)
        if res.stopped:
            raise _Stopped(folder)
        return res.model


class _Indexed(Subset):
    """A subset of the (balanced) indices; the BatchNorm recalibration uses the whole unaugmented set."""

    def unaugmented(self) -> LevelCropDataset:
        return self.dataset.unaugmented()


class _OneOutput(nn.Module):
    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__()
        self.name, self.net = name, net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.net(x)}


def _positive(t: dict[str, np.ndarray], name: str | None) -> np.ndarray:
    """Crops positive for lesion ``name``, or (None) with any finding or a corner not scorable."""
    if name is not None:
        return np.nansum(t[name], 1) > 0
    findings = np.concatenate([t[les] for les in (*CORNER_LESIONS, "bridging")], 1)
    return (np.nansum(findings, 1) > 0) | (t["not_scorable"] > 0).any(1)


def _set_pos_weights(heads: dict[str, Any], t: dict[str, np.ndarray], idx: np.ndarray, cap: float) -> None:
    """BCE ``pos_weight`` of each binary head = sqrt(negatives / positives) among the sampled crops
    (capped; the full ratio over-calls, measured): lesion types stay rare inside the balanced
    "any finding" sample of a shared network."""
    for name in set(heads) & set(t) - {"ordinal"}:
        v = t[name][idx]
        v = v[np.isfinite(v)]
        if v.sum() > 0:
            heads[name].pos_weight = float(np.clip(np.sqrt((v.size - v.sum()) / v.sum()), 1.0, cap))


def train_crop_model(kind: str, train: Sequence[ViewRecord], val: Sequence[ViewRecord], run: Run,
                     arch: dict[str, Any], folder: str = "") -> CropNet:
    """The lesion classifiers (``kind`` "lesions") or the ordinal alternative ("ordinal")."""
    cfg, folder = run.cfg, folder or kind
    model, heads = CropNet(arch), make_heads(kind, arch)
    size = int(arch["crop_size"])
    tr = LevelCropDataset(train, size=size, augment=True, jitter=tuple(cfg.crop_jitter), seed=cfg.seed)
    va = LevelCropDataset(val, size=size)
    rng = np.random.default_rng(cfg.seed)
    crops = [tr.targets(k) for k in range(len(tr))]
    t = {name: np.stack([c[name] for c in crops]) for name in crops[0]}  # {name: (crops, slots)}
    if model.shared:
        idx = imbalance_indices(_positive(t, None), rng, cfg.neg_per_pos, cfg.pos_repeat)
        _set_pos_weights(heads, t, idx, cfg.max_pos_weight)
        run.fit(kind, folder, model, _Indexed(tr, idx.tolist()), va, heads, monitor=next(iter(heads)))
        return model
    for name, net in model.nets.items():  # the paper: one classifier per lesion, each balanced on its own
        idx = imbalance_indices(_positive(t, None if name == "ordinal" else name), rng, cfg.neg_per_pos,
                                cfg.pos_repeat)
        run.fit(kind, f"{folder}_{name}", _OneOutput(name, net), _Indexed(tr, idx.tolist()), va,
                {name: heads[name]})
    return model


def train_system(train: Sequence[ViewRecord], val: Sequence[ViewRecord], run: Run,
                 log: Callable[[str], None] | None = None) -> tuple[MsasssSystem, Path]:
    """Train every stage and save the checkpoint to ``run.out/model``; returns (system, folder)."""
    cfg, out = run.cfg, run.out
    torch.manual_seed(cfg.seed)
    arch = cfg.system_architecture()
    system = MsasssSystem(arch)

    def landmarks() -> nn.Module:
        a, shape = arch["landmarks"], tuple(arch["landmarks"]["input_size"])
        return run.fit("landmarks", "landmarks", build_model(a), LandmarkDataset(train, shape, True, cfg.seed),
                       LandmarkDataset(val, shape), make_heads("landmarks", a))

    def refine() -> nn.Module:
        a = arch["refine"]
        kw = dict(size=int(a["crop_size"]), jitter=tuple(cfg.refine_jitter), side_factor=float(a["side_factor"]),
                  augment=True, keypoints=True)
        # validation crops jittered like the coarse points at predict time
        tr, va = (LevelCropDataset(recs, seed=s, **kw) for recs, s in ((train, cfg.seed), (val, cfg.seed + 1)))
        return run.fit("refine", "refine", build_model(a), tr, va, make_heads("refine", a))

    def crops(kind: str) -> nn.Module:
        if not cfg.separate_views:
            return train_crop_model(kind, train, val, run, arch[kind])
        return nn.ModuleDict({v: train_crop_model(kind, [r for r in train if r.view == v],
                                                  [r for r in val if r.view == v], run, arch[kind], f"{v}/{kind}")
                              for v in VIEWS})

    timings = {}
    for name, fn in (("landmarks", landmarks), ("refine", refine), ("lesions", lambda: crops("lesions")),
                     ("ordinal", lambda: crops("ordinal"))):
        if arch[name] is None:
            continue
        t = time.perf_counter()
        getattr(system, name).load_state_dict(fn().state_dict())
        timings[name] = round(time.perf_counter() - t, 1)
        if log:
            log(f"  {name}: trained in {timings[name]:.0f} s")
    system.eval()
    card = {"task": "msasss", "architecture": arch, "heads": {"landmarks": "keypoints", "lesions": "binary per lesion",
                                                              "ordinal": "ordinal 0-3 per corner"},
            "preprocessing": {"input_size": arch["landmarks"]["input_size"], "normalise": "percentile 1-99",
                              "crop": "disc level, side 0.9 x centre distance, z-score"},
            "threshold": 0.5, "threshold_rule": "fixed:0.5",
            "scoring": {"squaring_not_scored": sorted(SQUARING_NOT_SCORED), "missing": "segment_mean, <= 3 per view"},
            "training_data": {"views": len(train), "val_views": len(val)}, "train_config": asdict(cfg),
            "timings_s": timings}
    return system, save_checkpoint(out / "model", system, card)


def train(config: str | Path | Mapping[str, Any], manifest: str | Path | None, out_dir: str | Path, *,
          resume: bool = False, progress: Callable[[dict[str, Any]], None] | None = None,
          should_stop: Callable[[], bool] | None = None, show_progress: bool = True,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Config (``configs/msasss.toml`` or a mapping) + cohort table (``studies.csv`` with
    ``labels.csv`` beside it; None: the config's ``manifest``, relative to the config file) ->
    checkpoint ``out_dir/model``. The split is the table's ``split`` column or the config's
    seeded ``split`` fractions (``out_dir/split.json``); training uses train and val patients."""
    cfg, source = load_config(config)
    if manifest is None:
        if not cfg.manifest:
            raise InputError(source, "no cohort table: pass one or set manifest in the config")
        manifest = Path(cfg.manifest) if source is None else source.parent / cfg.manifest
    records = load_cohort(manifest)
    split = cohort_split(records, cfg.split, cfg.seed)
    train_recs, val_recs = ([r for r in records if split[r.patient_id] == s] for s in ("train", "val"))
    if not train_recs:
        raise InputError(manifest, "no training patients")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "split.json", split)
    try:
        _, folder = train_system(train_recs, val_recs, Run(cfg, out, resume, progress, should_stop, show_progress), log)
    except _Stopped:
        return TrainResult(None, out, stopped=True)
    return TrainResult(folder, out)
