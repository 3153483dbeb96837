"""NegSpA-AI preprocessing: per sequence, sample the sacroiliac box, normalise, split into joint halves.

LPS mm; arrays (k, j, i) = (slice, row, column). Lu et al. read the joints on oblique-coronal slices;
all three sequences are sampled on the same coronal planes, in the coronal-like frame of one reference
series (default the fat-suppressed one, :func:`rheumai.geometry.snap_frame` onto :data:`CORONAL_FRAME`),
so the inputs are aligned whatever each series' geometry (MixCut relies on it). As in the published
code, three slices per sequence are the channels (``n_slices``, centred on the box, ``slice_spacing_mm``
apart, A -> P). The box splits at its centre into halves, each on its own grid with columns lateral ->
medial (the left half mirrored), rows S -> I; half 0 = patient right. Intensity:
:func:`rheumai.normalize.normalize_intensity` per sequence over both halves together (asymmetry
survives), over points inside the series' field of view.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ...atomic import atomic_path, write_json
from ...errors import InputError
from ...geometry import Grid, image_from_array, snap_frame
from ...io import Study, _as_volume, read_study
from ...normalize import METHODS, normalize_intensity

ROLES = ("t1", "t2", "stir")
HALVES = ("right", "left")
# Columns: i = patient right -> left (LPS +x), j = superior -> inferior (-z), k = anterior -> posterior (+y).
CORONAL_FRAME = np.array([[1.0, 0.0, 0.0],
                          [0.0, 0.0, 1.0],
                          [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in LPS mm (both sacroiliac joints)."""

    min_lps: tuple[float, float, float]
    max_lps: tuple[float, float, float]

    def __post_init__(self) -> None:
        lo, hi = np.asarray(self.min_lps, float), np.asarray(self.max_lps, float)
        if lo.shape != (3,) or hi.shape != (3,) or np.any(hi <= lo):
            raise ValueError(f"box needs 3 min and 3 max LPS coordinates with max > min, got {self.min_lps}, "
                             f"{self.max_lps}")
        object.__setattr__(self, "min_lps", tuple(map(float, lo)))
        object.__setattr__(self, "max_lps", tuple(map(float, hi)))

    @property
    def center(self) -> np.ndarray:
        return (np.asarray(self.min_lps) + np.asarray(self.max_lps)) / 2

    def corners(self) -> np.ndarray:
        return np.array(list(itertools.product(*zip(self.min_lps, self.max_lps))))

    def to_dict(self) -> dict[str, Any]:
        return {"min_lps": list(self.min_lps), "max_lps": list(self.max_lps), "coordinate_system": "LPS", "unit": "mm"}

    @classmethod
    def from_center_size(cls, center_lps: Any, size_mm: Any) -> "Box":
        c, s = np.asarray(center_lps, float), np.abs(np.asarray(size_mm, float))
        return cls(tuple(c - s / 2), tuple(c + s / 2))


def box_from_dict(d: Mapping[str, Any], source: str | Path | None = None) -> Box:
    """Box from {"min_lps", "max_lps"}, {"center_lps", "size_mm"}, or a Slicer markups ROI (.mrk.json)."""
    try:
        if "min_lps" in d:
            return Box(tuple(d["min_lps"]), tuple(d["max_lps"]))
        if "center_lps" in d:
            return Box.from_center_size(d["center_lps"], d["size_mm"])
        if "markups" in d:
            roi = next(m for m in d["markups"] if m.get("type") == "ROI")
            center, size = np.asarray(roi["center"], float), np.asarray(roi["size"], float)
            axes = np.asarray(roi.get("orientation", np.eye(3).ravel()), float).reshape(3, 3)
            if roi.get("coordinateSystem", "LPS") == "RAS":  # RAS -> LPS: negate x and y
                flip = np.diag([-1.0, -1.0, 1.0])
                center, axes = flip @ center, flip @ axes
            half = np.abs(axes) @ (size / 2)  # axis-aligned bounds of a possibly rotated ROI
            return Box(tuple(center - half), tuple(center + half))
    except (KeyError, TypeError, ValueError, StopIteration) as exc:
        raise InputError(source, f"not a valid box ({exc})") from None
    raise InputError(source, "box JSON needs min_lps + max_lps, center_lps + size_mm, or a markups ROI")


