"""mSASSS cohorts and training samples (the engine's dict convention).

A cohort table ``studies.csv`` (patient_id, view, file [, split]) with ``labels.csv`` beside it
(one row per landmark, see :mod:`.synth`); :func:`load_cohort` reads every radiograph into a
:class:`ViewRecord`. :class:`LandmarkDataset`: the whole view letterboxed to the network input,
target ``{"keypoints": (21, 2)}`` (x, y) input pixels. :class:`LevelCropDataset`: one disc-level
crop (:func:`.crops.level_grid`), targets per corner slot (0 = top = lower corner of the vertebra
above, 1 = bottom): ``erosion / sclerosis / squaring / syndesmophyte`` (2,), ``bridging`` (1,),
``not_scorable`` (2,), ``ordinal`` (2,) score 0-3, ``corners`` (2, 2) crop pixels; NaN where a
corner is not scorable (ignored by the losses). A vertical flip swaps the two slots' labels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...errors import InputError
from ...normalize import normalize_intensity
from ...radiograph import read_radiograph
from .anatomy import VIEWS, disc_levels, point_names
from .crops import fit_grid, level_grid
from .scoring import CORNER_LESIONS


@dataclass
class ViewRecord:
    """One lateral view with its truth: points (21, 2) pixels; per-corner dicts (24 scored corners)."""

    patient_id: str
    view: str
    array: np.ndarray
    spacing_mm: tuple[float, float]
    points_xy: np.ndarray
    findings: dict[str, dict[str, bool]] = field(default_factory=dict)
    scorable: dict[str, bool] = field(default_factory=dict)
    scores: dict[str, int | None] = field(default_factory=dict)
    path: str = ""
    split: str = ""

    @property
    def bridged(self) -> dict[str, bool]:
        return {lvl.name: bool(self.findings.get(lvl.corners[0], {}).get("bridging", False))
                for lvl in disc_levels(self.view)}


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(path, "missing (an mSASSS cohort needs studies.csv and labels.csv beside it)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(path, f"missing column(s) {missing}")
        return list(reader)


def load_cohort(table: str | Path) -> list[ViewRecord]:
    """Read the views and truth of a cohort: its ``studies.csv`` or the folder holding it."""
    table = Path(table)
    root = table if table.is_dir() else table.parent
    table = root / "studies.csv" if table.is_dir() else table
    studies = _read_csv(table, ("patient_id", "view", "file"))
    splits = {s.get("split") or "" for s in studies}
    if splits != {""} and not splits <= {"train", "val", "test"}:
        raise InputError(table, "the split column must say train, val or test for every row, or be absent")
    labels_csv = root / "labels.csv"
    by_view: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for r in _read_csv(labels_csv, ("patient_id", "view", "point", "x", "y", "scored", "scorable", "score",
                                    *CORNER_LESIONS, "bridging")):
        by_view.setdefault((r["patient_id"], r["view"]), {})[r["point"]] = r
    out = []
    for s in studies:
        pid, view = s["patient_id"], s["view"]
        if view not in VIEWS:
            raise InputError(table, f"patient {pid}: unknown view {view!r} (views: {', '.join(VIEWS)})")
        path = (root / s["file"]).resolve()
        if root.resolve() not in path.parents:
            raise InputError(table, f"patient {pid}: file {s['file']!r} lies outside the cohort folder")
        rows, names = by_view.get((pid, view), {}), point_names(view)
        missing = [n for n in names if n not in rows]
        if missing:
            raise InputError(labels_csv, f"patient {pid} {view}: points missing: {', '.join(missing)}")
        rad = read_radiograph(path)
        try:
            rec = ViewRecord(pid, view, rad.array.astype(np.float32), rad.spacing_mm,
                             np.array([[float(rows[n]["x"]), float(rows[n]["y"])] for n in names]), path=str(path),
                             split=s.get("split") or "")
            for n in (n for n in names if rows[n]["scored"] == "1"):
                rec.scorable[n] = rows[n]["scorable"] == "1"
                rec.scores[n] = int(rows[n]["score"]) if rows[n]["score"] != "" else None
                rec.findings[n] = {les: rows[n][les] == "1" for les in (*CORNER_LESIONS, "bridging")}
        except ValueError as exc:
            raise InputError(labels_csv, f"patient {pid} {view}: {exc}") from None
        out.append(rec)
    return out


class LandmarkDataset(Dataset):
    """Whole views letterboxed to ``shape``; target the 21 points in input pixels."""

    def __init__(self, records: Sequence[ViewRecord], shape: tuple[int, int], augment: bool = False,
                 seed: int = 0) -> None:
        self.records, self.shape, self.augment, self.seed = list(records), shape, augment, seed
        self.rng = np.random.default_rng(seed)
        self.norm = [normalize_intensity(r.array) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation per epoch (the engine calls this), so a resumed run sees the same samples."""
        self.rng = np.random.default_rng((self.seed, epoch))

    def unaugmented(self) -> "LandmarkDataset":
        return LandmarkDataset(self.records, self.shape)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        rng = self.rng if self.augment else None
        grid = fit_grid(rec.array.shape, self.shape, rng, rotate_deg=6.0, scale=0.06, shift=0.04)
        x = grid.sample(self.norm[i])
        if self.augment:
            x = np.clip(x * self.rng.uniform(0.8, 1.2) + self.rng.uniform(-0.1, 0.1), 0, 1)
            x = x ** self.rng.uniform(0.8, 1.25)
        return {"input": torch.from_numpy(x[None].astype(np.float32)), "id": rec.patient_id,
                "target": {"keypoints": torch.from_numpy(grid.from_source(rec.points_xy).astype(np.float32))}}


