"""Reading studies: image files (NIfTI / NRRD / MHA) or DICOM folders, into LPS images.

Every image returned is a 3D ``SimpleITK.Image`` (float32) whose origin / spacing / direction are
in DICOM patient coordinates (LPS, mm), which is what SimpleITK and ITK use for every format
(NIfTI's RAS is converted on read). Every error names the file or folder and the problem.
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

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Tags copied from the first file of a DICOM series into Study.meta.
META_TAGS = (
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "SeriesDate",
    "SeriesDescription", "Modality", "PatientPosition", "Manufacturer", "MagneticFieldStrength",
    "EchoTime", "RepetitionTime", "InversionTime", "ScanningSequence", "SequenceName",
    "SliceThickness", "SeriesNumber", "BodyPartExamined",
)

# Storage classes that hold no image (reports, presentation states, raw data...).
_IMAGE_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1."
_NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",  # SR
    "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.104.1",  # SR, encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
}


@dataclass
class Study:
    """One 3D image with its provenance.

    image: float32 SimpleITK image, LPS geometry (mm). path: the file or DICOM folder read.
    series_uid: DICOM SeriesInstanceUID (None for image files). meta: selected DICOM tags.
    files: the DICOM files of the series, sorted along the slice normal (empty for image files).
    """

    image: sitk.Image
    path: str
    series_uid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class SeriesInfo:
    """A DICOM series found in a folder (headers only)."""

    uid: str
    description: str
    modality: str
    files: list[str]
    is_image: bool
    n_frames: int = 1
    headers: list = field(default_factory=list, repr=False)  # pydicom headers, same order as files
    part: str = ""  # enhanced files split by image type / stack: the part's key ("" when whole)
    frames: list = field(default_factory=list, repr=False)  # enhanced: rheumai.multiframe.Frame list
    problem: str | None = None  # why the series cannot be read (malformed functional groups)

    def describe(self) -> str:
        kind = "" if self.is_image else ", no image"
        frames = f", {len(self.frames)} frames" if self.frames else ""
        part = f", image type/stack {self.part}" if self.part else ""
        return f"{self.uid}  [{self.modality}] '{self.description}' ({len(self.files)} files{frames}{part}{kind})"


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: series, and broken DICOM files (path, reason) that belong to
    no series (empty, or truncated before the series UID) or whose pixel data is cut short."""

    series: list[SeriesInfo]
    broken: list[tuple[str, str]]


def is_image_file(path: str | Path) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


