"""index -> labels -> cohort -> split -> cache -> manifest, as one call (CLI, Slicer panel, demo).

Output folder::

    manifest.csv    one row per included patient (MANIFEST_COLUMNS [+ input columns] + clinical columns)
    dataset.json    task, rules, split, preprocessing parameters, hashes, counts
    cohort.csv      included patients with dates, follow-up days and the chosen series
    flow.txt / flow.json / flow.png / excluded.csv   the inclusion flow
    cache/          task inputs (<source>-<params>.npy/.json) and the file-hash memo

Re-running with the same inputs writes byte-identical manifest.csv, dataset.json, cohort.csv,
flow.txt, flow.json and excluded.csv. The set is built in a staging folder beside the output
folder and replaces it as a whole (:func:`rheumai.atomic.replace_dir`): a failed or killed build
leaves the previous set untouched. An image table (:func:`build_image_dataset`) replaces the
index and label sheet.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..atomic import link_or_copy, replace_dir, staging_dir, write_json, write_text
from ..errors import InputError
from .cache import (CacheJob, CacheReport, FileHasher, ProgressFn, build_cache, entry_name, params_hash,
                    reporting)
from .cohort import CohortResult, CohortRules, ImageRules, Step, apply_cohort, apply_image_rules
from .flow import csv_text, flow_dict, flow_text, write_flow
from .index import ArchiveIndex
from .labels import LabelRow, load_labels, read_image_table
from .split import SplitConfig, assign_splits

MANIFEST_COLUMNS = ["patient_id", "split", "fold", "site", "label", "outcome", "series_uid", "study_uid",
                    "source_path", "cache_file", "source_hash", "params_hash"]
# cohort.csv: these fields of each included patient (None as "", dates ISO), then source_path
COHORT_COLUMNS = ["patient_id", "label", "outcome", "baseline_date", "followup_date", "followup_days",
                  "study_uid", "series_uid", "series_description", "n_slices"]
DATASET_FILES = ("manifest.csv", "dataset.json", "cohort.csv", "flow.txt", "flow.json", "flow.png", "excluded.csv")
FilesFn = Callable[[LabelRow], list[str]]  # a patient's files (hashed; an indexed series' are read as one)


@dataclass
class DatasetResult:
    """What a build produced. ``paths``: name -> written file."""

    out_dir: Path
    manifest: Path
    cohort: CohortResult
    split: dict[str, tuple[str, int]]
    cache: CacheReport | None
    flow: dict[str, Any]
    paths: dict[str, Path]

    @property
    def n_included(self) -> int:
        return len(self.split)


def task_params(task: str, params: Any) -> dict[str, Any]:
    """The task's default preprocessing parameters updated by ``params`` (``to_dict()`` or a mapping)."""
    from ..tasks import get_task

    given = params.to_dict() if hasattr(params, "to_dict") else dict(params or {})
    return {**get_task(task).default_params(), **given}


def build_dataset(index_path: str | Path, labels_csv: str | Path, out_dir: str | Path,
                  rules: CohortRules = CohortRules(), split_cfg: SplitConfig = SplitConfig(), slice_params: Any = None,
                  workers: int = 1, progress: ProgressFn | None = None, compute_cache: bool = True) -> DatasetResult:
    """Build the cervical dataset from an index and a label sheet (see the module docstring). Raises
    :class:`~rheumai.dataset.labels.LabelSheetError` (every bad row named) before any output is
    written. A series the imaging core cannot read excludes its patient at the last flow step
    ("Task input computed") with the reason. ``compute_cache=False``: a dry run (flow and split, no
    manifest), refused into a folder that holds a built dataset. Raises :class:`InputError` (with
    the inclusion flow) when no patient is included."""
    index = ArchiveIndex.open(index_path)
    sheet = load_labels(labels_csv, index)
    cohort = apply_cohort(index, sheet, rules)
    header = (f"label sheet: {Path(labels_csv).name} ({len(sheet.rows)} rows); index: {Path(index_path).name} "
              f"({len(index.patients)} patients, {len(index.series)} series)")

    return _build_staged(Path(out_dir), cohort, sheet, header, index_path, "cervical_ra", rules, split_cfg,
                         slice_params, lambda e: index.series_files(e.series_uid), workers, progress, compute_cache)


def _carry_over(out: Path, stage: Path) -> None:
    """Seed ``stage`` from the previous ``out``: cache entries (immutable, written by atomic rename) and
    loose files that are not part of the dataset are hard-linked (copied where links fail); the
    file-hash memo is copied. An ``out`` holding other folders is refused before anything is written."""
    if not out.is_dir():
        if out.exists():
            raise InputError(out, "output folder is a file")
        return
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "cache")
    if folders:
        shown = ", ".join(folders[:5]) + (f" and {len(folders) - 5} more" if len(folders) > 5 else "")
        raise InputError(out, f"holds folders that are not part of a dataset ({shown}); a dataset is replaced as a "
                              "whole, so its output folder holds the dataset (and loose files) only: choose another")
    for src in out.iterdir():
        dst = stage / src.name
        if src.name == "cache" and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns(".*", "filehash.sqlite*"))
            if (src / "filehash.sqlite").is_file():
                shutil.copy2(src / "filehash.sqlite", dst / "filehash.sqlite")
        elif src.name not in DATASET_FILES:
            link_or_copy(src, dst)


