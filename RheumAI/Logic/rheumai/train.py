"""Training loop: manifest + config -> checkpoint folder (safetensors + model card).

Defaults follow the paper (BCE, Adam 1e-4, global batch 4, 100 epochs, random init). Runs on one
process, or under ``torchrun --nproc_per_node N`` with DistributedDataParallel (NCCL on GPU, gloo
on CPU): every process gets its share of the same seeded global batches (``GlobalBatchSampler``),
so N processes follow the single-process run. Resume state is saved at every epoch boundary
(``<out>/state``), without pickle; ``resume=True`` continues from it bit-for-bit on CPU.

Output folder: ``config.toml`` (resolved config), ``splits.csv`` (patient -> train/val used),
``history.csv``, ``val_predictions.csv``, ``state/`` (resume), ``model/`` (the checkpoint).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .atomic import write_text
from .checkpoint import (find_training_state, load_training_state, save_checkpoint, save_training_state,
                         software_versions)
from .config import TrainConfig, load_config, resolve_manifest, save_config
from .data import (GlobalBatchSampler, SliceStackDataset, build_eval_transform, build_train_transform, load_array,
                   preprocessing_from_dataset, read_manifest, split_train_val)
from .engine.batchnorm import recalibrate_batchnorm
from .engine.crossfit import ThresholdChoice, choose_threshold_with_ci, crossfit, needs_oof, select_epoch
from .errors import InputError
from .metrics import binary_report, parse_threshold_rule
from .models import build_model, count_parameters, default_architecture

ProgressFn = Callable[[dict[str, Any]], None]
# Resuming may change these without invalidating the saved state.
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "early_stopping_patience"), ("data", "num_workers"),
                     ("data", "manifest"), ("train", "eval_batch_size")}


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path | None          # None when stopped before the end
    epochs_run: int
    best_epoch: int | None           # 1-based
    best_val_auc: float | None
    threshold: float | None
    stopped: bool = False            # should_stop() asked to stop (resume with resume=True)
    early_stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    val_report: dict[str, Any] | None = None
    epoch_probabilities: np.ndarray | None = None   # (epochs, n_val), fold runs of OOF selection


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _dist_setup(use_cuda: bool) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    if dist.is_initialized():
        return _Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), created)
    return _Dist()


def _device(pref: str, d: _Dist) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "[train] device = 'cuda' but no CUDA device is available")
    if pref in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def _config_diff(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for sec in sorted(set(a) | set(b)):
        for key in sorted(set(a.get(sec, {})) | set(b.get(sec, {}))):
            va, vb = a.get(sec, {}).get(key), b.get(sec, {}).get(key)
            if va != vb and (sec, key) not in RESUMABLE_CHANGES:
                out.append(f"[{sec}] {key}: saved {va!r}, now {vb!r}")
    return out


def _autocast(device: torch.device, enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, dataset: torch.utils.data.Dataset, device: torch.device,
                   batch_size: int = 8, num_workers: int = 0, amp: bool = False, channels_last: bool = False,
                   should_stop: Callable[[], bool] | None = None, desc: str | None = None) -> np.ndarray:
    """Logits (N,) for a dataset of (x, y, index) in dataset order; model put in eval mode."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = np.empty(len(dataset), dtype=np.float64)
    for x, _, idx in tqdm(loader, desc=desc, leave=False, disable=desc is None):
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt("stopped")
        x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with _autocast(device, amp):
            logits = model(x)
        out[idx.numpy()] = logits.float().squeeze(1).cpu().numpy()
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def train(config: TrainConfig | str | Path, manifest_path: str | Path | None = None, out_dir: str | Path | None = None,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train a model on the manifest's train rows, choose the operating threshold on validation.

    ``progress`` is called with dicts ({"stage": "step"|"epoch", "epoch", "epochs", "step", "steps",
    "loss", "val_auc", ...}); ``should_stop()`` is polled every step: when it returns True the run
    stops (the last complete epoch is kept in ``<out>/state``; ``resume=True`` continues). It is
    meant for single-process runs (GUI cancel); under torchrun stop with a signal instead.
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    manifest_path = Path(manifest_path) if manifest_path else resolve_manifest(cfg)
    if manifest_path is None:
        raise InputError(cfg.source or None, "no manifest: pass one or set [data] manifest in the config")
    if out_dir is None:
        raise InputError(cfg.source or None, "no output folder given")
    out = Path(out_dir)
    tc = cfg.train
    use_cuda = tc.device in ("auto", "cuda") and torch.cuda.is_available()
    d = _dist_setup(use_cuda)
    try:
        return _train(cfg, manifest_path, out, d, _device(tc.device, d), progress, should_stop, resume, show_progress)
    finally:
        if d.created:
            dist.destroy_process_group()


class _Stopped(Exception):
    """should_stop() asked to stop inside a fold run."""


def _derived(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """The config of a fold or final run of out-of-fold selection: fixed epochs, last weights,
    no early stopping, no nested selection."""
    c = TrainConfig.from_dict(cfg.to_dict(), source=cfg.source or None)
    c.train.epochs, c.train.select, c.train.early_stopping_patience = int(epochs), "last", 0
    c.selection.method = "validation"
    return c


def _train(cfg: TrainConfig, manifest_path: Path, out: Path, d: _Dist, device: torch.device,
           progress: ProgressFn | None, should_stop: Callable[[], bool] | None, resume: bool,
           show_progress: bool) -> TrainResult:
    """Validation-split selection, or out-of-fold selection (folds, then the final run)."""
    df = read_manifest(manifest_path)
    preprocessing = preprocessing_from_dataset(manifest_path)
    train_df, val_df, val_how = split_train_val(df, cfg.data.val_fraction, cfg.train.seed)
    if len(train_df) == 0:
        raise InputError(manifest_path, "no rows with split == 'train'")
    if train_df["label"].nunique() < 2:
        raise InputError(manifest_path, "train rows hold only one class")
    sc = cfg.selection
    use_oof, why = needs_oof(sc.method, val_df["label"], sc.min_val_positives)
    base: dict[str, Any] = {"df": df, "preprocessing": preprocessing, "manifest_path": manifest_path, "d": d,
                            "device": device, "progress": progress, "should_stop": should_stop,
                            "show_progress": show_progress}
    if not use_oof:
        return _run(cfg, train_df, val_df, val_how, out, resume=resume,
                    selection={"method": "validation", "reason": why}, **base)
    if not resume and (out / "folds").exists():
        raise InputError(out, "holds an earlier run's folds: pass --resume to continue it, or choose a new --out")
    fold_cfg = _derived(cfg, cfg.train.epochs)

    def run_fold(j: int, tr: np.ndarray, ho: np.ndarray) -> np.ndarray:
        fold_out = out / "folds" / f"fold{j}"
        done = fold_out / "oof.csv"
        if done.is_file():
            return pd.read_csv(done).drop(columns=["patient_id", "label"]).to_numpy(dtype=float).T
        if show_progress and d.main:
            tqdm.write(f"rheumai train: fold {j + 1}: {len(tr)} train, {len(ho)} held out")
        res = _run(fold_cfg, train_df.iloc[tr].reset_index(drop=True), train_df.iloc[ho].reset_index(drop=True),
                   f"fold {j} of out-of-fold selection", fold_out,
                   resume=find_training_state(fold_out / "state") is not None, collect=True, save_model=False,
                   selection={"method": "fold", "reason": why}, **base)
        if res.stopped:
            raise _Stopped
        probs = np.asarray(res.epoch_probabilities)
        if d.main:
            table = pd.DataFrame({"patient_id": train_df["patient_id"].iloc[ho].to_numpy(),
                                  "label": train_df["label"].iloc[ho].to_numpy()})
            for e in range(probs.shape[0]):
                table[f"epoch{e + 1}"] = probs[e]
            write_text(done, table.to_csv(index=False))
        return probs

    try:
        oof = crossfit(run_fold, train_df["label"], train_df["patient_id"], sc.folds, cfg.train.seed)
    except _Stopped:
        return TrainResult(out, None, 0, None, None, None, stopped=True)
    except ValueError as exc:
        raise InputError(manifest_path, str(exc)) from None
    epoch, smoothed = select_epoch(oof.scores, oof.labels, sc.epoch_smoothing)
    choice = choose_threshold_with_ci(oof.labels, oof.scores[epoch - 1], cfg.threshold.rule, "oof",
                                      sc.min_threshold_positives, sc.threshold_ci_bootstrap, cfg.evaluate.alpha,
                                      cfg.train.seed)
    auc = oof.auc_by_epoch()
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "oof_curve.csv", pd.DataFrame({"epoch": np.arange(1, auc.size + 1), "oof_auc": auc,
                                                        "oof_auc_smoothed": smoothed}).to_csv(index=False))
        write_text(out / "oof_predictions.csv", pd.DataFrame({
            "patient_id": train_df["patient_id"], "label": oof.labels, "fold": oof.folds,
            "probability": oof.scores[epoch - 1]}).to_csv(index=False))
        if show_progress:
            tqdm.write(f"rheumai train: out-of-fold selection ({int(oof.folds.max()) + 1} folds): {epoch} epochs "
                       f"(OOF AUC {auc[epoch - 1]:.3f}); threshold {choice.value:.3f} ({choice.note})")
    selection = {"method": "oof", "reason": why, "folds": int(oof.folds.max()) + 1, "epochs_selected": epoch,
                 "epoch_smoothing": sc.epoch_smoothing, "oof_auc_by_epoch": [float(a) for a in auc],
                 "oof_auc": float(auc[epoch - 1])}
    return _run(_derived(cfg, epoch), train_df, val_df, val_how, out,
                resume=find_training_state(out / "state") is not None, selection=selection, threshold_choice=choice,
                saved_config=cfg, **base)


def _run(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, val_how: str, out: Path, *,
         df: pd.DataFrame, preprocessing: dict[str, Any], manifest_path: Path, d: _Dist, device: torch.device,
         progress: ProgressFn | None, should_stop: Callable[[], bool] | None, resume: bool, show_progress: bool,
         selection: dict[str, Any], threshold_choice: ThresholdChoice | None = None, collect: bool = False,
         save_model: bool = True, saved_config: TrainConfig | None = None) -> TrainResult:
    """One training run on ``train_df``, validated on ``val_df``. ``collect``: keep every epoch's
    validation probabilities (fold runs); ``threshold_choice``: given by out-of-fold selection."""
    tc, mc = cfg.train, cfg.model
    cuda = device.type == "cuda"
    amp, cl = tc.amp and cuda, tc.channels_last and cuda
    rule = parse_threshold_rule(cfg.threshold.rule)
    first = load_array(train_df["array_path"].iloc[0])
    if first.shape[0] != mc.in_channels:
        raise InputError(train_df["array_path"].iloc[0],
                         f"{first.shape[0]} slices per case but [model] in_channels = {mc.in_channels}")
    input_size = tuple(mc.input_size) if mc.input_size else tuple(first.shape[1:])
    arch = default_architecture(mc.depth, mc.in_channels, input_size, mc.conv1_t_stride, family=mc.family)
    train_ds = SliceStackDataset(train_df, build_train_transform(cfg.augment, input_size), tc.seed, mc.in_channels)
    eval_tf = build_eval_transform(cfg.augment.crop, cfg.augment.crop_fraction, input_size)
    val_ds = SliceStackDataset(val_df, eval_tf, tc.seed, mc.in_channels) if len(val_df) else None
    recal_ds = SliceStackDataset(train_df, eval_tf, tc.seed, mc.in_channels)  # un-augmented train images
    n_pos = int(train_df["label"].sum())
    n_neg = len(train_df) - n_pos

    sampler = GlobalBatchSampler(len(train_ds), tc.batch_size, d.world, d.rank, tc.accumulate_steps, tc.seed)
    workers = min(cfg.data.num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=workers, pin_memory=cuda)
    steps = sampler.steps_per_epoch()

    # ---- model, optimiser, loss
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % (2**32))
    model = build_model(arch).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    if d.world > 1 and cuda and tc.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
           if d.world > 1 else model)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    pos_weight = torch.tensor(n_neg / n_pos, device=device) if tc.class_weighting == "balanced" else None
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None

    # ---- output folder, resume
    state_dir = out / "state"
    start_epoch, best_auc, best_epoch, bad_epochs, history = 0, -math.inf, None, 0, []
    epoch_probs: list[list[float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    if resume:
        if find_training_state(state_dir) is None:
            raise InputError(out, "--resume: no saved training state here (state/state.json)")
        meta, best_state = load_training_state(state_dir, model, optimizer, scaler)
        diff = _config_diff(meta["config"], cfg.to_dict())
        if diff:
            raise InputError(out / "config.toml", "the config differs from the interrupted run's: " + "; ".join(diff))
        start_epoch, bad_epochs, history = meta["epochs_completed"], meta["bad_epochs"], meta["history"]
        best_auc = meta["best_val_auc"] if meta["best_val_auc"] is not None else -math.inf
        best_epoch = meta["best_epoch"]
        epoch_probs = meta.get("val_probabilities", [])
    elif find_training_state(state_dir) is not None:
        raise InputError(out, "holds an earlier run's training state: pass --resume to continue it, or choose a new --out")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(saved_config or cfg, out / "config.toml")
        splits = pd.concat([train_df.assign(used_as="train"), val_df.assign(used_as="val")])
        write_text(out / "splits.csv", splits[["patient_id", "label", "split", "used_as"]].to_csv(index=False))
        if show_progress:
            tqdm.write(f"rheumai train: {len(train_df)} train ({n_pos} positive), {len(val_df)} val ({val_how}); "
                       f"ResNet-{mc.depth} {count_parameters(model) / 1e6:.1f} M parameters, input "
                       f"{mc.in_channels}x{input_size[0]}x{input_size[1]}, {d.world} process(es) on {device.type}, "
                       f"{steps} steps/epoch")

    def _stop() -> bool:
        return bool(should_stop is not None and should_stop())

    def _recalibrate() -> None:
        """BatchNorm statistics of the un-augmented training images (same on every process)."""
        batches = torch.utils.data.DataLoader(recal_ds, batch_size=tc.eval_batch_size, shuffle=False)
        recalibrate_batchnorm(model, batches, lambda m, b: m(b[0].to(
            device, memory_format=torch.channels_last if cl else torch.contiguous_format)))

    stopped = early = False
    epoch_bar = tqdm(range(start_epoch, tc.epochs), desc="training", unit="epoch", initial=start_epoch,
                     total=tc.epochs, disable=not (d.main and show_progress))
    for epoch in epoch_bar:
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        net.train()
        it = iter(loader)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        step_bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False,
                        disable=not (d.main and show_progress))
        for step in step_bar:
            if _stop():
                stopped = True
                break
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for a in range(tc.accumulate_steps):
                x, y, _ = next(it)
                x = x.to(device, non_blocking=True, memory_format=torch.channels_last if cl else torch.contiguous_format)
                y = y.to(device, non_blocking=True)
                sync = contextlib.nullcontext() if (d.world == 1 or a == tc.accumulate_steps - 1) else net.no_sync()
                with sync:
                    with _autocast(device, amp):
                        logits = net(x).squeeze(1)
                    loss = criterion(logits.float(), y) / tc.accumulate_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                step_loss += float(loss.detach())
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            loss_sum += torch.tensor([step_loss, 1.0], dtype=torch.float64)
            step_bar.set_postfix(loss=f"{step_loss:.4f}")
            if progress:
                progress({"stage": "step", "epoch": epoch + 1, "epochs": tc.epochs, "step": step + 1,
                          "steps": steps, "loss": step_loss})
        step_bar.close()
        if stopped:
            break
        if d.world > 1:
            dist.all_reduce(loss_sum)
        train_loss = float(loss_sum[0] / loss_sum[1])

        # validation: every process scores the whole (small) validation set with identical weights
        # and BatchNorm statistics (rank 0's, broadcast), so all agree on early stopping
        if d.world > 1:
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        if tc.bn_recalibration == "epoch":
            _recalibrate()
        val_auc = val_loss = float("nan")
        if val_ds is not None:
            logits = predict_logits(model, val_ds, device, tc.eval_batch_size, 0, amp, cl)
            yv = val_ds.labels.astype(int)
            if collect:
                epoch_probs.append(_sigmoid(logits).tolist())
            val_loss = float(torch.nn.functional.binary_cross_entropy_with_logits(
                torch.from_numpy(logits), torch.from_numpy(yv.astype(np.float64))))
            if yv.min() != yv.max():
                from sklearn.metrics import roc_auc_score

                val_auc = float(roc_auc_score(yv, _sigmoid(logits)))
        improved = math.isfinite(val_auc) and val_auc > best_auc
        if improved:
            best_auc, best_epoch, bad_epochs = val_auc, epoch + 1, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif math.isfinite(val_auc):
            bad_epochs += 1
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc,
               "best_val_auc": best_auc if math.isfinite(best_auc) else float("nan"), "lr": tc.lr}
        history.append(row)
        epoch_bar.set_postfix(loss=f"{train_loss:.4f}", val_auc=f"{val_auc:.3f}",
                              best=f"{best_auc:.3f}" if math.isfinite(best_auc) else "-")
        if progress:
            progress({"stage": "epoch", "epochs": tc.epochs, **row})
        if d.main:
            meta = {"epochs_completed": epoch + 1, "best_val_auc": best_auc if math.isfinite(best_auc) else None,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history, "config": cfg.to_dict()}
            if collect:
                meta["val_probabilities"] = epoch_probs
            save_training_state(state_dir, model, optimizer, meta, best_model=best_state if improved else None,
                                scaler=scaler, keep_best=True)
            write_text(out / "history.csv", pd.DataFrame(history).to_csv(index=False))
        d.barrier()
        if tc.early_stopping_patience and bad_epochs >= tc.early_stopping_patience:
            early = True
            break
    epoch_bar.close()

    epochs_run = len(history)
    if stopped:
        return TrainResult(out, None, epochs_run, best_epoch, best_auc if math.isfinite(best_auc) else None,
                           None, stopped=True, history=history)

    # ---- final model, threshold on validation, checkpoint
    select = tc.select if best_state is not None else "last"
    if select == "best_val_auc":
        model.load_state_dict(best_state)
    if tc.bn_recalibration == "final":
        _recalibrate()
    if collect:  # a fold run: its held-out probabilities are the result
        return TrainResult(out, None, epochs_run, best_epoch, None, None, history=history,
                           epoch_probabilities=np.asarray(epoch_probs, dtype=float))
    sc = cfg.selection
    choice, val_report = threshold_choice, None
    if val_ds is not None:
        logits = predict_logits(model, val_ds, device, tc.eval_batch_size, 0, amp, cl)
        pv, yv = _sigmoid(logits), val_ds.labels.astype(int)
        if choice is None:
            choice = choose_threshold_with_ci(yv, pv, str(rule), "validation", sc.min_threshold_positives,
                                              sc.threshold_ci_bootstrap, cfg.evaluate.alpha, tc.seed)
        threshold = choice.value
        val_report = binary_report(yv, pv, threshold, alpha=cfg.evaluate.alpha, auc_method=cfg.evaluate.auc_ci,
                                   n_boot=min(cfg.evaluate.n_bootstrap, 1000), seed=tc.seed,
                                   n_bins=cfg.evaluate.calibration_bins)
        if d.main:
            write_text(out / "val_predictions.csv", pd.DataFrame(
                {"patient_id": val_ds.patient_ids, "label": yv, "probability": pv,
                 "predicted": (pv >= threshold).astype(int)}).to_csv(index=False))
    elif choice is None:
        choice = choose_threshold_with_ci([], [], str(rule), "validation", sc.min_threshold_positives)
        choice.note = "no validation set: probability 0.5 used" if rule.kind != "fixed" else choice.note
    threshold, note = choice.value, choice.note

    ckpt = None
    if d.main and save_model:
        vm = None
        if val_report is not None:
            vm = {"n": val_report["n"], "n_positive": val_report["n_positive"], "auc": val_report["auc"],
                  "counts": val_report["counts"], "brier": val_report["calibration"]["brier"],
                  **{k: v for k, v in val_report["metrics"].items()}}
        card = {
            "task": "cervical_ra",
            "architecture": arch,
            "preprocessing": preprocessing,
            "input_transform": {"center_crop_fraction": cfg.augment.crop_fraction if cfg.augment.crop == "center" else 1.0,
                                "resize": "bilinear", "input_size": list(input_size),
                                "layout": "(C, H, W): C sagittal slices right->left, H superior->inferior, W anterior->posterior"},
            "output": "sigmoid(logit) = probability of the outcome (deformity); positive when probability >= threshold",
            "threshold": float(threshold),
            "threshold_rule": str(rule),
            "threshold_note": note,
            "threshold_selection": choice.to_dict(),
            "model_selection": selection,
            "training_data": {
                "n_train": len(train_df), "n_train_positive": n_pos, "n_val": len(val_df),
                "n_val_positive": int(val_df["label"].sum()) if len(val_df) else 0, "val_source": val_how,
                "n_test_held_out": int((df["split"] == "test").sum()),
                "sites": int(df["site"].nunique()) if "site" in df.columns else None,
            },
            "metrics": {"validation": vm},
            "training": {"epochs_run": epochs_run, "epochs_planned": tc.epochs, "early_stopped": early,
                         "best_epoch": best_epoch, "weights": select, "world_size": d.world,
                         "bn_recalibration": tc.bn_recalibration,
                         "device": device.type, "amp": amp, "channels_last": cl, "config": cfg.to_dict(),
                         "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "software": software_versions(),
        }
        ckpt = save_checkpoint(out / "model", model, card)
        if show_progress:
            auc_txt = f"{val_report['auc']['value']:.3f}" if val_report else "n/a"
            tqdm.write(f"rheumai train: checkpoint {ckpt} (val AUC {auc_txt}, threshold {threshold:.3f}, {note})")
    d.barrier()
    return TrainResult(out, ckpt if ckpt else out / "model", epochs_run, best_epoch,
                       best_auc if math.isfinite(best_auc) else None, float(threshold), stopped=False,
                       early_stopped=early, history=history, val_report=val_report)
