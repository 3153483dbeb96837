"""Reading studies: image files (NIfTI / NRRD / MHA) or DICOM folders, into LPS images.

Every image returned is a 3D float32 ``SimpleITK.Image`` whose origin / spacing / direction are in
DICOM patient coordinates (LPS, mm), as SimpleITK gives them for every format (NIfTI's RAS is
converted on read). Every error names the file or folder and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from .errors import AmbiguousSeriesError, InputError
from .multiframe import (PART_SEP, Frame, finite_floats, frames_of, is_enhanced, read_volume, split_parts,
                         stack_of)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
META_TAGS = (  # copied from the first file of a DICOM series into Study.meta
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "SeriesDate",
    "SeriesDescription", "Modality", "PatientPosition", "Manufacturer", "MagneticFieldStrength",
    "EchoTime", "RepetitionTime", "InversionTime", "ScanningSequence", "SequenceName",
    "SliceThickness", "SeriesNumber", "BodyPartExamined",
)
_IMAGE_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1."
_NON_IMAGE_SOP = {  # storage classes that hold no image: raw data, presentation state, SR, PDF, spectroscopy
    "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.104.1",
    "1.2.840.10008.5.1.4.1.1.4.2",
}


@dataclass
class Study:
    """One 3D image (float32, LPS mm) with its provenance: the file or DICOM folder read, the
    SeriesInstanceUID and selected tags (DICOM only), the series' files sorted along the normal."""

    image: sitk.Image
    path: str
    series_uid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class SeriesInfo:
    """A DICOM series found in a folder (headers only). Enhanced files split by image type / stack:
    one entry per ``part`` with its ``frames`` (:class:`rheumai.multiframe.Frame`); ``problem``: why
    the series cannot be read (malformed functional groups, mixed files)."""

    uid: str
    description: str
    modality: str
    files: list[str]
    is_image: bool
    n_frames: int = 1
    headers: list = field(default_factory=list, repr=False)  # pydicom headers, same order as files
    part: str = ""
    frames: list = field(default_factory=list, repr=False)
    problem: str | None = None

    def describe(self) -> str:
        frames = f", {len(self.frames)} frames" if self.frames else ""
        part = f", image type/stack {self.part}" if self.part else ""
        kind = "" if self.is_image else ", no image"
        return f"{self.uid}  [{self.modality}] '{self.description}' ({len(self.files)} files{frames}{part}{kind})"


@dataclass
class FolderScan:
    """Series of a folder, and broken DICOM files (path, reason): empty, truncated before the
    series UID, or with pixel data cut short."""

    series: list[SeriesInfo]
    broken: list[tuple[str, str]]


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def read_study(path: str | Path, series_uid: str | None = None, require_modality: str | None = "MR") -> Study:
    """A 3D study from an image file, a DICOM folder or a single (e.g. enhanced multi-frame) DICOM file.

    ``series_uid`` chooses a series in a folder; without it a folder with more than one candidate
    series (of ``require_modality`` when given; DICOM only) raises :class:`AmbiguousSeriesError`
    listing them. Raises :class:`InputError` naming the file on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if is_image_file(path) and not path.is_dir():
        return Study(image=_as_volume(_read_image(path, "cannot be read as an image"), path), path=str(path))
    if path.is_dir() or _looks_like_dicom(path):
        return _read_dicom_folder(path, series_uid, require_modality)
    raise InputError(path, f"unsupported file type (expected a DICOM folder or one of {', '.join(IMAGE_SUFFIXES)})")


def as_study(src: str | os.PathLike | Study | sitk.Image, series_uid: str | None = None) -> Study:
    """A path (read by :func:`read_study`), a Study, or a bare LPS image (a Study without a path)."""
    if isinstance(src, (str, os.PathLike)):
        return read_study(src, series_uid=series_uid)
    if isinstance(src, sitk.Image):
        return Study(src, None)  # type: ignore[arg-type]
    if not isinstance(src, Study):
        raise InputError(None, f"expected a path, a Study or a SimpleITK image, got {type(src).__name__}")
    return src


def _as_volume(image: sitk.Image, path: Path | str) -> sitk.Image:
    """Check a 3D single-component volume (a 4D one with one volume is taken) and make it float32."""
    n, dim, size = image.GetNumberOfComponentsPerPixel(), image.GetDimension(), image.GetSize()
    for bad, problem in [(n == 3 and dim == 2, "is a 2D colour image; a 3D MRI volume is needed"),
                         (n != 1, f"has {n} components per voxel; a scalar volume is needed"),
                         (dim == 2 or (dim == 3 and min(size) == 1),
                          f"is a 2D image (size {'x'.join(map(str, size))}); a 3D volume is needed"),
                         (dim == 4 and size[3] != 1,
                          f"is a 4D series ({size[-1]} volumes); choose one 3D volume"),
                         (dim not in (2, 3, 4), f"has {dim} dimensions; a 3D volume is needed")]:
        if bad:
            raise InputError(path, problem)
    image = image[:, :, :, 0] if dim == 4 else image
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _looks_like_dicom(path: Path) -> bool:
    try:
        return _has_dicm_magic(path) or pydicom.dcmread(str(path), stop_before_pixels=True) is not None
    except Exception:  # noqa: BLE001 - not DICOM
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """All DICOM series under ``folder`` (recursive, headers only), sorted by UID; files that are not
    DICOM are ignored. An enhanced series interleaving image types or stacks is one entry per part,
    keyed ``<SeriesInstanceUID>#<part>`` (e.g. ``...#M`` and ``...#FIELD_MAP``)."""
    return scan_folder(folder).series


