"""Training the hand SvdH task through the engine (``rheumai.engine.fit``): three networks, one checkpoint.

1. Whole hand (the paper's path): total + severity class heads on the small input, optionally
   initialised from a user-supplied safetensors backbone and fine-tuned by scheme (whole network /
   last blocks / heads only).
2. Landmarks: heatmap U-Net (``rheumai.landmarks``) on the small input, keypoints head.
3. Joints: crops at the true landmarks with a random shift (``jitter_mm``, so the scorer tolerates
   landmark error), masked ordinal heads for erosion 0-5 and JSN 0-4.

The three are saved as one :class:`.model.HandSvdHNet` checkpoint (safetensors + model card).
``pretrain_backbone`` is the runnable pretraining step on auxiliary hand images: whole-hand
regression of an auxiliary label (e.g. bone age of a paediatric hand set) through the same engine,
saving the backbone's weights as safetensors for ``init_backbone``.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ...atomic import atomic_path, write_json
from ...checkpoint import save_checkpoint
from ...errors import InputError
from .dataset import Case, HandParams, JointDataset, LandmarkDataset, WholeHandDataset, load_cohort
from .heads import joint_heads, landmark_heads, whole_heads
from .model import FINETUNE_SCHEMES, HandSvdHNet, WholeHandNet, apply_finetune_scheme, default_architecture
from .scoring import JOINT_NAMES


@dataclass
class StageConfig:
    """Engine settings of one training stage (see rheumai.engine.fit)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 0

    def engine_cfg(self, seed: int) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "early_stopping_patience": self.patience, "seed": seed,
                "optimizer": "adamw", "scheduler": "onecycle", "num_workers": 0, "select": "last",
                "bn_recalibration": "final", "device": "auto"}


@dataclass
class HandTrainConfig:
    """Whole task training: stage settings, fine-tuning, split and seed."""

    whole: StageConfig = field(default_factory=lambda: StageConfig(epochs=30))
    landmarks: StageConfig = field(default_factory=lambda: StageConfig(epochs=30, lr=3e-3))
    joints: StageConfig = field(default_factory=lambda: StageConfig(epochs=12, batch_size=64, lr=3e-3))
    jitter_mm: float = 1.5
    finetune: str = "whole"
    init_backbone: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Named(torch.nn.Module):
    """A bare-Tensor network as a one-head dict network (``{name: net(x)}``)."""

    def __init__(self, net: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.net, self.name = net, name

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.net(x)}


def _fit(model: torch.nn.Module, train_ds: Dataset, val_ds: Dataset | None, heads: dict, cfg: StageConfig, seed: int,
         out_dir: Path, progress: Callable[..., Any] | None) -> Any:
    from ...engine.fit import fit

    return fit(model, train_ds, val_ds, heads, cfg.engine_cfg(seed), out_dir, progress=progress)


