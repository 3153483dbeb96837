"""The binary training recipe of every binary task: manifest + config -> checkpoint (``docs/ENGINE.md``).

Output folder: ``config.toml``, ``splits.csv``, ``history.csv``, ``val_predictions.csv``, ``state/``
(one ``<stage>/`` folder per stage when there are several), ``model/``; with out-of-fold selection
also ``folds/fold<j>/``, ``oof_curve.csv`` and ``oof_predictions.csv``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..checkpoint import find_training_state, read_card, save_checkpoint, software_versions
from ..config import TrainConfig, load_config, resolve_manifest, save_config
from ..dataset.split import SPLITS
from ..errors import InputError
from ..metrics import binary_report, logistic_calibration, parse_threshold_rule, validation_summary
from .crossfit import ThresholdChoice, choose_threshold_with_ci, crossfit, needs_oof, select_epoch
from .fit import BatchTransform, DistContext, fit, process_group, select_device
from .heads import BinaryHead

ProgressFn = Callable[[dict[str, Any]], None]
# Resuming may change these without invalidating the saved state.
RESUMABLE_CHANGES = ("train.epochs", "train.early_stopping_patience", "data.num_workers", "data.manifest",
                     "train.eval_batch_size", "train.state_every")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and check ``manifest.csv`` (patient_id, split, label 0 / 1 (-1: no label), cache_file);
    adds ``array_path`` (absolute ``<cache_file>.npy``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "split": str, "cache_file": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(path, f"not a readable CSV: {exc}") from None
    missing = [c for c in ("patient_id", "split", "label", "cache_file") if c not in df.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; has {list(df.columns)}")
    bad_split = sorted(set(df["split"].dropna()) - set(SPLITS))
    if bad_split or df["split"].isna().any():
        raise InputError(path, f"split must be one of {SPLITS}; found {bad_split or 'empty cells'}")
    label = pd.to_numeric(df["label"], errors="coerce")
    for bad, what in ((df["patient_id"].duplicated(), "patient_id not unique (one row per patient)"),
                      (~label.isin([-1, 0, 1]), "label must be 0 or 1 (-1: no label); bad rows (patient_id)"),
                      (df["cache_file"].isna(), "empty cache_file for")):
        if bad.any():
            raise InputError(path, f"{what}: {df.loc[bad, 'patient_id'].tolist()[:5]}")
    df["label"] = label.astype(int)
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


def split_train_val(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Train and validation rows: the manifest's ``val`` rows, else a stratified ``val_fraction``
    of the train patients. Returns (train, val, how)."""
    from sklearn.model_selection import train_test_split

    train, val = df[df["split"] == "train"], df[df["split"] == "val"]
    if len(val):
        return train.reset_index(drop=True), val.reset_index(drop=True), "manifest"
    if val_fraction <= 0:
        return train.reset_index(drop=True), val.reset_index(drop=True), "none"
    n_val = max(2, int(round(val_fraction * len(train))))
    strat = train["label"] if train["label"].value_counts().min() >= 2 else None
    tr, va = (part.sort_values("patient_id").reset_index(drop=True)
              for part in train_test_split(train, test_size=n_val, stratify=strat, random_state=seed))
    return tr, va, f"carved from train (val_fraction={val_fraction}, stratified, seed={seed})"


@dataclass
class Stage:
    """One :func:`fit` call. ``setup(model)`` freezes / switches the model and returns the parameters
    to train (None: all that require grad); ``bn_recalibration`` None: [train]'s."""

    name: str
    epochs: int
    lr: float
    setup: Callable[[torch.nn.Module], list[torch.nn.Parameter] | None] | None = None
    train_mode: Callable[[torch.nn.Module], None] | None = None
    batch_transform: BatchTransform | None = None
    bn_recalibration: str | None = None


@dataclass
class Prepared:
    """What a task builds for one run: model, datasets of sample dicts (``recal_ds``: train images
    without augmentation), stages, card entries (``architecture``, ``preprocessing``, ...)."""

    model: torch.nn.Module
    train_ds: torch.utils.data.Dataset
    val_ds: torch.utils.data.Dataset | None
    recal_ds: torch.utils.data.Dataset
    stages: list[Stage]
    card: dict[str, Any]
    summary: str = ""


