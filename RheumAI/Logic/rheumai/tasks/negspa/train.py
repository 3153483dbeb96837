"""NegSpA-AI dataset building, two-stage training and evaluation.

Dataset: :func:`build_dataset` preprocesses every study of a cohort CSV (patient_id, t1, t2, stir,
box, label, split) into ``cache/<patient_id>.npy/.json`` (:class:`NegSpaSample`) and writes
``manifest.csv`` (the contract's columns that apply + the parsed clinical columns) and
``dataset.json`` (parameters, excluded studies with the reason). Re-running skips cached studies
whose parameters match (resumable); a study that fails is listed, not silently dropped.

Training (:func:`train_negspa`), as Lu et al. describe it, in two stages, each one call of the
engine's loop (:func:`rheumai.engine.fit.fit`, binary head; state in ``<out>/stage<k>/``):
1. image stage: the three ResNet branches + the image-only head, BCE on the patient logit (max
   over the joint halves), MixCut (see :mod:`.mixcut`) and a random left/right swap of the halves
   as the batch transform; BatchNorm statistics recomputed on the unmixed training images;
2. fusion stage: branches frozen (BatchNorm statistics too), the clinical MLP + fusion head
   trained on unmixed images with the encoded clinical vector.
The operating threshold is chosen on the validation split (Youden by default;
:func:`rheumai.metrics.choose_threshold`). Checkpoint: :func:`rheumai.checkpoint.save_checkpoint`
(safetensors + model card); ``resume=True`` continues a killed run from the stage's state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ...atomic import write_json, write_text
from ...checkpoint import check_binding, find_training_state, load_weights, read_card, save_checkpoint
from ...engine.fit import FitConfig, fit
from ...engine.fit import predict as engine_predict
from ...engine.heads import BinaryHead
from ...paths import safe_child
from ...errors import InputError, RheumAIError
from ...metrics import binary_report, choose_threshold
from .clinical import NAMES, ClinicalEncoder, parse_table, read_clinical_csv
from .mixcut import mixcut
from .model import build_model, default_architecture, pack
from .preprocess import ROLES, NegSpaParams, preprocess
from .synth import read_cohort

TASK_NAME = "negspa"
ProgressFn = Callable[[dict[str, Any]], None]


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
                                      "cohort": str(cohort_csv), "clinical": None if clinical_csv is None else str(clinical_csv),
                                      "n": len(man), "excluded": excluded})
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    df = pd.read_csv(path, dtype={"patient_id": str, "split": str})
    missing = [c for c in ("patient_id", "split", "label", "cache_file") if c not in df.columns]
    if missing:
        raise InputError(path, f"manifest lacks columns {missing}")
    for c in NAMES:
        if c not in df.columns:
            df[c] = np.nan
    df["array_stem"] = [str(path.parent / c) for c in df["cache_file"]]
    return df


class NegSpaDataset(torch.utils.data.Dataset):
    """Engine samples: {"input": {"x": packed images float32 (S*2*C, H, W) (:func:`.model.pack`),
    "clinical": float32 (D,)}, "target": {"out": label float32}, "id": patient_id}."""

    def __init__(self, df: pd.DataFrame, encoder: ClinicalEncoder):
        self.df = df.reset_index(drop=True)
        self.clinical = encoder.encode(self.df[list(NAMES)])
        self.labels = self.df["label"].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, i: int) -> dict[str, Any]:
        stem = Path(self.df.at[i, "array_stem"])
        try:
            arr = np.load(stem.with_name(stem.name + ".npy"), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(stem, f"cached sample unreadable ({exc}); rebuild the dataset") from None
        x = pack(torch.from_numpy(arr.astype(np.float32))[None])[0]
        return {"input": {"x": x, "clinical": torch.from_numpy(self.clinical[i])},
                "target": {"out": torch.tensor(self.labels[i])}, "id": str(self.df.at[i, "patient_id"])}


# ---------------------------------------------------------------- training

@dataclass
class TrainResult:
    checkpoint: Path
    threshold: float
    val_auc: float | None
    initial_loss: float
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _device(pref: str) -> torch.device:
    return torch.device("cuda" if pref in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_loader(model: torch.nn.Module, ds: NegSpaDataset, device: torch.device, mode: str,
                   batch_size: int = 8) -> np.ndarray:
    """(N,) patient probabilities of head ``mode`` ("image" | "fusion"), eval mode."""
    if not len(ds):
        return np.zeros(0)
    previous, model.mode = model.mode, mode
    try:
        outputs, _, _ = engine_predict(model, ds, device, {"out": BinaryHead()}, batch_size)
    finally:
        model.mode = previous
    return BinaryHead().decode(outputs["out"])["probability"]


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of float64 probabilities (clipped only against log(0))."""
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _stage_params(model: torch.nn.Module, stage: int) -> list[torch.nn.Parameter]:
    """Stage 1: branches + image head (mode "image"); stage 2: branches frozen, clinical MLP +
    fusion head (mode "fusion")."""
    if stage == 1:
        model.mode = "image"
        return list(model.branches.parameters()) + list(model.image_head.parameters())
    model.mode = "fusion"
    for p in model.branches.parameters():
        p.requires_grad_(False)
    return list(model.clinical_mlp.parameters()) + list(model.fusion_head.parameters())


