"""Hand SvdH cohorts: label sheets -> prepared radiographs -> torch datasets (engine sample dicts).

Frames. Every radiograph is mirrored into the canonical frame of a left hand (``to_canonical``);
``Prepared.canon`` is the canonical full-resolution image, normalised to [0, 1] by its 1st / 99th
percentiles. ``Prepared.small`` (whole-hand and landmark input) and ``Prepared.hires`` (joint
crops are sampled from it) are the canonical image resized, aspect kept, padded bottom / right with
0, to ``input_size`` / ``hires_size`` (H, W). Points are pixel (x, y); ``to_small`` / ``to_hires``
and their inverses map them between the canonical full-resolution frame and those grids (pixel
centres aligned). Joint crops are ``crop_mm`` wide, ``crop_px`` pixels, axis aligned in the
canonical frame, so radiographs of any pixel size give the same physical crop.

Label sheet (CSV): ``patient_id, file`` (path relative to the sheet's folder), optional
``laterality`` (L / R; else the DICOM tag), ``total`` (one-hand SvdH total), optional ``class``
(else computed from ``total`` with the class edges) and per-area ``ero_<joint>`` / ``jsn_<joint>``
(empty = not scored / unknown), optional ``split`` (train / val / test). Landmark sheet (CSV):
``patient_id, joint, x, y`` (pixels of the file). Samples follow docs/ENGINE.md: ``{"input", "target", "id"}``.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from ...errors import InputError
from ...radiograph import CanonicalTransform, Radiograph, read_radiograph, to_canonical
from .scoring import DEFAULT_CLASS_EDGES, EROSION_MASK, JOINT_NAMES, JSN_MASK, MAX_TOTAL, severity_class

IGNORE = -1  # target value of a grade that is not scored / unknown


@dataclass
class HandParams:
    """Preprocessing of the task (goes into the model card). input_size (H, W) px of the whole-hand
    and landmark input; hires_size (H, W) px of the image joint crops are sampled from; crop_mm:
    side of a joint crop in mm; crop_px: its side in pixels; percentiles for normalisation."""

    input_size: tuple[int, int] = (160, 128)
    hires_size: tuple[int, int] = (320, 256)
    crop_mm: float = 30.0
    crop_px: int = 32
    canonical_side: str = "L"
    p_low: float = 1.0
    p_high: float = 99.0
    class_edges: tuple[float, ...] = DEFAULT_CLASS_EDGES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HandParams":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Prepared:
    """One radiograph ready for the networks (see module docstring for frames).

    canon: (H, W) canonical full resolution, normalised. hires: canonical letterboxed to
    ``hires_size`` (joint crops are sampled from it); small: canonical letterboxed to
    ``input_size`` (whole-hand and landmark input). hscale / scale: (sy, sx) hires / small px per
    canonical px. hspacing_mm: (row, col) mm per hires pixel.
    """

    rad: Radiograph
    canon: np.ndarray
    tf: CanonicalTransform
    hires: np.ndarray
    hscale: tuple[float, float]
    small: np.ndarray
    scale: tuple[float, float]

    @property
    def hspacing_mm(self) -> tuple[float, float]:
        return (self.rad.spacing_mm[0] / self.hscale[0], self.rad.spacing_mm[1] / self.hscale[1])

    @staticmethod
    def _map(xy: np.ndarray, s: tuple[float, float], inverse: bool = False) -> np.ndarray:
        xy = np.asarray(xy, np.float64)
        fx, fy = (1 / s[1], 1 / s[0]) if inverse else (s[1], s[0])
        return np.stack([(xy[..., 0] + 0.5) * fx - 0.5, (xy[..., 1] + 0.5) * fy - 0.5], -1)

    def to_small(self, xy: np.ndarray) -> np.ndarray:
        """Canonical full-res (x, y) -> small (input) pixels."""
        return self._map(xy, self.scale)

    def from_small(self, xy: np.ndarray) -> np.ndarray:
        return self._map(xy, self.scale, inverse=True)

    def to_hires(self, xy: np.ndarray) -> np.ndarray:
        return self._map(xy, self.hscale)

    def from_hires(self, xy: np.ndarray) -> np.ndarray:
        return self._map(xy, self.hscale, inverse=True)

    def to_source(self, xy_canon: np.ndarray) -> np.ndarray:
        """Canonical full-resolution (x, y) -> pixel (x, y) of the radiograph as stored."""
        return self.tf.points_from_canonical(xy_canon)

    def from_source(self, xy: np.ndarray) -> np.ndarray:
        return self.tf.points_to_canonical(xy)

    def small_map_to_source(self, m: np.ndarray) -> np.ndarray:
        """A map (h, w) on the input grid -> (H, W) on the radiograph as stored (bilinear)."""
        H, W = self.canon.shape
        nh, nw = round(H * self.scale[0]), round(W * self.scale[1])
        t = torch.as_tensor(np.asarray(m, np.float32)[:nh, :nw])[None, None]
        up = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
        return self.tf.map_from_canonical(up)


def _letterbox(canon: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, tuple[float, float]]:
    H, W = canon.shape
    h, w = int(size[0]), int(size[1])
    s = min(h / H, w / W)
    nh, nw = max(1, round(H * s)), max(1, round(W * s))
    out = np.zeros((h, w), np.float32)
    if (nh, nw) == (H, W):
        out[:H, :W] = canon
    else:
        t = torch.from_numpy(canon)[None, None]
        out[:nh, :nw] = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True,
                                      align_corners=False)[0, 0].numpy()
    return out, (nh / H, nw / W)


def prepare(rad: Radiograph, params: HandParams, laterality: str | None = None) -> Prepared:
    """Canonical, normalised, resized radiograph (see module docstring)."""
    canon, tf = to_canonical(rad, want=params.canonical_side, laterality=laterality)
    lo, hi = np.percentile(canon, [params.p_low, params.p_high])
    canon = np.clip((canon - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    hires, hscale = _letterbox(canon, params.hires_size)
    small, scale = _letterbox(canon, params.input_size)
    return Prepared(rad=rad, canon=canon, tf=tf, hires=hires, hscale=hscale, small=small, scale=scale)


def crop_batch(hires: torch.Tensor, points_hires: torch.Tensor, hspacing_mm: torch.Tensor,
               params: HandParams) -> torch.Tensor:
    """Joint crops (B, K, c, c) from hires images (B, 1, H, W) at points (B, K, 2) hires px, 0 outside.

    hspacing_mm: (B, 2) (row, col) mm per hires pixel. Crops are axis-aligned, ``crop_mm`` wide,
    ``crop_px`` square (``grid_sample``, bilinear).
    """
    B, K, _ = points_hires.shape
    n = params.crop_px
    H, W = hires.shape[-2:]
    off = (torch.arange(n, dtype=torch.float32, device=points_hires.device) - (n - 1) / 2.0) * (params.crop_mm / n)
    step = 1.0 / hspacing_mm.float()  # (B, 2) hires px per mm (row, col)
    gx = points_hires[..., 0, None, None] + off[None, None, None, :] * step[:, 1, None, None, None]
    gy = points_hires[..., 1, None, None] + off[None, None, :, None] * step[:, 0, None, None, None]
    gx, gy = torch.broadcast_tensors(gx, gy)
    grid = torch.stack([gx * 2 / max(W - 1, 1) - 1, gy * 2 / max(H - 1, 1) - 1], -1).reshape(B * K, n, n, 2)
    img = hires.expand(B, 1, H, W).repeat_interleave(K, dim=0)
    out = F.grid_sample(img, grid.to(hires.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(B, K, n, n)


def crops(prep: Prepared, points_canon: np.ndarray, params: HandParams) -> np.ndarray:
    """Joint crops (K, c, c) of one prepared radiograph around canonical full-res points (K, 2)."""
    pts = torch.as_tensor(prep.to_hires(points_canon), dtype=torch.float32)[None]
    sp = torch.tensor([prep.hspacing_mm], dtype=torch.float32)
    return crop_batch(torch.from_numpy(prep.hires)[None, None], pts, sp, params)[0].numpy()


@dataclass
class Case:
    """One labelled radiograph: prepared image, truth (grades IGNORE where unknown), landmarks."""

    patient_id: str
    prep: Prepared
    total: float
    cls: int
    erosion: np.ndarray  # (K,) int, IGNORE where not scored
    jsn: np.ndarray
    points_canon: np.ndarray | None  # (K, 2) canonical full-res px, NaN where unknown
    extra: dict[str, Any] = field(default_factory=dict)


def _num(v: str, sheet: Path, pid: str, col: str) -> float | None:
    v = (v or "").strip()
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise InputError(sheet, f"patient {pid}: column {col!r} is not a number: {v!r}") from None


def load_cohort(labels_csv: str | Path, params: HandParams, landmarks_csv: str | Path | None = None,
                progress: bool = False) -> list[Case]:
    """Read and prepare every radiograph of a label sheet (see module docstring for columns)."""
    sheet = Path(labels_csv)
    if not sheet.is_file():
        raise InputError(sheet, "label sheet not found")
    with open(sheet, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(sheet, "label sheet is empty")
    for col in ("patient_id", "file"):
        if col not in rows[0]:
            raise InputError(sheet, f"missing column {col!r} (columns: {', '.join(rows[0])})")
    points: dict[str, np.ndarray] = {}
    if landmarks_csv is not None:
        lm = Path(landmarks_csv)
        if not lm.is_file():
            raise InputError(lm, "landmark sheet not found")
        jidx = {n: i for i, n in enumerate(JOINT_NAMES)}
        with open(lm, newline="", encoding="utf-8-sig") as f:
            for r in csv.DictReader(f):
                if r.get("joint") not in jidx:
                    raise InputError(lm, f"unknown joint {r.get('joint')!r}; known: {', '.join(JOINT_NAMES)}")
                arr = points.setdefault(r["patient_id"], np.full((len(JOINT_NAMES), 2), np.nan))
                arr[jidx[r["joint"]]] = (float(r["x"]), float(r["y"]))
    if len({r["patient_id"].strip() for r in rows}) < len(rows):
        raise InputError(sheet, "a patient appears twice")
    cases = []
    for r in tqdm(rows, desc="reading radiographs", unit="img", disable=not progress):
        pid = r["patient_id"].strip()
        lat = (r.get("laterality") or "").strip().upper() or None
        if lat not in (None, "L", "R"):
            raise InputError(sheet, f"patient {pid}: laterality must be L or R, not {lat!r}")
        if r.get("split", "").strip() not in ("", "train", "val", "test"):
            raise InputError(sheet, f"patient {pid}: split must be train, val or test, not {r['split']!r}")
        prep = prepare(read_radiograph((sheet.parent / r["file"]).resolve()), params, laterality=lat)
        grades = {}
        for key, mask in (("ero", EROSION_MASK), ("jsn", JSN_MASK)):
            v = [_num(r.get(f"{key}_{n}", ""), sheet, pid, f"{key}_{n}") for n in JOINT_NAMES]
            grades[key] = np.array([IGNORE if g is None or not m else int(g) for g, m in zip(v, mask)], np.int64)
        ero, jsn = grades["ero"], grades["jsn"]
        total = _num(r.get("total", ""), sheet, pid, "total")
        if total is None:
            if (ero[EROSION_MASK] < 0).any() or (jsn[JSN_MASK] < 0).any():
                raise InputError(sheet, f"patient {pid}: no 'total' and incomplete per-joint grades")
            total = float(ero[EROSION_MASK].sum() + jsn[JSN_MASK].sum())
        if not 0 <= total <= MAX_TOTAL:
            raise InputError(sheet, f"patient {pid}: total {total} outside 0..{MAX_TOTAL} (one hand)")
        cls_v = _num(r.get("class", ""), sheet, pid, "class")
        cls = int(cls_v) if cls_v is not None else int(severity_class(total, params.class_edges))
        pts = points.get(pid)
        cases.append(Case(pid, prep, float(total), cls, ero, jsn, None if pts is None else prep.from_source(pts),
                          {k: r[k].strip() for k in ("hand_length_mm", "split") if (r.get(k) or "").strip()}))
    return cases


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity augmentation of a [0, 1] image: gamma, contrast, noise (geometry untouched)."""
    x = np.clip(x, 0, 1) ** rng.uniform(0.75, 1.33)
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    return (x + rng.normal(0, 0.02, x.shape)).astype(np.float32)


