"""Cache of task inputs: each study preprocessed once by its task, stored by content hash.

An entry is ``cache/<source_hash[:16]>-<params_hash[:16]>`` (``.npy`` + ``.json``, each written
atomically by the sample's ``save``). ``source_hash``: SHA-256 over the sorted SHA-256 digests of
the study's files (content only); ``params_hash``: SHA-256 of the canonical JSON of the task's
preprocessing parameters and the cache version. A changed file or parameter points at a new
entry; an entry whose two files exist is reused. File digests are memoised in
``cache/filehash.sqlite`` keyed by (path, size, mtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..errors import RheumAIError
from ..process_guard import die_with_parent, stop_pool

CACHE_VERSION = 1
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CacheJob:
    """One study. inputs: (role, path) pairs for the task's ``preprocess`` (the ROI too);
    series_files: an indexed DICOM series' files, read as one study for the first role."""

    patient_id: str
    inputs: tuple[tuple[str, str], ...]
    stem: str  # absolute stem of the entry (no suffix)
    series_uid: str = ""
    series_files: tuple[str, ...] = ()


@dataclass
class CacheReport:
    computed: list[str]
    reused: list[str]
    failed: dict[str, str]  # patient_id -> reason


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the preprocessing parameters and the cache format version."""
    blob = json.dumps({"cache_version": CACHE_VERSION, "params": dict(params)}, sort_keys=True)
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
        """Content hash of a set of files: order- and path-independent."""
        digests = sorted(self.file(f) for f in files)
        return hashlib.sha256("\n".join(digests).encode()).hexdigest()

    def close(self) -> None:
        self.con.commit()
        self.con.close()


def compute_entry(job: CacheJob, task: str, params: Mapping[str, Any]) -> str | None:
    """Preprocess one study with the task and save it; returns the error or None. An indexed
    series' files are linked into a private folder first: ``read_study`` reads every DICOM file
    under the folder it is given and hospital exports mix series in one folder."""
    from ..io import read_study
    from ..tasks import get_task

    inputs: dict[str, Any] = dict(job.inputs)
    # Inside the cache folder (a build's staging folder): a killed run's leftovers go with it.
    with tempfile.TemporaryDirectory(prefix=".rheumai-series-", dir=Path(job.stem).parent) as tmp:
        folder = job.inputs[0][1]
        try:
            if job.series_files:
                for i, f in enumerate(job.series_files):
                    os.symlink(os.path.abspath(f), os.path.join(tmp, f"{i:06d}.dcm"))
                study = read_study(tmp, series_uid=job.series_uid or None)
                study.path = folder
                inputs[job.inputs[0][0]] = study
            get_task(task).preprocess(inputs, params).save(job.stem)
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the others; reported per patient
            why = str(exc) if isinstance(exc, RheumAIError) else f"{type(exc).__name__}: {exc}"
            return why.replace(tmp, folder)
    return None


@contextlib.contextmanager
def reporting(progress: ProgressFn | None, stage: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """``tick(done)``: calls ``progress(stage, done, total)``, or moves a tqdm bar when it is None."""
    if progress is not None:
        yield lambda i: progress(stage, i, total)
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=stage, unit=unit, disable=not total) as bar:
        yield lambda i: bar.update(1)


def build_cache(jobs: Sequence[CacheJob], task: str, params: Mapping[str, Any], workers: int = 1,
                progress: ProgressFn | None = None) -> CacheReport:
    """Compute the missing entries of ``jobs`` (``workers`` processes), reuse the present ones."""
    todo = [j for j in jobs if not all(Path(f"{j.stem}{suffix}").is_file() for suffix in (".npy", ".json"))]
    errors: dict[str, str | None] = {}  # patient_id -> error (None: computed)
    with reporting(progress, "computing task inputs", len(todo), "study") as tick:
        if workers > 1 and len(todo) > 1:
            # "spawn": workers are children of this process (so they can die with it) and inherit
            # no threads, locks or open files from it.
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                       initializer=die_with_parent, initargs=(os.getpid(),))
            try:
                futures = {pool.submit(compute_entry, j, task, params): j.patient_id for j in todo}
                for i, fut in enumerate(as_completed(futures), 1):
                    errors[futures[fut]] = fut.result()
                    tick(i)
            except BaseException:
                stop_pool(pool)
                raise
            pool.shutdown(wait=True)
        else:
            for i, j in enumerate(todo, 1):
                errors[j.patient_id] = compute_entry(j, task, params)
                tick(i)
    return CacheReport(computed=sorted(p for p, e in errors.items() if e is None),
                       reused=sorted({j.patient_id for j in jobs} - set(errors)),
                       failed={p: e for p, e in errors.items() if e is not None})
