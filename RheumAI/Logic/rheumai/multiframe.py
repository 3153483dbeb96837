"""Enhanced (multi-frame) DICOM: per-frame geometry from the functional groups, split into 3D parts.

Each frame's position, orientation, pixel spacing and rescale live in its per-frame functional
group item, or in the shared one. A series may interleave image types (a Philips field map:
magnitude + field-map frames at the same positions) or time points (4D): frames are grouped into
**parts** by the FrameType values that differ, by StackID and by echo time; each part is one
candidate 3D volume, and one whose frames repeat positions (4D) is refused. Used by the reader
(:mod:`rheumai.io`) and the index (:mod:`rheumai.dataset.index`), so both see the same parts,
slice counts and geometry. Positions: DICOM LPS mm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from .errors import InputError

PART_SEP = "#"  # series key of a part: "<SeriesInstanceUID>#<part>"


@dataclass(frozen=True)
class Frame:
    """One frame. ``index``: 0-based in ``file``; ``pixel_spacing``: (row, column) mm; ``iop``: row
    then column cosines."""

    file: str
    index: int
    ipp: tuple[float, float, float]
    iop: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    frame_type: tuple[str, ...]
    stack: str
    echo_ms: float | None = None  # EffectiveEchoTime (MREchoSequence)


@dataclass
class Stack:
    """A part's frames sorted along the slice normal, with what was found wrong (``problem``)."""

    frames: list[Frame]
    positions: np.ndarray  # mm along the normal, sorted, one per distinct slice
    n_volumes: int
    problem: str | None
    severe: bool
    at: Frame | None = None

    @property
    def n_slices(self) -> int:
        return len(self.positions)


def is_enhanced(ds: pydicom.Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def _item(frame: pydicom.Dataset, shared: pydicom.Dataset, keyword: str) -> pydicom.Dataset:
    """The first item of ``keyword`` in the frame's functional groups, else the shared ones, else empty."""
    return next((g[keyword][0] for g in (frame, shared) if len(g.get(keyword) or ())), pydicom.Dataset())


def finite_floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n and all(np.isfinite(vals)) else None


def frames_of(ds: pydicom.Dataset, path: str | Path) -> list[Frame]:
    """The frames of one enhanced file with their geometry; raises InputError naming the file."""
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per) != n:
        raise InputError(path, f"NumberOfFrames is {n} but the file holds {len(per)} per-frame functional groups")
    top_px = finite_floats(ds.get("PixelSpacing"), 2)
    frames = []
    for i, f in enumerate(per):
        ipp = finite_floats(_item(f, shared, "PlanePositionSequence").get("ImagePositionPatient"), 3)
        iop = finite_floats(_item(f, shared, "PlaneOrientationSequence").get("ImageOrientationPatient"), 6)
        if ipp is None or iop is None:
            raise InputError(path, f"frame {i + 1} of {n} has no ImagePositionPatient / ImageOrientationPatient in "
                                   "its functional groups; its place in the volume is unknown")
        spacing = finite_floats(_item(f, shared, "PixelMeasuresSequence").get("PixelSpacing"), 2) or top_px
        if spacing is None:
            raise InputError(path, f"frame {i + 1} of {n} has no PixelSpacing")
        pix = _item(f, shared, "PixelValueTransformationSequence") or ds
        ft = _item(f, shared, "MRImageFrameTypeSequence") or _item(f, shared, "CTImageFrameTypeSequence")
        frame_type = tuple(str(v) for v in (ft.get("FrameType") if "FrameType" in ft
                                             else ds.get("ImageType", [])) or [])
        stack = str(_item(f, shared, "FrameContentSequence").get("StackID", "") or "")
        te = finite_floats([_item(f, shared, "MREchoSequence").get("EffectiveEchoTime")], 1)
        slope, intercept = float(pix.get("RescaleSlope", 1) or 1), float(pix.get("RescaleIntercept", 0) or 0)
        frames.append(Frame(str(path), i, ipp, iop, spacing, slope, intercept,  # type: ignore[arg-type]
                            frame_type, stack, te[0] if te else None))
    return frames