@torch.no_grad()
def run_network(model: torch.nn.Module, ds: Dataset, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Outputs of ``model`` (eval mode) over a dataset, concatenated per head."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    for b in DataLoader(ds, batch_size=batch_size, shuffle=False):
        x = b["input"]
        o = model(**x) if isinstance(x, dict) else model(x)
        for k, v in (o if isinstance(o, dict) else {"out": o}).items():
            outs.setdefault(k, []).append(v.detach().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


def load_backbone(model: WholeHandNet, path: str | Path) -> list[str]:
    """Load backbone weights from a safetensors file (keys as ``backbone.*`` or bare); returns the
    keys that did not match. Pickled files are refused."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(path, "backbone weights must be a .safetensors file (pickles are refused)")
    if not path.is_file():
        raise InputError(path, "backbone weights not found")
    state = load_file(str(path))
    state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    own = model.backbone.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if len(bad) == len(state):
        raise InputError(path, "no tensor matches this backbone (wrong architecture?)")
    model.backbone.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    return bad


def train_whole(train_cases: Sequence[Case], val_cases: Sequence[Case] | None, arch_whole: dict[str, Any],
                cfg: StageConfig, out_dir: str | Path, seed: int = 0, init_backbone: str | Path | None = None,
                finetune: str = "whole", progress: Callable[..., Any] | None = None) -> WholeHandNet:
    """The paper's whole-hand network (total + class), through the engine."""
    torch.manual_seed(seed)
    net = WholeHandNet(arch_whole)
    if init_backbone is not None:
        load_backbone(net, init_backbone)
    if finetune not in FINETUNE_SCHEMES:
        raise ValueError(f"fine-tuning scheme must be one of {FINETUNE_SCHEMES}, not {finetune!r}")
    if finetune != "whole" and init_backbone is None:
        raise ValueError(f"fine-tuning scheme {finetune!r} needs a pretrained backbone (init_backbone)")
    apply_finetune_scheme(net, finetune)
    heads = whole_heads(int(arch_whole["n_classes"]), float(arch_whole["total_scale"]))
    _fit(net, WholeHandDataset(train_cases, augment=True, seed=seed),
         None if not val_cases else WholeHandDataset(val_cases), heads, cfg, seed, Path(out_dir), progress)
    for p in net.parameters():
        p.requires_grad_(True)
    return net.cpu().eval()


def train_landmarks(train_cases: Sequence[Case], val_cases: Sequence[Case] | None, arch_lm: dict[str, Any],
                    cfg: StageConfig, out_dir: str | Path, seed: int = 0,
                    progress: Callable[..., Any] | None = None) -> torch.nn.Module:
    from .model import PooledLandmarkNet

    torch.manual_seed(seed)
    net = PooledLandmarkNet(arch_lm)
    heads = landmark_heads(int(arch_lm["n_points"]), float(arch_lm["sigma"]), net.stride)
    _fit(_Named(net, "landmarks"), LandmarkDataset(train_cases, augment=True, seed=seed),
         None if not val_cases else LandmarkDataset(val_cases), heads, cfg, seed, Path(out_dir), progress)
    return net.cpu().eval()


def train_joints(train_cases: Sequence[Case], val_cases: Sequence[Case] | None, arch_joints: dict[str, Any],
                 params: HandParams, cfg: StageConfig, out_dir: str | Path, seed: int = 0, jitter_mm: float = 1.5,
                 progress: Callable[..., Any] | None = None) -> torch.nn.Module:
    from .model import JointScorer

    torch.manual_seed(seed)
    net = JointScorer(arch_joints)
    _fit(net, JointDataset(train_cases, params, jitter_mm=jitter_mm, augment=True, seed=seed),
         None if not val_cases else JointDataset(val_cases, params), joint_heads(), cfg, seed, Path(out_dir), progress)
    return net.cpu().eval()


def split_ids(cases: Sequence[Case], fractions: dict[str, float], seed: int = 0) -> dict[str, list[str]]:
    """Patient-level split stratified by severity class (``fractions``: name -> share, summing to 1)."""
    rng = np.random.default_rng(seed)
    names = list(fractions)
    shares = np.array([fractions[n] for n in names], float)
    if not np.isclose(shares.sum(), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    out: dict[str, list[str]] = {n: [] for n in names}
    by_class: dict[int, list[str]] = {}
    for c in cases:
        by_class.setdefault(c.cls, []).append(c.patient_id)
    carry = np.zeros(len(names))
    for cls in sorted(by_class):
        ids = list(rng.permutation(by_class[cls]))
        want = shares * len(ids) + carry
        counts = np.floor(want).astype(int)
        rest = len(ids) - counts.sum()
        order = np.argsort(-(want - counts))
        counts[order[:rest]] += 1
        carry = want - counts
        start = 0
        for n, k in zip(names, counts):
            out[n] += ids[start:start + k]
            start += k
    return {n: sorted(v) for n, v in out.items()}


def build_card(arch: dict[str, Any], params: HandParams, cfg: HandTrainConfig, counts: dict[str, int],
               metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    heads = {**whole_heads(int(arch["whole"]["n_classes"]), float(arch["whole"]["total_scale"])),
             **landmark_heads(int(arch["landmarks"]["n_points"]), float(arch["landmarks"]["sigma"]),
                              int(arch["landmarks"].get("in_pool", 1)) * int(arch["landmarks"].get("out_stride", 1))),
             **joint_heads()}
    return {"task": "hand_svdh", "architecture": arch, "preprocessing": params.to_dict(),
            "heads": {k: h.describe() for k, h in heads.items()}, "threshold": None, "threshold_rule": None,
            "class_edges": list(params.class_edges), "joints": list(JOINT_NAMES), "training": cfg.to_dict(),
            "training_data": counts, "metrics": metrics or {}}


def train_hand(labels_csv: str | Path, out_dir: str | Path, landmarks_csv: str | Path | None = None,
               cfg: HandTrainConfig | None = None, arch: dict[str, Any] | None = None,
               params: HandParams | None = None, train_ids: Sequence[str] | None = None,
               val_ids: Sequence[str] | None = None, cases: Sequence[Case] | None = None,
               progress: Callable[..., Any] | None = None) -> Path:
    """Train all three networks and write one checkpoint folder ``out_dir/model``; returns it.

    ``cases`` (already loaded) or ``labels_csv`` (+ ``landmarks_csv``; the joint path needs it).
    ``train_ids`` / ``val_ids`` restrict the cases (default: all for training, none for validation).
    """
    cfg = cfg or HandTrainConfig()
    arch = arch or default_architecture()
    params = params or HandParams.from_dict(arch.get("preprocessing", {}))
    arch = dict(arch, preprocessing=params.to_dict())
    if cases is None:
        cases = load_cohort(labels_csv, params, landmarks_csv)
    by_id = {c.patient_id: c for c in cases}
    tr = [by_id[i] for i in (train_ids or list(by_id))]
    va = [by_id[i] for i in (val_ids or [])]
    out = Path(out_dir)
    whole = train_whole(tr, va, arch["whole"], cfg.whole, out / "whole", cfg.seed, cfg.init_backbone, cfg.finetune,
                        progress)
    net = HandSvdHNet(arch)
    net.whole.load_state_dict(whole.state_dict())
    with_points = [c for c in tr if c.points_canon is not None]
    if with_points:
        lm = train_landmarks(with_points, [c for c in va if c.points_canon is not None], arch["landmarks"],
                             cfg.landmarks, out / "landmarks", cfg.seed, progress)
        net.landmarks.load_state_dict(lm.state_dict())
        js = train_joints(with_points, [c for c in va if c.points_canon is not None], arch["joints"], params,
                          cfg.joints, out / "joints", cfg.seed, cfg.jitter_mm, progress)
        net.joints.load_state_dict(js.state_dict())
    counts = {"train": len(tr), "val": len(va), "train_with_landmarks": len(with_points)}
    return save_checkpoint(out / "model", net.eval(), build_card(arch, params, cfg, counts))


def pretrain_backbone(labels_csv: str | Path, label_column: str, out_path: str | Path,
                      backbone: str = "resnet", cfg: StageConfig | None = None, params: HandParams | None = None,
                      seed: int = 0, progress: Callable[..., Any] | None = None) -> Path:
    """Auxiliary-label pretraining on hand radiographs (e.g. a paediatric set with bone age).

    labels_csv: ``patient_id, file`` + ``label_column`` (a number per image). Trains the whole-hand
    network's backbone to regress the (standardised) auxiliary label through the engine and writes
    the backbone weights to ``out_path`` (safetensors) for :func:`train_whole` (``init_backbone``).
    """
    params = params or HandParams()
    sheet = Path(labels_csv)
    with open(sheet, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or label_column not in rows[0]:
        raise InputError(sheet, f"label sheet has no column {label_column!r}")
    from ...radiograph import read_radiograph
    from .dataset import prepare

    vals = []
    cases = []
    for r in rows:
        try:
            v = float(r[label_column])
        except ValueError:
            raise InputError(sheet, f"patient {r.get('patient_id')}: {label_column} is not a number: "
                                    f"{r[label_column]!r}") from None
        prep = prepare(read_radiograph(sheet.parent / r["file"]), params,
                       laterality=(r.get("laterality") or None))
        vals.append(v)
        cases.append(Case(r["patient_id"], prep, 0.0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64), None))
    mu, sd = float(np.mean(vals)), float(np.std(vals) or 1.0)
    for c, v in zip(cases, vals):
        c.total = (v - mu) / sd  # standardised auxiliary label in the regression slot
    cfg = cfg or StageConfig(epochs=10)
    arch = default_architecture(backbone)["whole"]
    torch.manual_seed(seed)
    net = WholeHandNet(arch)
    from ...engine.heads import make_head

    _fit(net, _AuxDataset(cases, seed), None, {"total": make_head("regression", name="total", loss_kind="smooth_l1")},
         cfg, seed, Path(out_path).parent / "pretrain_run", progress)
    state = {f"backbone.{k}": v.detach().contiguous() for k, v in net.backbone.state_dict().items()}
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"label": label_column, "mean": str(mu), "sd": str(sd),
                                             "backbone": backbone})
    write_json(Path(out_path).with_suffix(".json"), {"label": label_column, "mean": mu, "sd": sd, "n": len(cases),
                                                     "architecture": arch})
    return Path(out_path)


class _AuxDataset(WholeHandDataset):
    """Whole-hand samples with only the (standardised) auxiliary label as target ``total``."""

    def __init__(self, cases: Sequence[Case], seed: int = 0) -> None:
        super().__init__(cases, augment=True, seed=seed)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = super().__getitem__(i)
        s["target"] = {"total": s["target"]["total"]}
        return s
