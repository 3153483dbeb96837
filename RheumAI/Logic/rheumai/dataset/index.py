"""Index a hospital DICOM export: headers only, grouped into patient / study / series.

One SQLite file: table ``files`` (one row per file seen: path, size, mtime, status, header
fields); ``series`` / ``studies`` are rebuilt from it. Re-running reads only files whose (size,
mtime) changed and drops vanished ones; reading commits every ``COMMIT_EVERY`` files, so an
interrupted run resumes. Unreadable files are recorded with the reason, never fatal. Slice
geometry goes through :func:`rheumai.multiframe.stack_of`, as in the reader. Positions: DICOM
LPS mm; dates: ISO ``YYYY-MM-DD``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from ..io import pixel_data_problem
from ..multiframe import PART_SEP, Frame, finite_floats, frames_of, is_enhanced, split_parts, stack_of
from .cache import ProgressFn, reporting
from .classify import as_float, guess_region, guess_sequence, orientation_class

SCHEMA_VERSION = 2
COMMIT_EVERY = 500


def _str(ds: pydicom.Dataset, key: str) -> str:
    v = ds.get(key)
    if v is None:
        return ""
    return "\\".join(str(x) for x in v) if isinstance(v, pydicom.multival.MultiValue) else str(v).strip()


def _float(ds: pydicom.Dataset, key: str) -> float | None:
    return as_float(ds.get(key))


def _int(ds: pydicom.Dataset, key: str) -> int | None:
    return None if (f := as_float(ds.get(key))) is None else int(f)


def _vec(n: int) -> Callable[[pydicom.Dataset, str], str | None]:
    """Reader of an n-number tag as JSON (None when absent, malformed or not finite)."""
    return lambda ds, key: None if (v := finite_floats(ds.get(key), n)) is None else json.dumps(list(v))


# files columns read from the header: (column, SQL type, DICOM keyword, reader). Pixel data is never read.
_HEADER = [
    ("patient_id", "TEXT", "PatientID", _str), ("study_uid", "TEXT", "StudyInstanceUID", _str),
    ("series_uid", "TEXT", "SeriesInstanceUID", _str), ("sop_uid", "TEXT", "SOPInstanceUID", _str),
    ("study_description", "TEXT", "StudyDescription", _str),
    ("series_description", "TEXT", "SeriesDescription", _str), ("protocol_name", "TEXT", "ProtocolName", _str),
    ("series_number", "INTEGER", "SeriesNumber", _int), ("modality", "TEXT", "Modality", _str),
    ("body_part", "TEXT", "BodyPartExamined", _str), ("institution", "TEXT", "InstitutionName", _str),
    ("scanning_sequence", "TEXT", "ScanningSequence", _str), ("sequence_variant", "TEXT", "SequenceVariant", _str),
    ("scan_options", "TEXT", "ScanOptions", _str), ("sequence_name", "TEXT", "SequenceName", _str),
    ("echo_time", "REAL", "EchoTime", _float), ("repetition_time", "REAL", "RepetitionTime", _float),
    ("inversion_time", "REAL", "InversionTime", _float), ("iop", "TEXT", "ImageOrientationPatient", _vec(6)),
    ("ipp", "TEXT", "ImagePositionPatient", _vec(3)), ("instance_number", "INTEGER", "InstanceNumber", _int),
    ("rows", "INTEGER", "Rows", _int), ("cols", "INTEGER", "Columns", _int),
    ("pixel_spacing", "TEXT", "PixelSpacing", _vec(2)), ("slice_thickness", "REAL", "SliceThickness", _float),
    ("n_frames", "INTEGER", "NumberOfFrames", _int),
]
_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate")
TAGS = [k for _, _, k, _ in _HEADER] + list(_DATES) + ["ImageType", "PixelData", "PerFrameFunctionalGroupsSequence",
                                                       "SharedFunctionalGroupsSequence"]
_FILE_COLUMNS = ([("path", "TEXT PRIMARY KEY"), ("size", "INTEGER"), ("mtime_ns", "INTEGER"), ("status", "TEXT"),
                  ("error", "TEXT"), ("study_date", "TEXT")] + [(c, t) for c, t, _, _ in _HEADER]
                 + [("frames", "TEXT"), ("problem", "TEXT")])
FILE_FIELDS = [c for c, _ in _FILE_COLUMNS]
SERIES_COLUMNS = [
    "series_uid", "patient_id", "study_uid", "study_date", "series_number", "description", "modality",
    "orientation", "sequence", "fat_suppressed", "sequence_source", "region", "n_files", "n_slices", "rows",
    "cols", "folder", "n_folders", "institution", "problems", "severe",
]


@dataclass
class IndexSummary:
    """What one indexing run did (counts of files) and what the index now holds."""

    index_path: str
    root: str
    files_seen: int = 0
    files_read: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this root
    n_patients: int = 0
    n_studies: int = 0
    n_series: int = 0

    def text(self, max_unreadable: int = 20) -> str:
        lines = [f"index {self.index_path} (root {self.root})",
                 f"  files: {self.files_seen} seen, {self.files_read} read, {self.files_unchanged} unchanged, "
                 f"{self.files_removed} removed, {len(self.unreadable)} unreadable or not images",
                 f"  holds {self.n_patients} patients, {self.n_studies} studies, {self.n_series} series"]
        lines += [f"  unreadable: {p}: {why}" for p, why in self.unreadable[:max_unreadable]]
        if len(self.unreadable) > max_unreadable:
            lines.append(f"  ... and {len(self.unreadable) - max_unreadable} more unreadable files")
        return "\n".join(lines)


def _connect(index_path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(index_path), timeout=60.0)  # another indexing run may hold the write lock
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is not None and int(row[0]) > SCHEMA_VERSION:
        con.close()
        raise InputError(index_path, f"index schema version {row[0]}, this rheumai reads {SCHEMA_VERSION}; "
                                     "re-index into a new file")
    if row is not None and int(row[0]) < SCHEMA_VERSION:
        # An older index lacks per-file columns: every file is read again once, into the same file.
        con.executescript("".join(f"DROP TABLE IF EXISTS {t};" for t in ("files", "series", "studies")))
    con.execute(f"CREATE TABLE IF NOT EXISTS files ({', '.join(f'{c} {t}' for c, t in _FILE_COLUMNS)})")
    con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    con.commit()
    return con


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under root, sorted; hidden entries skipped; symlinked folders not followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))


def read_header(path: Path) -> dict[str, Any]:
    """One ``files`` row for ``path`` (status "ok", "unreadable" or "not_image")."""
    try:
        st = path.stat()
    except OSError as exc:  # vanished between walk and read
        return {"path": str(path), "size": -1, "mtime_ns": -1, "status": "unreadable", "error": str(exc)}
    row: dict[str, Any] = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:  # pixel data deferred: its length is checked against the file size, never read
        ds = pydicom.dcmread(path, defer_size=4096, specific_tags=TAGS)
    except InvalidDicomError:
        try:  # some exports omit the 128-byte preamble; accept them only if they hold an image header
            ds = pydicom.dcmread(path, defer_size=4096, specific_tags=TAGS, force=True)
            if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
                return {**row, "status": "unreadable", "error": "not a DICOM file"}
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not DICOM"
            return {**row, "status": "unreadable", "error": f"not a DICOM file ({type(exc).__name__})"}
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files must not stop the walk
        return {**row, "status": "unreadable", "error": f"{type(exc).__name__}: {exc}"[:300]}
    try:
        if not _str(ds, "SeriesInstanceUID") or not _str(ds, "SOPInstanceUID"):
            return {**row, "status": "not_image", "error": "no SeriesInstanceUID/SOPInstanceUID in the header "
                                                           "(truncated file, DICOMDIR or non-image object)"}
        row.update({c: f(ds, k) for c, _, k, f in _HEADER}, status="ok", error=None, frames=None,
                   problem=pixel_data_problem(path, ds))
        date = next((v for v in map(lambda k: _str(ds, k), _DATES) if len(v) >= 8 and v[:8].isdigit()), None)
        row["study_date"] = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if date else None
        if is_enhanced(ds):
            row["frames"] = json.dumps(_frames_json(ds, path))
    except InputError as exc:  # malformed functional groups: the file is there but cannot be placed
        row["problem"] = exc.problem[:300]
    except Exception as exc:  # noqa: BLE001 - a malformed value in one header is that file's problem
        return {**row, "status": "unreadable", "error": f"bad header value: {type(exc).__name__}: {exc}"[:300]}
    return row


def _frames_json(ds: pydicom.Dataset, path: Path) -> list[dict[str, Any]]:
    """An enhanced file's frames, one entry per (frame type, stack, echo time, orientation, pixel
    spacing) with the frames' positions (LPS mm), in frame order."""
    groups: dict[tuple, dict[str, Any]] = {}
    for fr in frames_of(ds, path):
        g = groups.setdefault((fr.frame_type, fr.stack, fr.echo_ms, fr.iop, fr.pixel_spacing), {
            "type": list(fr.frame_type), "stack": fr.stack, "echo_ms": fr.echo_ms, "iop": list(fr.iop),
            "spacing": list(fr.pixel_spacing), "index": [], "ipp": []})
        g["index"].append(fr.index)
        g["ipp"].append([round(v, 5) for v in fr.ipp])
    return list(groups.values())