def _build_staged(out: Path, cohort: CohortResult, sheet: Any, header: str, index_path: str | Path | None, task: str,
                  rules: Any, split_cfg: SplitConfig, params: Any, files: FilesFn, workers: int,
                  progress: ProgressFn | None, compute_cache: bool) -> DatasetResult:
    """Cache, flow, split, manifest, cohort.csv and dataset.json written into a staging folder that
    then replaces ``out`` whole."""
    if not compute_cache and (out / "manifest.csv").is_file():
        raise InputError(out, "holds a built dataset (manifest.csv); a flow-only dry run would replace it with a "
                              "flow report alone, so nothing was written: choose another output folder")
    params = task_params(task, params)
    p_hash = params_hash(params)
    with staging_dir(out) as stage:
        _carry_over(out, stage)
        report: CacheReport | None = None
        hashes: dict[str, str] = {}
        if compute_cache and cohort.included:
            jobs = []
            with (contextlib.closing(FileHasher(stage / "cache" / "filehash.sqlite")) as hasher,
                  reporting(progress, "hashing sources", len(cohort.included), "study") as tick):
                for k, e in enumerate(cohort.included, 1):
                    found = files(e)
                    hashes[e.patient_id] = hasher.series(found)
                    jobs.append(CacheJob(e.patient_id, tuple(e.inputs.items()),
                                         str(stage / "cache" / entry_name(hashes[e.patient_id], p_hash)),
                                         e.series_uid, tuple(found) if e.series_uid else ()))
                    tick(k)
            report = build_cache(jobs, task, params, workers=workers, progress=progress)
            cohort.included = [e for e in cohort.included if e.patient_id not in report.failed]
            bad = sorted(report.failed.items())
            cohort.steps.append(Step("input", "Task input computed", len(cohort.included),
                                     [(p, f"series could not be read or sampled: {why}") for p, why in bad]))

        def no_dataset(problem: str, path: Path | None) -> InputError:
            return InputError(path, f"{problem}, so nothing was written; the inclusion flow:\n"
                              + flow_text(flow_dict(cohort), header=header))

        if not cohort.included:
            raise no_dataset("no patient is included in the dataset", Path(sheet.path))
        if any(e.split for e in cohort.included):  # rows are sorted by patient_id
            split = {e.patient_id: (e.split, -1) for e in cohort.included}
            split_desc = "the table's split column"
        else:
            split_desc = split_cfg.describe()
            try:
                split = assign_splits([(e.patient_id, e.label, e.site) for e in cohort.included], split_cfg)
            except InputError as exc:
                raise no_dataset(exc.problem, exc.path) from None
        flow = flow_dict(cohort, split)
        paths = write_flow(stage, flow, header=header, split_desc=split_desc)
        if compute_cache:
            clinical = sheet.clinical_columns
            first = cohort.included[0].inputs
            extra = list(first) if len(first) > 1 else []  # one column per input for several inputs (+ ROI)
            rows, cohort_rows = [], []
            for e in cohort.included:
                name, fold = split[e.patient_id]
                src = hashes[e.patient_id]
                rows.append([e.patient_id, name, fold, e.site, e.label, e.outcome, e.series_uid, e.study_uid, e.folder,
                             f"cache/{entry_name(src, p_hash)}", src, p_hash] + [e.inputs[c] for c in extra]
                            + [e.clinical.get(c, "") for c in clinical])
                cohort_rows.append([getattr(e, c) for c in COHORT_COLUMNS] + [e.folder])
            paths["manifest"] = write_text(stage / "manifest.csv", csv_text(MANIFEST_COLUMNS + extra + clinical, rows))
            paths["cohort"] = write_text(stage / "cohort.csv",
                                         csv_text(COHORT_COLUMNS + ["source_path"], cohort_rows))
            paths["dataset"] = write_json(stage / "dataset.json", {
                "format": "rheumai-dataset", "format_version": 1, "task": task, "rheumai_version": __version__,
                "index": str(Path(index_path).resolve()) if index_path is not None else None,
                "labels": {"path": str(Path(sheet.path).resolve()), "sha256": sheet.sha256},
                "rules": rules.to_dict(), "series_rule": rules.series_rule_text(),
                "split": split_cfg.to_dict(), "split_description": split_desc,
                "preprocessing": params, "params_hash": p_hash, "clinical_columns": clinical,
                "counts": {"label_rows": len(sheet.rows), "included": len(rows),
                           "positive": sum(r[4] for r in rows), "negative": sum(1 - r[4] for r in rows),
                           "split": flow.get("split", {})},
                "manifest": "manifest.csv",
            })
        replace_dir(stage, out)
    return DatasetResult(out_dir=out, manifest=out / "manifest.csv", cohort=cohort, split=split, cache=report,
                         flow=flow, paths={k: out / p.name for k, p in paths.items()})


def _image_files(image: str) -> list[str]:
    p = Path(image)
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))


def build_image_dataset(table_csv: str | Path, out_dir: str | Path, rules: ImageRules = ImageRules(),
                        split_cfg: SplitConfig = SplitConfig(), params: Any = None, workers: int = 1,
                        progress: ProgressFn | None = None, compute_cache: bool = True,
                        task: str = "cervical_ra", clinical_csv: str | Path | None = None) -> DatasetResult:
    """:func:`build_dataset` for ``task`` from an image table (same outputs, staging and swap);
    ``params``: the task's preprocessing parameters (``to_dict()`` or overrides; None: its defaults)."""
    table = read_image_table(table_csv, task, clinical_csv)
    cohort = apply_image_rules(table, rules)
    header = f"image table: {Path(table_csv).name} ({len(table.rows)} rows)"
    return _build_staged(Path(out_dir), cohort, table, header, None, task, rules, split_cfg, params,
                         lambda e: [f for p in e.inputs.values() for f in _image_files(p)],
                         workers, progress, compute_cache)
