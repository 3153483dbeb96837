"""Cervical RA training: manifest + config -> checkpoint folder (safetensors + model card).

Defaults follow the paper (BCE, Adam 1e-4, global batch 4, 100 epochs, random init). The loop is
the engine's (:func:`rheumai.engine.fit.fit`: DDP under torchrun, AMP, accumulation, resume,
early stopping, cancel, BatchNorm recalibration); this module prepares the cached slice stacks,
chooses the epoch count and threshold (validation split, or out-of-fold selection over the train
patients when validation is too small: :mod:`rheumai.engine.crossfit`) and writes the card.

Output folder: ``config.toml`` (resolved config), ``splits.csv`` (patient -> train/val used),
``history.csv``, ``val_predictions.csv``, ``state/`` (resume), ``model/`` (the checkpoint);
with out-of-fold selection also ``folds/fold<j>/`` (one run per fold), ``oof_curve.csv`` and
``oof_predictions.csv``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .atomic import write_text
from .checkpoint import find_training_state, save_checkpoint, software_versions
from .config import TrainConfig, load_config, resolve_manifest, save_config
from .data import (SliceStackDataset, build_eval_transform, build_train_transform, load_array,
                   preprocessing_from_dataset, read_manifest, split_train_val)
from .engine.crossfit import ThresholdChoice, choose_threshold_with_ci, crossfit, needs_oof, select_epoch
from .engine.fit import DistContext, FitConfig, dist_setup, fit, select_device
from .engine.heads import BinaryHead
from .errors import InputError
from .metrics import binary_report, logistic_calibration, parse_threshold_rule
from .tasks.cervical_ra.model import build_model, count_parameters, default_architecture

ProgressFn = Callable[[dict[str, Any]], None]
# Resuming may change these without invalidating the saved state.
RESUMABLE_CHANGES = ("train.epochs", "train.early_stopping_patience", "data.num_workers", "data.manifest",
                     "train.eval_batch_size")


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
    already_finished: bool = False   # resume=True found a finished run and changed nothing


def train(config: TrainConfig | str | Path, manifest_path: str | Path | None = None, out_dir: str | Path | None = None,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train a model on the manifest's train rows, choose the operating threshold on validation.

    ``progress`` is called with dicts ({"stage": "step"|"epoch", "epoch", "epochs", "step", "steps",
    "loss", "val_auc", ...}; during out-of-fold selection also "fold", "folds"); ``should_stop()``
    is polled every step: when it returns True the run stops (the last complete epoch is kept in
    ``<out>/state``; ``resume=True`` continues). It is meant for single-process runs (GUI cancel);
    under torchrun stop with a signal instead. ``resume=True`` on a finished run (``model/``
    written) says so and changes nothing (``TrainResult.already_finished``).
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    manifest_path = Path(manifest_path) if manifest_path else resolve_manifest(cfg)
    if manifest_path is None:
        raise InputError(cfg.source or None, "no manifest: pass one or set [data] manifest in the config")
    if out_dir is None:
        raise InputError(cfg.source or None, "no output folder given")
    out = Path(out_dir)
    tc = cfg.train
    if resume:
        done = _finished(out)
        if done is not None:
            if show_progress:
                print(f"rheumai train: {out} holds a finished run (checkpoint {done.checkpoint}); nothing to resume, "
                      "nothing changed. Train into a new --out to train again.")
            done.already_finished = True
            return done
    use_cuda = tc.device in ("auto", "cuda") and torch.cuda.is_available()
    d = dist_setup(use_cuda)
    try:
        return _train(cfg, manifest_path, out, d, select_device(tc.device, d), progress, should_stop, resume,
                      show_progress)
    finally:
        if d.created:
            dist.destroy_process_group()


def _check_train_rows(df: pd.DataFrame, train_df: pd.DataFrame, manifest_path: Path) -> None:
    """Clear errors for manifests that cannot train: no rows, no train rows, one class in train
    (saying where the other class went)."""
    if len(df) == 0:
        raise InputError(manifest_path, "has a header but no rows (the cohort build included 0 patients?)")
    counts = df.groupby("split")["label"].agg(["size", "sum"])
    if len(train_df) == 0:
        present = ", ".join(f"{k}: {int(v['size'])}" for k, v in counts.iterrows())
        raise InputError(manifest_path, f"no rows with split == 'train' (rows per split: {present})")
    if train_df["label"].nunique() < 2:
        have = int(train_df["label"].iloc[0])
        names = {1: "positive", 0: "negative"}
        missing = names[1 - have]
        elsewhere = {k: int(v["sum"]) if have == 0 else int(v["size"] - v["sum"]) for k, v in counts.iterrows()
                     if k != "train"}
        where = {k: n for k, n in elsewhere.items() if n}
        if where:
            lead = f"the only {missing} is" if sum(where.values()) == 1 else f"the {missing}s are"
            hint = f"{lead} in " + ", ".join(f"{k} ({n})" for k, n in where.items())
        else:
            hint = f"the manifest has no {missing} case at all"
        raise InputError(manifest_path, f"train rows hold only one class ({len(train_df)} {names[have]}); {hint}")


def _finished(out: Path) -> TrainResult | None:
    """The result of a finished run in ``out`` (model/ written), or None."""
    card_path = out / "model" / "model_card.json"
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        t = card.get("training", {})
        return TrainResult(out, out / "model", int(t.get("epochs_run", 0)), t.get("best_epoch"), None,
                           float(card["threshold"]), early_stopped=bool(t.get("early_stopped")))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(card_path, f"unreadable model card of the finished run: {exc}") from None


class _Stopped(Exception):
    """should_stop() asked to stop inside a fold run."""


def _derived(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """The config of a fold or final run of out-of-fold selection: fixed epochs, last weights,
    no early stopping, no nested selection."""
    c = TrainConfig.from_dict(cfg.to_dict(), source=cfg.source or None)
    c.train.epochs, c.train.select, c.train.early_stopping_patience = int(epochs), "last", 0
    c.selection.method = "validation"
    return c


def _train(cfg: TrainConfig, manifest_path: Path, out: Path, d: DistContext, device: torch.device,
           progress: ProgressFn | None, should_stop: Callable[[], bool] | None, resume: bool,
           show_progress: bool) -> TrainResult:
    """Validation-split selection, or out-of-fold selection (folds, then the final run)."""
    df = read_manifest(manifest_path)
    preprocessing = preprocessing_from_dataset(manifest_path)
    _check_train_rows(df, df[df["split"] == "train"], manifest_path)
    train_df, val_df, val_how = split_train_val(df, cfg.data.val_fraction, cfg.train.seed)
    if train_df["label"].nunique() < 2:
        raise InputError(manifest_path, f"carving the validation set (val_fraction = {cfg.data.val_fraction}) left "
                                        "one class in train: add val rows to the manifest or lower val_fraction")
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
                   selection={"method": "fold", "reason": why},
                   **{**base, "progress": None if progress is None else
                      (lambda ev: progress({**ev, "fold": j + 1, "folds": int(folds_n)}))})
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

    folds_n = min(sc.folds, int(train_df["label"].sum()), int((1 - train_df["label"]).sum()))
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


def _fit_config(cfg: TrainConfig, collect: bool) -> FitConfig:
    t = cfg.train
    return FitConfig(epochs=t.epochs, batch_size=t.batch_size, accumulate_steps=t.accumulate_steps, lr=t.lr,
                     weight_decay=t.weight_decay, optimizer=t.optimizer, seed=t.seed, device=t.device, amp=t.amp,
                     channels_last=t.channels_last, sync_batchnorm=t.sync_batchnorm, eval_batch_size=t.eval_batch_size,
                     num_workers=cfg.data.num_workers, early_stopping_patience=t.early_stopping_patience,
                     select="best" if t.select == "best_val_auc" else "last", bn_recalibration=t.bn_recalibration,
                     collect_val_outputs=collect)


def _run(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, val_how: str, out: Path, *,
         df: pd.DataFrame, preprocessing: dict[str, Any], manifest_path: Path, d: DistContext, device: torch.device,
         progress: ProgressFn | None, should_stop: Callable[[], bool] | None, resume: bool, show_progress: bool,
         selection: dict[str, Any], threshold_choice: ThresholdChoice | None = None, collect: bool = False,
         save_model: bool = True, saved_config: TrainConfig | None = None) -> TrainResult:
    """One training run on ``train_df``, validated on ``val_df``. ``collect``: keep every epoch's
    validation probabilities (fold runs); ``threshold_choice``: given by out-of-fold selection."""
    tc, mc = cfg.train, cfg.model
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
    fc = _fit_config(cfg, collect)
    torch.manual_seed(tc.seed)
    model = build_model(arch)
    head = BinaryHead("out", pos_weight=n_neg / n_pos if tc.class_weighting == "balanced" else None)
    if resume and find_training_state(out / "state") is None:
        raise InputError(out, "--resume: no saved training state here (state/state.json)")
    if not resume and find_training_state(out / "state") is not None:
        raise InputError(out, "holds an earlier run's training state: pass --resume to continue it, or choose a new --out")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(saved_config or cfg, out / "config.toml")
        splits = pd.concat([train_df.assign(used_as="train"), val_df.assign(used_as="val")])
        write_text(out / "splits.csv", splits[["patient_id", "label", "split", "used_as"]].to_csv(index=False))
        if show_progress:
            steps = -(-len(train_df) // tc.batch_size)
            tqdm.write(f"rheumai train: {len(train_df)} train ({n_pos} positive), {len(val_df)} val ({val_how}); "
                       f"ResNet-{mc.depth} {count_parameters(model) / 1e6:.1f} M parameters, input "
                       f"{mc.in_channels}x{input_size[0]}x{input_size[1]}, {d.world} process(es) on {device.type}, "
                       f"{steps} steps/epoch")
    res = fit(model, train_ds, val_ds, {"out": head}, fc, out, progress, should_stop, resume, recal_ds=recal_ds,
              config_record=cfg.to_dict(), resumable=RESUMABLE_CHANGES, show_progress=show_progress)
    best_auc = res.best_score
    if res.stopped:
        return TrainResult(out, None, res.epochs_run, res.best_epoch, best_auc, None, stopped=True,
                           history=res.history)
    if collect:  # a fold run: its held-out probabilities are the result
        probs = [head.decode(torch.as_tensor(e["out"]))["probability"] for e in res.epoch_val_outputs]
        return TrainResult(out, None, res.epochs_run, res.best_epoch, None, None, history=res.history,
                           epoch_probabilities=np.asarray(probs, dtype=float))
    sc = cfg.selection
    choice, val_report, val_cal = threshold_choice, None, None
    if res.val_outputs is not None and val_ds is not None:
        pv, yv = head.decode(res.val_outputs["out"])["probability"], val_ds.labels.astype(int)
        if choice is None:
            choice = choose_threshold_with_ci(yv, pv, str(rule), "validation", sc.min_threshold_positives,
                                              sc.threshold_ci_bootstrap, cfg.evaluate.alpha, tc.seed)
        val_report = binary_report(yv, pv, choice.value, alpha=cfg.evaluate.alpha, auc_method=cfg.evaluate.auc_ci,
                                   n_boot=min(cfg.evaluate.n_bootstrap, 1000), seed=tc.seed,
                                   n_bins=cfg.evaluate.calibration_bins)
        try:
            val_cal = logistic_calibration(yv, pv, cfg.evaluate.alpha)
        except (ValueError, np.linalg.LinAlgError):
            val_cal = None  # one class, or separable: no finite intercept / slope
        if d.main:
            write_text(out / "val_predictions.csv", pd.DataFrame(
                {"patient_id": val_ds.patient_ids, "label": yv, "probability": pv,
                 "predicted": (pv >= choice.value).astype(int)}).to_csv(index=False))
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
            "heads": {"out": head.describe()},
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
            "metrics": {"validation": vm, "calibration": val_cal},
            "training": {"epochs_run": res.epochs_run, "epochs_planned": tc.epochs, "early_stopped": res.early_stopped,
                         "best_epoch": res.best_epoch, "weights": "best_val_auc" if res.weights == "best" else "last",
                         "world_size": res.world_size, "bn_recalibration": res.bn_recalibration,
                         "device": res.device, "amp": res.amp, "channels_last": res.channels_last,
                         "config": cfg.to_dict(),
                         "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "software": software_versions(),
        }
        ckpt = save_checkpoint(out / "model", model, card)
        if show_progress:
            auc_txt = f"{val_report['auc']['value']:.3f}" if val_report else "n/a"
            tqdm.write(f"rheumai train: checkpoint {ckpt} (val AUC {auc_txt}, threshold {threshold:.3f}, {note})")
    d.barrier()
    return TrainResult(out, ckpt if ckpt else out / "model", res.epochs_run, res.best_epoch, best_auc, float(threshold),
                       stopped=False, early_stopped=res.early_stopped, history=res.history, val_report=val_report)
