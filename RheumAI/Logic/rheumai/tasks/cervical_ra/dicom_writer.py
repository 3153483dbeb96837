"""Write a SimpleITK volume as a DICOM MR series (one file per slice), geometry preserved.

pydicom, because the generator makes new pixels and geometry (:mod:`rheumai.dataset.archive_tools`
copies existing series) and SimpleITK's writer cannot write the MR tags the archive indexer reads.
ImageOrientationPatient comes from the direction's i and j columns, the slice normal i x j must be
the k direction, ImagePositionPatient of slice k is voxel (0, 0, k) in LPS mm; pixels are uint16
with slope 1 / intercept 0, so SimpleITK's ImageSeriesReader reads back the same image.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from ...atomic import atomic_path
from ...dataset.archive_tools import uid as deterministic_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

# Timing tags (ms) per weighting; the values the archive classifier reads as T1 / T2.
SEQUENCE_TAGS: dict[str, dict[str, object]] = {
    "T2": {"EchoTime": 100.0, "RepetitionTime": 3000.0, "SequenceName": "*tse2d1_15"},
    "T1": {"EchoTime": 10.0, "RepetitionTime": 500.0, "SequenceName": "*tse2d1_3"},
}

# Tags every generated series shares.
FIXED_TAGS: dict[str, object] = {
    "SpecificCharacterSet": "ISO_IR 100", "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
    "SOPClassUID": MR_IMAGE_STORAGE, "Modality": "MR", "Manufacturer": "RheumAI synthetic", "MRAcquisitionType": "2D",
    "PatientPosition": "HFS", "PositionReferenceIndicator": "", "SamplesPerPixel": 1,
    "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15,
    "PixelRepresentation": 0, "RescaleIntercept": 0.0, "RescaleSlope": 1.0, "RescaleType": "US",
    "StudyDescription": "MRI CWK", "StudyTime": "093000", "BodyPartExamined": "CSPINE",
    "MagneticFieldStrength": 1.5, "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"],
}


def _values(tags: dict[str, object]) -> dict[str, object]:
    """Tag keyword -> value with every float (also in a list) as DS rounded to 6 decimals."""
    def ds(x: object) -> object:
        return DSfloat(round(float(x), 6), auto_format=True) if isinstance(x, float) else x
    return {k: [ds(x) for x in v] if isinstance(v, list) else ds(v) for k, v in tags.items()}


@dataclass
class SeriesHeader:
    """Identifiers and descriptive tags of one series (dates as ``datetime.date``)."""

    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    study_date: dt.date
    series_number: int
    series_description: str
    sequence: str = "T2"  # key of SEQUENCE_TAGS
    accession_number: str = ""
    patient_sex: str = ""
    patient_age_years: int | None = None
    birth_date: dt.date | None = None
    institution: str = ""


def write_series(image: sitk.Image, folder: str | Path, header: SeriesHeader) -> list[Path]:
    """Write ``image`` (3D, LPS, values 0..65535 after rounding) as one DICOM file per k slice
    (InstanceNumber 1..n); returns the paths. ValueError on a 2D image or a direction that is not
    orthonormal right-handed (the slice normal must be i x j)."""
    if image.GetDimension() != 3:
        raise ValueError(f"write_series needs a 3D image, got {image.GetDimension()}D")
    d = np.array(image.GetDirection()).reshape(3, 3)  # columns: i, j, k directions (LPS)
    row, col, nrm = d[:, 0], d[:, 1], d[:, 2]
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6) or np.dot(np.cross(row, col), nrm) < 0.999:
        raise ValueError("write_series needs an orthonormal right-handed direction (normal = i x j)")
    arr = np.clip(np.rint(sitk.GetArrayFromImage(image)), 0, 65535).astype(np.uint16)  # (k, j, i)
    sx, sy, sz = image.GetSpacing()
    wl = np.percentile(arr, [1, 99.5]) if arr.size else (0.0, 1.0)
    h = header
    da, tm = h.study_date.strftime("%Y%m%d"), f"09{h.series_number % 60:02d}00"  # series n: n min after 09:00
    base = Dataset()
    base.update(_values({
        **FIXED_TAGS, **SEQUENCE_TAGS[h.sequence],
        "StudyDate": da, "SeriesDate": da, "AcquisitionDate": da, "ContentDate": da,
        "SeriesTime": tm, "AcquisitionTime": tm, "ContentTime": tm, "AccessionNumber": h.accession_number,
        "InstitutionName": h.institution, "SeriesDescription": h.series_description,
        "ProtocolName": h.series_description, "PatientName": h.patient_id, "PatientID": h.patient_id,
        "PatientSex": h.patient_sex,
        "PatientBirthDate": h.birth_date.strftime("%Y%m%d") if h.birth_date else "",
        **({} if h.patient_age_years is None else {"PatientAge": f"{int(h.patient_age_years):03d}Y"}),
        "StudyInstanceUID": h.study_uid, "SeriesInstanceUID": h.series_uid, "SeriesNumber": h.series_number,
        "StudyID": h.accession_number[-8:] if h.accession_number else "1", "FrameOfReferenceUID": h.frame_uid,
        "ImageOrientationPatient": [*row, *col], "PixelSpacing": [sy, sx],  # (between rows, between columns)
        "SliceThickness": sz, "SpacingBetweenSlices": sz, "Rows": arr.shape[1], "Columns": arr.shape[2],
        "WindowCenter": float(wl[0] + wl[1]) / 2, "WindowWidth": float(max(wl[1] - wl[0], 1))}))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(arr.shape[0]):
        ipp = image.TransformIndexToPhysicalPoint((0, 0, k))
        ds = Dataset()
        ds.update(base)
        ds.update(_values({"SOPInstanceUID": deterministic_uid("sop", h.series_uid, k),
                           "InstanceNumber": k + 1, "ImagePositionPatient": list(ipp),
                           "SliceLocation": float(np.dot(nrm, ipp)), "PixelData": arr[k].tobytes()}))
        ds.file_meta = FileMetaDataset()  # the writer fills the rest from the dataset
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        paths.append(folder / f"IM{k + 1:04d}.dcm")
        with atomic_path(paths[-1]) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    return paths


def read_series(folder: str | Path) -> sitk.Image:
    """Read a series folder written by :func:`write_series` back with SimpleITK (for tests/preview)."""
    return sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