def read_study(
    path: str | Path,
    series_uid: str | None = None,
    require_modality: str | None = "MR",
) -> Study:
    """Read a 3D study from an image file or a DICOM folder.

    For a folder holding several image series, ``series_uid`` chooses one; without it a folder
    with more than one candidate series (of ``require_modality`` when given) raises
    :class:`AmbiguousSeriesError` listing them. ``require_modality`` applies to DICOM only
    (image files carry no modality). Raises :class:`InputError` naming the file on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        return _read_dicom_folder(path, series_uid, require_modality)
    if is_image_file(path):
        return Study(image=_read_image_file(path), path=str(path))
    # A single DICOM file (e.g. enhanced multi-frame) is accepted too.
    if _looks_like_dicom(path):
        return _read_dicom_folder(path, series_uid, require_modality)
    raise InputError(path, f"unsupported file type (expected a DICOM folder or one of {', '.join(IMAGE_SUFFIXES)})")


def _read_image_file(path: Path) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as an image ({_first_line(exc)})") from None
    return _as_volume(image, path)


def _as_volume(image: sitk.Image, path: Path | str) -> sitk.Image:
    """Check a 3D single-component volume and cast it to float32."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        if image.GetNumberOfComponentsPerPixel() == 3 and image.GetDimension() == 2:
            raise InputError(path, "is a 2D colour image; a 3D MRI volume is needed")
        raise InputError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed")
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 2 or (dim == 3 and sorted(size)[0] == 1):
        raise InputError(path, f"is a 2D image (size {'x'.join(map(str, size))}); a 3D volume is needed")
    if dim == 4:
        if size[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise InputError(path, f"is a 4D series ({size[3]} volumes); choose one 3D volume")
    if image.GetDimension() != 3:
        raise InputError(path, f"has {image.GetDimension()} dimensions; a 3D volume is needed")
    return sitk.Cast(image, sitk.sitkFloat32)


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return True
        pydicom.dcmread(str(path), stop_before_pixels=True)
        return True
    except Exception:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """All DICOM series under ``folder`` (recursive), from headers only, sorted by UID.

    Files that are not DICOM are ignored (a folder with none raises :class:`InputError`). An
    enhanced multi-frame series that interleaves image types or stacks is listed as one entry
    per part, with the key ``<SeriesInstanceUID>#<part>`` (e.g. ``...#M`` and ``...#FIELD_MAP``).
    """
    return scan_folder(folder).series


def _looks_like_dicom_name(path: Path) -> bool:
    return path.suffix.lower() in ("", ".dcm", ".ima", ".dicom")


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
    if tell + length > size:
        return f"truncated: its pixel data needs {length} bytes, the file holds {max(size - tell, 0)}"
    return None


def scan_folder(folder: str | Path) -> FolderScan:
    """Series (see :func:`list_series`) and broken DICOM files under ``folder``."""
    from .multiframe import PART_SEP, frames_of, is_enhanced, split_parts

    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    groups: dict[str, SeriesInfo] = {}
    broken: list[tuple[str, str]] = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), defer_size=4096)
        except Exception as exc:  # noqa: BLE001 - not DICOM, or cut short inside the header
            if f.stat().st_size == 0 and _looks_like_dicom_name(f):
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
            sop.startswith(_IMAGE_SOP_PREFIX) or not sop
        )
        info = groups.get(uid)
        if info is None:
            info = groups[uid] = SeriesInfo(
                uid=uid,
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                modality=str(getattr(ds, "Modality", "") or ""),
                files=[],
                is_image=is_image,
                n_frames=int(getattr(ds, "NumberOfFrames", 1) or 1),
            )
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
            out.append(SeriesInfo(
                uid=f"{uid}{PART_SEP}{key}" if len(parts) > 1 else uid, description=info.description,
                modality=info.modality, files=names, is_image=True, n_frames=len(part_frames),
                headers=[ds for f, ds in zip(info.files, info.headers) if f in names],
                part=key if len(parts) > 1 else "", frames=part_frames, problem=info.problem))
    return FolderScan(series=sorted(out, key=lambda s: s.uid), broken=broken)


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _read_dicom_folder(folder: Path, series_uid: str | None, require_modality: str | None) -> Study:
    scan = scan_folder(folder)
    if scan.broken:
        path, why = scan.broken[0]
        more = f" ({len(scan.broken) - 1} more broken files)" if len(scan.broken) > 1 else ""
        raise InputError(path, f"{why}; a broken DICOM file among the series' files (a missing or damaged slice): "
                               f"replace or remove it{more}")
    all_series = scan.series
    images = [s for s in all_series if s.is_image]
    if series_uid is not None:
        chosen = [s for s in all_series if s.uid == series_uid]
        if not chosen:
            listing = "\n  ".join(s.describe() for s in all_series)
            raise InputError(folder, f"has no series with SeriesInstanceUID {series_uid}; series found:\n  {listing}")
        series = chosen[0]
        if not series.is_image:
            raise InputError(folder, f"series {series_uid} holds no image ({series.modality})")
    else:
        if not images:
            raise InputError(folder, "contains DICOM files but no image series")
        candidates = images
        if require_modality:
            candidates = [s for s in images if s.modality.upper() == require_modality.upper()] or images
        if len(candidates) > 1:
            listing = "\n  ".join(s.describe() for s in candidates)
            raise AmbiguousSeriesError(
                folder, f"holds {len(candidates)} image series; choose one by SeriesInstanceUID:\n  {listing}"
            )
        series = candidates[0]
    if require_modality and series.modality.upper() != require_modality.upper():
        raise InputError(
            folder, f"series {series.uid} ('{series.description}') is modality {series.modality or 'unknown'}; "
            f"a {require_modality} series is required"
        )
    return _read_series(folder, series)


