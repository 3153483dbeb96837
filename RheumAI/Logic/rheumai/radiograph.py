"""Projection radiographs (DICOM CR / DX, PNG / JPEG / TIFF) as one-slice images with geometry.

Conventions:

* ``Radiograph.array`` is (H, W) float32 with **bone bright** (MONOCHROME1 is inverted on read),
  after BitsStored masking and RescaleSlope / RescaleIntercept.
* Pixel coordinates are (x, y) = (column, row), in pixels, origin at the centre of the first pixel.
* ``Radiograph.image`` is a one-slice 3D ``SimpleITK.Image`` (size (W, H, 1)) in LPS mm: from
  ImagePositionPatient / ImageOrientationPatient when the file has them, else identity direction at
  origin (0, 0, 0). Spacing is (col, row, 1) mm. Anything mapped through this image overlays the
  radiograph exactly in Slicer.
* Spacing: ``PixelSpacing`` (calibrated to the patient plane) is preferred; ``ImagerPixelSpacing``
  (detector plane, magnification not corrected) is used when it is the only one and flagged as not
  calibrated; missing or zero spacing gives 1.0 mm, flagged ``spacing_source="none"``.
* ``to_canonical(rad, want="L")`` mirrors a radiograph of the other side into one frame and returns
  the :class:`CanonicalTransform` that maps points and maps back.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .atomic import atomic_path
from .errors import InputError

__all__ = ["Radiograph", "CanonicalTransform", "read_radiograph", "to_canonical", "write_radiograph_dicom",
           "radiograph_from_array", "RASTER_SUFFIXES", "SOP_CLASS"]

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
             "DX": "1.2.840.10008.5.1.4.1.1.1.1"}  # Digital X-Ray Image Storage - For Presentation
_META_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "Modality",
              "BodyPartExamined", "ViewPosition", "Manufacturer", "SeriesDescription", "PixelSpacingCalibrationType")


@dataclass
class Radiograph:
    """One projection radiograph (see module docstring for conventions).

    spacing_mm: (row, col) mm per pixel. laterality: "L" | "R" | None (from Laterality (0020,0060)
    or ImageLaterality (0020,0062), or given by the caller). photometric: the file's photometric
    interpretation before inversion ("MONOCHROME1" / "MONOCHROME2" / "RGB" ...).
    """

    image: sitk.Image
    array: np.ndarray
    spacing_mm: tuple[float, float]
    spacing_calibrated: bool
    spacing_source: str
    laterality: str | None
    photometric: str
    path: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) pixels."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> sitk.Image:
        """``array`` (H, W) as a one-slice image with this radiograph's geometry (for maps)."""
        array = np.asarray(array, dtype=np.float32)
        if array.shape != self.array.shape:
            raise ValueError(f"map shape {array.shape} differs from the radiograph {self.array.shape}")
        img = sitk.GetImageFromArray(array[None])
        img.CopyInformation(self.image)
        return img


@dataclass(frozen=True)
class CanonicalTransform:
    """Pixel mapping between a radiograph and its canonical (mirrored or not) frame.

    flip_x: the canonical frame is the source mirrored left-right. width: W in pixels. Points are
    (..., 2) arrays of (x, y) pixels; maps are (..., H, W) arrays. The mapping is its own inverse.
    """

    flip_x: bool
    width: int

    def points_to_canonical(self, xy: np.ndarray) -> np.ndarray:
        xy = np.array(xy, dtype=np.float64, copy=True)
        if self.flip_x:
            xy[..., 0] = (self.width - 1) - xy[..., 0]
        return xy

    points_from_canonical = points_to_canonical

    def map_to_canonical(self, arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr[..., ::-1]) if self.flip_x else np.asarray(arr)

    map_from_canonical = map_to_canonical

    def to_dict(self) -> dict[str, Any]:
        return {"flip_x": self.flip_x, "width": self.width}


