"""Stacking ensemble of whole-hand networks (the paper's ensembles): a scikit-learn meta-learner on
out-of-fold base predictions.

For each base architecture (e.g. ResNet and MobileNetV2), k networks are trained on k-1 folds of the
training patients (through the engine) and predict the held-out fold: every training patient gets
one out-of-fold prediction per base. The meta-learner (``LinearRegression(positive=True)``: a
non-negative weighted sum plus an intercept, so it cannot overfit the few base columns) is fitted on
those predictions against the truth. At prediction time each base's k fold networks are averaged
and the meta-learner combines the bases. The meta-learner is stored as JSON (coefficients), never
pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import StratifiedKFold

from ...atomic import write_json
from .dataset import Case, WholeHandDataset
from .model import WholeHandNet
from .train import StageConfig, run_network, train_whole


@dataclass
class StackingEnsemble:
    """Meta-learner over base predictions (columns in ``bases`` order): total = X @ coef + intercept."""

    bases: list[str]
    coef: list[float]
    intercept: float
    oof_metrics: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, float) @ np.asarray(self.coef, float) + self.intercept

    def to_dict(self) -> dict[str, Any]:
        return {"bases": self.bases, "coef": self.coef, "intercept": self.intercept,
                "meta_learner": "sklearn LinearRegression(positive=True)", "oof_metrics": self.oof_metrics}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StackingEnsemble":
        return cls(list(d["bases"]), [float(c) for c in d["coef"]], float(d["intercept"]), d.get("oof_metrics", {}))


def predict_totals(nets: Sequence[WholeHandNet], cases: Sequence[Case], total_scale: float) -> np.ndarray:
    """Mean predicted total of ``nets`` per case."""
    ds = WholeHandDataset(cases)
    preds = [run_network(n, ds)["total"].reshape(-1).numpy() * total_scale for n in nets]
    return np.mean(preds, axis=0)


def fit_stacking(cases: Sequence[Case], base_archs: dict[str, dict[str, Any]], cfg: StageConfig, out_dir: str | Path,
                 k: int = 3, seed: int = 0, progress: Callable[..., Any] | None = None
                 ) -> tuple[StackingEnsemble, dict[str, list[WholeHandNet]]]:
    """Out-of-fold training of each base, the meta-learner, and the fold networks per base.

    Folds are stratified by severity class (patient level: one radiograph per patient here).
    Writes ``out_dir/stacking.json`` (meta-learner + out-of-fold figures).
    """
    y = np.array([c.total for c in cases], float)
    strat = np.array([c.cls for c in cases])
    n_splits = max(2, min(k, int(np.bincount(strat).max())))
    folds = list(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)),
                                                                                            _mergeable(strat, n_splits)))
    oof = np.zeros((len(cases), len(base_archs)))
    nets: dict[str, list[WholeHandNet]] = {}
    for b, (name, arch) in enumerate(base_archs.items()):
        nets[name] = []
        for f, (tr, te) in enumerate(folds):
            net = train_whole([cases[i] for i in tr], None, arch, cfg, Path(out_dir) / f"{name}_fold{f}", seed + f,
                              progress=progress)
            oof[te, b] = predict_totals([net], [cases[i] for i in te], float(arch["total_scale"]))
            nets[name].append(net)
    meta = LinearRegression(positive=True).fit(oof, y)
    stacked = meta.predict(oof)
    metrics = {name: {"pcc": float(np.corrcoef(oof[:, b], y)[0, 1]), "mae": float(np.abs(oof[:, b] - y).mean())}
               for b, name in enumerate(base_archs)}
    metrics["stacked_in_sample"] = {"pcc": float(np.corrcoef(stacked, y)[0, 1]), "mae": float(np.abs(stacked - y).mean())}
    ens = StackingEnsemble(list(base_archs), [float(c) for c in meta.coef_], float(meta.intercept_), metrics)
    write_json(Path(out_dir) / "stacking.json", ens.to_dict())
    return ens, nets


def _mergeable(strat: np.ndarray, n_splits: int) -> np.ndarray:
    """Severity classes with fewer members than folds are merged into their lower neighbour."""
    s = strat.copy()
    for c in sorted(np.unique(s))[::-1]:
        if (s == c).sum() < n_splits and c > s.min():
            s[s == c] = max(v for v in np.unique(s) if v < c)
    return s


def predict_stacked(ens: StackingEnsemble, nets: dict[str, list[WholeHandNet]], cases: Sequence[Case],
                    total_scale: float) -> dict[str, np.ndarray]:
    """Per-base (fold-averaged) and stacked totals for ``cases``."""
    cols = {name: predict_totals(nets[name], cases, total_scale) for name in ens.bases}
    with torch.no_grad():
        stacked = ens.predict(np.stack([cols[n] for n in ens.bases], 1))
    return dict(cols, stacked=stacked)
