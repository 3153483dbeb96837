"""Patient-level, label-stratified, seeded splits (scikit-learn's splitters): random hold-out
(default 60:40 train:test, as in the paper) with an optional validation part of train; k folds
over the non-test patients (StratifiedKFold); or an external-site test set. One row per patient,
sorted by id first, so the same patients, labels and seed always give the same split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from sklearn.model_selection import StratifiedKFold, train_test_split

from ..errors import InputError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """train_fraction: share of (non-external) patients for training, the rest is test.
    val_fraction: share of the training part moved to "val". kfold: number of folds over the
    training part (0 = none). test_sites: external-site test set (train_fraction then ignored)."""

    train_fraction: float = 0.6
    val_fraction: float = 0.0
    kfold: int = 0
    test_sites: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "test_sites", tuple(self.test_sites))
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], not {self.train_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.kfold == 1 or self.kfold < 0:
            raise ValueError(f"kfold must be 0 (off) or >= 2, not {self.kfold}")
        if self.kfold and self.val_fraction:
            raise ValueError("use either kfold or val_fraction (the folds provide the validation sets)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "test_sites": list(self.test_sites)}

    def describe(self) -> str:
        if self.test_sites:
            s = f"external site: test = site(s) {', '.join(self.test_sites)}, train = other sites"
        else:
            s = f"random {self.train_fraction:.0%} train / {1 - self.train_fraction:.0%} test"
        if self.val_fraction:
            s += f", {self.val_fraction:.0%} of train as val"
        if self.kfold:
            s += f", {self.kfold}-fold over train"
        return s + f"; patient level, stratified by label, seed {self.seed}"


def _holdout(ids: list[str], labels: list[int], fraction: float, seed: int, what: str) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (keep, held out) with ``fraction`` held out, stratified by label."""
    try:
        keep, held = train_test_split(ids, test_size=fraction, stratify=labels, random_state=seed, shuffle=True)
    except ValueError as exc:
        raise InputError(None, f"cannot draw a stratified {what} set of {fraction:.0%} from {len(ids)} patients "
                               f"(label counts {dict(sorted(Counter(labels).items()))}): {exc}") from None
    return sorted(keep), sorted(held)


def assign_splits(patients: Sequence[tuple[str, int, str]], cfg: SplitConfig) -> dict[str, tuple[str, int]]:
    """patients: (patient_id, label 0/1, site). Returns patient_id -> (split, fold); fold -1 if none."""
    rows = sorted(patients)
    ids = [p for p, _, _ in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate patient ids given to assign_splits")
    label = {p: int(y) for p, y, _ in rows}
    site = {p: s for p, _, s in rows}
    if cfg.test_sites:
        missing = [p for p in ids if not site[p]]
        if missing:
            raise InputError(None, "external-site split needs a site for every patient; none for: "
                                   + ", ".join(missing))
        test = [p for p in ids if site[p] in cfg.test_sites]
        train = [p for p in ids if site[p] not in cfg.test_sites]
        if not test:
            raise InputError(None, f"no included patient from test site(s) {', '.join(cfg.test_sites)}; "
                                   f"sites present: {', '.join(sorted(set(site.values())))}")
        if not train:
            raise InputError(None, "every included patient is from a test site: nothing left to train on")
    elif cfg.train_fraction < 1.0:
        train, test = _holdout(ids, [label[p] for p in ids], 1.0 - cfg.train_fraction, cfg.seed, "test")
    else:
        train, test = ids, []
    val: list[str] = []
    if cfg.val_fraction:
        train, val = _holdout(train, [label[p] for p in train], cfg.val_fraction, cfg.seed + 1, "validation")
    out = {p: (name, -1) for name, part in (("test", test), ("val", val), ("train", train)) for p in part}
    if cfg.kfold:
        y = [label[p] for p in train]
        if len(set(y)) < 2 or min(Counter(y).values()) < cfg.kfold:
            raise InputError(None, f"cannot make {cfg.kfold} stratified folds from {len(train)} training patients "
                                   f"(label counts {dict(sorted(Counter(y).items()))})")
        skf = StratifiedKFold(n_splits=cfg.kfold, shuffle=True, random_state=cfg.seed)
        for k, (_, idx) in enumerate(skf.split(train, y)):
            for i in idx:
                out[train[i]] = ("train", k)
    return dict(sorted(out.items()))
