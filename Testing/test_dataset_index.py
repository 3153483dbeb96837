"""Indexing a DICOM export: grouping, classification, problems, unreadable files, incremental runs.

Archives are written on the fly from the real Siemens series in Testing/Data (re-identified copies).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pydicom
import pytest

from rheumai.dataset.archive_tools import uid, write_series
from rheumai.dataset.classify import guess_region, guess_sequence, orientation_class
from rheumai.dataset.index import ArchiveIndex, index_archive
from rheumai.errors import InputError


def _small_archive(src: Path, root: Path) -> dict[str, str]:
    """Two patients, nested folders, names without extension, mixed folders, debris. Returns uids."""
    u = {k: uid("idx-test", k) for k in ("st1", "st2", "st3", "t2", "ax", "stir", "t1", "gap", "split", "x")}
    p1 = root / "site_a" / "IDX1"
    kw = dict(downsample=8, file_pattern="{sop}")
    write_series(src, p1 / "mixed", patient_id="IDX1", study_uid=u["st1"], series_uid=u["t2"], study_date="2020-01-02",
                 description="T2_TSE_SAG", sequence="T2", slices=range(8), series_number=3, **kw)
    write_series(src, p1 / "mixed", patient_id="IDX1", study_uid=u["st1"], series_uid=u["ax"], study_date="2020-01-02",
                 description="t2_tse_tra", sequence="T2", orientation="axial", slices=range(5), series_number=4, **kw)
    write_series(src, p1 / "stir", patient_id="IDX1", study_uid=u["st1"], series_uid=u["stir"], study_date="2020-01-02",
                 description="stir_sag", sequence="STIR", slices=range(6), series_number=5, **kw)
    write_series(src, p1 / "t1", patient_id="IDX1", study_uid=u["st1"], series_uid=u["t1"], study_date="2020-01-02",
                 description="sag", sequence="T1", slices=range(6), series_number=2, body_part="", **kw)
    p2 = root / "site_b" / "deep" / "er" / "IDX2"
    write_series(src, p2 / "2019", patient_id="IDX2", study_uid=u["st2"], series_uid=u["gap"], study_date="2019-05-06",
                 description="t2_sag", sequence="T2", slices=[0, 1, 2, 3, 5, 6, 7], **kw)
    write_series(src, p2 / "2022" / "x", patient_id="IDX2", study_uid=u["st3"], series_uid=u["split"],
                 study_date="2022-07-08", description="t2_sag", sequence="T2", slices=range(4), **kw)
    write_series(src, p2 / "2022" / "y", patient_id="IDX2", study_uid=u["st3"], series_uid=u["split"],
                 study_date="2022-07-08", description="t2_sag", sequence="T2", slices=range(4, 8),
                 file_pattern="b{index:04d}", downsample=8)
    (root / "notes.txt").write_text("not dicom\n")
    (root / "site_a" / "empty.dcm").write_bytes(b"")
    one = next((p1 / "t1").iterdir()).read_bytes()
    (root / "site_b" / "cut.dcm").write_bytes(one[:700])
    return u


@pytest.fixture()
def archive(tmp_path: Path, dicom_t1_dir: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "export"
    return root, _small_archive(dicom_t1_dir, root)


def test_grouping_and_classification(archive, tmp_path):
    root, u = archive
    summary = index_archive(root, tmp_path / "index.sqlite", progress=lambda *a: None)
    assert (summary.n_patients, summary.n_studies, summary.n_series) == (2, 3, 6)
    s = ArchiveIndex.open(tmp_path / "index.sqlite").series.set_index("series_uid")
    assert s.loc[u["t2"], ["orientation", "sequence", "sequence_source", "n_slices", "study_date", "region"]].tolist() == \
        ["sagittal", "T2", "description", 8, "2020-01-02", "cervical"]
    assert s.loc[u["ax"], ["orientation", "sequence", "n_slices"]].tolist() == ["axial", "T2", 5]
    assert s.loc[u["stir"], ["orientation", "sequence", "fat_suppressed"]].tolist() == ["sagittal", "STIR", 1]
    # No weighting keyword in "sag": guessed from TE 9 ms / TR 550 ms. Region from the study description.
    assert s.loc[u["t1"], ["sequence", "sequence_source", "region"]].tolist() == ["T1", "tags", "cervical"]
    assert s.loc[u["gap"], "patient_id"] == "IDX2" and s.loc[u["gap"], "n_slices"] == 7
    assert s.loc[u["t2"], "problems"] == [] and s.loc[u["t2"], "severe"] == 0


def test_problems_and_unreadable_files(archive, tmp_path):
    root, u = archive
    summary = index_archive(root, tmp_path / "index.sqlite", progress=lambda *a: None)
    s = ArchiveIndex.open(tmp_path / "index.sqlite").series.set_index("series_uid")
    assert any(p.startswith("about 1 missing slice(s): gap of") for p in s.loc[u["gap"], "problems"])
    assert "files spread over 2 folders" in s.loc[u["split"], "problems"]
    assert s.loc[u["split"], "n_slices"] == 8 and s.loc[u["split"], "n_files"] == 8
    bad = dict(summary.unreadable)
    assert set(bad) == {str((root / n).resolve()) for n in ("notes.txt", "site_a/empty.dcm", "site_b/cut.dcm")}
    assert bad[str((root / "notes.txt").resolve())] == "not a DICOM file"
    assert "unreadable: " in summary.text()


def test_incremental_reads_only_new_or_changed(archive, tmp_path, dicom_t1_dir):
    root, u = archive
    idx = tmp_path / "index.sqlite"
    first = index_archive(root, idx, progress=lambda *a: None)
    assert first.files_read == first.files_seen == 43  # 40 DICOM + 3 debris
    again = index_archive(root, idx, progress=lambda *a: None)
    assert (again.files_read, again.files_unchanged, again.files_removed) == (0, 43, 0)

    # Grown archive: a new patient; only its files are read.
    write_series(dicom_t1_dir, root / "site_c" / "IDX3", patient_id="IDX3", study_uid=uid("idx3"),
                 series_uid=uid("idx3s"), study_date="2021-03-04", description="t2_sag", sequence="T2",
                 slices=range(5), downsample=8)
    grown = index_archive(root, idx, progress=lambda *a: None)
    assert (grown.files_read, grown.files_unchanged, grown.n_patients) == (5, 43, 3)

    # A changed file (new description, later mtime) is re-read and the series updated.
    f = next((root / "site_a" / "IDX1" / "t1").iterdir())
    ds = pydicom.dcmread(f)
    ds.SeriesDescription = "t1_tse_sag_renamed"
    ds.save_as(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = index_archive(root, idx, progress=lambda *a: None)
    assert changed.files_read == 1
    import sqlite3

    con = sqlite3.connect(idx)
    (desc,) = con.execute("SELECT series_description FROM files WHERE path = ?", (str(f.resolve()),)).fetchone()
    con.close()
    assert desc == "t1_tse_sag_renamed"
    assert ArchiveIndex.open(idx).series.set_index("series_uid").loc[u["t1"], "n_files"] == 6

    # Vanished files are removed from the index.
    shutil.rmtree(root / "site_a" / "IDX1" / "stir")
    shrunk = index_archive(root, idx, progress=lambda *a: None)
    assert (shrunk.files_read, shrunk.files_removed) == (0, 6)
    assert u["stir"] not in set(ArchiveIndex.open(idx).series["series_uid"])


def test_each_header_is_read_once(archive, tmp_path, monkeypatch):
    import rheumai.dataset.index as index_module

    calls: list[Path] = []
    real = index_module.read_header
    monkeypatch.setattr(index_module, "read_header", lambda p: calls.append(p) or real(p))
    summary = index_archive(archive[0], tmp_path / "index.sqlite", progress=lambda *a: None)
    assert len(calls) == len(set(calls)) == summary.files_read == 43


def test_index_errors(tmp_path):
    with pytest.raises(InputError, match="archive root is not a folder"):
        index_archive(tmp_path / "nope", tmp_path / "i.sqlite")
    with pytest.raises(InputError, match="index file not found"):
        ArchiveIndex.open(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("hello")
    with pytest.raises(InputError, match="not a rheumai dataset index"):
        ArchiveIndex.open(tmp_path / "junk.sqlite")


def test_orientation_classes():
    assert orientation_class([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert orientation_class([1, 0, 0, 0, 1, 0]) == "axial"
    assert orientation_class([1, 0, 0, 0, 0, -1]) == "coronal"
    c, s = 0.94, 0.342  # 20 degrees tilt: still sagittal; 45 degrees: oblique
    assert orientation_class([0, c, s, 0, -s, c]) == "sagittal"
    assert orientation_class([0.7071, 0.7071, 0, 0, 0, -1]) == "oblique"
    assert orientation_class(None) == "unknown"
    assert orientation_class([0, 0, 0, 0, 0, 0]) == "unknown"


def test_sequence_and_region_guesses():
    assert guess_sequence("t2_tse_sag")[:3] == ("T2", False, "description")
    assert guess_sequence("T2_TSE_SAG_FS")[:2] == ("T2", True)
    assert guess_sequence("sag tirm")[:2] == ("STIR", True)
    assert guess_sequence("", te=100, tr=3000, scanning_sequence="SE")[:3] == ("T2", False, "tags")
    assert guess_sequence("", te=40, tr=4000, ti=150, scanning_sequence="SE\\IR")[:2] == ("STIR", True)
    assert guess_sequence("", te=2.5, tr=300, scanning_sequence="GR")[0] == "T1"
    assert guess_sequence("localizer")[0] == "unknown"
    seq, _, _, problems = guess_sequence("t2_sag", te=9, tr=500)
    assert seq == "T2" and problems == ["description suggests T2 but TE 9.0 ms / TR 500.0 ms suggest T1"]
    assert guess_region("CSPINE") == "cervical"
    assert guess_region("", "MRI CWK") == "cervical"
    assert guess_region("", "MRI LWK", "t2_sag") == "lumbar"
    assert guess_region("BRAIN") == "brain"
    assert guess_region("", "") == "unknown"


def test_problems_are_json_in_the_store(archive, tmp_path):
    import sqlite3

    root, _ = archive
    index_archive(root, tmp_path / "index.sqlite", progress=lambda *a: None)
    con = sqlite3.connect(tmp_path / "index.sqlite")
    vals = [json.loads(v) for (v,) in con.execute("SELECT problems FROM series")]
    con.close()
    assert all(isinstance(v, list) for v in vals)
