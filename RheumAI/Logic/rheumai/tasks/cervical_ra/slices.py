"""Slice selection: the paper's 6 x 512 x 512 input (six middle sagittal slices at 1 mm), and the way back.

Only the selection grid's points are sampled (sagittal frame, :mod:`rheumai.geometry`, centred on
the volume or an override; SimpleITK, linear by default), over the part overlapping the source;
:func:`select_slices_full_resample` is the literal "resample everything, then pick" reference.
Arrays (C, H, W) = (slices right -> left, rows superior -> inferior, columns anterior -> posterior);
points outside the source's field of view are 0 after normalisation (``mask`` marks those inside).
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ... import __version__
from ...atomic import atomic_path, write_json
from ...errors import InputError
from ...geometry import SAGITTAL_FRAME, Grid, corners, image_from_array, snap_frame, voxel_center
from ...io import Study
from ...normalize import METHODS, normalize_intensity

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline3,
}
FRAMES = ("acquisition", "patient")


@dataclass(frozen=True)
class SliceParams:
    """How the network input is sampled. Defaults are the paper's.

    n_slices: sagittal slices (channels). spacing_mm: isotropic sampling step (mm).
    size: in-plane (H, W) = (superior-inferior, anterior-posterior) in pixels; centre crop or
    zero pad. center_lps: slab centre (LPS mm) instead of the volume centre. lr_mm: only the
    left-right centre, as an LPS x coordinate (mm; Slicer's RAS R = -x). frame: "acquisition"
    keeps a slightly oblique acquisition's planes, "patient" samples along the pure LPS axes.
    norm: intensity normalisation after selection (see :mod:`rheumai.normalize`).
    """

    n_slices: int = 6
    spacing_mm: float = 1.0
    size: tuple[int, int] = (512, 512)
    center_lps: tuple[float, float, float] | None = None
    lr_mm: float | None = None
    frame: str = "acquisition"
    interpolator: str = "linear"
    norm: str = "percentile"
    norm_lower: float = 1.0
    norm_upper: float = 99.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if self.center_lps is not None:
            object.__setattr__(self, "center_lps", tuple(float(c) for c in self.center_lps))
        if self.n_slices < 1 or self.spacing_mm <= 0 or len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"invalid slice parameters: {self}")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, not '{self.frame}'")
        if self.interpolator not in INTERPOLATORS:
            raise ValueError(f"interpolator must be one of {tuple(INTERPOLATORS)}, not '{self.interpolator}'")
        if self.norm not in METHODS:
            raise ValueError(f"norm must be one of {METHODS}, not '{self.norm}'")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["center_lps"] = None if self.center_lps is None else list(self.center_lps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SliceParams":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def digest(self) -> str:
        """Stable hash of the parameters (for caches)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SliceSelection:
    """Selected slices with their sampling grid and provenance.

    array: float32 (C, H, W), normalised. mask: bool (C, H, W), True inside the source's field
    of view. grid: the selection grid (size in (i, j, k) = (W, H, C)). source_grid: the grid of
    the source image, so maps can be sent back without re-reading it.
    """

    array: np.ndarray
    mask: np.ndarray
    grid: Grid
    source_grid: Grid
    params: SliceParams
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def slab_center(self) -> np.ndarray:
        """Centre of the selection grid, LPS mm."""
        return self.grid.index_to_physical((np.asarray(self.grid.size) - 1) / 2.0)

    def grid_image(self, arr: np.ndarray | None = None) -> sitk.Image:
        """``arr`` (default: the selected slices) as an image on the selection grid."""
        arr = self.array if arr is None else np.asarray(arr, dtype=np.float32)
        return image_from_array(arr, self.grid)

    def to_source(self, arr: np.ndarray, interpolator: str = "linear") -> sitk.Image:
        """Map a (C, H, W) array on the selection grid into the source image's exact grid.

        Same origin, spacing, direction and size as the source; 0 outside the selected slab.
        Linear interpolation covers the slab's full thickness (ITK's half-voxel border rule).
        """
        g = self.source_grid  # geometry given directly: no reference image of the source's size is allocated
        return sitk.Resample(self.grid_image(arr), [int(v) for v in g.size], sitk.Transform(),
                             INTERPOLATORS[interpolator],
                             [float(v) for v in g.origin], [float(v) for v in g.spacing],
                             [float(v) for v in g.direction_matrix.ravel()], 0.0, sitk.sitkFloat32)

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write ``stem.npy`` (array) and ``stem.json`` (grid, mask bounds, params, provenance)."""
        stem = Path(stem)
        npy, meta = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(self.array, dtype=np.float32))
        write_json(meta, {
            "grid": self.grid.to_dict(),
            "source_grid": self.source_grid.to_dict(),
            "params": self.params.to_dict(),
            "provenance": self.provenance,
            "mask_packed": _pack_mask(self.mask),
        })
        return npy, meta

    @classmethod
    def load(cls, stem: str | Path, mmap: bool = False) -> "SliceSelection":
        stem = Path(stem)
        npy, meta_path = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        try:
            meta = json.loads(meta_path.read_text())
            array = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(stem, f"is not a readable slice selection ({exc})") from None
        grid = Grid.from_dict(meta["grid"])
        return cls(array=array, mask=_unpack_mask(meta["mask_packed"], array.shape), grid=grid,
                   source_grid=Grid.from_dict(meta["source_grid"]),
                   params=SliceParams.from_dict(meta["params"]), provenance=meta["provenance"])


def _pack_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compact JSON storage of a bool mask: packed bits, zlib-compressed, base64 text."""
    return {"shape": list(mask.shape),
            "zlib_b64": base64.b64encode(zlib.compress(np.packbits(mask.astype(bool)).tobytes())).decode()}


def _unpack_mask(d: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(d["zlib_b64"])), dtype=np.uint8)
    return np.unpackbits(bits)[: int(np.prod(shape))].reshape(shape).astype(bool)