def pixel_data_problem(path: str | Path, ds: pydicom.Dataset) -> str | None:
    """Why the (deferred) pixel data of a header read with ``defer_size`` is cut short, or None."""
    tag = pydicom.tag.Tag(0x7FE0, 0x0010)
    try:
        raw = ds.get_item(tag, keep_deferred=True)
    except TypeError:  # older pydicom
        raw = ds.get_item(tag)
    length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
    if raw is None or length is None or tell is None or length == 0xFFFFFFFF:
        return None
    size = os.path.getsize(path)
    if tell + length <= size:
        return None
    return f"truncated: its pixel data needs {length} bytes, the file holds {max(size - tell, 0)}"


def scan_folder(folder: str | Path) -> FolderScan:
    """Series (see :func:`list_series`) and broken DICOM files under ``folder``."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    groups: dict[str, SeriesInfo] = {}
    broken: list[tuple[str, str]] = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), defer_size=4096)
        except Exception as exc:  # noqa: BLE001 - not DICOM, or cut short inside the header
            if f.stat().st_size == 0 and f.suffix.lower() in ("", ".dcm", ".ima", ".dicom"):
                broken.append((str(f), "is an empty file"))
            elif _has_dicm_magic(f):
                broken.append((str(f), f"is a damaged DICOM file ({_first_line(exc)})"))
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
            if sop.startswith(_IMAGE_SOP_PREFIX) and sop not in _NON_IMAGE_SOP:
                broken.append((str(f), "is a truncated DICOM file (its header ends before the SeriesInstanceUID)"))
            continue
        cut = pixel_data_problem(f, ds)
        if cut:
            broken.append((str(f), cut))
        sop = str(getattr(ds, "SOPClassUID", ""))
        is_image = bool(getattr(ds, "Rows", 0)) and sop not in _NON_IMAGE_SOP and (
            sop.startswith(_IMAGE_SOP_PREFIX) or not sop)
        info = groups.get(uid)
        if info is None:
            info = groups[uid] = SeriesInfo(uid, str(getattr(ds, "SeriesDescription", "") or ""),
                                            str(getattr(ds, "Modality", "") or ""), [], is_image,
                                            int(getattr(ds, "NumberOfFrames", 1) or 1))
        info.files.append(str(f))
        info.headers.append(ds)
        info.is_image = info.is_image or is_image
    if not groups and not broken:
        raise InputError(folder, "contains no DICOM files")
    out: list[SeriesInfo] = []
    for uid in sorted(groups):
        info = groups[uid]
        enhanced = [(f, ds) for f, ds in zip(info.files, info.headers) if is_enhanced(ds)]
        if not enhanced or not info.is_image:
            out.append(info)
            continue
        try:
            frames = [fr for f, ds in enhanced for fr in frames_of(ds, f)]
        except InputError as exc:
            info.problem = str(exc)
            out.append(info)
            continue
        if len(enhanced) < len(info.files):
            info.problem = (f"series {uid} mixes {len(enhanced)} enhanced multi-frame files with "
                            f"{len(info.files) - len(enhanced)} single-frame files")
        parts = split_parts(frames)
        for key, part_frames in parts.items():
            names = sorted({fr.file for fr in part_frames})
            whole = len(parts) == 1
            out.append(SeriesInfo(
                uid if whole else f"{uid}{PART_SEP}{key}", info.description, info.modality, names, True,
                len(part_frames), [ds for f, ds in zip(info.files, info.headers) if f in names],
                "" if whole else key, part_frames, info.problem))
    return FolderScan(series=sorted(out, key=lambda s: s.uid), broken=broken)


def _read_dicom_folder(folder: Path, series_uid: str | None, require_modality: str | None) -> Study:
    scan = scan_folder(folder)
    if scan.broken:
        path, why = scan.broken[0]
        more = f" ({len(scan.broken) - 1} more broken files)" if len(scan.broken) > 1 else ""
        raise InputError(path, f"{why}; a broken DICOM file among the series' files (a missing or damaged slice): "
                               f"replace or remove it{more}")
    images = [s for s in scan.series if s.is_image]
    if series_uid is not None:
        chosen = [s for s in scan.series if s.uid == series_uid]
        if not chosen:
            listing = "\n  ".join(s.describe() for s in scan.series)
            raise InputError(folder, f"has no series with SeriesInstanceUID {series_uid}; series found:\n  {listing}")
        series = chosen[0]
        if not series.is_image:
            raise InputError(folder, f"series {series_uid} holds no image ({series.modality})")
    else:
        if not images:
            raise InputError(folder, "contains DICOM files but no image series")
        mod = (require_modality or "").upper()
        candidates = [s for s in images if s.modality.upper() == mod] or images if mod else images
        if len(candidates) > 1:
            listing = "\n  ".join(s.describe() for s in candidates)
            raise AmbiguousSeriesError(
                folder, f"holds {len(candidates)} image series; choose one by SeriesInstanceUID:\n  {listing}")
        series = candidates[0]
    if require_modality and series.modality.upper() != require_modality.upper():
        raise InputError(folder, f"series {series.uid} ('{series.description}') is modality "
                                 f"{series.modality or 'unknown'}; a {require_modality} series is required")
    return _read_series(folder, series)


def _read_series(folder: Path, series: SeriesInfo) -> Study:
    headers = series.headers
    meta = {t: _plain(getattr(headers[0], t)) for t in META_TAGS if getattr(headers[0], t, None) not in (None, "")}
    if series.problem:
        raise InputError(series.files[0], series.problem)
    files, where = series.files, folder
    if series.frames:
        image, files, where = _read_enhanced(folder, series)
        meta = {**meta, "ImageTypePart": series.part} if series.part else meta
    elif len(series.files) == 1 and series.n_frames > 1:  # legacy multi-frame: GDCM reads the geometry
        where = files[0]
        image = _read_image(where, "multi-frame DICOM cannot be read")
    elif len(series.files) == 1:
        raise InputError(files[0], f"series {series.uid} has a single slice: a 2D image; a 3D volume is "
                                   "needed")
    else:  # single-frame files: checked as the index checks them (one orientation, even spacing)
        frames = []
        for f, ds in zip(files, headers):
            ipp = finite_floats(ds.get("ImagePositionPatient"), 3)
            iop = finite_floats(ds.get("ImageOrientationPatient"), 6)
            if ipp is None or iop is None:
                raise InputError(f, "has no ImagePositionPatient / ImageOrientationPatient; its place in the "
                                    "volume is unknown")
            frames.append(Frame(f, 0, ipp, iop, (1.0, 1.0), 1.0, 0.0, (), ""))  # type: ignore[arg-type]
        stack = stack_of(frames)
        if stack.problem:
            raise InputError(stack.at.file if stack.at else folder, stack.problem)
        files = [fr.file for fr in stack.frames]
        try:
            image = sitk.ReadImage(files)
        except RuntimeError as exc:
            why = f"series {series.uid} cannot be decoded ({_first_line(exc)})"
            for f in files:  # name the first file that cannot be decoded on its own
                _read_image(f, f"{why}; this file cannot be read on its own")
            raise InputError(folder, why) from None
    return Study(_as_volume(image, where), str(folder), series.uid, meta, files)


def _read_image(path: str | Path, what: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"{what} ({_first_line(exc)})") from None


def _frames_by_gdcm(path: str, frames: list, pydicom_error: Exception) -> np.ndarray:
    """Stored frames of a multi-frame file decoded by GDCM, in file order, for transfer syntaxes
    pydicom cannot decode here (JPEG lossless, JPEG-LS...). GDCM applies one rescale to the whole
    file, so only where every frame's rescale is the identity; otherwise the file is refused, named."""
    if any(fr.slope != 1.0 or fr.intercept != 0.0 for fr in frames):
        raise InputError(path, f"multi-frame pixel data cannot be decoded with per-frame rescaling "
                               f"({_first_line(pydicom_error)}; install pylibjpeg for compressed files)")
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as exc:
        raise InputError(path, f"multi-frame pixel data cannot be decoded ({_first_line(pydicom_error)}; "
                               f"GDCM: {_first_line(exc)})") from None