def crop_targets(rec: ViewRecord, level: int) -> dict[str, np.ndarray]:
    """Per-slot targets of one disc level (module doc); NaN where a corner is not scorable."""
    lvl = disc_levels(rec.view)[level]
    ok = np.array([rec.scorable.get(c, True) for c in lvl.corners], bool)
    t = {les: np.where(ok, [float(rec.findings.get(c, {}).get(les, False)) for c in lvl.corners], np.nan)
         for les in CORNER_LESIONS}
    t["bridging"] = np.array([float(rec.bridged[lvl.name]) if ok.all() else np.nan])
    t["not_scorable"] = (~ok).astype(float)
    t["ordinal"] = np.array([np.nan if rec.scores.get(c) is None else rec.scores[c] for c in lvl.corners], float)
    return {k: v.astype(np.float32) for k, v in t.items()}


class LevelCropDataset(Dataset):
    """Disc-level crops of views; ``index`` lists (record, level) pairs (default: all, in order).

    augment: jittered crop placement (``jitter`` = (mm, deg, scale)), vertical flip with the slot
    labels swapped (``flip``), intensity changes. ``keypoints``: the target is the two corners only
    (``{"keypoints": (2, 2)}``, the refinement network's).
    """

    def __init__(self, records: Sequence[ViewRecord], index: Sequence[tuple[int, int]] | None = None,
                 size: int = 48, augment: bool = False, jitter: tuple[float, float, float] = (1.5, 6.0, 0.08),
                 flip: bool = True, seed: int = 0, side_factor: float = 0.9, keypoints: bool = False) -> None:
        self.records, self.keypoints = list(records), keypoints
        self.side_factor, self.seed = side_factor, seed
        self.index = list(index) if index is not None else [(r, l) for r in range(len(self.records)) for l in range(6)]
        self.size, self.augment, self.jitter, self.flip = size, augment, jitter, flip
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the augmentation per epoch (the engine calls this), so a resumed run sees the same crops."""
        self.rng = np.random.default_rng((self.seed, epoch))

    def unaugmented(self) -> "LevelCropDataset":
        return LevelCropDataset(self.records, self.index, self.size, side_factor=self.side_factor,
                                keypoints=self.keypoints)

    def targets(self, k: int) -> dict[str, np.ndarray]:
        r, lvl = self.index[k]
        return crop_targets(self.records[r], lvl)

    def __getitem__(self, k: int) -> dict[str, Any]:
        r, lvl = self.index[k]
        rec, aug, (jm, jd, js) = self.records[r], self.augment, self.jitter
        grid = level_grid(rec.points_xy, rec.view, lvl, rec.spacing_mm, self.size, side_factor=self.side_factor,
                          rng=self.rng if aug else None, jitter_mm=jm, jitter_deg=jd, jitter_scale=js)
        x = grid.sample(rec.array)
        flip = aug and self.flip and bool(self.rng.random() < 0.5)
        if aug:
            x = x * self.rng.uniform(0.8, 1.2) + self.rng.normal(0, 0.01 * float(x.std() + 1e-6), x.shape)
        x = normalize_intensity(x, method="zscore")[::-1 if flip else 1]
        sample: dict[str, Any] = {"id": f"{rec.patient_id}:{rec.view}:{disc_levels(rec.view)[lvl].name}",
                                  "input": torch.from_numpy(np.ascontiguousarray(x[None], np.float32))}
        t = crop_targets(rec, lvl)
        t["corners"] = grid.from_source(rec.points_xy[[point_names(rec.view).index(c)
                                                       for c in disc_levels(rec.view)[lvl].corners]])
        if flip:  # the flipped crop shows the level upside down: the slots swap
            t = {name: v[::-1].copy() for name, v in t.items()}
            t["corners"][:, 1] = self.size - 1 - t["corners"][:, 1]
        if self.keypoints:
            t = {"keypoints": t["corners"]}
        sample["target"] = {name: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for name, v in t.items()}
        return sample


def imbalance_indices(positive: np.ndarray, rng: np.random.Generator, neg_per_pos: float = 3.0,
                      pos_repeat: int = 3) -> np.ndarray:
    """Indices for one training epoch: every positive ``pos_repeat`` times (oversampling) and
    negatives reduced at random to ``neg_per_pos`` per positive (all when fewer), shuffled.

    The paper reduces negatives to 1:3 and oversamples positives; with the defaults the epoch is
    balanced 1:1. No positives: all negatives.
    """
    pos = np.flatnonzero(positive)
    neg = np.flatnonzero(~np.asarray(positive, bool))
    if len(pos) == 0:
        return rng.permutation(neg)
    n_neg = min(len(neg), int(round(neg_per_pos * len(pos))))
    idx = np.concatenate([np.repeat(pos, pos_repeat), rng.choice(neg, n_neg, replace=False)])
    return rng.permutation(idx)


def split_patients(patient_ids: Sequence[str], fractions: tuple[float, float, float] = (0.6, 0.1, 0.3),
                   seed: int = 0) -> dict[str, str]:
    """Patient-level split {patient_id: "train" | "val" | "test"} (seeded, by sorted IDs)."""
    ids = sorted(set(patient_ids))
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_tr = int(round(fractions[0] * len(ids)))
    n_va = int(round(fractions[1] * len(ids)))
    out = {}
    for rank, k in enumerate(perm):
        out[ids[k]] = "train" if rank < n_tr else ("val" if rank < n_tr + n_va else "test")
    return out


def cohort_split(records: Sequence[ViewRecord], fractions: Sequence[float], seed: int) -> dict[str, str]:
    """{patient_id: "train" | "val" | "test"}: the cohort table's ``split`` column where it has one,
    else :func:`split_patients` (seeded)."""
    if records and records[0].split:
        return {r.patient_id: r.split for r in records}
    return split_patients([r.patient_id for r in records], tuple(fractions), seed)
