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

    def describe(self) -> str:
        kind = "" if self.is_image else ", no image"
        return f"{self.uid}  [{self.modality}] '{self.description}' ({len(self.files)} files{kind})"


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

    Files that are not DICOM are ignored (a folder with none raises :class:`InputError`).
    """
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    groups: dict[str, SeriesInfo] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            continue
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
    if not groups:
        raise InputError(folder, "contains no DICOM files")
    return [groups[k] for k in sorted(groups)]


def _read_dicom_folder(folder: Path, series_uid: str | None, require_modality: str | None) -> Study:
    all_series = list_series(folder)
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
        raise InputError(folder, f"series {series.uid} cannot be decoded ({_first_line(exc)})") from None
    return Study(image=_as_volume(image, folder), path=str(folder), series_uid=series.uid, meta=meta, files=ordered)


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
