"""Slicer's DICOM database as a dataset source, through the database API.

Slicer imports DICOM files by link by default: the files stay where they were and the database
only records their paths, so ``<database>/dicom`` holds just the copied ones. The files of each
series are asked from the database (``ctkDICOMDatabase``: ``patients``, ``studiesForPatient``,
``seriesForStudy``, ``filesForSeries``) and linked into one folder per series, which the dataset
indexer reads like any DICOM export. Any object with those four methods works (tests use a fake).
No Qt, no MRML.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rheumai.errors import InputError

LINK_FOLDER = "dicom_database_files"


class DicomDatabase(Protocol):
    def patients(self) -> list[str]: ...
    def studiesForPatient(self, patient: str) -> list[str]: ...  # noqa: N802 (ctkDICOMDatabase names)
    def seriesForStudy(self, study: str) -> list[str]: ...  # noqa: N802
    def filesForSeries(self, series: str) -> list[str]: ...  # noqa: N802


@dataclass
class LinkedFiles:
    """folder: the folder of links (one sub-folder per series); n_series / n_files linked;
    missing: files the database lists that no longer exist; how: "symlink", "hardlink" or "copy"."""

    folder: Path
    n_series: int = 0
    n_files: int = 0
    missing: list[str] = field(default_factory=list)
    how: str = "symlink"


def series_files(db: DicomDatabase) -> dict[str, list[str]]:
    """{SeriesInstanceUID: [file paths]} of every series in the database (in database order)."""
    if getattr(db, "isOpen", True) is False:
        raise InputError(None, "Slicer's DICOM database is not open (open the DICOM module first)")
    out: dict[str, list[str]] = {}
    for patient in db.patients():
        for study in db.studiesForPatient(patient):
            for series in db.seriesForStudy(study):
                out.setdefault(str(series), []).extend(str(f) for f in db.filesForSeries(series))
    return out


def link_database_files(db: DicomDatabase, out_dir: str | Path) -> LinkedFiles:
    """Link every file of every series into ``out_dir/dicom_database_files/<series>/`` (rebuilt on
    each call, so removed series do not linger). Symbolic links where the system allows them,
    else hard links, else copies. Raises InputError when the database holds no existing file."""
    from rheumai.paths import safe_child

    by_series = series_files(db)
    root = Path(out_dir) / LINK_FOLDER
    if root.is_symlink() or root.is_file():
        raise InputError(root, "exists and is not a folder made by RheumAI")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    res = LinkedFiles(folder=root)
    for series, files in by_series.items():
        present = [f for f in files if os.path.isfile(f)]
        res.missing += [f for f in files if not os.path.isfile(f)]
        if not present:
            continue
        folder = safe_child(root, series, what="SeriesInstanceUID")
        folder.mkdir()
        for i, src in enumerate(present):
            dst = folder / f"{i:06d}.dcm"
            res.how = _link(Path(src).resolve(), dst, res.how)
        res.n_series += 1
        res.n_files += len(present)
    if not res.n_files:
        raise InputError(None, "Slicer's DICOM database lists no existing file"
                               + (f" ({len(res.missing)} listed files are missing)" if res.missing else ""))
    return res


def _link(src: Path, dst: Path, how: str) -> str:
    if how == "symlink":
        try:
            os.symlink(src, dst)
            return how
        except OSError:  # e.g. Windows without the symlink privilege
            how = "hardlink"
    if how == "hardlink":
        try:
            os.link(src, dst)
            return how
        except OSError:  # another volume
            how = "copy"
    shutil.copy2(src, dst)
    return how


def database_of(app_module: Any) -> DicomDatabase:
    """Slicer's open DICOM database (``slicer.dicomDatabase``), or InputError saying why not."""
    db = getattr(app_module, "dicomDatabase", None)
    if db is None or not getattr(db, "isOpen", False):
        raise InputError(None, "Slicer's DICOM database is not open (open the DICOM module first)")
    return db