def _read_series(folder: Path, series: SeriesInfo) -> Study:
    headers = series.headers or [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    meta = {t: _plain(getattr(headers[0], t, None)) for t in META_TAGS if getattr(headers[0], t, None) not in (None, "")}
    if series.problem:
        raise InputError(series.files[0], series.problem)
    if series.frames:
        return _read_enhanced(folder, series, meta)
    if len(series.files) == 1 and series.n_frames > 1:
        # Enhanced / multi-frame: one file holds the volume; GDCM reads its per-frame geometry.
        f = series.files[0]
        try:
            image = sitk.ReadImage(f)
        except RuntimeError as exc:
            raise InputError(f, f"multi-frame DICOM cannot be read ({_first_line(exc)})") from None
        return Study(image=_as_volume(image, f), path=str(folder), series_uid=series.uid, meta=meta, files=[f])
    if len(series.files) == 1:
        raise InputError(series.files[0], f"series {series.uid} has a single slice: a 2D image; a 3D volume is needed")
    ordered = check_slice_geometry(series.files, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(ordered)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(_undecodable_file(ordered) or folder,
                         f"series {series.uid} cannot be decoded ({_first_line(exc)})") from None
    return Study(image=_as_volume(image, folder), path=str(folder), series_uid=series.uid, meta=meta, files=ordered)


def _undecodable_file(files: list[str]) -> str | None:
    """The first file of a series that cannot be decoded on its own (to name it in the error)."""
    for f in files:
        try:
            sitk.ReadImage(f)
        except RuntimeError:
            return f
    return None


def _frames_by_gdcm(path: str, frames: list, pydicom_error: Exception) -> np.ndarray:
    """Stored frames of a multi-frame file decoded by GDCM (SimpleITK), in file order.

    For transfer syntaxes pydicom cannot decode here (JPEG lossless, JPEG-LS...). GDCM applies a
    single rescale to the whole file, so this is used only where every frame's rescale is the
    identity (stored = real values); otherwise the file is refused, named.
    """
    if any(fr.slope != 1.0 or fr.intercept != 0.0 for fr in frames):
        raise InputError(path, f"multi-frame pixel data cannot be decoded with per-frame rescaling "
                               f"({_first_line(pydicom_error)}; install pylibjpeg for compressed files)")
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as exc:
        raise InputError(path, f"multi-frame pixel data cannot be decoded ({_first_line(pydicom_error)}; "
                               f"GDCM: {_first_line(exc)})") from None


def _read_enhanced(folder: Path, series: SeriesInfo, meta: dict[str, Any]) -> Study:
    """An enhanced multi-frame series (or one part of it) as one 3D volume, from the functional groups."""
    from .multiframe import read_volume, stack_of

    where = series.files[0] if len(series.files) == 1 else folder
    stack = stack_of(series.frames)
    if stack.severe:
        what = f" (image type/stack {series.part})" if series.part else ""
        if stack.n_volumes > 1:
            raise InputError(where, f"series {series.uid}{what} is a {stack.problem}; choose one 3D volume "
                                    "(a 4D series is not a task input)")
        raise InputError(where, f"series {series.uid}{what} is not one 3D volume: {stack.problem}")
    pixels: dict[str, np.ndarray] = {}
    for f in sorted({fr.file for fr in stack.frames}):
        try:
            ds = pydicom.dcmread(f)
            if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
                raise InputError(f, f"has {ds.SamplesPerPixel} samples per pixel; a scalar volume is needed")
            arr = ds.pixel_array
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoder errors vary by transfer syntax
            arr = _frames_by_gdcm(f, [fr for fr in series.frames if fr.file == f], exc)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise InputError(f, f"multi-frame pixel data of shape {arr.shape}: one sample per pixel is needed")
        pixels[f] = arr
    arr, origin, spacing, direction = read_volume(stack, pixels)
    image = sitk.GetImageFromArray(arr)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    if series.part:
        meta = {**meta, "ImageTypePart": series.part}
    files = sorted({fr.file for fr in stack.frames})
    return Study(image=_as_volume(image, where), path=str(folder), series_uid=series.uid, meta=meta, files=files)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def check_slice_geometry(files: list[str], headers: list[pydicom.Dataset] | None = None,
                         rel_tol: float = 0.05) -> list[str]:
    """Sort single-frame DICOM files along the slice normal and validate the stack.

    Checks: every file has ImagePositionPatient / ImageOrientationPatient, one orientation for all,
    no duplicated position, even spacing (a gap is reported with the two neighbouring files and
    positions in mm along the normal). ``rel_tol`` is the allowed relative spacing deviation.
    Returns the files ordered by position along the normal (row x column cosine).
    """
    headers = headers or [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iops, ipps = [], []
    for f, ds in zip(files, headers):
        iop = getattr(ds, "ImageOrientationPatient", None)
        ipp = getattr(ds, "ImagePositionPatient", None)
        if iop is None or ipp is None:
            raise InputError(f, "has no ImagePositionPatient / ImageOrientationPatient; its place in the volume is unknown")
        iops.append(np.asarray(iop, dtype=float))
        ipps.append(np.asarray(ipp, dtype=float))
    iop0 = iops[0]
    for f, iop in zip(files, iops):
        if np.abs(iop - iop0).max() > 1e-3:
            raise InputError(f, f"has ImageOrientationPatient {np.round(iop, 4).tolist()} unlike the series' first "
                             f"slice {np.round(iop0, 4).tolist()}; the series mixes orientations")
    normal = np.cross(iop0[:3], iop0[3:])
    pos = np.array([p @ normal for p in ipps])
    order = np.argsort(pos, kind="stable")
    pos_sorted = pos[order]
    files_sorted = [files[i] for i in order]
    steps = np.diff(pos_sorted)
    for i, step in enumerate(steps):
        if abs(step) < 1e-3:
            raise InputError(files_sorted[i + 1], f"duplicates the slice position {pos_sorted[i]:.3f} mm of "
                             f"{files_sorted[i]} (along the slice normal)")
    spacing = float(np.median(steps))
    bad = np.where(np.abs(steps - spacing) > rel_tol * spacing)[0]
    if bad.size:
        i = int(bad[0])
        missing = int(round(steps[i] / spacing)) - 1
        what = f"about {missing} missing slice(s)" if missing >= 1 else "uneven slice spacing"
        raise InputError(
            files_sorted[i + 1],
            f"{what}: gap of {steps[i]:.3f} mm after {os.path.basename(files_sorted[i])} (position "
            f"{pos_sorted[i]:.3f} mm along the normal) where the series spacing is {spacing:.3f} mm",
        )
    return files_sorted
