"""Re-identified copies of a real DICOM series (:func:`write_series`) and a synthetic hospital
export with a label sheet whose inclusion flow is known (:func:`write_demo_archive`), for tests
and demos. Geometry stays consistent: positions / orientations (DICOM LPS, mm) change together.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pydicom
from pydicom.uid import generate_uid

from ..errors import InputError

# Header values that make a series look like each weighting (ms). Matches classify.sequence_from_tags.
SEQUENCE_TAGS: dict[str, dict[str, object]] = {
    "T2": {"EchoTime": 100.0, "RepetitionTime": 3200.0, "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"],
           "SequenceName": "*tse2d1_17", "ScanOptions": ""},
    "T1": {"EchoTime": 9.0, "RepetitionTime": 550.0, "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"],
           "SequenceName": "*tse2d1_3", "ScanOptions": ""},
    "STIR": {"EchoTime": 50.0, "RepetitionTime": 4000.0, "InversionTime": 160.0, "ScanningSequence": ["SE", "IR"],
             "SequenceVariant": ["SK", "SP", "MP"], "SequenceName": "*tir2d1_13", "ScanOptions": "IR"},
}


def uid(*parts: object) -> str:
    """Deterministic DICOM UID from the given parts (same parts, same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


@functools.lru_cache(maxsize=4)
def _load_source(source: str) -> tuple[bytes, ...]:
    """The DICOM files of a source series folder, sorted along the slice normal, as bytes without
    vendor-private elements (they may hold the original identifiers) and referenced localisers (they
    point at the original series). Each copy reads them anew (faster than copying a dataset)."""
    dss = []
    for f in sorted(p for p in Path(source).iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except pydicom.errors.InvalidDicomError:
            continue  # LICENSE and other non-DICOM files beside the series
        ds.remove_private_tags()
        ds.pop("ReferencedImageSequence", None)
        dss.append(ds)
    if not dss:
        raise InputError(source, "no DICOM files to copy")
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    out = []
    for ds in dss:
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append(buf.getvalue())
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _downsampled(source: str, i: int, step: int) -> tuple[bytes, tuple[int, int]]:
    """Pixel bytes and (rows, cols) of slice ``i`` of ``source`` taken every ``step`` pixels."""
    arr = pydicom.dcmread(io.BytesIO(_load_source(source)[i])).pixel_array[::step, ::step]
    return np.ascontiguousarray(arr).tobytes(), arr.shape


def write_series(
    source: str | Path,
    out_dir: str | Path,
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    study_date: dt.date | str,
    description: str,
    series_number: int = 1,
    sequence: str | None = None,
    orientation: str | None = None,
    slices: Sequence[int] | None = None,
    downsample: int = 1,
    body_part: str = "CSPINE",
    file_pattern: str = "IM{index:04d}.dcm",
) -> list[Path]:
    """Copy the series in ``source`` into ``out_dir`` as a new patient / study / series; returns the paths.

    sequence: timing tags of :data:`SEQUENCE_TAGS` (None keeps them). orientation "axial": slices
    stacked along LPS +z at the source spacing (a valid distractor). slices: indices along the
    normal to keep. downsample: in-plane stride (PixelSpacing grows, first pixel centre kept).
    """
    if sequence not in (None, *SEQUENCE_TAGS):
        raise ValueError(f"sequence must be one of {sorted(SEQUENCE_TAGS)}, not {sequence!r}")
    if orientation not in (None, "axial"):
        raise ValueError(f"orientation must be None or 'axial', not {orientation!r}")
    dss = _load_source(str(Path(source).resolve()))
    keep = list(range(len(dss))) if slices is None else list(slices)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    da = str(study_date).replace("-", "")
    ipp = [np.asarray(pydicom.dcmread(io.BytesIO(d)).ImagePositionPatient, float) for d in dss[:2]]
    spacing = float(np.linalg.norm(ipp[1] - ipp[0])) if len(ipp) > 1 else 1.0
    written = []
    for n, i in enumerate(keep, 1):
        ds = pydicom.dcmread(io.BytesIO(dss[i]))
        sop = uid("sop", series_uid, i)
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if sequence is not None:
            ds.pop("InversionTime", None)
        for tag, value in {"PatientID": patient_id, "PatientName": patient_id, "StudyInstanceUID": study_uid,
                           "SeriesInstanceUID": series_uid, "SOPInstanceUID": sop,
                           **dict.fromkeys(("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                                            "InstanceCreationDate", "PerformedProcedureStepStartDate"), da),
                           "SeriesDescription": description, "ProtocolName": description,
                           "StudyDescription": "MRI CWK", "SeriesNumber": series_number, "InstanceNumber": n,
                           "BodyPartExamined": body_part, "InstitutionName": "", "StudyID": "",
                           "FrameOfReferenceUID": uid("frame", series_uid),
                           **(SEQUENCE_TAGS[sequence] if sequence else {})}.items():
            setattr(ds, tag, value)
        if orientation == "axial":
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            z = -60.0 + spacing * i
            ds.ImagePositionPatient = [-128.0, -128.0, z]
            ds.SliceLocation = z
        if downsample > 1:
            ds.PixelData, (ds.Rows, ds.Columns) = _downsampled(str(Path(source).resolve()), i, downsample)
            ds.PixelSpacing = [float(v) * downsample for v in ds.PixelSpacing]
            ds.pop("SmallestImagePixelValue", None)
            ds.pop("LargestImagePixelValue", None)
        path = Path(out_dir) / file_pattern.format(index=n, sop=sop)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)  # encoding from TransferSyntaxUID
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Demo archive with a known inclusion flow.

DEMO_SCENARIOS: dict[str, str] = {
    "ok": "baseline study with sagittal T2 (complete), sagittal T1 and axial T2; follow-up study later",
    "two_t2": "baseline study with two sagittal T2 series (complete and a 12-slice one): the complete one is chosen",
    "by_uid": "label sheet names the baseline by StudyInstanceUID instead of date",
    "no_study": "no MRI study on the label sheet's baseline date (the study is 40 days earlier)",
    "no_t2": "baseline study has sagittal T1 and axial T2 only",
    "short_followup": "follow-up 700 days after baseline",
    "deformity": "deformity already present at baseline",
    "intermediate": "outcome 'intermediate'",
}
# Scenario of each demo patient, cycled every 22: 44 patients -> 34 included and 10 excluded under the
# default rules (2 per exclusion kind: no_study, no_t2, short_followup, deformity, intermediate).
_DEMO_CYCLE = (
    ["ok"] * 7 + ["two_t2", "by_uid"] + ["ok"] * 5
    + ["no_study", "no_t2", "short_followup", "deformity", "intermediate"]
    + ["ok"] * 3
)


@dataclass
class DemoArchive:
    """What :func:`write_demo_archive` wrote and the truth."""

    root: Path
    labels_csv: Path
    scenarios: dict[str, str]  # patient_id -> scenario key
    outcomes: dict[str, str]  # patient_id -> yes / no / intermediate
    t2_series: dict[str, str]  # patient_id -> SeriesInstanceUID of the series that should be chosen


def write_demo_archive(
    source: str | Path,
    root: str | Path,
    labels_csv: str | Path,
    n_patients: int = 44,
    downsample: int = 2,
    seed: int = 0,
) -> DemoArchive:
    """A nested, mixed synthetic export of ``n_patients`` (scenarios of :data:`DEMO_SCENARIOS`, cycled)
    plus its label sheet (sites A / B). The T2 series to select are complete copies of ``source``;
    distractors keep 4 slices; ``seed`` shifts the dates. Debris: a non-DICOM file, a truncated
    DICOM file and a patient without a label row."""
    root, labels_csv = Path(root), Path(labels_csv)
    rng = np.random.default_rng(seed)
    few = [0, 8, 16, 24]
    scenarios, outcomes, chosen = {}, {}, {}
    rows = []
    for k in range(n_patients):
        pid = f"P{k + 1:03d}"
        kind = scenarios[pid] = _DEMO_CYCLE[k % len(_DEMO_CYCLE)]
        j = list(scenarios.values()).count(kind) - 1  # earlier patients of this scenario
        yes = (j + k) % 3 == 0
        outcome = outcomes[pid] = "intermediate" if kind == "intermediate" else "yes" if yes else "no"
        base = dt.date(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 1500)))
        fu_days = 700 if kind == "short_followup" else 1000 + int(rng.integers(0, 800))
        follow = base + dt.timedelta(days=fu_days)
        # Nested, mixed layout: patient folder / study date folder / series folder.
        pdir = root / f"export_{k % 3}" / pid
        study = uid("study", pid, "base", seed)

        def series(sub: str, key: str, description: str, number: int, sequence: str, date: dt.date = base,
                   study_uid: str = study, **kw: Any) -> str:
            series_uid = uid("series", pid, key, seed)
            write_series(source, pdir / date.isoformat() / sub, patient_id=pid, study_uid=study_uid,
                         series_uid=series_uid, study_date=date, description=description, series_number=number,
                         sequence=sequence, downsample=downsample, **kw)
            return series_uid

        if kind != "no_t2":
            chosen[pid] = series("S3", "t2", "t2_tse_sag", 3, "T2")
        series("S2", "t1", "t1_tse_sag", 2, "T1", slices=few)
        series("S4", "ax", "t2_tse_tra", 4, "T2", orientation="axial", slices=few)
        if kind == "two_t2":
            series("S5", "t2b", "t2_tse_sag_repeat", 5, "T2", slices=range(10, 22))
        series("S3", "fu_t2", "t2_tse_sag", 3, "T2", follow, uid("study", pid, "follow", seed), slices=few)
        label_base = base + dt.timedelta(days=40) if kind == "no_study" else base
        rows.append({"patient_id": pid, "baseline_date": "" if kind == "by_uid" else label_base.isoformat(),
                     "baseline_study_uid": study if kind == "by_uid" else "", "followup_date": follow.isoformat(),
                     "outcome": outcome, "baseline_deformity": "yes" if kind == "deformity" else "no",
                     "site": "AB"[k % 2], "age": str(45 + (k * 7) % 30), "sex": "F" if k % 3 else "M"})
    # Debris: a patient with images but no label row, a text file, a truncated DICOM file.
    write_series(source, root / "unlabelled" / "X999", patient_id="X999", study_uid=uid("study", "X999", seed),
                 series_uid=uid("series", "X999", seed), study_date="2015-05-05", description="t2_tse_sag",
                 sequence="T2", slices=few, downsample=downsample)
    (root / "export_0" / "README.txt").write_text("exported by PACS\n")
    any_dcm = next((root / "unlabelled" / "X999").iterdir()).read_bytes()
    (root / "export_1" / "broken.dcm").write_bytes(any_dcm[:600])
    labels_csv.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(labels_csv, index=False)
    return DemoArchive(root=root, labels_csv=labels_csv, scenarios=scenarios, outcomes=outcomes, t2_series=chosen)
