"""index -> labels -> cohort -> split -> cache -> manifest, as one call (CLI, Slicer panel, demo).

Output folder::

    manifest.csv    one row per included patient (docs/CONTRACT.md columns + clinical columns)
    dataset.json    rules, split config, SliceParams, hashes, counts (what a training run needs)
    cohort.csv      included patients with dates, follow-up days and the chosen series
    flow.txt / flow.json / flow.png / excluded.csv   the inclusion flow
    cache/          task inputs (<source>-<params>.npy/.json) and the file-hash memo

Re-running with the same inputs writes byte-identical manifest.csv, dataset.json, cohort.csv,
flow.txt, flow.json and excluded.csv (sorted rows, fixed formatting, no timestamps).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..atomic import write_json, write_text
from ..errors import InputError
from ..slices import SliceParams
from .cache import CacheJob, CacheReport, FileHasher, build_cache, entry_name, params_hash
from .cohort import CohortResult, CohortRules, Step, apply_cohort
from .flow import flow_dict, write_flow
from .index import ArchiveIndex
from .labels import load_labels
from .split import SplitConfig, assign_splits

MANIFEST_COLUMNS = ["patient_id", "split", "fold", "site", "label", "outcome", "series_uid", "study_uid",
                    "source_path", "cache_file", "source_hash", "params_hash"]
ProgressFn = Callable[[str, int, int], None]


@dataclass
class DatasetResult:
    """What :func:`build_dataset` produced. ``paths``: name -> written file."""

    out_dir: Path
    manifest: Path
    cohort: CohortResult
    split: dict[str, tuple[str, int]]
    cache: CacheReport | None
    flow: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def n_included(self) -> int:
        return len(self.split)


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def build_dataset(
    index_path: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    rules: CohortRules = CohortRules(),
    split_cfg: SplitConfig = SplitConfig(),
    slice_params: SliceParams = SliceParams(),
    workers: int = 1,
    progress: ProgressFn | None = None,
    compute_cache: bool = True,
) -> DatasetResult:
    """Build a training dataset from an index and a label sheet; see the module docstring.

    Raises :class:`~rheumai.dataset.labels.LabelSheetError` (every bad row named) before any
    output is written. A series that the imaging core cannot read excludes its patient at the
    last flow step ("Task input computed") with the reason; nothing is dropped silently.
    ``compute_cache=False`` stops after the flow report and split (no manifest): a dry run.
    """
    out = Path(out_dir)
    index = ArchiveIndex.open(index_path)
    sheet = load_labels(labels_csv, index)
    cohort = apply_cohort(index, sheet, rules)

    p_hash = params_hash(slice_params)
    report: CacheReport | None = None
    hashes: dict[str, str] = {}
    if compute_cache and cohort.included:
        hasher = FileHasher(out / "cache" / "filehash.sqlite")
        jobs = []
        try:
            for k, e in enumerate(cohort.included, 1):
                files = index.series_files(e.series_uid)
                hashes[e.patient_id] = hasher.series(files)
                jobs.append(CacheJob(e.patient_id, e.series_uid, tuple(files), e.folder,
                                     str(out / "cache" / entry_name(hashes[e.patient_id], p_hash))))
                if progress is not None:
                    progress("hashing source series", k, len(cohort.included))
        finally:
            hasher.close()
        report = build_cache(jobs, slice_params, workers=workers, progress=progress)
        step = Step("input", "Task input computed", note="")
        step.excluded = [(p, f"series could not be read or sampled: {report.failed[p]}") for p in sorted(report.failed)]
        cohort.included = [e for e in cohort.included if e.patient_id not in report.failed]
        step.remaining = len(cohort.included)
        cohort.steps.append(step)

    labels = {e.patient_id: e.label for e in cohort.included}
    header = (f"label sheet: {Path(labels_csv).name} ({len(sheet.rows)} rows); index: {Path(index_path).name} "
              f"({len(index.patients)} patients, {len(index.series)} series)")
    try:
        split = assign_splits([(e.patient_id, e.label, e.site) for e in cohort.included], split_cfg) if cohort.included else {}
    except InputError:
        write_flow(out, flow_dict(cohort), header=header)  # the flow is still worth reading
        raise
    flow = flow_dict(cohort, split, labels)
    paths = write_flow(out, flow, header=header, split_desc=split_cfg.describe())
    result = DatasetResult(out_dir=out, manifest=out / "manifest.csv", cohort=cohort, split=split, cache=report,
                           flow=flow, paths=paths)
    if not compute_cache:
        return result

    clinical = sheet.clinical_columns
    rows, cohort_rows = [], []
    for e in sorted(cohort.included, key=lambda e: e.patient_id):
        name, fold = split[e.patient_id]
        src = hashes[e.patient_id]
        rows.append([e.patient_id, name, fold, e.site, e.label, e.outcome, e.series_uid, e.study_uid, e.folder,
                     f"cache/{entry_name(src, p_hash)}", src, p_hash] + [e.clinical.get(c, "") for c in clinical])
        cohort_rows.append([e.patient_id, e.label, e.outcome, e.baseline_date.isoformat(), e.followup_date.isoformat(),
                            e.followup_days, e.study_uid, e.series_uid, e.series_description, e.n_slices, e.folder])
    paths["manifest"] = write_text(out / "manifest.csv", _csv_text(MANIFEST_COLUMNS + clinical, rows))
    paths["cohort"] = write_text(out / "cohort.csv", _csv_text(
        ["patient_id", "label", "outcome", "baseline_date", "followup_date", "followup_days", "study_uid",
         "series_uid", "series_description", "n_slices", "source_path"], cohort_rows))
    split_counts = flow.get("split", {})
    paths["dataset"] = write_json(out / "dataset.json", {
        "format": "rheumai-dataset", "format_version": 1, "task": "cervical_ra",
        "rheumai_version": __version__,
        "index": str(Path(index_path).resolve()),
        "labels": {"path": str(Path(labels_csv).resolve()), "sha256": sheet.sha256},
        "rules": rules.to_dict(), "series_rule": rules.series_rule_text(),
        "split": split_cfg.to_dict(), "split_description": split_cfg.describe(),
        "slice_params": slice_params.to_dict(), "params_hash": p_hash,
        "clinical_columns": clinical,
        "counts": {"label_rows": len(sheet.rows), "included": len(rows),
                   "positive": sum(r[4] for r in rows), "negative": sum(1 - r[4] for r in rows),
                   "split": split_counts},
        "manifest": "manifest.csv",
    })
    return result