def read_box(box: Box | Mapping[str, Any] | str | Path) -> Box:
    """A box as given, from a dict (:func:`box_from_dict`), or read from JSON or a one-row CSV with columns
    min_x,min_y,min_z,max_x,max_y,max_z (LPS mm) or center_x,center_y,center_z,size_x,size_y,size_z."""
    if isinstance(box, (Box, Mapping)):
        return box if isinstance(box, Box) else box_from_dict(box)
    path = Path(box)
    if not path.is_file():
        raise InputError(path, "box file not found")
    if path.suffix.lower() == ".csv":
        try:
            row = pd.read_csv(path).iloc[0]
            if "min_x" in row:
                return Box(tuple(row[f"min_{a}"] for a in "xyz"), tuple(row[f"max_{a}"] for a in "xyz"))
            return Box.from_center_size([row[f"center_{a}"] for a in "xyz"], [row[f"size_{a}"] for a in "xyz"])
        except (KeyError, IndexError, ValueError, pd.errors.ParserError) as exc:
            raise InputError(path, f"box CSV needs min_x..max_z or center_x..size_z columns in LPS mm ({exc})"
                             ) from None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"box file is not valid JSON: {exc}") from None
    return box_from_dict(d, path)


as_box = read_box


@dataclass(frozen=True)
class NegSpaParams:
    """size: (H, W) pixels per joint half; n_slices per sequence (channels), slice_spacing_mm apart
    (A -> P); pixel_mm: in-plane step (mm), None = the smallest that fits the half box; frame:
    "acquisition" (the ``frame_reference`` series' coronal-like planes, for all sequences) or
    "patient" (pure LPS coronal); norm: see rheumai.normalize."""

    size: tuple[int, int] = (224, 224)
    n_slices: int = 3
    slice_spacing_mm: float = 4.0
    pixel_mm: float | None = None
    frame: str = "acquisition"
    frame_reference: str = "stir"
    norm: str = "percentile"
    norm_lower: float = 1.0
    norm_upper: float = 99.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if len(self.size) != 2 or min(self.size) < 8 or self.n_slices < 1 or self.slice_spacing_mm <= 0:
            raise ValueError(f"invalid NegSpA parameters: {self}")
        if self.pixel_mm is not None and self.pixel_mm <= 0:
            raise ValueError("pixel_mm must be positive")
        for name, allowed in (("frame", ("acquisition", "patient")), ("norm", METHODS),
                              ("frame_reference", ROLES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NegSpaParams":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def half_grids(frame: np.ndarray, box: Box, params: NegSpaParams) -> tuple[Grid, Grid]:
    """The (right, left) half grids in ``frame``; columns lateral -> medial (see module doc)."""
    u_i, u_j, u_k = frame.T
    ext_i, ext_j = np.ptp((box.corners() - box.center) @ frame[:, :2], axis=0)
    h, w = params.size
    px = float(params.pixel_mm) if params.pixel_mm else max(ext_i / 2 / w, ext_j / h)
    spacing = np.array([px, px, float(params.slice_spacing_mm)])
    size = np.array([w, h, params.n_slices])
    grids = []
    for sign in (-1.0, 1.0):  # right half (towards -x), then left half (towards +x)
        centre = box.center + sign * u_i * (w * px / 2)  # halves meet at the box centre
        d = np.stack([-sign * u_i, u_j, u_k], axis=1)  # columns lateral -> medial
        origin = centre - d @ (spacing * (size - 1) / 2)
        grids.append(Grid.from_dict({"origin": origin, "direction": d, "spacing": spacing, "size": size}))
    return grids[0], grids[1]


def _resample(image: sitk.Image, grid: Grid, interpolator: int) -> np.ndarray:
    out = sitk.Resample(image, grid.reference_image(), sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


@dataclass
class SequenceSample:
    """One sequence's input. array/mask: (2, C, H, W) = (half right/left, slice A->P, row S->I,
    column lateral->medial); grids: the two half grids; source_grid: the series' own grid."""

    role: str
    array: np.ndarray
    mask: np.ndarray
    grids: tuple[Grid, Grid]
    source_grid: Grid
    source_path: str | None = None

    def to_source(self, maps: np.ndarray, interpolator: int = sitk.sitkLinear) -> sitk.Image:
        """(2, C, H, W) maps on the half grids -> one float32 image on the series' exact grid
        (0 outside the sampled slab; the halves do not overlap, the max joins them)."""
        maps = np.asarray(maps, np.float32)
        if maps.shape != self.array.shape:
            raise ValueError(f"maps shape {maps.shape} differs from the sample's {self.array.shape}")
        ref = self.source_grid.reference_image()
        halves = [sitk.Resample(image_from_array(np.ascontiguousarray(m), g), ref, sitk.Transform(),
                                interpolator, 0.0, sitk.sitkFloat32) for m, g in zip(maps, self.grids)]
        return sitk.Maximum(*halves)


@dataclass
class NegSpaSample:
    """A study's network input: one :class:`SequenceSample` per role (:data:`ROLES` order)."""

    sequences: dict[str, SequenceSample]
    box: Box
    params: NegSpaParams
    provenance: dict[str, Any] = field(default_factory=dict)

    def stacked(self) -> np.ndarray:
        """float32 (S, 2, C, H, W): sequence (t1, t2, stir), half, slice, row, column."""
        return np.stack([self.sequences[r].array for r in ROLES]).astype(np.float32)

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """``stem.npy`` (the stacked array) + ``stem.json`` (grids, box, params, provenance)."""
        stem = Path(stem)
        npy, meta = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        with atomic_path(npy) as tmp:
            np.save(tmp, self.stacked())  # tmp ends in .npy: no suffix added
        write_json(meta, {
            "format": "rheumai-negspa-sample/1", "roles": list(ROLES), "box": self.box.to_dict(),
            "params": self.params.to_dict(), "provenance": self.provenance,
            "sequences": {r: {"grids": [g.to_dict() for g in s.grids], "source_grid": s.source_grid.to_dict(),
                              "source_path": s.source_path, "inside_fraction": float(s.mask.mean())}
                          for r, s in self.sequences.items()}})
        return npy, meta


def _as_image(src: Any, role: str) -> tuple[sitk.Image, str | None]:
    """A 3D float32 volume (checked by :mod:`rheumai.io`) and its path, from a path, Study or image."""
    if isinstance(src, (str, Path)):
        src = read_study(src)
    if isinstance(src, sitk.Image):
        src = Study(src, None)  # type: ignore[arg-type]
    if isinstance(src, Study):  # also a Study made from a bare image (rheumai.io.as_study): checked here
        return _as_volume(src.image, src.path or f"{role} image"), src.path
    raise InputError(None, f"{role}: expected a path, a Study or a SimpleITK image, got {type(src).__name__}")


def preprocess(study_inputs: Mapping[str, Any], params: Mapping[str, Any] | NegSpaParams | None = None) -> NegSpaSample:
    """The task's preprocessing: each series sampled, masked to its field of view and normalised on the
    two half grids. ``study_inputs``: {"t1", "t2", "stir": path | Study | image, "box": Box | dict |
    path}; ``params``: NegSpaParams or its dict (defaults: 224 x 224, 3 slices)."""
    p = params if isinstance(params, NegSpaParams) else NegSpaParams.from_dict(dict(params or {}))
    missing = [r for r in (*ROLES, "box") if study_inputs.get(r) is None]
    if missing:
        raise InputError(None, f"NegSpA-AI needs the T1, T2 and fat-suppressed (STIR/SPAIR) series and a box; "
                               f"missing: {', '.join(missing)}")
    box = read_box(study_inputs["box"])
    loaded = {role: _as_image(study_inputs[role], role) for role in ROLES}
    ref = loaded[p.frame_reference][0]
    frame = CORONAL_FRAME if p.frame == "patient" else snap_frame(np.reshape(ref.GetDirection(), (3, 3)),
                                                                 CORONAL_FRAME)
    grids = half_grids(frame, box, p)
    seqs = {}
    for role, (image, path) in loaded.items():
        ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(image)
        mask = np.stack([_resample(ones, g, sitk.sitkNearestNeighbor) > 0.5 for g in grids])
        if not mask.any():
            raise InputError(path, f"the sacroiliac box {list(box.min_lps)}..{list(box.max_lps)} (LPS mm) "
                                   f"lies outside the {role} series")
        raw = np.stack([_resample(image, g, sitk.sitkLinear) for g in grids])
        arr = normalize_intensity(raw, mask, p.norm, p.norm_lower, p.norm_upper)
        seqs[role] = SequenceSample(role, arr, mask, grids, Grid.of(image), path)
    return NegSpaSample(sequences=seqs, box=box, params=p, provenance={"sources": {r: path for r, (_, path) in
                                                                                   loaded.items()}})
