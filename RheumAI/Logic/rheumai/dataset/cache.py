"""Cache of task inputs: each selected series read once through the imaging core, stored by hash.

An entry is ``cache/<source_hash[:16]>-<params_hash[:16]>`` (``.npy`` + ``.json``, written by
:meth:`rheumai.tasks.cervical_ra.slices.SliceSelection.save`, each file atomically). ``source_hash`` is the SHA-256
of the sorted SHA-256 digests of the series' files (content only: a moved archive keeps its
hashes); ``params_hash`` is the SHA-256 of the canonical JSON of the SliceParams plus the cache
format version. A changed parameter or a changed file therefore points at a new entry, so exactly
the affected entries are recomputed; an entry whose two files exist is reused. File digests are
memoised in ``cache/filehash.sqlite`` keyed by (path, size, mtime), so re-runs do not re-read
unchanged files.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import RheumAIError
from ..process_guard import die_with_parent, stop_pool
from ..tasks.cervical_ra.slices import SliceParams

CACHE_VERSION = 1
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CacheJob:
    """One series to turn into a task input. files: its DICOM files; folder: reported source."""

    patient_id: str
    series_uid: str
    files: tuple[str, ...]
    folder: str
    stem: str  # absolute stem of the entry (no suffix)


@dataclass
class CacheReport:
    computed: list[str]
    reused: list[str]
    failed: dict[str, str]  # patient_id -> reason


def params_hash(params: SliceParams) -> str:
    """SHA-256 (hex) of the slice parameters and the cache format version."""
    blob = json.dumps({"cache_version": CACHE_VERSION, "params": params.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_name(source_hash: str, p_hash: str) -> str:
    return f"{source_hash[:16]}-{p_hash[:16]}"


class FileHasher:
    """SHA-256 of files, memoised in a small SQLite table keyed by (path, size, mtime_ns)."""

    def __init__(self, db_path: str | Path):
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(str(db_path))
        self.con.execute("CREATE TABLE IF NOT EXISTS h (path TEXT PRIMARY KEY, size INT, mtime_ns INT, sha256 TEXT)")

    def file(self, path: str) -> str:
        st = os.stat(path)
        row = self.con.execute("SELECT size, mtime_ns, sha256 FROM h WHERE path = ?", (path,)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        self.con.execute("INSERT OR REPLACE INTO h VALUES (?, ?, ?, ?)", (path, st.st_size, st.st_mtime_ns, digest))
        return digest

    def series(self, files: Sequence[str]) -> str:
        """Content hash of a series: order- and path-independent."""
        digests = sorted(self.file(f) for f in files)
        return hashlib.sha256("\n".join(digests).encode()).hexdigest()

    def close(self) -> None:
        self.con.commit()
        self.con.close()


def entry_exists(stem: str | Path) -> bool:
    stem = Path(stem)
    return stem.with_name(stem.name + ".npy").is_file() and stem.with_name(stem.name + ".json").is_file()


def compute_entry(job: CacheJob, params: SliceParams) -> str | None:
    """Read the series through the imaging core, select the slices, save. Returns an error or None.

    The series' files are linked into a private folder first, because ``read_study`` reads every
    DICOM file under the folder it is given and hospital exports mix series in one folder.
    """
    from ..io import is_image_file, read_study
    from ..tasks.cervical_ra.slices import select_slices

    if len(job.files) == 1 and is_image_file(job.files[0]):  # an image file (image-table cohorts)
        try:
            study = read_study(job.files[0], require_modality=None)
            select_slices(study, params).save(job.stem)
        except RheumAIError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others; reported per patient
            return f"{type(exc).__name__}: {exc}"
        return None
    # Inside the cache folder (a build's staging folder): a killed run's leftovers go with it.
    with tempfile.TemporaryDirectory(prefix=".rheumai-series-", dir=Path(job.stem).parent) as tmp:
        try:
            for i, f in enumerate(job.files):
                os.symlink(os.path.abspath(f), os.path.join(tmp, f"{i:06d}.dcm"))
            study = read_study(tmp, series_uid=job.series_uid or None)
            study.path = job.folder
            select_slices(study, params).save(job.stem)
        except RheumAIError as exc:
            return str(exc).replace(tmp, job.folder)
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop the others; reported per patient
            return f"{type(exc).__name__}: {exc}".replace(tmp, job.folder)
    return None


def _run(job: CacheJob, params: SliceParams) -> tuple[str, str | None]:
    return job.patient_id, compute_entry(job, params)


def build_cache(jobs: Sequence[CacheJob], params: SliceParams, workers: int = 1,
                progress: ProgressFn | None = None) -> CacheReport:
    """Compute the missing entries of ``jobs`` (``workers`` processes), reuse the present ones."""
    todo = [j for j in jobs if not entry_exists(j.stem)]
    report = CacheReport(computed=[], reused=sorted(j.patient_id for j in jobs if entry_exists(j.stem)), failed={})
    for j in todo:
        Path(j.stem).parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress is None and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="computing task inputs", unit="series")

    def done(i: int, pid: str, err: str | None) -> None:
        if err is None:
            report.computed.append(pid)
        else:
            report.failed[pid] = err
        if bar is not None:
            bar.update(1)
        elif progress is not None:
            progress("computing task inputs", i, len(todo))

    if workers > 1 and len(todo) > 1:
        # "spawn": workers are children of this process (so they can die with it) and inherit
        # no threads, locks or open files from it.
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                   initializer=die_with_parent, initargs=(os.getpid(),))
        try:
            futures = [pool.submit(_run, j, params) for j in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                done(i, *fut.result())
        except BaseException:
            stop_pool(pool)
            raise
        pool.shutdown(wait=True)
    else:
        for i, j in enumerate(todo, 1):
            done(i, *_run(j, params))
    if bar is not None:
        bar.close()
    report.computed.sort()
    return report