def to_canonical(rad: Radiograph, want: str = "L", laterality: str | None = None) -> tuple[np.ndarray, CanonicalTransform]:
    """The radiograph's array in the frame of a ``want`` ("L" / "R") side, and the transform back.

    ``laterality`` overrides the radiograph's own; when neither says which side, the image is kept
    as is (it is assumed to be of side ``want``).
    """
    if want not in ("L", "R"):
        raise ValueError(f"want must be 'L' or 'R', not {want!r}")
    side = laterality or rad.laterality
    tf = CanonicalTransform(flip_x=bool(side in ("L", "R") and side != want), width=rad.array.shape[1])
    return tf.map_to_canonical(rad.array).astype(np.float32, copy=False), tf


def _laterality(ds: Dataset) -> str | None:
    for key in ("ImageLaterality", "Laterality"):
        v = str(ds.get(key, "") or "").strip().upper()
        if v in ("L", "R"):
            return v
    return None


def _spacing(ds: Dataset) -> tuple[tuple[float, float], bool, str]:
    """((row, col) mm, calibrated, source)."""
    for key, calibrated in (("PixelSpacing", True), ("ImagerPixelSpacing", False)):
        v = ds.get(key)
        if v is None:
            continue
        try:
            vals = [float(x) for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v])]
        except (TypeError, ValueError):
            continue
        if len(vals) == 2 and all(np.isfinite(vals)) and min(vals) > 0:
            return (vals[0], vals[1]), calibrated, key
    return (1.0, 1.0), False, "none"


def _geometry(ds: Dataset, shape: tuple[int, int], spacing: tuple[float, float]) -> sitk.Image:
    h, w = shape
    img = sitk.Image([w, h, 1], sitk.sitkFloat32)
    img.SetSpacing((spacing[1], spacing[0], 1.0))
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if iop is not None and ipp is not None and len(iop) == 6 and len(ipp) == 3:
        r = np.array([float(x) for x in iop[:3]])
        c = np.array([float(x) for x in iop[3:]])
        n = np.cross(r, c)
        if np.linalg.norm(r) > 0.5 and np.linalg.norm(c) > 0.5 and np.linalg.norm(n) > 0.5:
            r, c, n = r / np.linalg.norm(r), c / np.linalg.norm(c), n / np.linalg.norm(n)
            img.SetDirection(tuple(np.stack([r, c, n], axis=1).ravel()))
            img.SetOrigin(tuple(float(x) for x in ipp))
    return img


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float)) or v is None:
        return v
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return [_plain(x) for x in v]
    return str(v)