def _read_enhanced(folder: Path, series: SeriesInfo) -> tuple[sitk.Image, list[str], str | Path]:
    """An enhanced multi-frame series (or one part of it) as one 3D volume, from the functional
    groups: (image, files, the file or folder that errors name)."""
    where = series.files[0] if len(series.files) == 1 else folder
    stack = stack_of(series.frames)
    if stack.severe:
        what = f" (image type/stack {series.part})" if series.part else ""
        if stack.n_volumes > 1:
            raise InputError(where, f"series {series.uid}{what} is a {stack.problem}; choose one 3D volume "
                                    "(a 4D series is not a task input)")
        raise InputError(where, f"series {series.uid}{what} is not one 3D volume: {stack.problem}")
    files = sorted({fr.file for fr in stack.frames})
    pixels: dict[str, np.ndarray] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
                raise InputError(f, f"has {ds.SamplesPerPixel} samples per pixel; a scalar volume is needed")
            arr = ds.pixel_array
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoder errors vary by transfer syntax
            arr = _frames_by_gdcm(f, [fr for fr in series.frames if fr.file == f], exc)
        if arr.ndim not in (2, 3):
            raise InputError(f, f"multi-frame pixel data of shape {arr.shape}: one sample per pixel is needed")
        pixels[f] = arr[None] if arr.ndim == 2 else arr
    return read_volume(stack, pixels), files, where


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
