"""Cohorts as a table of image paths + labels, for any registered task, through the same rules,
flow report, split and cache as a DICOM archive.

CSV (comma, semicolon or tab separated; UTF-8), one row per patient: ``patient_id``; one column
per input role of the task (a one-input task also takes ``image``): a NIfTI / NRRD / MHA file or a
DICOM folder with one series, relative to the table's folder; the task's ROI file when it declares
one (NegSpA-AI: ``box``); ``outcome`` yes | no | intermediate or ``label`` 1 | 0; optional
``followup_days`` (or ``baseline_date`` + ``followup_date``), ``baseline_deformity`` yes | no,
``site``, ``split`` (train | val | test on every row: the table's own split). Other columns are
clinical, copied verbatim; a task that declares clinical variables gets those only, parsed by its
``clinical_table`` entry point. They may also come from a CSV keyed by patient_id
(``clinical_csv``). Every bad row is reported at once (:class:`~rheumai.dataset.labels.LabelSheetError`)
before anything is written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from ..io import is_image_file
from .build import DatasetResult, ProgressFn, _build_staged
from .cohort import CohortEntry, CohortResult, ImageRules, Step, outcome_steps
from .labels import (LabelRow, LabelSheet, LabelSheetError, _read_csv, parse_date, parse_deformity,
                     parse_outcome, parse_rows)
from .split import SPLITS, SplitConfig

RESERVED = ("patient_id", "image", "outcome", "label", "followup_days", "baseline_date", "followup_date",
            "baseline_deformity", "site", "split")


def read_image_table(path: str | Path, task: str = "cervical_ra", clinical_csv: str | Path | None = None) -> LabelSheet:
    """Read and validate an image table for ``task``; raises LabelSheetError listing every bad row."""
    from ..tasks import get_task

    spec, path = get_task(task), Path(path)
    header, body = _read_csv(path)
    roles = list(spec.roles) + ([spec.roi.kind] if spec.roi else [])
    cols = {r: "image" if len(spec.roles) == 1 and r == spec.roles[0] and r not in header else r for r in roles}
    missing = [c for c in ("patient_id", *cols.values()) if c not in header]
    if "outcome" not in header and "label" not in header:
        missing.append("outcome or label")
    if missing:
        raise InputError(path, f"image table lacks the column(s) {', '.join(missing)}; it has: {', '.join(header)}")
    clinical = [h for h in header if h and h not in RESERVED and h not in roles]
    has_followup = "followup_days" in header or ("baseline_date" in header and "followup_date" in header)

    def parse(n: int, v: dict[str, str], errs: list[str]) -> LabelRow:
        errs += [f"missing {c} path" for c in cols.values() if not v[c]]
        days = _followup_days(v, errs) if has_followup else None
        if v.get("split", "") not in ("", *SPLITS):
            errs.append(f"split must be one of {', '.join(SPLITS)} or blank, not '{v['split']}'")
        inputs = {r: str((path.parent / Path(v[c]).expanduser()).resolve()) for r, c in cols.items()}
        return LabelRow(n, v["patient_id"], parse_outcome(v, errs, label_column=True), parse_deformity(v, errs),
                        v.get("site", ""), {c: v[c] for c in clinical}, inputs=inputs, followup_days=days,
                        split=v.get("split", ""))

    rows, problems = parse_rows(path, header, body, parse, what="image table")
    if problems:
        raise LabelSheetError(path, problems)
    if len({bool(r.split) for r in rows}) > 1:
        raise InputError(path, "the split column is filled on some rows only: fill it on every row or on none")
    if clinical_csv is not None:
        extra_header, extra_body = _read_csv(Path(clinical_csv))
        extra = {v["patient_id"]: v for v in (dict(zip(extra_header, (x.strip() for x in b))) for b in extra_body)
                 if v.get("patient_id")}
        clinical += [c for c in extra_header if c != "patient_id" and c not in clinical]
        for r in rows:
            r.clinical.update({c: extra.get(r.patient_id, {}).get(c, "") for c in extra_header if c != "patient_id"})
    if spec.clinical:
        clinical = [c.name for c in spec.clinical]
        raw = pd.DataFrame([{"patient_id": r.patient_id, **r.clinical} for r in rows])
        parsed = spec.entry("clinical_table")(raw, clinical_csv if clinical_csv is not None else path)
        for r, (_, values) in zip(rows, parsed.iterrows()):
            r.clinical.clear()
            r.clinical.update({c: "" if pd.isna(values[c]) else repr(float(values[c])) for c in clinical})
    return LabelSheet(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), rows, clinical, has_followup,
                      spec.roi.kind if spec.roi else None)


def _followup_days(v: dict[str, str], errs: list[str]) -> int | None:
    if v.get("followup_days"):
        try:
            return int(v["followup_days"])
        except ValueError:
            errs.append(f"followup_days must be a whole number of days, not '{v['followup_days']}'")
            return None
    if v.get("baseline_date") and v.get("followup_date"):
        b, f = parse_date(v, "baseline_date", errs), parse_date(v, "followup_date", errs)
        return (f - b).days if b and f else None
    return None


def apply_image_rules(table: LabelSheet, rules: ImageRules) -> CohortResult:
    """The inclusion steps on an image table (the last step, preprocessing, runs in the cache)."""
    steps = [Step("image", "Image found")]
    kept = []
    for r in sorted(table.rows, key=lambda r: r.patient_id):
        why = []
        for role, p in r.inputs.items():
            if not Path(p).exists():
                why.append(f"{role if role == table.roi else 'image'} not found: {p}")
            elif role != table.roi and Path(p).is_file() and not is_image_file(p) and \
                    Path(p).suffix.lower() not in ("", ".dcm", ".ima"):
                why.append(f"not an image file (NIfTI / NRRD / MHA) or DICOM folder: {p}")
        if why:
            steps[0].excluded.append((r.patient_id, "; ".join(why)))
        else:
            kept.append((r, r.followup_days, ""))
    steps[0].remaining = len(kept)
    included = [CohortEntry(patient_id=r.patient_id, label=label, outcome=r.outcome, site=r.site, clinical=r.clinical,
                            inputs=r.inputs, split=r.split, followup_days=r.followup_days,
                            series_description=Path(r.inputs[next(iter(r.inputs))]).name)
                for r, label in outcome_steps(kept, rules, steps, table.has_followup)]
    return CohortResult(rules=rules, n_start=len(table.rows), steps=steps, included=included, not_in_sheet=[])


def _image_files(image: str) -> list[str]:
    p = Path(image)
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))


def build_image_dataset(table_csv: str | Path, out_dir: str | Path, rules: ImageRules = ImageRules(),
                        split_cfg: SplitConfig = SplitConfig(), params: Any = None, workers: int = 1,
                        progress: ProgressFn | None = None, compute_cache: bool = True, task: str = "cervical_ra",
                        clinical_csv: str | Path | None = None) -> DatasetResult:
    """Build ``task``'s dataset from an image table: the outputs of
    :func:`rheumai.dataset.build.build_dataset` (manifest, flow, split, cache, dataset.json) with
    the same staging and swap. ``params``: the task's preprocessing parameters (an object with
    ``to_dict`` or a dict of overrides; None: the task's defaults)."""
    table = read_image_table(table_csv, task, clinical_csv)
    cohort = apply_image_rules(table, rules)
    header = f"image table: {Path(table_csv).name} ({len(table.rows)} rows)"
    return _build_staged(Path(out_dir), cohort, table, header, None, task, rules, split_cfg, params,
                         lambda e: [f for p in e.inputs.values() for f in _image_files(p)],
                         workers, progress, compute_cache)