def read_radiograph(path: str | Path, laterality: str | None = None) -> Radiograph:
    """Read a DICOM CR / DX (or any single-frame greyscale DICOM) or a PNG / JPEG / TIFF radiograph.

    ``laterality`` ("L" / "R") overrides or supplies the side (raster files carry none).
    Raises :class:`InputError` naming the file for anything unreadable or not a single 2D image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if laterality is not None and laterality not in ("L", "R"):
        raise InputError(path, f"laterality must be 'L' or 'R', not {laterality!r}")
    if path.suffix.lower() in RASTER_SUFFIXES:
        rad = _read_raster(path)
    else:
        rad = _read_dicom(path)
    if laterality is not None:
        rad.laterality = laterality
    return rad


def _read_dicom(path: Path) -> Radiograph:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        raise InputError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        raise InputError(path, "DICOM file holds no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InputError(path, f"expected a single radiograph, found {frames} frames")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(path, f"photometric interpretation {photometric} is not a greyscale radiograph")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - e.g. no decoder for a compressed transfer syntax
        tsuid = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise InputError(path, f"cannot decode pixel data (transfer syntax {tsuid}): {exc}") from None
    if stored.ndim != 2:
        raise InputError(path, f"expected a 2D image, pixel data has shape {stored.shape}")
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if signed:
        lo_s, hi_s = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        values = stored.astype(np.float64)
    else:
        lo_s, hi_s = 0, 2 ** bits - 1
        values = (stored.astype(np.int64) & hi_s).astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = values * slope + intercept
    if photometric == "MONOCHROME1":  # low values are white: reflect within the possible range
        lo, hi = sorted((lo_s * slope + intercept, hi_s * slope + intercept))
        values = (lo + hi) - values
    spacing, calibrated, source = _spacing(ds)
    image = _geometry(ds, values.shape, spacing)
    arr = values.astype(np.float32)
    img = sitk.GetImageFromArray(arr[None])
    img.CopyInformation(image)
    meta = {k: _plain(ds.get(k)) for k in _META_TAGS if k in ds}
    meta.update({"BitsStored": bits, "RescaleSlope": slope, "RescaleIntercept": intercept})
    return Radiograph(image=img, array=arr, spacing_mm=spacing, spacing_calibrated=calibrated,
                      spacing_source=source, laterality=_laterality(ds), photometric=photometric,
                      path=str(path), meta=meta)


def _read_raster(path: Path) -> Radiograph:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(path, f"not a readable image file ({exc})") from None
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise InputError(path, f"expected a 2D greyscale image, got shape {arr.shape}")
    rad = radiograph_from_array(arr, path=str(path))
    rad.photometric = "MONOCHROME2" if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F") else mode
    return rad


def radiograph_from_array(array: np.ndarray, spacing_mm: tuple[float, float] | None = None,
                          laterality: str | None = None, path: str = "") -> Radiograph:
    """Wrap an (H, W) bone-bright array (e.g. generated) as a :class:`Radiograph` at the origin.

    ``spacing_mm`` (row, col) given means calibrated spacing; None means 1.0 mm, uncalibrated.
    """
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) array, got shape {arr.shape}")
    calibrated = spacing_mm is not None
    spacing = (float(spacing_mm[0]), float(spacing_mm[1])) if calibrated else (1.0, 1.0)
    img = sitk.GetImageFromArray(arr[None])
    img.SetSpacing((spacing[1], spacing[0], 1.0))
    return Radiograph(image=img, array=arr, spacing_mm=spacing, spacing_calibrated=calibrated,
                      spacing_source="PixelSpacing" if calibrated else "none", laterality=laterality,
                      photometric="MONOCHROME2", path=path)


def write_radiograph_dicom(path: str | Path, array: np.ndarray, spacing_mm: tuple[float, float] | None,
                           modality: str = "CR", laterality: str | None = None, photometric: str = "MONOCHROME2",
                           patient_id: str = "ANON", bits_stored: int = 12, spacing_tag: str = "ImagerPixelSpacing",
                           **tags: Any) -> Path:
    """Write a bone-bright (H, W) ``array`` as a single-frame 16-bit DICOM CR / DX file (atomic).

    array: float values in [0, 1] (scaled to 0..2**bits_stored - 1) or integers in that range.
    spacing_mm: (row, col) mm, written to ``spacing_tag`` ("PixelSpacing" | "ImagerPixelSpacing" |
    "both"); None writes no spacing. photometric "MONOCHROME1" stores the inverted values, so a
    reader that honours the photometric interpretation gets ``array`` back. Extra ``tags`` are set
    by keyword (e.g. StudyInstanceUID, StudyDate, SeriesDescription, BodyPartExamined).
    """
    if modality not in SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS)}, not {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if spacing_tag not in ("PixelSpacing", "ImagerPixelSpacing", "both"):
        raise ValueError(f"spacing_tag must be PixelSpacing, ImagerPixelSpacing or both, not {spacing_tag!r}")
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be within 8..16")
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) array, got shape {arr.shape}")
    top = 2 ** bits_stored - 1
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError("float arrays must hold finite values in [0, 1]")
        stored = np.rint(arr * top).astype(np.uint16)
    else:
        if arr.min() < 0 or arr.max() > top:
            raise ValueError(f"integer arrays must lie in 0..{top}")
        stored = arr.astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)

    sop_uid = tags.pop("SOPInstanceUID", None) or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    today = _dt.date.today().strftime("%Y%m%d")
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "RheumAI"
    ds.PatientOrientation = ""
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    if laterality is not None:
        if laterality not in ("L", "R"):
            raise ValueError(f"laterality must be 'L' or 'R', not {laterality!r}")
        ds.Laterality = laterality
        ds.ImageLaterality = laterality
    if spacing_mm is not None:
        sp = [f"{float(spacing_mm[0]):.6g}", f"{float(spacing_mm[1]):.6g}"]
        if spacing_tag in ("PixelSpacing", "both"):
            ds.PixelSpacing = sp
        if spacing_tag in ("ImagerPixelSpacing", "both"):
            ds.ImagerPixelSpacing = sp
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.RescaleType = "US"
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
