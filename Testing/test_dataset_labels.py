"""Label sheet validation: every bad row is named with its problem."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from rheumai.dataset.archive_tools import uid, write_series
from rheumai.dataset.index import ArchiveIndex, index_archive
from rheumai.dataset.labels import LabelSheetError, load_labels, read_labels
from rheumai.errors import InputError

HEADER = "patient_id,baseline_date,baseline_study_uid,followup_date,outcome,baseline_deformity,site,age"


@pytest.fixture(scope="module")
def index(tmp_path_factory, dicom_t1_dir) -> ArchiveIndex:
    root = tmp_path_factory.mktemp("labels") / "export"
    for k in range(1, 11):
        pid = f"L{k}"
        write_series(dicom_t1_dir, root / pid, patient_id=pid, study_uid=uid("lab", pid), series_uid=uid("lab-s", pid),
                     study_date="2020-01-02", description="t2_sag", sequence="T2", slices=range(3), downsample=8)
    idx = root.parent / "index.sqlite"
    index_archive(root, idx, progress=lambda *a: None)
    return ArchiveIndex.open(idx)


def _write(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


def test_every_bad_row_is_named(index, tmp_path):
    sheet = _write(tmp_path / "labels.csv", [
        HEADER,
        "L1,2020-01-02,,2023-05-01,yes,no,A,50",
        "X9,2020-01-02,,2023-05-01,no,no,A,51",
        "L2,2020-02-30,,2023-05-01,no,,A,52",
        "L3,,,2023-05-01,no,,A,53",
        "L1,2020-01-02,,2023-06-01,no,,A,54",
        "L4,2020-01-02,,2023-05-01,maybe,no,A,55",
        "L5,2020-01-02,,2019-05-01,no,no,A,56",
        "L6,2020-01-02,,03/05/2023,no,no,A,57",
        "L7,2020-01-02,,2023-05-01,no,perhaps,B,58",
        "L8,,1.2.3.4,2023-05-01,no,no,B,59",
        "L9,2020-01-02,,2023-05-01,,no,B,60",
        "",
        "L10,2020-01-02",
        ",2020-01-02,,,yes,no,B,61",
    ])
    good, problems = read_labels(sheet, index)
    assert [r.patient_id for r in good.rows] == ["L1"]
    assert [str(p) for p in problems] == [
        "row 3 (patient X9): unknown patient (not in the index)",
        "row 4 (patient L2): baseline_date: impossible date '2020-02-30' (no such day)",
        "row 5 (patient L3): missing baseline (neither baseline_date nor baseline_study_uid)",
        "row 6 (patient L1): duplicate patient_id (first on row 2)",
        "row 7 (patient L4): outcome 'maybe' is not one of yes, no, intermediate",
        "row 8 (patient L5): impossible dates: followup_date 2019-05-01 is not after baseline_date 2020-01-02",
        "row 9 (patient L6): followup_date: '03/05/2023' is not a date in YYYY-MM-DD form",
        "row 10 (patient L7): baseline_deformity 'perhaps' is not yes, no or blank",
        "row 11 (patient L8): baseline_study_uid 1.2.3.4 is not a study of this patient in the index",
        "row 12 (patient L9): missing outcome",
        "row 14 (patient L10): has 2 fields, the header has 8",
        "row 15: missing patient_id",
        "row 15: missing followup_date",
    ]
    with pytest.raises(LabelSheetError) as info:
        load_labels(sheet, index)
    msg = str(info.value)
    assert msg.startswith(f"{sheet}: 13 problem(s) in the label sheet")
    assert "row 9 (patient L6)" in msg and len(info.value.problems) == 13


def test_valid_sheet_semicolons_bom_and_uids(index, tmp_path):
    sheet = _write(tmp_path / "labels.csv", [
        HEADER.replace(",", ";"),
        "L1;2020-01-02;;2023-05-01;Yes;No;A;50",
        f"L2;;{uid('lab', 'L2')};2023-05-01;INTERMEDIATE;;B;51",
        "L3;2020-01-02;;2022-01-01;no;;;",
    ], encoding="utf-8-sig")
    labels = load_labels(sheet, index)
    assert labels.clinical_columns == ["age"]
    r1, r2, r3 = labels.rows
    assert (r1.outcome, r1.baseline_deformity, r1.site, r1.clinical) == ("yes", "no", "A", {"age": "50"})
    assert r1.baseline_date == dt.date(2020, 1, 2) and r1.followup_date == dt.date(2023, 5, 1)
    assert (r2.baseline_date, r2.baseline_study_uid, r2.outcome) == (None, uid("lab", "L2"), "intermediate")
    assert r3.baseline_deformity is None and r3.site == ""
    assert len(labels.sha256) == 64


def test_sheet_level_errors(index, tmp_path):
    with pytest.raises(InputError, match="missing column\\(s\\): outcome"):
        load_labels(_write(tmp_path / "a.csv", ["patient_id,baseline_date,followup_date", "L1,2020-01-02,2023-01-01"]), index)
    with pytest.raises(InputError, match="baseline_date or baseline_study_uid"):
        load_labels(_write(tmp_path / "b.csv", ["patient_id,followup_date,outcome", "L1,2023-01-01,yes"]), index)
    with pytest.raises(InputError, match="label sheet is empty"):
        load_labels(_write(tmp_path / "c.csv", [""]), index)
    with pytest.raises(InputError, match="duplicate column\\(s\\) in the header: age"):
        load_labels(_write(tmp_path / "d.csv", [HEADER + ",age"]), index)
    with pytest.raises(InputError, match="label sheet not found"):
        load_labels(tmp_path / "none.csv", index)
    with pytest.raises(InputError, match="has a header but no rows"):
        load_labels(_write(tmp_path / "e.csv", [HEADER]), index)