@dataclass
class Recipe:
    """A binary task's training declaration. ``prepare(cfg, train_rows, val_rows, dataset_info)``;
    ``eval_dataset(rows, card)`` (the card's inference inputs); ``output``: the card's text."""

    task: str
    sections: Mapping[str, type]
    prepare: Callable[[TrainConfig, pd.DataFrame, pd.DataFrame, dict[str, Any]], Prepared]
    eval_dataset: Callable[[pd.DataFrame, dict[str, Any]], torch.utils.data.Dataset]
    output: str = "sigmoid(logit) = probability of the outcome; positive when probability >= threshold"


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
    epoch_probabilities: np.ndarray | None = None   # (epochs, n_val), fold runs of OOF selection
    already_finished: bool = False   # resume=True found a finished run and changed nothing


def train(config: TrainConfig | str | Path | Mapping[str, Any], manifest: str | Path | None = None,
          out_dir: str | Path | None = None, *, resume: bool = False, progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None, show_progress: bool = True) -> TrainResult:
    """Train the config's task on the manifest's train rows and choose the threshold. ``progress`` gets
    the loop's dicts (plus "fold", "folds" out of fold); ``should_stop()`` is polled every step (the
    last complete epoch stays in the state; ``resume=True`` continues, on a finished run changes nothing)."""
    cfg = config if isinstance(config, TrainConfig) else (
        TrainConfig.from_dict(config) if isinstance(config, Mapping) else load_config(config))
    manifest_path = Path(manifest) if manifest else resolve_manifest(cfg)
    if manifest_path is None:
        raise InputError(cfg.source or None, "no manifest: pass one or set [data] manifest in the config")
    if out_dir is None:
        raise InputError(cfg.source or None, "no output folder given")
    out = Path(out_dir)
    if resume and (done := _finished(out)) is not None:
        if show_progress:
            print(f"rheumai train: {out} holds a finished run (checkpoint {done.checkpoint}); nothing to resume, "
                  "nothing changed. Train into a new --out to train again.")
        return done
    from ..tasks import get_task

    recipe = get_task(cfg.task).training_recipe()
    df = read_manifest(manifest_path)
    df = df[df["label"] >= 0].reset_index(drop=True)
    _check_train_rows(df, manifest_path)
    with process_group(cfg.train.device) as d:
        ctx = _Ctx(recipe, manifest_path, d, select_device(cfg.train.device, d), progress, should_stop, show_progress,
                   df, read_dataset_info(manifest_path))
        return _select_and_run(cfg, ctx, out, resume)


@dataclass
class _Ctx:
    recipe: Recipe
    manifest_path: Path
    d: DistContext
    device: torch.device
    progress: ProgressFn | None
    should_stop: Callable[[], bool] | None
    show_progress: bool
    df: pd.DataFrame
    info: dict[str, Any]


def _check_train_rows(df: pd.DataFrame, manifest_path: Path) -> None:
    """Clear errors for manifests that cannot train: no rows, no train rows, one class in train
    (saying where the other class went)."""
    y_train = df.loc[df["split"] == "train", "label"]
    if len(df) == 0:
        raise InputError(manifest_path, "has a header but no rows (the cohort build included 0 patients?)")
    if len(y_train) == 0:
        present = ", ".join(f"{k}: {n}" for k, n in df["split"].value_counts().sort_index().items())
        raise InputError(manifest_path, f"no rows with split == 'train' (rows per split: {present})")
    if y_train.nunique() < 2:
        have = int(y_train.iloc[0])
        name, missing = ("negative", "positive")[have], ("negative", "positive")[1 - have]
        where = df.loc[df["label"] != have, "split"].value_counts().sort_index()  # all outside train
        lead = f"the only {missing} is" if where.sum() == 1 else f"the {missing}s are"
        hint = f"{lead} in " + ", ".join(f"{k} ({n})" for k, n in where.items()) if len(where) else \
            f"the manifest has no {missing} case at all"
        raise InputError(manifest_path, f"train rows hold only one class ({len(y_train)} {name}); {hint}")


