"""Stacking ensemble of whole-hand networks (the paper's ensembles): a scikit-learn meta-learner on
out-of-fold base predictions.

Per base architecture (e.g. ResNet and MobileNetV2), k networks train on k-1 folds of the training
patients (through the engine) and predict the held-out fold. The meta-learner
(``LinearRegression(positive=True)``: a non-negative weighted sum plus an intercept) is fitted on
those out-of-fold predictions; at prediction time each base's fold networks are averaged and the
meta-learner combines the bases. Fold networks are checkpoints (``<base>_fold<k>/model``), the
meta-learner is ``stacking.json`` (coefficients, never pickled).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import StratifiedKFold

from ...atomic import write_json
from ...checkpoint import load_checkpoint, save_checkpoint
from ...engine.fit import predict
from .dataset import Case, HandParams, WholeHandDataset
from .model import WholeHandNet


@dataclass
class StackingEnsemble:
    """Meta-learner over base predictions (columns in ``bases`` order): total = X @ coef + intercept."""

    bases: list[str]
    coef: list[float]
    intercept: float
    oof_metrics: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, float) @ np.asarray(self.coef, float) + self.intercept


def predict_totals(nets: Sequence[WholeHandNet], cases: Sequence[Case]) -> np.ndarray:
    """Mean predicted total (one-hand SvdH) of ``nets`` per case."""
    ds = WholeHandDataset(cases)
    preds = [predict(n, ds, torch.device("cpu"), batch_size=32)[0]["total"].reshape(-1).numpy()
             * float(n.total_scale) for n in nets]
    return np.mean(preds, axis=0)


def _pcc_mae(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"pcc": float(np.corrcoef(p, y)[0, 1]), "mae": float(np.abs(p - y).mean())}


def fit_stacking(cases: Sequence[Case], base_archs: dict[str, dict[str, Any]], cfg: Any, out_dir: str | Path,
                 k: int = 3, seed: int = 0, **kw: Any) -> tuple[StackingEnsemble, dict[str, list[WholeHandNet]]]:
    """Out-of-fold training of each base (folds stratified by severity class), the meta-learner,
    and the fold networks per base; writes ``out_dir`` (see module docstring). ``kw``: passed to
    :func:`.train.train_whole` (engine progress, resume...)."""
    from .train import merge_small_classes, train_whole

    out = Path(out_dir)
    y = np.array([c.total for c in cases], float)
    cls = [c.cls for c in cases]
    n_splits = max(2, min(k, int(np.bincount(cls).max())))
    strat = merge_small_classes(cls, n_splits)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), strat)
    oof = np.zeros((len(cases), len(base_archs)))
    nets: dict[str, list[WholeHandNet]] = {name: [] for name in base_archs}
    for f, (tr, te) in enumerate(folds):
        for b, (name, arch) in enumerate(base_archs.items()):
            net = train_whole([cases[i] for i in tr], None, arch, cfg, out / f"{name}_fold{f}", seed + f, **kw)
            save_checkpoint(out / f"{name}_fold{f}" / "model", net, {
                "task": "hand_svdh", "architecture": arch, "preprocessing": HandParams().to_dict(),
                "threshold": None, "threshold_rule": None})
            oof[te, b] = predict_totals([net], [cases[i] for i in te])
            nets[name].append(net)
    meta = LinearRegression(positive=True).fit(oof, y)
    metrics = {name: _pcc_mae(oof[:, b], y) for b, name in enumerate(base_archs)}
    metrics["stacked_in_sample"] = _pcc_mae(meta.predict(oof), y)
    ens = StackingEnsemble(list(base_archs), [float(c) for c in meta.coef_], float(meta.intercept_), metrics)
    write_json(out / "stacking.json", dict(asdict(ens), folds=n_splits,
                                           meta_learner="sklearn LinearRegression(positive=True)"))
    return ens, nets


def load_stacking(folder: str | Path) -> tuple[StackingEnsemble, dict[str, list[WholeHandNet]]]:
    """The ensemble written by :func:`fit_stacking` (meta-learner + fold checkpoints)."""
    import json

    d = json.loads((Path(folder) / "stacking.json").read_text(encoding="utf-8"))
    ens = StackingEnsemble(d["bases"], d["coef"], d["intercept"], d["oof_metrics"])
    return ens, {b: [load_checkpoint(Path(folder) / f"{b}_fold{f}" / "model")[0] for f in range(d["folds"])]
                 for b in ens.bases}


def predict_stacked(ens: StackingEnsemble, nets: dict[str, list[WholeHandNet]], cases: Sequence[Case]
                    ) -> dict[str, np.ndarray]:
    """Per-base (fold-averaged) and stacked totals for ``cases``."""
    cols = {name: predict_totals(nets[name], cases) for name in ens.bases}
    return dict(cols, stacked=ens.predict(np.stack([cols[n] for n in ens.bases], 1)))