def selection_grid(image: sitk.Image, params: SliceParams) -> Grid:
    """The selection grid for ``image``: sagittal frame, centred, (W, H, C) points at spacing_mm."""
    if params.frame == "acquisition":
        frame = snap_frame(np.asarray(image.GetDirection()).reshape(3, 3), SAGITTAL_FRAME)
    else:
        frame = SAGITTAL_FRAME.copy()
    center = np.asarray(params.center_lps, dtype=float) if params.center_lps is not None else voxel_center(image)
    if params.lr_mm is not None:
        center = center.copy()
        center[0] = float(params.lr_mm)
    h, w = params.size
    size = np.array([w, h, params.n_slices])
    spacing = np.full(3, float(params.spacing_mm))
    origin = center - frame @ (spacing * (size - 1) / 2.0)
    return Grid(origin=tuple(map(float, origin)), direction=tuple(tuple(map(float, r)) for r in frame),
                spacing=tuple(map(float, spacing)), size=tuple(map(int, size)))


def _overlap_window(image: sitk.Image, grid: Grid) -> tuple[np.ndarray, np.ndarray] | None:
    """Index box [lo, hi] (inclusive, (i, j, k)) of grid points that may fall inside ``image``."""
    idx = grid.physical_to_index(corners(image))
    lo = np.maximum(np.floor(idx.min(axis=0)) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(idx.max(axis=0)) + 1, np.asarray(grid.size) - 1).astype(int)
    if np.any(hi < lo):
        return None
    return lo, hi


def _inside_mask(image: sitk.Image, grid: Grid, eps: float = 1e-4) -> np.ndarray:
    """(k, j, i) bool: grid points whose continuous source index lies in [-0.5, N - 0.5].

    Computed analytically with a small tolerance (``eps`` voxel) instead of ITK's own bounds
    test, because symmetric grids put points exactly on the half-voxel border, where rounding
    would make the decision depend on how the source happens to be stored.
    """
    src = Grid.of(image)
    m = np.linalg.inv(src.direction_matrix * np.asarray(src.spacing)[None, :])
    g = grid.direction_matrix * np.asarray(grid.spacing)[None, :]
    a = m @ g  # source continuous index per grid index step
    b = m @ (np.asarray(grid.origin) - np.asarray(src.origin))
    n = np.asarray(src.size, dtype=float)
    wi, hj, ck = (np.arange(s, dtype=float) for s in grid.size)
    inside = np.ones(tuple(grid.size[::-1]), dtype=bool)
    for ax in range(3):
        ci = (b[ax] + a[ax, 0] * wi[None, None, :] + a[ax, 1] * hj[None, :, None] + a[ax, 2] * ck[:, None, None])
        inside &= (ci >= -0.5 - eps) & (ci <= n[ax] - 0.5 + eps)
    return inside


def _resample_window(image: sitk.Image, grid: Grid, interpolator: int) -> tuple[np.ndarray, np.ndarray]:
    """Values and inside-mask on ``grid`` (k, j, i), resampling only the overlapping window."""
    shape = tuple(grid.size[::-1])
    values = np.zeros(shape, dtype=np.float32)
    inside = np.zeros(shape, dtype=bool)
    win = _overlap_window(image, grid)
    if win is None:
        return values, inside
    lo, hi = win
    sub = Grid(origin=tuple(grid.index_to_physical(lo)), direction=grid.direction, spacing=grid.spacing,
               size=tuple(int(v) for v in hi - lo + 1))
    res = _resample(image, sub, interpolator)
    sl = tuple(slice(int(l), int(h) + 1) for l, h in zip(lo[::-1], hi[::-1]))
    values[sl] = res
    inside[sl] = _inside_mask(image, sub)
    values[~inside] = 0.0
    return values, inside


