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

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline3}
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
        for name, allowed in (("frame", FRAMES), ("interpolator", tuple(INTERPOLATORS)), ("norm", METHODS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not '{getattr(self, name)}'")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SliceParams":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

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
        return image_from_array(self.array if arr is None else np.asarray(arr, dtype=np.float32), self.grid)

    def to_source(self, arr: np.ndarray) -> sitk.Image:
        """Map a (C, H, W) array on the selection grid into the source image's exact grid.

        Same origin, spacing, direction and size as the source; 0 outside the selected slab.
        Linear interpolation covers the slab's full thickness (ITK's half-voxel border rule).
        """
        g = self.source_grid  # geometry given directly: no reference image of the source's size is allocated
        return sitk.Resample(self.grid_image(arr), [int(v) for v in g.size], sitk.Transform(),
                             sitk.sitkLinear, [float(v) for v in g.origin], [float(v) for v in g.spacing],
                             [float(v) for v in g.direction_matrix.ravel()], 0.0, sitk.sitkFloat32)

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write ``stem.npy`` (array) and ``stem.json`` (grids, params, provenance, packed mask)."""
        stem = Path(stem)
        npy, meta = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        with atomic_path(npy) as tmp:  # keeps the .npy suffix: np.save appends none
            np.save(tmp, np.ascontiguousarray(self.array, dtype=np.float32))
        bits = zlib.compress(np.packbits(self.mask.astype(bool)).tobytes())
        write_json(meta, {"grid": self.grid.to_dict(), "source_grid": self.source_grid.to_dict(),
                          "params": self.params.to_dict(), "provenance": self.provenance,
                          "mask_packed": {"shape": list(self.mask.shape),
                                          "zlib_b64": base64.b64encode(bits).decode()}})
        return npy, meta

    @classmethod
    def load(cls, stem: str | Path) -> "SliceSelection":
        stem = Path(stem)
        npy, meta_path = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        try:
            meta = json.loads(meta_path.read_text())
            array = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(stem, f"is not a readable slice selection ({exc})") from None
        bits = zlib.decompress(base64.b64decode(meta["mask_packed"]["zlib_b64"]))
        mask = np.unpackbits(np.frombuffer(bits, np.uint8))[: array.size].reshape(array.shape).astype(bool)
        return cls(array=array, mask=mask, grid=Grid.from_dict(meta["grid"]),
                   source_grid=Grid.from_dict(meta["source_grid"]),
                   params=SliceParams.from_dict(meta["params"]), provenance=meta["provenance"])


def selection_grid(image: sitk.Image, params: SliceParams) -> Grid:
    """The selection grid for ``image``: sagittal frame, centred, (W, H, C) points at spacing_mm."""
    acquisition = params.frame == "acquisition"
    frame = snap_frame(np.asarray(image.GetDirection()).reshape(3, 3)) if acquisition else SAGITTAL_FRAME
    center = np.array(voxel_center(image) if params.center_lps is None else params.center_lps, dtype=float)
    if params.lr_mm is not None:
        center[0] = float(params.lr_mm)
    size = np.array([*params.size[::-1], params.n_slices])  # (W, H, C)
    spacing = np.full(3, float(params.spacing_mm))
    origin = center - frame @ (spacing * (size - 1) / 2.0)
    return Grid(origin=tuple(map(float, origin)), direction=tuple(tuple(map(float, r)) for r in frame),
                spacing=tuple(map(float, spacing)), size=tuple(map(int, size)))


def _inside_mask(image: sitk.Image, grid: Grid, eps: float = 1e-4) -> np.ndarray:
    """(k, j, i) bool: grid points whose continuous source index lies in [-0.5, N - 0.5].

    Computed analytically with a small tolerance (``eps`` voxel) instead of ITK's own bounds
    test, because symmetric grids put points exactly on the half-voxel border, where rounding
    would make the decision depend on how the source happens to be stored.
    """
    src = Grid.of(image)
    m = np.linalg.inv(src.direction_matrix * np.asarray(src.spacing)[None, :])
    a = m @ (grid.direction_matrix * np.asarray(grid.spacing)[None, :])  # source index per grid index step
    b = m @ (np.asarray(grid.origin) - np.asarray(src.origin))
    k, j, i = np.ogrid[: grid.size[2], : grid.size[1], : grid.size[0]]
    inside = np.ones(tuple(grid.size[::-1]), dtype=bool)
    for ax, n in enumerate(src.size):
        ci = b[ax] + a[ax, 0] * i + a[ax, 1] * j + a[ax, 2] * k
        inside &= (ci >= -0.5 - eps) & (ci <= n - 0.5 + eps)
    return inside


def _sample(image: sitk.Image, grid: Grid, lo: np.ndarray, hi: np.ndarray, interpolator: str
            ) -> tuple[np.ndarray, np.ndarray]:
    """Values and inside-mask (k, j, i) on the index box [lo, hi] of ``grid`` (may pass its edges)."""
    sub = Grid(origin=tuple(grid.index_to_physical(lo)), direction=grid.direction, spacing=grid.spacing,
               size=tuple(int(v) for v in hi - lo + 1))
    # nearest-neighbour extrapolation for points on or just past the border: the mask decides what is outside
    values = sitk.GetArrayFromImage(sitk.Resample(image, sub.reference_image(), sitk.Transform(),
                                                  INTERPOLATORS[interpolator], 0.0, sitk.sitkFloat32, True))
    inside = _inside_mask(image, sub)
    values[~inside] = 0.0
    return values, inside


def select_slices(source: Study | sitk.Image, params: SliceParams = SliceParams(),
                  source_path: str | None = None, full_resample: bool = False) -> SliceSelection:
    """Select the task input from a study (or a bare LPS image), resampling only the overlapping window.

    full_resample: the reference instead (:func:`select_slices_full_resample`). Raises
    :class:`InputError` when a requested slice lies entirely outside the image.
    """
    if isinstance(source, sitk.Image):
        source = Study(source, source_path)
    if not isinstance(source, Study):
        raise TypeError(f"expected a Study or a SimpleITK image, got {type(source).__name__}")
    image = source.image
    if image.GetDimension() != 3:
        raise InputError(source.path, f"is {image.GetDimension()}D; a 3D volume is needed")
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    grid = selection_grid(image, params)
    raw, inside = np.zeros(grid.size[::-1], np.float32), np.zeros(grid.size[::-1], bool)
    idx = grid.physical_to_index(corners(image))  # the grid's index box [lo, hi] around the image, (i, j, k)
    lo, hi = np.floor(idx.min(axis=0)).astype(int) - 1, np.ceil(idx.max(axis=0)).astype(int) + 1
    wlo, whi = np.maximum(lo, 0), np.minimum(hi, np.asarray(grid.size) - 1)
    if np.all(whi >= wlo):
        window = tuple(slice(int(l), int(h) + 1) for l, h in zip(wlo[::-1], whi[::-1]))
        if full_resample:
            vol, ins = _sample(image, grid, lo, hi, params.interpolator)
            pick = tuple(slice(w.start - int(l), w.stop - int(l)) for w, l in zip(window, lo[::-1]))
            raw[window], inside[window] = vol[pick], ins[pick]
        else:
            raw[window], inside[window] = _sample(image, grid, wlo, whi, params.interpolator)
    empty = [c for c in range(inside.shape[0]) if not inside[c].any()]
    if empty:
        lr = grid.index_to_physical(np.array([[0, 0, c] for c in empty]))[:, 0]
        xs = corners(image)[:, 0]
        raise InputError(source.path,
                         f"slice(s) {empty} of the selection (LPS x = {np.round(lr, 1).tolist()} mm) lie outside "
                         f"the image, whose left-right extent is [{xs.min():.1f}, {xs.max():.1f}] mm (LPS x); "
                         f"move the centre or use fewer slices")
    meta = {k: source.meta[k] for k in ("PatientID", "StudyInstanceUID", "SeriesDescription", "Modality",
                                         "StudyDate") if k in source.meta}
    provenance = {"source_path": source.path, "series_uid": source.series_uid, "meta": meta,
                  "rheumai_version": __version__, "params": params.to_dict()}
    arr = normalize_intensity(raw, inside, params.norm, params.norm_lower, params.norm_upper)
    return SliceSelection(array=arr, mask=inside, grid=grid, source_grid=Grid.of(image), params=params,
                          provenance=provenance)


def select_slices_full_resample(source: Study | sitk.Image, params: SliceParams = SliceParams(),
                                source_path: str | None = None) -> SliceSelection:
    """Reference implementation: resample the whole volume to the isotropic grid, then pick.

    The full grid is the selection grid extended by whole steps until it covers the source, so
    the picked points are the same physical points. Slow; for tests and benchmarks.
    """
    return select_slices(source, params, source_path, full_resample=True)


def params_from(base: SliceParams | None = None, **overrides: Any) -> SliceParams:
    """``base`` (default: the paper's) with the non-None ``overrides`` applied."""
    return replace(base or SliceParams(), **{k: v for k, v in overrides.items() if v is not None})