def _frames_from_json(path: str, text: str) -> list[Frame]:
    return [Frame(path, i, tuple(ipp), tuple(g["iop"]), tuple(g["spacing"]), 1.0, 0.0, tuple(g["type"]), g["stack"],
                  g.get("echo_ms")) for g in json.loads(text) for i, ipp in zip(g["index"], g["ipp"])]


def index_archive(root: str | Path, index_path: str | Path, progress: ProgressFn | None = None,
                  oblique_deg: float = 30.0) -> IndexSummary:
    """Index (or update the index of) the DICOM files under ``root`` into ``index_path``: only new or
    changed files are read; one index may hold several roots; files that vanished from under ``root``
    are removed. ``progress(stage, done, total)`` replaces the tqdm bar; ``oblique_deg``: degrees, see
    :mod:`rheumai.dataset.classify`."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError(root, "archive root is not a folder")
    index_path = Path(index_path)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    summary = IndexSummary(index_path=str(index_path), root=str(root))
    under = (str(root) + os.sep, str(root) + chr(ord(os.sep) + 1))
    with contextlib.closing(_connect(index_path)) as con:
        known = {p: (s, m) for p, s, m in con.execute(
            "SELECT path, size, mtime_ns FROM files WHERE path >= ? AND path < ?", under)}
        todo: list[Path] = []
        seen: set[str] = set()
        for p in _walk(root):
            try:
                st = p.stat()
            except OSError as exc:
                summary.unreadable.append((str(p), f"cannot stat: {exc}"))
                continue
            seen.add(str(p))
            if known.get(str(p)) == (st.st_size, st.st_mtime_ns):
                summary.files_unchanged += 1
            else:
                todo.append(p)
        summary.files_seen = len(seen)
        gone = [p for p in known if p not in seen]
        con.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in gone])
        summary.files_removed = len(gone)
        con.commit()

        sql = f"INSERT OR REPLACE INTO files ({', '.join(FILE_FIELDS)}) VALUES ({', '.join('?' * len(FILE_FIELDS))})"
        with reporting(progress, "reading DICOM headers", len(todo), "file") as tick:
            for i, p in enumerate(todo, 1):
                header = read_header(p)  # once per file, not once per field
                con.execute(sql, tuple(header.get(c) for c in FILE_FIELDS))
                if i % COMMIT_EVERY == 0 or i == len(todo):
                    con.commit()
                tick(i)
        summary.files_read = len(todo)
        summary.unreadable += [(p, e or "") for p, e in con.execute(
            "SELECT path, error FROM files WHERE status != 'ok' AND path >= ? AND path < ? ORDER BY path", under)]
        # The series tables depend only on the files table and oblique_deg: skip the rebuild
        # (about 10 s per 100k files) when neither changed.
        has_series = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'series'").fetchone()
        last = con.execute("SELECT value FROM meta WHERE key = 'oblique_deg'").fetchone()
        if todo or gone or not has_series or last is None or float(last[0]) != oblique_deg:
            _rebuild_series(con, oblique_deg)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('oblique_deg', ?)", (repr(float(oblique_deg)),))
            con.commit()
        summary.n_patients, summary.n_studies, summary.n_series = con.execute(
            "SELECT COUNT(DISTINCT patient_id), COUNT(DISTINCT study_uid), COUNT(*) FROM series").fetchone()
    return summary


def _series_row(g: pd.DataFrame, oblique_deg: float, frames: list[Frame] | None = None) -> dict[str, Any]:
    """Aggregate the ``files`` rows of one series (or part: ``frames`` of enhanced files) into one
    ``series`` row; slice count and geometry problems from :func:`rheumai.multiframe.stack_of`."""
    found: list[tuple[str, bool]] = []  # (problem, severe)
    first = g.iloc[0]

    def one(col: str, what: str, severe: bool = False) -> Any:
        counts = Counter(g[col].dropna())
        if len(counts) > 1:
            found.append((f"{len(counts)} different {what} in one series", severe))
        return counts.most_common(1)[0][0] if counts else None

    patient, study = one("patient_id", "patient IDs", True), one("study_uid", "study UIDs", True)
    date = one("study_date", "study dates")
    if date is None:
        found.append(("no study date", False))
    iop_txt = one("iop", "orientations", True) if frames is None else json.dumps(list(frames[0].iop))
    rows, cols = one("rows", "row counts", True), one("cols", "column counts", True)
    found += [(f"{os.path.basename(p)}: {why}", True) for p, why in zip(g["path"], g["problem"])
              if isinstance(why, str) and why]
    n_frames = int(g["n_frames"].fillna(1).max())
    if frames is None and (iop_txt is None or g["ipp"].isna().any()):
        found.append(("missing ImageOrientationPatient/ImagePositionPatient", True))
        n_slices = len(g)
    else:
        stack = stack_of(frames or [
            Frame(p, 0, tuple(json.loads(ipp)), tuple(json.loads(iop)), (1.0, 1.0), 1.0, 0.0, (), "")
            for p, ipp, iop in zip(g["path"], g["ipp"], g["iop"].fillna(iop_txt))])
        n_slices = stack.n_slices if not (stack.severe and stack.n_slices == 0) else len(stack.frames)
        if stack.problem:
            found.append((stack.problem, stack.severe))
    if n_frames > 1 and frames is None:
        found.append((f"multi-frame file ({n_frames} frames)", False))
    few = n_slices < 3 and (n_frames <= 1 or frames is not None)
    if few and (f"only {n_slices} slice", True) not in found:  # stack_of's own wording
        found.append((f"only {n_slices} slice(s)", False))
    desc = str(first["series_description"] or first["protocol_name"] or "")
    seq, fat, source, seq_problems = guess_sequence(
        " ".join(str(x) for x in (first["series_description"], first["protocol_name"], first["sequence_name"]) if x),
        first["echo_time"], first["repetition_time"], first["inversion_time"],
        first["scanning_sequence"] or "", first["scan_options"] or "")
    found += [(why, False) for why in seq_problems]
    folders = sorted({os.path.dirname(p) for p in g["path"]})
    if len(folders) > 1:
        found.append((f"files spread over {len(folders)} folders", False))
    return {
        "series_uid": first["series_uid"], "patient_id": patient, "study_uid": study, "study_date": date,
        "series_number": None if pd.isna(first["series_number"]) else int(first["series_number"]),
        "description": desc, "modality": first["modality"],
        "orientation": orientation_class(json.loads(iop_txt) if iop_txt else None, oblique_deg),
        "sequence": seq, "fat_suppressed": int(fat), "sequence_source": source,
        "region": guess_region(str(first["body_part"] or ""), str(first["study_description"] or ""), desc),
        "n_files": len(g), "n_slices": n_slices, "rows": rows, "cols": cols, "folder": folders[0],
        "n_folders": len(folders), "institution": first["institution"],
        "problems": json.dumps([why for why, _ in found]), "severe": int(any(severe for _, severe in found)),
    }


def _rebuild_series(con: sqlite3.Connection, oblique_deg: float) -> None:
    files = pd.read_sql_query("SELECT * FROM files WHERE status = 'ok' ORDER BY path", con)
    rows = []
    for uid, g in files.groupby("series_uid", sort=True):
        enhanced = g[g["frames"].notna()]
        if enhanced.empty:
            rows.append(_series_row(g, oblique_deg))
            continue
        parts = split_parts([fr for p, t in zip(enhanced["path"], enhanced["frames"])
                             for fr in _frames_from_json(p, t)])
        for key, part in parts.items():
            row = _series_row(g[g["path"].isin({fr.file for fr in part})], oblique_deg, frames=part)
            if len(enhanced) < len(g):
                row["problems"] = json.dumps(json.loads(row["problems"]) + [f"mixes {len(enhanced)} enhanced "
                                            f"multi-frame files with {len(g) - len(enhanced)} single-frame files"])
                row["severe"] = 1
            if len(parts) > 1:  # the same key as rheumai.io.list_series gives the part
                row["series_uid"] = f"{uid}{PART_SEP}{key}"
            rows.append(row)
    # Built under new names, then swapped in one transaction: a reader (a dataset build while the
    # archive is re-indexed) sees the old tables or the new ones, never none.
    con.executescript("DROP TABLE IF EXISTS series_new; DROP TABLE IF EXISTS studies_new")
    pd.DataFrame(rows, columns=SERIES_COLUMNS).to_sql("series_new", con, index=False)
    con.execute("CREATE TABLE studies_new AS SELECT study_uid, patient_id, MIN(study_date) AS study_date, "
                "COUNT(*) AS n_series FROM series_new GROUP BY study_uid, patient_id ORDER BY patient_id, study_uid")
    con.commit()
    con.executescript("BEGIN IMMEDIATE; DROP TABLE IF EXISTS series; DROP TABLE IF EXISTS studies; "
                      "ALTER TABLE series_new RENAME TO series; ALTER TABLE studies_new RENAME TO studies; "
                      "CREATE INDEX IF NOT EXISTS files_series ON files(series_uid); COMMIT")


@dataclass
class ArchiveIndex:
    """Read-only view of an index: ``series`` as a pandas frame (sorted)."""

    path: str
    series: pd.DataFrame

    @classmethod
    def open(cls, index_path: str | Path) -> "ArchiveIndex":
        index_path = Path(index_path)
        if not index_path.is_file():
            raise InputError(index_path, "index file not found (run `rheumai dataset index` first)")
        try:
            with contextlib.closing(sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)) as con:
                series = pd.read_sql_query("SELECT * FROM series ORDER BY patient_id, study_uid, series_uid", con)
        except (sqlite3.Error, pd.errors.DatabaseError) as exc:
            raise InputError(index_path, f"not a rheumai dataset index ({exc})") from exc
        series["problems"] = series["problems"].map(json.loads)
        return cls(path=str(index_path), series=series)

    @property
    def patients(self) -> set[str]:
        return set(self.series["patient_id"].astype(str))

    def series_files(self, series_uid: str) -> list[str]:
        """Paths of the readable files of one series (a part "<uid>#<key>": those of <uid>), sorted."""
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as con:
            return [r[0] for r in con.execute("SELECT path FROM files WHERE series_uid = ? AND status = 'ok' "
                                              "ORDER BY path", (series_uid.split(PART_SEP, 1)[0],))]