class WholeHandDataset(Dataset):
    """Whole-hand samples: input (1, h, w) (``Prepared.small``, augmented per (seed, epoch, index));
    target {"total": () one-hand total, "class": () index}."""

    def __init__(self, cases: Sequence[Case], augment: bool = False, seed: int = 0) -> None:
        self.cases, self.augment, self.seed, self.epoch = list(cases), augment, seed, 0

    def __len__(self) -> int:
        return len(self.cases)

    def target(self, c: Case) -> dict[str, torch.Tensor]:
        return {"total": torch.tensor(c.total, dtype=torch.float32), "class": torch.tensor(c.cls, dtype=torch.long)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.cases[i]
        x = _augment(c.prep.small, np.random.default_rng((self.seed, self.epoch, i))) if self.augment else c.prep.small
        return {"input": torch.from_numpy(np.ascontiguousarray(x))[None], "target": self.target(c), "id": c.patient_id}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def unaugmented(self) -> "WholeHandDataset":
        """The same cases without augmentation (the engine's BatchNorm recalibration)."""
        return type(self)(self.cases, augment=False, seed=self.seed)


class LandmarkDataset(WholeHandDataset):
    """Landmark samples (cases with landmarks): input as :class:`WholeHandDataset`; target
    {"landmarks": (K, 2) (x, y) input px, NaN unknown}."""

    def __init__(self, cases: Sequence[Case], augment: bool = False, seed: int = 0) -> None:
        super().__init__([c for c in cases if c.points_canon is not None], augment, seed)

    def target(self, c: Case) -> dict[str, torch.Tensor]:
        return {"landmarks": torch.from_numpy(c.prep.to_small(c.points_canon).astype(np.float32))}


class JointDataset(Dataset):
    """Per-joint samples at the true landmarks: input {"x": (1, c, c), "joint": ()}; target
    {"erosion", "jsn"} (IGNORE = -1). ``jitter_mm``: random shift (SD, mm) of each crop centre, drawn
    anew per epoch (training on imperfect points); an epoch's crops are computed at once."""

    def __init__(self, cases: Sequence[Case], params: HandParams, jitter_mm: float = 0.0, augment: bool = False,
                 seed: int = 0) -> None:
        self.cases, self.params, self.jitter, self.augment = list(cases), params, jitter_mm, augment
        missing = [c.patient_id for c in self.cases if c.points_canon is None]
        if missing:
            raise ValueError(f"no landmarks to crop at for {', '.join(missing)}")
        self.K = len(JOINT_NAMES)
        self.seed, self.epoch = seed, 0
        self._crops = self._make_crops()

    def _make_crops(self) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch, 7))
        out = []
        for c in self.cases:
            p = np.nan_to_num(np.asarray(c.points_canon, np.float64), nan=-1e4)
            if self.jitter > 0:
                p = p + rng.normal(0, self.jitter, p.shape) / np.array(c.prep.rad.spacing_mm[::-1])
            out.append(crops(c.prep, p, self.params))
        return np.stack(out) if out else np.zeros((0, self.K, self.params.crop_px, self.params.crop_px), np.float32)

    def __len__(self) -> int:
        return len(self.cases) * self.K

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, j = divmod(i, self.K)
        c = self.cases[ci]
        x = self._crops[ci, j]
        if self.augment:
            x = _augment(x, np.random.default_rng((self.seed, self.epoch, i)))
        return {"input": {"x": torch.from_numpy(np.ascontiguousarray(x))[None], "joint": torch.tensor(j)},
                "target": {"erosion": torch.tensor(int(c.erosion[j])), "jsn": torch.tensor(int(c.jsn[j]))},
                "id": f"{c.patient_id}:{JOINT_NAMES[j]}"}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            if self.jitter > 0:
                self._crops = self._make_crops()

    def unaugmented(self) -> "JointDataset":
        return JointDataset(self.cases, self.params, seed=self.seed)


class HandDataset(Dataset):
    """Whole-task samples for :class:`.model.HandSvdHNet`: input {"small", "hires", "hspacing"};
    target {"total", "class", "landmarks" (K, 2) hires px, "erosion" (K,), "jsn" (K,)}."""

    def __init__(self, cases: Sequence[Case]) -> None:
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.cases[i]
        p = c.prep
        pts = np.full((len(JOINT_NAMES), 2), np.nan) if c.points_canon is None else p.to_hires(c.points_canon)
        return {"input": {"small": torch.from_numpy(p.small)[None], "hires": torch.from_numpy(p.hires)[None],
                          "hspacing": torch.tensor(p.hspacing_mm, dtype=torch.float32)},
                "target": {"total": torch.tensor(c.total, dtype=torch.float32),
                           "class": torch.tensor(c.cls, dtype=torch.long),
                           "landmarks": torch.as_tensor(pts, dtype=torch.float32),
                           "erosion": torch.from_numpy(c.erosion), "jsn": torch.from_numpy(c.jsn)},
                "id": c.patient_id}