def _finished(out: Path) -> TrainResult | None:
    """The result of a finished run in ``out`` (model/ written), or None."""
    if not (out / "model" / "model_card.json").is_file():
        return None
    card = read_card(out / "model")
    t = card.get("training", {})
    return TrainResult(out, out / "model", int(t.get("epochs_run", 0)), t.get("best_epoch"), None,
                       float(card["threshold"]), early_stopped=bool(t.get("early_stopped")), already_finished=True)


class _Stopped(Exception):
    """should_stop() asked to stop inside a fold run."""


def _select_and_run(cfg: TrainConfig, ctx: _Ctx, out: Path, resume: bool) -> TrainResult:
    """Validation-split selection, or out-of-fold selection (folds, then the final run)."""
    train_df, val_df, val_how = split_train_val(ctx.df, cfg.data.val_fraction, cfg.train.seed)
    if train_df["label"].nunique() < 2:
        raise InputError(ctx.manifest_path, f"carving the validation set (val_fraction = {cfg.data.val_fraction}) left "
                                            "one class in train: add val rows to the manifest or lower val_fraction")
    sc = cfg.selection
    use_oof, why = needs_oof(sc.method, val_df["label"], sc.min_val_positives)
    if not use_oof:
        return _run(cfg, ctx, train_df, val_df, val_how, out, resume=resume,
                    selection={"method": "validation", "reason": why})
    if not resume and (out / "folds").exists():
        raise InputError(out, "holds an earlier run's folds: pass --resume to continue it, or choose a new --out")
    # the folds' and the final run's config: last weights, no early stopping, no nested selection
    fold_cfg = TrainConfig.from_dict(cfg.to_dict(), source=cfg.source or None)
    fold_cfg.train.select, fold_cfg.train.early_stopping_patience = "last", 0
    fold_cfg.selection.method = "validation"

    def run_fold(j: int, tr: np.ndarray, ho: np.ndarray) -> np.ndarray:
        fold_out = out / "folds" / f"fold{j}"
        done = fold_out / "oof.csv"
        if done.is_file():
            return pd.read_csv(done).drop(columns=["patient_id", "label"]).to_numpy(dtype=float).T
        if ctx.show_progress and ctx.d.main:
            tqdm.write(f"rheumai train: fold {j + 1}: {len(tr)} train, {len(ho)} held out")
        prog = ctx.progress
        fold_ctx = replace(ctx, progress=None if prog is None else
                           (lambda ev: prog({**ev, "fold": j + 1, "folds": folds_n})))
        res = _run(fold_cfg, fold_ctx, train_df.iloc[tr].reset_index(drop=True),
                   train_df.iloc[ho].reset_index(drop=True), f"fold {j} of out-of-fold selection", fold_out,
                   resume=_has_state(fold_out), collect=True, selection={"method": "fold", "reason": why})
        if res.stopped:
            raise _Stopped
        probs = np.asarray(res.epoch_probabilities)
        if ctx.d.main:
            write_text(done, train_df.iloc[ho][["patient_id", "label"]].assign(
                **{f"epoch{e + 1}": pe for e, pe in enumerate(probs)}).to_csv(index=False))
        return probs

    folds_n = min(sc.folds, int(train_df["label"].sum()), int((1 - train_df["label"]).sum()))
    try:
        oof = crossfit(run_fold, train_df["label"], train_df["patient_id"], sc.folds, cfg.train.seed)
    except _Stopped:
        return TrainResult(out, None, 0, None, None, None, stopped=True)
    except ValueError as exc:
        raise InputError(ctx.manifest_path, str(exc)) from None
    epoch, auc, smoothed = select_epoch(oof.scores, oof.labels, sc.epoch_smoothing)
    choice = choose_threshold_with_ci(oof.labels, oof.scores[epoch - 1], cfg.threshold.rule, "oof",
                                      sc.min_threshold_positives, sc.threshold_ci_bootstrap, cfg.evaluate.alpha,
                                      cfg.train.seed)
    if ctx.d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "oof_curve.csv", pd.DataFrame({"epoch": np.arange(1, auc.size + 1), "oof_auc": auc,
                                                        "oof_auc_smoothed": smoothed}).to_csv(index=False))
        write_text(out / "oof_predictions.csv", pd.DataFrame({
            "patient_id": train_df["patient_id"], "label": oof.labels, "fold": oof.folds,
            "probability": oof.scores[epoch - 1]}).to_csv(index=False))
        if ctx.show_progress:
            tqdm.write(f"rheumai train: out-of-fold selection ({int(oof.folds.max()) + 1} folds): {epoch} epochs "
                       f"(OOF AUC {auc[epoch - 1]:.3f}); threshold {choice.value:.3f} ({choice.note})")
    selection = {"method": "oof", "reason": why, "folds": int(oof.folds.max()) + 1, "epochs_selected": epoch,
                 "epoch_smoothing": sc.epoch_smoothing, "oof_auc_by_epoch": [float(a) for a in auc],
                 "oof_auc": float(auc[epoch - 1])}
    return _run(fold_cfg, ctx, train_df, val_df, val_how, out, resume=_has_state(out),
                selection=selection, threshold_choice=choice, saved_config=cfg, last_epochs=epoch)