def _train_mode(stage: int) -> Callable[[torch.nn.Module], None]:
    def set_mode(model: torch.nn.Module) -> None:
        model.train()
        if stage == 2:
            getattr(model, "module", model).branches.eval()  # frozen: keep the stage-1 BatchNorm statistics
    return set_mode


def _augment(stage: int, mixcut_alpha: float, mixcut_prob: float) -> Callable[..., dict[str, Any]]:
    """Batch transform: random left/right swap of the joint halves, then (stage 1) MixCut."""

    def transform(batch: dict[str, Any], gen: torch.Generator, epoch: int) -> dict[str, Any]:
        x, y = batch["input"]["x"], batch["target"]["out"]
        n, _, h, w = x.shape
        x6 = x.view(n, len(ROLES), 2, -1, h, w).clone()
        swap = torch.rand(n, generator=gen) < 0.5  # anatomical L/R flip = swap the halves
        x6[swap] = x6[swap].flip(2)
        if stage == 1 and mixcut_alpha > 0 and float(torch.rand(1, generator=gen)) < mixcut_prob:
            mc = mixcut(x6, y, mixcut_alpha, gen)
            x6, y = mc.images, mc.targets
        return {**batch, "input": {**batch["input"], "x": pack(x6)}, "target": {"out": y}}

    return transform


