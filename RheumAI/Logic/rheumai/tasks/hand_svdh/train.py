"""Training the hand SvdH task through the engine (``rheumai.engine.fit``): three networks, one checkpoint.

1. Whole hand (the paper's path): total + severity class heads on the small input, optionally
   initialised from a safetensors backbone and fine-tuned by scheme (whole / last blocks / heads only).
2. Landmarks: heatmap U-Net (``rheumai.landmarks``) on the small input, keypoints head.
3. Joints: crops at the true landmarks with a random shift (``jitter_mm``, so the scorer tolerates
   landmark error), masked ordinal heads for erosion 0-5 and JSN 0-4.

:func:`train` is the task's ``api["train"]``: a TOML config (``configs/hand_svdh.toml``) + the label
sheet -> ``out_dir/model`` (one :class:`.model.HandSvdHNet` checkpoint) and, with ``[ensemble]
bases``, the stacking ensemble in ``out_dir/ensemble``. ``pretrain_backbone`` pretrains the
backbone on an auxiliary label (e.g. bone age) for ``init_backbone``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...atomic import atomic_path, write_json
from ...checkpoint import save_checkpoint
from ...engine.fit import fit
from ...errors import InputError
from .dataset import Case, HandParams, JointDataset, LandmarkDataset, WholeHandDataset, load_cohort, prepare
from .heads import joint_heads, landmark_heads, whole_heads
from .model import (BACKBONES, FINETUNE_SCHEMES, HandSvdHNet, PooledLandmarkNet, JointScorer, WholeHandNet,
                    apply_finetune_scheme, default_architecture)
from .scoring import JOINT_NAMES


@dataclass
class StageConfig:
    """Engine settings of one training stage (see rheumai.engine.fit)."""

    epochs: int = 15
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 0

    def engine_cfg(self, seed: int) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "early_stopping_patience": self.patience, "seed": seed,
                "optimizer": "adamw", "scheduler": "onecycle", "num_workers": 0, "select": "last",
                "bn_recalibration": "final", "device": "auto"}


@dataclass
class WholeConfig(StageConfig):
    """Whole-hand stage: backbone (resnet | mobilenetv2), fine-tuning scheme, pretrained backbone file."""

    epochs: int = 50  # 30 left the total's PCC at 0.898-0.922 on the demo depending on the thread count
    lr: float = 2e-3
    backbone: str = "resnet"
    finetune: str = "whole"
    init_backbone: str = ""


@dataclass
class JointsConfig(StageConfig):
    """Joint stage; jitter_mm: SD of the random shift of each crop centre during training."""

    epochs: int = 6
    batch_size: int = 64
    jitter_mm: float = 1.5


@dataclass
class DataConfig:
    """labels / landmarks: sheets (paths relative to the config file); without a ``split`` column in the
    label sheet, a patient-level split stratified by severity class (train_fraction, val_fraction)."""

    labels: str = ""
    landmarks: str = ""
    train_fraction: float = 0.7
    val_fraction: float = 0.0


@dataclass
class EnsembleConfig:
    """Stacking ensemble of whole-hand networks (bases: backbones, e.g. ["resnet", "mobilenetv2"]; empty = off)."""

    bases: list[str] = field(default_factory=list)
    folds: int = 3


@dataclass
class HandTrainConfig:
    """The task's training config (``configs/hand_svdh.toml``); ``source``: the file it came from."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    whole: WholeConfig = field(default_factory=WholeConfig)
    landmarks: StageConfig = field(default_factory=StageConfig)
    joints: JointsConfig = field(default_factory=JointsConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return dict(task="hand_svdh", **d)

    def path(self, value: str) -> Path | None:
        """A path of the config, relative to the config file's folder; None for ''."""
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() or not self.source else Path(self.source).parent / p


def load_config(config: str | Path | Mapping[str, Any]) -> HandTrainConfig:
    """A TOML file or a mapping -> :class:`HandTrainConfig`; unknown keys and bad values raise
    :class:`InputError` naming the file."""
    from ...config import read_toml

    src = None if isinstance(config, Mapping) else Path(config)
    d = dict(config if src is None else read_toml(src))
    task = d.pop("task", "hand_svdh")
    if task != "hand_svdh":
        raise InputError(src, f"config is for task {task!r}, not hand_svdh")
    fields = {f.name: f for f in dataclasses.fields(HandTrainConfig) if f.name != "source"}
    kw: dict[str, Any] = {}
    for key, value in d.items():
        if key not in fields:
            raise InputError(src, f"unknown key {key!r}; allowed: task, {', '.join(fields)}")
        sec = fields[key].default_factory  # type: ignore[misc]
        if sec is dataclasses.MISSING:
            kw[key] = value
            continue
        allowed = [f.name for f in dataclasses.fields(sec)]
        bad = sorted(set(value) - set(allowed)) if isinstance(value, Mapping) else ["(not a table)"]
        if bad:
            raise InputError(src, f"unknown key(s) {bad} in [{key}]; allowed: {allowed}")
        kw[key] = sec(**value)
    cfg = HandTrainConfig(**kw, source=str(src or ""))
    w, e, dt = cfg.whole, cfg.ensemble, cfg.data
    checks = [(w.finetune in FINETUNE_SCHEMES, f"[whole] finetune must be one of {FINETUNE_SCHEMES}"),
              (w.finetune == "whole" or bool(w.init_backbone),
               f"[whole] finetune {w.finetune!r} needs a pretrained backbone (init_backbone)"),
              (all(b in BACKBONES for b in [w.backbone, *e.bases]), f"backbones must be among {BACKBONES}"),
              (e.folds >= 2, "[ensemble] folds must be >= 2"),
              (0 < dt.train_fraction <= 1 and 0 <= dt.val_fraction < 1, "[data] fractions must lie in (0, 1]"),
              (all(s.epochs >= 1 and s.batch_size >= 1 for s in (w, cfg.landmarks, cfg.joints)),
               "epochs and batch_size must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise InputError(src, msg)
    return cfg


def merge_small_classes(cls: Sequence[int], min_n: int) -> np.ndarray:
    """Severity classes with fewer than ``min_n`` patients joined to their lower neighbour (for stratifying)."""
    s = np.array(cls)
    for c in sorted(np.unique(s))[::-1]:
        if (s == c).sum() < min_n and c > s.min():
            s[s == c] = max(v for v in np.unique(s) if v < c)
    return s


def split_cases(cases: Sequence[Case], data: Mapping[str, Any], seed: int) -> dict[str, list[Case]]:
    """train / val / test cases: the label sheet's ``split`` column, else a patient-level split
    stratified by severity class (``rheumai.dataset.split``; ``data``: the config's [data])."""
    from ...dataset.split import SplitConfig, assign_splits

    if cases and all("split" in c.extra for c in cases):
        where = {c.patient_id: c.extra["split"] for c in cases}
    else:
        sc = SplitConfig(train_fraction=float(data["train_fraction"]), val_fraction=float(data["val_fraction"]),
                         seed=seed)
        strata = merge_small_classes([c.cls for c in cases], 2)
        where = {p: s for p, (s, _) in assign_splits([(c.patient_id, k, "") for c, k in zip(cases, strata)],
                                                     sc).items()}
    return {s: [c for c in cases if where[c.patient_id] == s] for s in ("train", "val", "test")}


def load_backbone(model: WholeHandNet, path: str | Path) -> list[str]:
    """Load backbone weights from a safetensors file (keys as ``backbone.*`` or bare); returns the
    keys that did not match. Pickled files are refused."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(path, "backbone weights must be a .safetensors file (pickles are refused)")
    if not path.is_file():
        raise InputError(path, "backbone weights not found")
    state = {k.removeprefix("backbone."): v for k, v in load_file(str(path)).items()}
    own = model.backbone.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if len(bad) == len(state):
        raise InputError(path, "no tensor matches this backbone (wrong architecture?)")
    model.backbone.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    return bad


def _stage(net: torch.nn.Module, train_ds: Any, val_ds: Any, heads: dict, cfg: StageConfig, seed: int, out: Path,
           **kw: Any) -> torch.nn.Module:
    """One engine ``fit`` (resumes only a stage that has a saved state)."""
    kw["resume"] = bool(kw.get("resume")) and (out / "state" / "state.json").is_file()
    fit(net, train_ds, val_ds if val_ds is not None and len(val_ds) else None, heads, cfg.engine_cfg(seed), out,
        desc=out.name, **kw)
    return net.cpu().eval()


def train_whole(train_cases: Sequence[Case], val_cases: Sequence[Case] | None, arch_whole: dict[str, Any],
                cfg: StageConfig, out_dir: str | Path, seed: int = 0, init_backbone: str | Path | None = None,
                finetune: str = "whole", **kw: Any) -> WholeHandNet:
    """The paper's whole-hand network (total + class), through the engine."""
    if finetune != "whole" and not init_backbone:
        raise ValueError(f"fine-tuning scheme {finetune!r} needs a pretrained backbone (init_backbone)")
    torch.manual_seed(seed)
    net = WholeHandNet(arch_whole)
    if init_backbone:
        load_backbone(net, init_backbone)
    apply_finetune_scheme(net, finetune)
    heads = whole_heads(int(arch_whole["n_classes"]), float(arch_whole["total_scale"]))
    _stage(net, WholeHandDataset(train_cases, augment=True, seed=seed), WholeHandDataset(val_cases or []), heads,
           cfg, seed, Path(out_dir), **kw)
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def build_card(arch: dict[str, Any], params: HandParams, cfg: HandTrainConfig, counts: dict[str, int]
               ) -> dict[str, Any]:
    lm = arch["landmarks"]
    heads = {**whole_heads(int(arch["whole"]["n_classes"]), float(arch["whole"]["total_scale"])),
             **landmark_heads(int(lm["n_points"]), float(lm["sigma"]), int(lm["in_pool"]) * int(lm["out_stride"])),
             **joint_heads()}
    return {"task": "hand_svdh", "architecture": arch, "preprocessing": params.to_dict(),
            "heads": {k: h.describe() for k, h in heads.items()}, "threshold": None, "threshold_rule": None,
            "class_edges": list(params.class_edges), "joints": list(JOINT_NAMES), "training": cfg.to_dict(),
            "training_data": counts, "metrics": {}}


def train_hand(cases: Sequence[Case], out_dir: str | Path, cfg: HandTrainConfig, params: HandParams | None = None,
               **kw: Any) -> Path:
    """Train the three networks on ``cases`` (split per :func:`split_cases`) into ``out_dir/model``;
    ``kw``: the engine's ``progress``, ``should_stop``, ``resume``, ``show_progress``."""
    params = params or HandParams()
    arch = dict(default_architecture(cfg.whole.backbone), preprocessing=params.to_dict())
    parts = split_cases(cases, asdict(cfg.data), cfg.seed)
    tr, va = parts["train"], parts["val"]
    if not tr:
        raise InputError(cfg.path(cfg.data.labels), "no patients in the training split")
    out, s = Path(out_dir), cfg.seed
    net = HandSvdHNet(arch)
    whole = train_whole(tr, va, arch["whole"], cfg.whole, out / "whole", s, cfg.path(cfg.whole.init_backbone),
                        cfg.whole.finetune, **kw)
    net.whole.load_state_dict(whole.state_dict())
    tr_pts, va_pts = ([c for c in x if c.points_canon is not None] for x in (tr, va))
    if tr_pts:
        torch.manual_seed(s)
        lm = PooledLandmarkNet(arch["landmarks"])
        heads = landmark_heads(int(arch["landmarks"]["n_points"]), float(arch["landmarks"]["sigma"]), lm.stride)
        _stage(lm, LandmarkDataset(tr_pts, augment=True, seed=s), LandmarkDataset(va_pts), heads, cfg.landmarks, s,
               out / "landmarks", **kw)
        net.landmarks.load_state_dict(lm.state_dict())
        torch.manual_seed(s)
        js = JointScorer(arch["joints"])
        _stage(js, JointDataset(tr_pts, params, jitter_mm=cfg.joints.jitter_mm, augment=True, seed=s),
               JointDataset(va_pts, params), joint_heads(), cfg.joints, s, out / "joints", **kw)
        net.joints.load_state_dict(js.state_dict())
    counts = {"train": len(tr), "val": len(va), "test": len(parts["test"]), "train_with_landmarks": len(tr_pts)}
    return save_checkpoint(out / "model", net.eval(), build_card(arch, params, cfg, counts))


@dataclass
class HandTrainResult:
    """checkpoint: the task network's folder; ensemble: the stacking ensemble's folder (or None)."""

    checkpoint: Path
    ensemble: Path | None = None


def train(config: str | Path | Mapping[str, Any], manifest: str | Path | None, out_dir: str | Path, *,
          resume: bool = False, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, show_progress: bool = True) -> HandTrainResult:
    """The task's ``api["train"]``: config + label sheet (``manifest``; None: the config's [data]
    labels) -> ``out_dir/model``. The landmark sheet: [data] landmarks, else ``landmarks.csv``
    beside the label sheet when present (the joint path needs it)."""
    cfg = load_config(config)
    labels = Path(manifest) if manifest is not None else cfg.path(cfg.data.labels)
    if labels is None:
        raise InputError(cfg.source or None, "no label sheet: pass a manifest or set [data] labels")
    lms = cfg.path(cfg.data.landmarks) or labels.parent / "landmarks.csv"
    cases = load_cohort(labels, HandParams(), lms if lms.is_file() or cfg.data.landmarks else None,
                        progress=show_progress)
    kw = {"resume": resume, "progress": progress, "should_stop": should_stop, "show_progress": show_progress}
    out = Path(out_dir)
    ckpt = train_hand(cases, out, cfg, **kw)
    write_json(out / "config.json", cfg.to_dict())
    if not cfg.ensemble.bases:
        return HandTrainResult(ckpt)
    from .ensemble import fit_stacking

    train_cases = split_cases(cases, asdict(cfg.data), cfg.seed)["train"]
    archs = {b: default_architecture(b)["whole"] for b in cfg.ensemble.bases}
    fit_stacking(train_cases, archs, cfg.whole, out / "ensemble", k=cfg.ensemble.folds, seed=cfg.seed, **kw)
    return HandTrainResult(ckpt, out / "ensemble")


def pretrain_backbone(labels_csv: str | Path, label_column: str, out_path: str | Path,
                      backbone: str = "resnet", cfg: StageConfig | None = None, params: HandParams | None = None,
                      seed: int = 0, progress: Callable[..., Any] | None = None) -> Path:
    """Auxiliary-label pretraining on hand radiographs (e.g. a paediatric set with bone age).

    labels_csv: ``patient_id, file`` + ``label_column`` (a number per image). The whole-hand
    network's backbone regresses the standardised label through the engine; its weights are written
    to ``out_path`` (safetensors) for ``init_backbone``.
    """
    import pandas as pd

    from ...engine.heads import make_head
    from ...radiograph import read_radiograph

    params = params or HandParams()
    sheet = Path(labels_csv)
    rows = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    if label_column not in rows.columns:
        raise InputError(sheet, f"label sheet has no column {label_column!r}")
    vals = pd.to_numeric(rows[label_column], errors="coerce")
    if vals.isna().any():
        raise InputError(sheet, f"{label_column} is not a number for patient(s) "
                                f"{', '.join(rows['patient_id'][vals.isna()])}")
    mu, sd = float(vals.mean()), float(vals.std(ddof=0) or 1.0)
    cases = [Case(r["patient_id"], prepare(read_radiograph(sheet.parent / r["file"]), params,
                                           laterality=r.get("laterality") or None),
                  (v - mu) / sd, 0, np.zeros(0, np.int64), np.zeros(0, np.int64), None)
             for r, v in zip(rows.to_dict("records"), vals)]
    arch = default_architecture(backbone)["whole"]
    torch.manual_seed(seed)
    net = WholeHandNet(arch)
    # the standardised label sits in the "total" slot; only that head trains
    _stage(net, WholeHandDataset(cases, augment=True, seed=seed), None,
           {"total": make_head("regression", name="total", loss_kind="smooth_l1")}, cfg or StageConfig(epochs=10),
           seed, Path(out_path).parent / "pretrain_run", progress=progress)
    state = {f"backbone.{k}": v.detach().contiguous() for k, v in net.backbone.state_dict().items()}
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"label": label_column, "mean": str(mu), "sd": str(sd),
                                             "backbone": backbone})
    write_json(Path(out_path).with_suffix(".json"), {"label": label_column, "mean": mu, "sd": sd, "n": len(cases),
                                                     "architecture": arch})
    return Path(out_path)
