"""DICOM traps: enhanced multi-frame files that interleave image types or time points, and slices
replaced by empty or truncated files. The reader and the index agree and name the bad file."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from rheumai.dataset import CohortRules, SplitConfig, build_dataset, index_archive
from rheumai.dataset.index import ArchiveIndex
from rheumai.errors import AmbiguousSeriesError, InputError
from rheumai.io import list_series, read_study
from rheumai.tasks.cervical_ra.slices import SliceParams, SliceSelection

QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def enh(data_dir) -> Path:
    """Philips field map (magnitude + field map interleaved, one file) and a Siemens 4D series."""
    return data_dir / "dcm_qa_enh_multiframe"


def test_interleaved_image_types_are_separate_series(enh):
    philips = enh / "Philips" / "IM_0027_fMAP.dcm"
    series = list_series(philips)
    assert [s.part for s in series] == ["FIELD_MAP", "M"]
    assert all(s.uid.endswith("#" + s.part) and len(s.frames) == 32 for s in series)
    with pytest.raises(AmbiguousSeriesError, match="holds 2 image series") as err:
        read_study(philips)  # never one 64-slice volume
    assert "FIELD_MAP" in str(err.value) and "#M" in str(err.value)
    ref = sitk.ReadImage(str(enh / "Ref" / "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii.gz"))
    for s in series:
        img = read_study(philips, series_uid=s.uid).image
        assert img.GetSize() == (64, 64, 32) and img.GetSpacing() == pytest.approx((4.0, 4.0, 4.0))
        # Same physical box as dcm2niix's reference (its NIfTI is stored flipped in x and y).
        for corner in ((0, 0, 0), (63, 63, 31)):
            p = img.TransformIndexToPhysicalPoint(corner)
            q = ref.TransformIndexToPhysicalPoint(ref.TransformPhysicalPointToIndex(p))
            assert np.allclose(p, q, atol=0.05)
    # The field map part carries dcm2niix's field map values (Hz), frame rescale applied.
    fmap = read_study(philips, series_uid=series[0].uid).image
    same = sitk.Resample(ref, fmap, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    a, b = sitk.GetArrayFromImage(fmap), sitk.GetArrayFromImage(same)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_4d_enhanced_series_is_refused_as_4d(enh):
    with pytest.raises(InputError, match=r"is a 4D series \(2 volumes of 6 slices\)"):
        read_study(enh / "Siemens_XA10_4D")


def test_index_agrees_with_the_reader_and_the_series_enters_a_cohort(enh, tmp_path):
    root = tmp_path / "export"
    shutil.copytree(enh / "Philips", root / "philips")
    shutil.copytree(enh / "Siemens_XA10_4D", root / "siemens")
    idx = tmp_path / "index.sqlite"
    index_archive(root, idx, progress=QUIET)
    s = ArchiveIndex.open(idx).series.set_index("series_uid")
    for info in list_series(root / "philips"):
        row = s.loc[info.uid]
        img = read_study(root / "philips", series_uid=info.uid).image
        assert row["n_slices"] == img.GetSize()[2] == 32 and row["severe"] == 0 and row["problems"] == []
        assert row["orientation"] == "axial"
    four_d = s[s["problems"].map(lambda p: any("4D series (2 volumes of 6 slices)" in x for x in p))]
    assert len(four_d) == 1 and four_d["severe"].iloc[0] == 1
    # The magnitude part goes through rules, split and cache like any series.
    mag = next(u for u in s.index if u.endswith("#M"))
    ds = pydicom.dcmread(root / "philips" / "IM_0027_fMAP.dcm", stop_before_pixels=True)
    base = dt.date.fromisoformat(s.loc[mag, "study_date"])
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,baseline_study_uid,followup_date,outcome\n"
                      f"{ds.PatientID},{ds.StudyInstanceUID},{base + dt.timedelta(days=2000)},no\n")
    rules = CohortRules(orientation="axial", sequence=s.loc[mag, "sequence"], allow_fat_suppressed=True,
                        regions=(s.loc[mag, "region"],), min_slices=8)
    res = build_dataset(idx, labels, tmp_path / "ds", rules, SplitConfig(train_fraction=1.0),
                        SliceParams(n_slices=4, spacing_mm=4.0, size=(32, 32)), progress=QUIET)
    assert res.n_included == 1 and res.cohort.included[0].series_uid in (mag, next(u for u in s.index if "#FIELD_MAP" in u))
    row = next(iter(open(res.manifest).read().splitlines()[1:]))
    assert SliceSelection.load(tmp_path / "ds" / row.split(",")[9]).array.shape == (4, 32, 32)


def _copy_series(dicom_t1_dir: Path, dest: Path) -> list[Path]:
    shutil.copytree(dicom_t1_dir, dest)
    return sorted(p for p in dest.iterdir() if p.suffix == ".dcm")


@pytest.mark.parametrize("damage", ["empty", "header_cut", "half"])
def test_damaged_slice_is_named(dicom_t1_dir, tmp_path, damage):
    files = _copy_series(dicom_t1_dir, tmp_path / "s")
    bad = files[17]
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "header_cut": data[:600], "half": data[: len(data) // 2]}[damage])
    with pytest.raises(InputError) as err:
        read_study(tmp_path / "s")
    assert str(err.value).startswith(str(bad)), str(err.value)
    assert {"empty": "empty file", "header_cut": "truncated", "half": "truncated"}[damage] in str(err.value)


def test_index_does_not_call_a_series_with_a_truncated_file_clean(dicom_t1_dir, tmp_path):
    files = _copy_series(dicom_t1_dir, tmp_path / "s")
    files[5].write_bytes(files[5].read_bytes()[:5000])  # header intact, pixel data cut
    idx = tmp_path / "index.sqlite"
    index_archive(tmp_path / "s", idx, progress=QUIET)
    row = ArchiveIndex.open(idx).series.iloc[0]
    assert row["severe"] == 1
    assert any(p.startswith(files[5].name + ": truncated") for p in row["problems"]), row["problems"]
    # A slice replaced by an empty file leaves a gap: severe too (the reader refuses that stack).
    files[20].write_bytes(b"")
    index_archive(tmp_path / "s", idx, progress=QUIET)
    row = ArchiveIndex.open(idx).series.iloc[0]
    assert row["severe"] == 1 and any("missing slice(s)" in p for p in row["problems"])


def test_index_of_an_older_schema_is_upgraded_in_place(enh, tmp_path):
    import sqlite3

    root = tmp_path / "export"
    shutil.copytree(enh / "Philips", root / "philips")
    idx = tmp_path / "index.sqlite"
    index_archive(root, idx, progress=QUIET)
    con = sqlite3.connect(idx)
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.execute("ALTER TABLE files DROP COLUMN frames")
    con.commit()
    con.close()
    summary = index_archive(root, idx, progress=QUIET)
    assert summary.files_read == 1 and summary.n_series == 2


def test_index_readers_never_see_a_half_rebuilt_index(dicom_t1_dir, tmp_path):
    """A dataset build opening the index while it is re-indexed sees whole series tables."""
    import threading

    _copy_series(dicom_t1_dir, tmp_path / "s")
    idx = tmp_path / "index.sqlite"
    index_archive(tmp_path / "s", idx, progress=QUIET)
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                assert len(ArchiveIndex.open(idx).series) == 1
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=read)
    t.start()
    try:
        for k in range(12):  # a new oblique limit rebuilds the series tables
            index_archive(tmp_path / "s", idx, progress=QUIET, oblique_deg=20.0 + k)
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_frames_pydicom_cannot_decode_come_from_gdcm(enh, tmp_path, monkeypatch):
    """A compressed enhanced file (no pydicom decoder here) is decoded by GDCM when every frame's
    rescale is the identity, with the same result; with per-frame rescaling it is refused, named."""
    src = pydicom.dcmread(enh / "Philips" / "IM_0027_fMAP.dcm")
    for item in src.PerFrameFunctionalGroupsSequence:
        pvt = item.PixelValueTransformationSequence[0]
        pvt.RescaleSlope, pvt.RescaleIntercept = 1, 0
    plain = tmp_path / "identity.dcm"
    src.save_as(plain)
    uid = next(s.uid for s in list_series(plain) if s.part == "M")
    expected = sitk.GetArrayFromImage(read_study(plain, series_uid=uid).image)

    def no_decoder(self):
        raise RuntimeError("Unable to decode the pixel data: no available plugins (test)")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_decoder))
    got = sitk.GetArrayFromImage(read_study(plain, series_uid=uid).image)
    assert np.array_equal(got, expected)
    philips = enh / "Philips" / "IM_0027_fMAP.dcm"
    with pytest.raises(InputError, match="per-frame rescaling") as err:
        read_study(philips, series_uid=uid)
    assert str(err.value).startswith(str(philips))
