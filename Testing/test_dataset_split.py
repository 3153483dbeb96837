"""Patient-level splits: no leakage, stratification, seeding, k-fold, external site."""

from __future__ import annotations

from collections import Counter

import pytest

from rheumai.dataset.split import SplitConfig, assign_splits
from rheumai.errors import InputError

# 100 patients, 30 positive; two sites; ids deliberately unsorted.
PATIENTS = [(f"P{(k * 37) % 100:03d}", int(k % 10 < 3), "A" if k % 4 else "B") for k in range(100)]


def _share(split, name):
    ids = [p for p, (s, _) in split.items() if s == name]
    labels = dict((p, y) for p, y, _ in PATIENTS)
    return len(ids), sum(labels[p] for p in ids)


def test_holdout_60_40_stratified_no_leakage():
    split = assign_splits(PATIENTS, SplitConfig())
    assert sorted(split) == sorted(p for p, _, _ in PATIENTS)  # every patient exactly once
    assert _share(split, "train") == (60, 18) and _share(split, "test") == (40, 12)
    assert {f for _, f in split.values()} == {-1}


def test_seeded_and_order_independent():
    a = assign_splits(PATIENTS, SplitConfig(seed=3))
    assert assign_splits(list(reversed(PATIENTS)), SplitConfig(seed=3)) == a
    assert assign_splits(PATIENTS, SplitConfig(seed=4)) != a


def test_validation_part_and_kfold():
    split = assign_splits(PATIENTS, SplitConfig(train_fraction=0.8, val_fraction=0.25))
    assert _share(split, "train") == (60, 18) and _share(split, "val") == (20, 6) and _share(split, "test") == (20, 6)
    folds = assign_splits(PATIENTS, SplitConfig(kfold=5))
    train = [p for p, (s, _) in folds.items() if s == "train"]
    assert len(train) == 60 and Counter(folds[p][1] for p in train) == {k: 12 for k in range(5)}
    labels = dict((p, y) for p, y, _ in PATIENTS)
    assert all(sum(labels[p] for p in train if folds[p][1] == k) in (3, 4) for k in range(5))
    assert all(f == -1 for s, f in folds.values() if s == "test")
    everyone = assign_splits(PATIENTS, SplitConfig(train_fraction=1.0, kfold=4))
    assert {s for s, _ in everyone.values()} == {"train"} and len({f for _, f in everyone.values()}) == 4


def test_external_site():
    split = assign_splits(PATIENTS, SplitConfig(test_sites=("B",)))
    site = {p: s for p, _, s in PATIENTS}
    assert all((s == "test") == (site[p] == "B") for p, (s, _) in split.items())
    with pytest.raises(InputError, match="no included patient from test site\\(s\\) C; sites present: A, B"):
        assign_splits(PATIENTS, SplitConfig(test_sites=("C",)))
    with pytest.raises(InputError, match="needs a site for every patient; none for: X1"):
        assign_splits(PATIENTS + [("X1", 0, "")], SplitConfig(test_sites=("B",)))
    with pytest.raises(InputError, match="nothing left to train on"):
        assign_splits(PATIENTS, SplitConfig(test_sites=("A", "B")))


def test_impossible_stratification_and_bad_config():
    few = [("a", 1, ""), ("b", 0, ""), ("c", 0, ""), ("d", 0, "")]
    with pytest.raises(InputError, match="cannot draw a stratified test set"):
        assign_splits(few, SplitConfig(train_fraction=0.5))
    with pytest.raises(InputError, match="cannot make 3 stratified folds"):
        assign_splits(few, SplitConfig(train_fraction=1.0, kfold=3))
    with pytest.raises(ValueError, match="either kfold or val_fraction"):
        SplitConfig(kfold=5, val_fraction=0.2)
    with pytest.raises(ValueError, match="train_fraction"):
        SplitConfig(train_fraction=0.0)