def split_parts(frames: list[Frame]) -> dict[str, list[Frame]]:
    """Frames grouped by key (sorted by key; frame order kept): the differing FrameType values
    (``M`` / ``FIELD_MAP``), the stack (``stack2``) when there are several, the echo time
    (``TE4.92``) where one type and stack has several; ``""`` when all agree."""
    types = sorted({f.frame_type for f in frames})
    width = max((len(t) for t in types), default=0)
    padded = {t: t + ("",) * (width - len(t)) for t in types}
    differ = [i for i in range(width) if len({padded[t][i] for t in types}) > 1]
    stacks = len({f.stack for f in frames}) > 1
    base = []
    for f in frames:
        vals = [padded[f.frame_type][i] for i in differ if padded[f.frame_type][i]]
        if stacks:
            vals.append(f"stack{f.stack}")
        base.append(vals)
    # Echo times split only what the frame type and stack leave together (multi-echo magnitude).
    echoes: dict[tuple, set] = {}
    for f, vals in zip(frames, base):
        echoes.setdefault(tuple(vals), set()).add(f.echo_ms)
    out: dict[str, list[Frame]] = {}
    for f, vals in zip(frames, base):
        if len(echoes[tuple(vals)]) > 1:
            vals = vals + [f"TE{f.echo_ms:g}" if f.echo_ms is not None else "TEnone"]
        out.setdefault(re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(vals)), []).append(f)
    return dict(sorted(out.items()))


def stack_of(frames: list[Frame], rel_tol: float = 0.05) -> Stack:
    """Sort a part's frames along the slice normal and check that they form one 3D volume:
    one orientation, no repeated position (4D: ``k`` volumes), >= 2 slices, even spacing within
    ``rel_tol``. ``problem`` names the frame (file, or frame of a multi-frame file) where it was
    found, ``at``; ``severe`` when the frames cannot be read as one volume."""
    multi = len({f.file for f in frames}) < len(frames)

    def name(f: Frame) -> str:
        return f"frame {f.index + 1} of {Path(f.file).name}" if multi else Path(f.file).name

    iop0 = np.asarray(frames[0].iop)
    for f in frames:
        if np.abs(np.asarray(f.iop) - iop0).max() > 1e-3:
            return Stack(frames, np.zeros(0), 1, f"{name(f)} has ImageOrientationPatient "
                         f"{np.round(f.iop, 4).tolist()} unlike {name(frames[0])} "
                         f"{np.round(iop0, 4).tolist()}: the series mixes orientations", True, f)
    normal = np.cross(iop0[:3], iop0[3:])
    dist = np.array([np.dot(f.ipp, normal) for f in frames])
    order = np.argsort(dist, kind="stable")
    frames, dist = [frames[i] for i in order], dist[order]
    distinct = np.unique(np.round(dist, 2))
    n, k = len(distinct), len(frames)
    if n < k:
        if k % n == 0 and all(np.sum(np.round(dist, 2) == d) == k // n for d in distinct):
            return Stack(frames, distinct, k // n, f"4D series ({k // n} volumes of {n} slices)", True)
        i = int(np.flatnonzero(np.diff(np.round(dist, 2)) == 0)[0])
        return Stack(frames, distinct, 1, f"{name(frames[i + 1])} duplicates the slice position "
                     f"{dist[i]:.3f} mm of {name(frames[i])} (along the slice normal; {k - n} frames repeat "
                     "a position)", True, frames[i + 1])
    if n < 2:
        return Stack(frames, distinct, 1, f"only {n} slice", True)
    steps = np.diff(dist)
    spacing = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - spacing) > rel_tol * spacing)
    if bad.size:
        i = int(bad[0])
        missing = int(round(steps[i] / spacing)) - 1
        what = f"about {missing} missing slice(s)" if missing >= 1 else "uneven slice spacing"
        return Stack(frames, distinct, 1, f"{what}: gap of {steps[i]:.3f} mm after {name(frames[i])} "
                     f"(position {dist[i]:.3f} mm along the normal) where the series spacing is "
                     f"{spacing:.3f} mm", True, frames[i + 1])
    return Stack(frames, distinct, 1, None, False)


def read_volume(stack: Stack, pixels: dict[str, np.ndarray]) -> sitk.Image:
    """A stack without a severe problem as a float32 LPS image; ``pixels``: file -> stored values
    (frames, rows, cols), each frame rescaled with its own slope / intercept."""
    f0 = stack.frames[0]
    image = sitk.GetImageFromArray(np.stack([pixels[f.file][f.index].astype(np.float32) * np.float32(f.slope)
                                             + np.float32(f.intercept) for f in stack.frames]))
    iop = np.asarray(f0.iop)
    image.SetDirection(np.column_stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])]).ravel().tolist())
    image.SetSpacing((f0.pixel_spacing[1], f0.pixel_spacing[0], float(np.median(np.diff(stack.positions)))))
    image.SetOrigin(f0.ipp)
    return image