def train_negspa(manifest: str | Path, out_dir: str | Path, depth: int = 50, epochs_stage1: int = 30,
                 epochs_stage2: int = 20, batch_size: int = 8, lr: float = 1e-4, lr_fusion: float = 1e-3,
                 mixcut_alpha: float = 1.0, mixcut_prob: float = 0.5, threshold_rule: str = "youden",
                 seed: int = 0, device: str = "auto", resume: bool = False, shared_backbone: bool = False,
                 state_every: int = 1, progress: ProgressFn | None = None,
                 should_stop: Callable[[], bool] | None = None, show_progress: bool = True) -> TrainResult:
    """Two-stage training on the manifest's ``train`` rows; threshold on ``val``. Returns the
    checkpoint folder ``<out_dir>/model`` and the loss history. See the module docstring.

    The resume state (model + Adam moments: about 12 bytes per parameter, ~1.2 GB for three
    ResNet-50 branches) is written every ``state_every`` epochs and at the end of each stage
    (``state_every=0``: stage ends only)."""
    manifest = Path(manifest)
    df = read_manifest(manifest)
    info = json.loads((manifest.parent / "dataset.json").read_text()) if (manifest.parent / "dataset.json").is_file() else {}
    labelled = df[df["label"].isin([0, 1])]  # rows without a label (-1) cannot train or set a threshold
    train_df = labelled[labelled["split"] == "train"]
    val_df = labelled[labelled["split"] == "val"]
    if train_df.empty or train_df["label"].nunique() < 2:
        raise InputError(manifest, "training needs train rows of both classes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    dev = _device(device)
    encoder = ClinicalEncoder.fit(train_df[list(NAMES)])
    ds_train, ds_val = NegSpaDataset(train_df, encoder), NegSpaDataset(val_df, encoder)
    stem = Path(ds_train.df.at[0, "array_stem"])
    try:
        s, halves, c, h, w = np.load(stem.with_name(stem.name + ".npy"), mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as exc:
        raise InputError(stem, f"cached sample unreadable ({exc}); rebuild the dataset") from None
    arch = default_architecture(depth=depth, n_slices=c, input_size=(h, w), clinical_dim=encoder.dim,
                                shared_backbone=shared_backbone)
    model = build_model(arch).to(dev)
    y_train = ds_train.labels
    initial_loss = _bce(predict_loader(model, ds_train, dev, "image", batch_size), y_train)
    history: list[dict[str, Any]] = []
    for stage, n_epochs in ((1, epochs_stage1), (2, epochs_stage2)):
        stage_out = out / f"stage{stage}"
        params = _stage_params(model, stage)
        cfg = FitConfig(epochs=n_epochs, batch_size=batch_size, lr=lr if stage == 1 else lr_fusion, seed=seed + stage,
                        device=device, select="last", eval_batch_size=batch_size, state_every=state_every,
                        bn_recalibration="epoch" if stage == 1 else "none")
        res = fit(model, ds_train, ds_val if len(ds_val) else None, {"out": BinaryHead()}, cfg, stage_out,
                  progress=progress, should_stop=should_stop,
                  resume=resume and find_training_state(stage_out / "state") is not None,
                  recal_ds=ds_train, batch_transform=_augment(stage, mixcut_alpha, mixcut_prob), params=params,
                  train_mode=_train_mode(stage), show_progress=show_progress, desc=f"negspa stage {stage}")
        if res.stopped:
            raise KeyboardInterrupt("stopped")
        history += [{"stage": stage, "epoch": h["epoch"] - 1, "loss": h["train_loss"], "val_auc": h["val_auc"]}
                    for h in res.history]
    p_train = predict_loader(model, ds_train, dev, "fusion", batch_size)
    final_loss = _bce(p_train, y_train)
    val_auc, threshold, rule = None, 0.5, threshold_rule
    if len(ds_val) and ds_val.labels.min() != ds_val.labels.max():
        p_val = predict_loader(model, ds_val, dev, "fusion", batch_size)
        threshold = float(choose_threshold(ds_val.labels, p_val, threshold_rule))
        val_auc = float(binary_report(ds_val.labels, p_val, threshold, n_boot=200)["auc"]["value"])
    else:
        rule = "fixed:0.5 (validation split missing or one class)"
    card = {
        "task": TASK_NAME, "architecture": arch, "preprocessing": info.get("preprocessing", NegSpaParams().to_dict()),
        "clinical_encoder": encoder.to_dict(), "threshold": threshold, "threshold_rule": rule,
        "training_data": {"train": len(ds_train), "train_positive": int(y_train.sum()), "val": len(ds_val),
                          "val_positive": int(ds_val.labels.sum()) if len(ds_val) else 0},
        "metrics": {"val_auc": val_auc, "train_loss_initial": initial_loss, "train_loss_final": final_loss},
        "training": {"epochs_stage1": epochs_stage1, "epochs_stage2": epochs_stage2, "batch_size": batch_size,
                     "lr": lr, "lr_fusion": lr_fusion, "mixcut_alpha": mixcut_alpha, "mixcut_prob": mixcut_prob,
                     "seed": seed, "optimizer": "Adam", "loss": "BCE on max-over-halves patient logit"},
        "reference": "Lu et al., Quant Imaging Med Surg 2024 (NegSpA-AI)",
    }
    model.mode = "fusion"
    ckpt = save_checkpoint(out / "model", model, card)
    write_json(out / "history.json", history)
    return TrainResult(ckpt, threshold, val_auc, initial_loss, final_loss, history)


def load_negspa_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the card's tri-input network and load its safetensors weights (strict); eval mode."""
    card = read_card(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if card.get("task") != TASK_NAME:
        raise InputError(folder, f"checkpoint is for task {card.get('task')!r}, not {TASK_NAME!r}")
    try:
        model = build_model(card["architecture"])
    except ValueError as exc:
        raise InputError(folder, str(exc)) from None
    load_weights(folder / card.get("weights_file", "model.safetensors"), model,
                 expected_sha256=check_binding(folder, card))
    model.mode = "fusion"
    return model.to(device).eval(), card


# ---------------------------------------------------------------- evaluation

def evaluate_negspa(checkpoint: str | Path, manifest: str | Path, out_dir: str | Path, split: str = "test",
                    n_bootstrap: int = 2000, seed: int = 0, device: str = "auto", batch_size: int = 8) -> dict[str, Any]:
    """Score a manifest split; write predictions.csv, metrics.json and the shared report
    (:func:`rheumai.report.write_evaluation_report`: report.md/html, ROC, confusion, calibration)."""
    from ...report import write_evaluation_report

    dev = _device(device)
    model, card = load_negspa_checkpoint(checkpoint, dev)
    df = read_manifest(manifest)
    rows = df if split == "all" else df[df["split"] == split]
    rows = rows[rows["label"].isin([0, 1])]
    if rows.empty:
        raise InputError(manifest, f"no labelled rows with split == {split!r} "
                                   f"(splits present: {sorted(df['split'].unique())})")
    enc = ClinicalEncoder.from_dict(card["clinical_encoder"])
    ds = NegSpaDataset(rows, enc)
    p = predict_loader(model, ds, dev, "fusion", batch_size)
    thr = float(card["threshold"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = pd.DataFrame({"patient_id": rows["patient_id"].to_numpy(), "label": ds.labels.astype(int),
                         "probability": p, "predicted": (p >= thr).astype(int)})
    write_text(out / "predictions.csv", pred.to_csv(index=False))
    report = binary_report(ds.labels, p, thr, n_boot=n_bootstrap, seed=seed)
    report["task"] = TASK_NAME
    write_json(out / "metrics.json", report)
    arch = dict(card["architecture"], in_channels=f"3 sequences x {card['architecture']['in_channels']} slices x 2 halves")
    write_evaluation_report(out, report, {"title": "NegSpA-AI evaluation", "model_id": card.get("model_id"),
                                          "split": split, "threshold_source": f"model card ({card['threshold_rule']})",
                                          "card": dict(card, architecture=arch)})
    return report