def _resample(image: sitk.Image, grid: Grid, interpolator: int) -> np.ndarray:
    """Resample onto ``grid``; points on or just past the border take the nearest edge value."""
    res = sitk.Resample(image, grid.reference_image(), sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32,
                        True)  # useNearestNeighborExtrapolator: the mask decides what is outside
    return sitk.GetArrayFromImage(res)


def select_slices(source: Study | sitk.Image, params: SliceParams = SliceParams(),
                  source_path: str | None = None) -> SliceSelection:
    """Select the task input from a study (or a bare LPS image): see the module docstring.

    Raises :class:`InputError` when a requested slice lies entirely outside the image.
    """
    image, provenance = _unpack_source(source, source_path)
    grid = selection_grid(image, params)
    raw, inside = _resample_window(image, grid, INTERPOLATORS[params.interpolator])
    return _finish(raw, inside, grid, image, params, provenance)


def select_slices_full_resample(source: Study | sitk.Image, params: SliceParams = SliceParams(),
                                source_path: str | None = None) -> SliceSelection:
    """Reference implementation: resample the whole volume to the isotropic grid, then pick.

    The full grid is the selection grid extended by whole steps until it covers the source, so
    the picked points are the same physical points. Slow; for tests and benchmarks.
    """
    image, provenance = _unpack_source(source, source_path)
    grid = selection_grid(image, params)
    idx = grid.physical_to_index(corners(image))
    lo = np.floor(idx.min(axis=0)).astype(int) - 1
    hi = np.ceil(idx.max(axis=0)).astype(int) + 1
    full = Grid(origin=tuple(grid.index_to_physical(lo)), direction=grid.direction, spacing=grid.spacing,
                size=tuple(int(v) for v in hi - lo + 1))
    vol = _resample(image, full, INTERPOLATORS[params.interpolator])
    ins = _inside_mask(image, full)
    vol[~ins] = 0.0
    # Pick the selection window out of the full volume (zero where the window leaves it).
    shape = tuple(grid.size[::-1])
    raw = np.zeros(shape, np.float32)
    inside = np.zeros(shape, bool)
    src_lo = -lo[::-1]  # selection index 0 sits at full index -lo
    dst, srcs = [], []
    for ax in range(3):
        a0 = max(0, -src_lo[ax])
        a1 = min(shape[ax], vol.shape[ax] - src_lo[ax])
        dst.append(slice(a0, max(a0, a1)))
        srcs.append(slice(a0 + src_lo[ax], max(a0, a1) + src_lo[ax]))
    raw[tuple(dst)] = vol[tuple(srcs)]
    inside[tuple(dst)] = ins[tuple(srcs)]
    return _finish(raw, inside, grid, image, params, provenance)


def _unpack_source(source: Study | sitk.Image, source_path: str | None) -> tuple[sitk.Image, dict[str, Any]]:
    if isinstance(source, Study):
        image = source.image
        prov = {"source_path": source.path, "series_uid": source.series_uid,
                "meta": {k: source.meta[k] for k in ("PatientID", "StudyInstanceUID", "SeriesDescription",
                                                      "Modality", "StudyDate") if k in source.meta}}
    elif isinstance(source, sitk.Image):
        image = source
        prov = {"source_path": source_path, "series_uid": None, "meta": {}}
    else:
        raise TypeError(f"expected a Study or a SimpleITK image, got {type(source).__name__}")
    if image.GetDimension() != 3:
        raise InputError(prov["source_path"], f"is {image.GetDimension()}D; a 3D volume is needed")
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    prov["rheumai_version"] = __version__
    return image, prov


def _finish(raw: np.ndarray, inside: np.ndarray, grid: Grid, image: sitk.Image, params: SliceParams,
            provenance: dict[str, Any]) -> SliceSelection:
    empty = [c for c in range(inside.shape[0]) if not inside[c].any()]
    if empty:
        lr = grid.index_to_physical(np.array([[0, 0, c] for c in empty]))[:, 0]
        xs = corners(image)[:, 0]
        raise InputError(provenance.get("source_path"),
                         f"slice(s) {empty} of the selection (LPS x = {np.round(lr, 1).tolist()} mm) lie outside "
                         f"the image, whose left-right extent is [{xs.min():.1f}, {xs.max():.1f}] mm (LPS x); "
                         f"move the centre or use fewer slices")
    arr = normalize_intensity(raw, inside, params.norm, params.norm_lower, params.norm_upper)
    provenance = dict(provenance, params=params.to_dict())
    return SliceSelection(array=arr, mask=inside, grid=grid, source_grid=Grid.of(image), params=params,
                          provenance=provenance)


def params_from(base: SliceParams | None = None, **overrides: Any) -> SliceParams:
    """``base`` (default: the paper's) with the non-None ``overrides`` applied."""
    base = base or SliceParams()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})

