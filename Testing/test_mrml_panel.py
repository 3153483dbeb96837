"""The panel's Qt-free parts: task rows from the registry, clinical form values, path fields,
and Slicer's DICOM database read through its API (a fake database with linked files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rheumai.errors import InputError
from rheumai.tasks import get_task, list_tasks
from rheumai_mrml.dicom_db import LINK_FOLDER, link_database_files, series_files
from rheumai_mrml.panel import clinical_values, path_text, result_text, task_fields


def test_every_registered_task_has_a_panel():
    for task in list_tasks():
        d = task.describe()
        fields = task_fields(d)
        assert [f.key for f in fields if f.kind == "volume"] == list(task.roles)
        assert all(f.node_class == "vtkMRMLScalarVolumeNode" for f in fields if f.kind == "volume")
        assert any(f.kind == "roi" for f in fields) == (task.roi is not None)
        assert [f.key for f in fields if f.kind == "clinical"] == [c.name for c in task.clinical]


def test_negspa_panel_rows_and_clinical_form():
    d = get_task("negspa").describe()
    fields = {f.key: f for f in task_fields(d)}
    assert [k for k, f in fields.items() if f.kind == "volume"] == ["t1", "t2", "stir"]
    assert fields["roi"].node_class == "vtkMRMLMarkupsROINode"
    assert fields["crp"].unit == "mg/L" and fields["crp"].range == (0.0, 300.0) and not fields["crp"].choices
    assert fields["sex"].choices == ("", "yes", "no") or fields["sex"].choices[0] == ""
    assert clinical_values(d, {"crp": " 12.5 ", "age": "", "sex": "M"}) == {"crp": 12.5, "sex": "M"}
    with pytest.raises(InputError, match="crp: 400 mg/L is outside 0-300"):
        clinical_values(d, {"crp": "400"})
    with pytest.raises(InputError, match="crp: 'high' is not a number"):
        clinical_values(d, {"crp": "high"})
    with pytest.raises(InputError, match="not yes / no"):
        clinical_values(d, {"sex": "maybe"})
    with pytest.raises(InputError, match="no clinical variable hla"):
        clinical_values(d, {"hla": "1"})


def test_path_fields_are_empty_when_unset():
    assert path_text(None) == "" and path_text(Path("")) == "" and path_text(".") == ""
    assert path_text(Path("/data/x")) == "/data/x"


class FakeDicomDatabase:
    """What ctkDICOMDatabase answers: patients -> studies -> series -> files (anywhere on disk)."""

    def __init__(self, tree: dict, is_open: bool = True):
        self.tree, self.isOpen = tree, is_open

    def patients(self):
        return list(self.tree)

    def studiesForPatient(self, p):  # noqa: N802
        return list(self.tree[p])

    def seriesForStudy(self, s):  # noqa: N802
        return [se for p in self.tree.values() for st, series in p.items() if st == s for se in series]

    def filesForSeries(self, se):  # noqa: N802
        return [f for p in self.tree.values() for series in p.values() for k, fs in series.items() if k == se
                for f in fs]


def test_dicom_database_files_are_found_through_the_api(tmp_path, dicom_t1_dir):
    """Files imported by link live outside <database>/dicom; the database API still lists them."""
    db_dir = tmp_path / "SlicerDICOMDatabase"
    (db_dir / "dicom").mkdir(parents=True)  # what Slicer copies: nothing, with link import
    files = sorted(str(p) for p in dicom_t1_dir.glob("*.dcm"))
    db = FakeDicomDatabase({"P1": {"1.2.3": {"1.2.3.4": files + [str(tmp_path / "deleted.dcm")]}}})
    assert series_files(db) == {"1.2.3.4": files + [str(tmp_path / "deleted.dcm")]}
    linked = link_database_files(db, tmp_path / "out")
    assert (linked.n_series, linked.n_files, linked.missing) == (1, len(files), [str(tmp_path / "deleted.dcm")])
    assert linked.folder == tmp_path / "out" / LINK_FOLDER
    links = sorted((linked.folder / "1.2.3.4").iterdir())
    assert [os.path.realpath(p) for p in links] == [os.path.realpath(f) for f in files]
    from rheumai.dataset import index_archive

    summary = index_archive(linked.folder, tmp_path / "out" / "index.sqlite", progress=lambda *a: None)
    assert summary.n_series == 1 and summary.files_seen == len(files) and not summary.unreadable
    # rebuilt on each call: a series gone from the database leaves no stale links
    db.tree["P1"]["1.2.3"] = {"9.9": files[:2]}
    again = link_database_files(db, tmp_path / "out")
    assert sorted(p.name for p in again.folder.iterdir()) == ["9.9"] and again.n_files == 2
    with pytest.raises(InputError, match="not open"):
        series_files(FakeDicomDatabase({}, is_open=False))
    with pytest.raises(InputError, match="no existing file"):
        link_database_files(FakeDicomDatabase({"P": {"S": {"X": [str(tmp_path / "gone.dcm")]}}}), tmp_path / "o2")
    with pytest.raises(InputError, match="SeriesInstanceUID"):
        link_database_files(FakeDicomDatabase({"P": {"S": {"../../evil": files[:1]}}}), tmp_path / "o3")


def test_result_line_for_binary_and_other_heads():
    assert result_text({"probability": 0.81234, "label": 1, "threshold": 0.4, "model_id": "m"}) == \
        "Probability 0.812, class 1 (threshold 0.400); model m"
    assert result_text({"task": "hand_svdh", "total": 12.456, "class": 2, "class_name": "moderate", "label": 2,
                        "landmarks_source": "predicted", "model_id": "h"}) == \
        "total 12.46, class 2, class name moderate; model h"
