"""Projection radiographs (DICOM CR / DX, PNG / JPEG / TIFF) as one-slice images with geometry.

``Radiograph.array`` is (H, W) float32, **bone bright** (MONOCHROME1 inverted on read), after
BitsStored masking and rescale. Pixel coordinates are (x, y) = (column, row), origin at the centre
of the first pixel. ``Radiograph.image`` is a one-slice 3D ``SimpleITK.Image`` (size (W, H, 1)) in
LPS mm (ImagePositionPatient / ImageOrientationPatient when present, else identity at the origin),
spacing (col, row, 1) mm, so anything mapped through it overlays the radiograph in Slicer. Spacing:
``PixelSpacing`` (calibrated) is preferred; ``ImagerPixelSpacing`` (detector plane) is used but
flagged not calibrated; missing or zero gives 1.0 mm, ``spacing_source="none"``.
``to_canonical`` mirrors a radiograph of the other side into one frame (:class:`CanonicalTransform`).
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


def to_canonical(rad: Radiograph, want: str = "L", laterality: str | None = None
                 ) -> tuple[np.ndarray, CanonicalTransform]:
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


def as_radiograph(src: str | Path | Radiograph | sitk.Image) -> Radiograph:
    """A file path, a :class:`Radiograph` or a one-slice SimpleITK image (LPS, bone bright; e.g. a
    Slicer volume node's image, whose geometry is kept) as a :class:`Radiograph`."""
    if isinstance(src, Radiograph):
        return src
    if not isinstance(src, sitk.Image):
        return read_radiograph(src)
    arr = sitk.GetArrayFromImage(src)
    sp = src.GetSpacing()
    rad = radiograph_from_array(arr[0] if arr.ndim == 3 else arr, spacing_mm=(float(sp[1]), float(sp[0])))
    if src.GetDimension() == 3:
        rad.image = sitk.Cast(src, sitk.sitkFloat32)
    return rad


def write_radiograph_dicom(path: str | Path, array: np.ndarray, spacing_mm: tuple[float, float] | None,
                           modality: str = "CR", laterality: str | None = None, photometric: str = "MONOCHROME2",
                           patient_id: str = "ANON", bits_stored: int = 12, spacing_tag: str = "ImagerPixelSpacing",
                           **tags: Any) -> Path:
    """Write a bone-bright (H, W) ``array`` as a single-frame 16-bit DICOM CR / DX file (atomic).

    array: floats in [0, 1] (scaled to 0..2**bits_stored - 1) or integers in that range.
    spacing_mm: (row, col) mm, written to ``spacing_tag`` ("PixelSpacing" | "ImagerPixelSpacing" |
    "both"); None writes none. MONOCHROME1 stores inverted values, so a reader honouring it gets
    ``array`` back. Extra ``tags`` are set by keyword (StudyInstanceUID, SeriesDescription...).
    """
    checks = [(modality in SOP_CLASS, f"modality must be one of {sorted(SOP_CLASS)}, not {modality!r}"),
              (photometric in ("MONOCHROME1", "MONOCHROME2"), f"photometric {photometric!r} unknown"),
              (spacing_tag in ("PixelSpacing", "ImagerPixelSpacing", "both"), f"spacing_tag {spacing_tag!r} unknown"),
              (8 <= bits_stored <= 16, "bits_stored must be within 8..16"),
              (laterality in (None, "L", "R"), f"laterality must be 'L' or 'R', not {laterality!r}"),
              (np.ndim(array) == 2, f"expected an (H, W) array, got shape {np.shape(array)}")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    arr = np.asarray(array)
    top = 2 ** bits_stored - 1
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError("float arrays must hold finite values in [0, 1]")
        arr = np.rint(arr * top)
    elif arr.min() < 0 or arr.max() > top:
        raise ValueError(f"integer arrays must lie in 0..{top}")
    stored = (top - arr if photometric == "MONOCHROME1" else arr).astype("<u2")
    sop_uid = tags.pop("SOPInstanceUID", None) or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.update({"MediaStorageSOPClassUID": SOP_CLASS[modality], "MediaStorageSOPInstanceUID": sop_uid,
                         "TransferSyntaxUID": ExplicitVRLittleEndian,
                         "ImplementationClassUID": pydicom.uid.PYDICOM_IMPLEMENTATION_UID})
    today = _dt.date.today().strftime("%Y%m%d")
    values: dict[str, Any] = {
        "SOPClassUID": SOP_CLASS[modality], "SOPInstanceUID": sop_uid, "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(), "StudyDate": today, "SeriesDate": today, "ContentDate": today,
        "StudyTime": "000000", "SeriesTime": "000000", "ContentTime": "000000", "Modality": modality,
        "PatientID": patient_id, "PatientName": patient_id, "PatientBirthDate": "", "PatientSex": "",
        "AccessionNumber": "", "ReferringPhysicianName": "", "StudyID": "1", "SeriesNumber": 1, "InstanceNumber": 1,
        "Manufacturer": "RheumAI", "PatientOrientation": "", "SamplesPerPixel": 1,
        "PhotometricInterpretation": photometric, "Rows": int(arr.shape[0]), "Columns": int(arr.shape[1]),
        "BitsAllocated": 16, "BitsStored": bits_stored, "HighBit": bits_stored - 1, "PixelRepresentation": 0,
        "RescaleSlope": "1", "RescaleIntercept": "0", "RescaleType": "US"}
    if modality == "DX":
        values.update(ImageType=["ORIGINAL", "PRIMARY"], PresentationIntentType="FOR PRESENTATION",
                      PixelIntensityRelationship="LOG",
                      PixelIntensityRelationshipSign=1 if photometric == "MONOCHROME2" else -1)
    if laterality is not None:
        values.update(Laterality=laterality, ImageLaterality=laterality)
    if spacing_mm is not None:
        sp = [f"{float(spacing_mm[0]):.6g}", f"{float(spacing_mm[1]):.6g}"]
        values.update({k: sp for k in ("PixelSpacing", "ImagerPixelSpacing") if spacing_tag in (k, "both")})
    for key, value in {**values, **tags}.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path