def _has_state(out: Path) -> bool:
    return find_training_state(out / "state") is not None or any(
        find_training_state(p / "state") is not None for p in out.glob("*/") if p.name not in ("folds", "model"))


def _run(cfg: TrainConfig, ctx: _Ctx, train_df: pd.DataFrame, val_df: pd.DataFrame, val_how: str, out: Path, *,
         resume: bool, selection: dict[str, Any], threshold_choice: ThresholdChoice | None = None,
         collect: bool = False, saved_config: TrainConfig | None = None, last_epochs: int | None = None
         ) -> TrainResult:
    """One training run (every stage) on ``train_df``, validated on ``val_df``. ``collect``: a fold
    run (every epoch's validation probabilities of the last stage, no checkpoint); ``last_epochs``:
    the last stage's epochs chosen out of fold."""
    tc, d = cfg.train, ctx.d
    rule = parse_threshold_rule(cfg.threshold.rule)
    torch.manual_seed(tc.seed)
    prep = ctx.recipe.prepare(cfg, train_df, val_df, ctx.info)
    n_pos = int(train_df["label"].sum())
    head = BinaryHead("out", pos_weight=(len(train_df) - n_pos) / n_pos if tc.class_weighting == "balanced" else None)
    if resume != _has_state(out):
        raise InputError(out, "--resume: no saved training state here (state/state.json)" if resume else
                         "holds an earlier run's training state: pass --resume to continue it, "
                         "or choose a new --out")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(saved_config or cfg, out / "config.toml")
        splits = pd.concat([train_df.assign(used_as="train"), val_df.assign(used_as="val")])
        write_text(out / "splits.csv", splits[["patient_id", "label", "split", "used_as"]].to_csv(index=False))
        if ctx.show_progress:
            n_par = sum(p.numel() for p in prep.model.parameters()) / 1e6
            tqdm.write(f"rheumai train: {len(train_df)} train ({n_pos} positive), {len(val_df)} val ({val_how}); "
                       f"{prep.summary} {n_par:.1f} M parameters, {d.world} process(es) on {ctx.device.type}")
    history: list[dict[str, Any]] = []
    record = cfg.to_dict()
    for i, stage in enumerate(prep.stages):
        last = i == len(prep.stages) - 1
        sdir = out if len(prep.stages) == 1 else out / stage.name
        params = stage.setup(prep.model) if stage.setup else None
        fc = tc.fit_config(epochs=(last and last_epochs) or stage.epochs, lr=stage.lr, num_workers=cfg.data.num_workers,
                           collect_val_outputs=collect and last,
                           bn_recalibration=stage.bn_recalibration or tc.bn_recalibration)
        res = fit(prep.model, prep.train_ds, prep.val_ds, {"out": head}, fc, sdir,
                  ctx.progress, ctx.should_stop, resume and find_training_state(sdir / "state") is not None,
                  recal_ds=prep.recal_ds, batch_transform=stage.batch_transform, params=params,
                  train_mode=stage.train_mode, config_record=record, resumable=RESUMABLE_CHANGES,
                  show_progress=ctx.show_progress,
                  desc=f"training ({stage.name})" if len(prep.stages) > 1 else "training")
        history += [dict(h, stage=stage.name) for h in res.history] if len(prep.stages) > 1 else res.history
        if res.stopped:
            return TrainResult(out, None, res.epochs_run, res.best_epoch, res.best_score, None, stopped=True,
                               history=history)
    if collect:  # a fold run: its held-out probabilities are the result
        probs = [head.decode(torch.as_tensor(e["out"]))["probability"] for e in res.epoch_val_outputs]
        return TrainResult(out, None, res.epochs_run, res.best_epoch, None, None, history=history,
                           epoch_probabilities=np.asarray(probs, dtype=float))
    sc, ev = cfg.selection, cfg.evaluate
    choice, val_report, val_cal = threshold_choice, None, None
    if res.val_outputs is not None and prep.val_ds is not None:
        pv, yv = head.decode(res.val_outputs["out"])["probability"], val_df["label"].to_numpy(dtype=int)
        if choice is None:
            choice = choose_threshold_with_ci(yv, pv, str(rule), "validation", sc.min_threshold_positives,
                                              sc.threshold_ci_bootstrap, ev.alpha, tc.seed)
        val_report = binary_report(yv, pv, choice.value, alpha=ev.alpha, auc_method=ev.auc_ci,
                                   n_boot=min(ev.n_bootstrap, 1000), seed=tc.seed, n_bins=ev.calibration_bins)
        try:
            val_cal = logistic_calibration(yv, pv, ev.alpha)
        except (ValueError, np.linalg.LinAlgError):
            val_cal = None  # one class, or separable: no finite intercept / slope
        if d.main:
            write_text(out / "val_predictions.csv", pd.DataFrame(
                {"patient_id": val_df["patient_id"].astype(str), "label": yv, "probability": pv,
                 "predicted": (pv >= choice.value).astype(int)}).to_csv(index=False))
    elif choice is None:
        choice = choose_threshold_with_ci([], [], str(rule), "validation", sc.min_threshold_positives)
        choice.note = "no validation set: probability 0.5 used" if rule.kind != "fixed" else choice.note
    ckpt = None
    if d.main:
        card = {
            "task": ctx.recipe.task, **prep.card, "heads": {"out": head.describe()}, "output": ctx.recipe.output,
            "threshold": float(choice.value), "threshold_rule": str(rule), "threshold_note": choice.note,
            "threshold_selection": asdict(choice), "model_selection": selection,
            "training_data": {
                "n_train": len(train_df), "n_train_positive": n_pos, "n_val": len(val_df),
                "n_val_positive": int(val_df["label"].sum()), "val_source": val_how,
                "n_test_held_out": int((ctx.df["split"] == "test").sum()),
                "sites": int(ctx.df["site"].nunique()) if "site" in ctx.df.columns else None,
            },
            "metrics": {"validation": val_report and validation_summary(val_report), "calibration": val_cal},
            "training": {"epochs_run": res.epochs_run, "epochs_planned": last_epochs or prep.stages[-1].epochs,
                         "early_stopped": res.early_stopped, "best_epoch": res.best_epoch,
                         "weights": "best_val_auc" if res.weights == "best" else "last",
                         "stages": [{"name": s.name, "epochs": s.epochs, "lr": s.lr} for s in prep.stages],
                         "world_size": res.world_size, "bn_recalibration": res.bn_recalibration,
                         "device": res.device, "amp": res.amp, "channels_last": res.channels_last,
                         "config": (saved_config or cfg).to_dict(),
                         "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "software": software_versions(),
        }
        ckpt = save_checkpoint(out / "model", prep.model, card)
        if ctx.show_progress:
            auc_txt = f"{val_report['auc']['value']:.3f}" if val_report else "n/a"
            tqdm.write(f"rheumai train: checkpoint {ckpt} (val AUC {auc_txt}, threshold {choice.value:.3f}, "
                       f"{choice.note})")
    d.barrier()
    return TrainResult(out, ckpt or out / "model", res.epochs_run, res.best_epoch, res.best_score,
                       float(choice.value), early_stopped=res.early_stopped, history=history)
