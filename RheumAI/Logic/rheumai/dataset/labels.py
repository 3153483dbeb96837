"""Label sheets and image tables: read and validate strictly, naming every bad row at once
(:class:`LabelSheetError`) before anything is written.

CSV (comma, semicolon or tab separated; UTF-8, Excel's BOM accepted), one row per patient. Rows
are numbered as a spreadsheet shows them (header = row 1); values are stripped; yes / no /
intermediate are case-insensitive. Label sheet (a DICOM index): ``patient_id`` (a patient of the
index), ``baseline_date`` (YYYY-MM-DD, of the baseline MRI study) and / or
``baseline_study_uid``, ``followup_date`` (after the baseline), ``outcome`` yes | no |
intermediate (deformity at follow-up), optional ``baseline_deformity`` yes | no (blank = not
recorded) and ``site`` (external-site split); any other column is clinical, copied verbatim into
the manifest.

Image table (any registered task, no DICOM index): ``patient_id``; one column per input role of
the task (a one-input task also takes ``image``): a NIfTI / NRRD / MHA file or a DICOM folder with
one series, relative to the table's folder; the task's ROI file when it declares one (NegSpA-AI:
``box``); ``outcome`` yes | no | intermediate or ``label`` 1 | 0; optional ``followup_days`` (or
``baseline_date`` + ``followup_date``), ``baseline_deformity``, ``site``, ``split`` (train | val |
test on every row: the table's own split). Other columns are clinical, copied verbatim; a task
that declares clinical variables gets those only, parsed by its ``clinical_table`` entry point.
They may also come from a CSV keyed by patient_id (``clinical_csv``).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..errors import InputError
from .index import ArchiveIndex
from .split import SPLITS

OUTCOMES = ("yes", "no", "intermediate")
RESERVED = ("patient_id", "baseline_date", "baseline_study_uid", "followup_date", "outcome",
            "baseline_deformity", "site")
IMAGE_RESERVED = ("patient_id", "image", "outcome", "label", "followup_days", "baseline_date",
                  "followup_date", "baseline_deformity", "site", "split")


@dataclass(frozen=True)
class LabelRow:
    """One patient: a valid row of a label sheet (dates; ``baseline_date`` None when the row names
    ``baseline_study_uid``) or of an image table (``inputs`` role -> absolute path, follow-up days,
    split), completed by the cohort rules (``label``; DICOM: the chosen series, its folder as the
    input and its study date as ``baseline_date``)."""

    row: int
    patient_id: str
    outcome: str  # yes | no | intermediate
    baseline_deformity: str | None
    site: str
    clinical: dict[str, str] = field(default_factory=dict)
    baseline_date: dt.date | None = None
    baseline_study_uid: str | None = None
    followup_date: dt.date | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    followup_days: int | None = None
    split: str = ""  # given by an image table ("" = drawn by the split config)
    label: int = 0
    study_uid: str = ""
    series_uid: str = ""
    series_description: str = ""
    n_slices: int = 0

    @property
    def folder(self) -> str:
        return next(iter(self.inputs.values()))


@dataclass
class LabelSheet:
    """The valid rows of a label sheet or image table (``has_followup``, ``roi``: image tables)."""

    path: str
    sha256: str
    rows: list[Any]
    clinical_columns: list[str]
    has_followup: bool = True
    roi: str | None = None  # the key of the ROI file in each image-table row's inputs


@dataclass(frozen=True)
class RowProblem:
    row: int
    patient_id: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.row}{f' (patient {self.patient_id})' if self.patient_id else ''}: {self.problem}"


class LabelSheetError(InputError):
    """The sheet has bad rows; ``problems`` lists every one."""

    def __init__(self, path: str | Path, problems: list[RowProblem]):
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(path, f"{len(problems)} problem(s) in the label sheet:\n  {lines}")


def parse_date(v: dict[str, str], col: str, errs: list[str]) -> dt.date | None:
    """``v[col]`` as an ISO date; None when blank or bad (then the reason is added to ``errs``)."""
    text = v.get(col, "")
    try:
        d = dt.datetime.strptime(text, "%Y-%m-%d").date() if text else None
    except ValueError:
        no_day = len(text) == 10 and text[4] == text[7] == "-" and text.replace("-", "").isdigit()
        errs.append(f"{col}: impossible date '{text}' (no such day)" if no_day
                    else f"{col}: '{text}' is not a date in YYYY-MM-DD form")
        return None
    if d is not None and d.year < 1900:
        errs.append(f"{col}: impossible date '{text}' (before 1900)")
        return None
    return d


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(path, "label sheet not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"label sheet is not UTF-8 text ({exc})") from None
    if not text.strip():
        raise InputError(path, "label sheet is empty")
    lines = text.splitlines()
    # csv.Sniffer guesses badly on short files; the header line decides between the 3 usual separators.
    rows = list(csv.reader(lines, delimiter=max((",", ";", "\t"), key=lines[0].count)))
    header = [h.strip() for h in rows[0]]
    if dup := sorted({h for h in header if header.count(h) > 1}):
        raise InputError(path, f"duplicate column(s) in the header: {', '.join(dup)}")
    return header, rows[1:]


def parse_rows(path: Path, header: list[str], body: list[list[str]],
               parse: Callable[[int, dict[str, str], list[str]], Any], what: str = "label sheet",
               ) -> tuple[list[Any], list[RowProblem]]:
    """Rows as {column: stripped value} through ``parse(row number, values, errors)``; blank rows are
    skipped, wrong field counts and missing or repeated patient IDs named. Returns (parsed, problems)."""
    problems: list[RowProblem] = []
    good: list[Any] = []
    first_row: dict[str, int] = {}
    for n, raw in enumerate(body, start=2):
        if not any(v.strip() for v in raw):
            continue  # blank line (Excel often leaves some at the end)
        if len(raw) != len(header):
            problems.append(RowProblem(n, raw[0].strip() if raw else "",
                                       f"has {len(raw)} fields, the header has {len(header)}"))
            continue
        v = {h: x.strip() for h, x in zip(header, raw)}
        pid, errs = v["patient_id"], []
        if not pid:
            errs.append("missing patient_id")
        elif pid in first_row:
            errs.append(f"duplicate patient_id (first on row {first_row[pid]})")
        else:
            first_row[pid] = n
        row = parse(n, v, errs)
        if errs:
            problems += [RowProblem(n, pid, e) for e in errs]
        else:
            good.append(row)
    if not good and not problems:
        raise InputError(path, f"{what} has a header but no rows")
    return good, problems


def parse_outcome(v: dict[str, str], errs: list[str], label_column: bool = False) -> str:
    """``outcome`` yes | no | intermediate, or (``label_column``, when outcome is blank) ``label`` 1 | 0."""
    if label_column and not v.get("outcome"):
        lab = v.get("label", "")
        if lab not in ("0", "1"):
            errs.append(f"label must be 0 or 1, not '{lab}'" if lab else "missing outcome / label")
        return "yes" if lab == "1" else "no"
    outcome = v["outcome"].lower()
    if not outcome:
        errs.append("missing outcome")
    elif outcome not in OUTCOMES:
        errs.append(f"outcome '{v['outcome']}' is not one of {', '.join(OUTCOMES)}")
    return outcome


def parse_deformity(v: dict[str, str], errs: list[str]) -> str | None:
    deform = v.get("baseline_deformity", "").lower() or None
    if deform not in (None, "yes", "no"):
        errs.append(f"baseline_deformity '{v['baseline_deformity']}' is not yes, no or blank")
    return deform


def read_labels(path: str | Path, index: ArchiveIndex) -> tuple[LabelSheet, list[RowProblem]]:
    """Parse and validate a label sheet against ``index`` (patients, baseline study UIDs): (valid
    rows, every problem found); see :func:`load_labels`."""
    path = Path(path)
    header, body = _read_csv(path)
    missing = [c for c in ("patient_id", "followup_date", "outcome") if c not in header]
    if "baseline_date" not in header and "baseline_study_uid" not in header:
        missing.append("baseline_date or baseline_study_uid")
    if missing:
        raise InputError(path, f"missing column(s): {', '.join(missing)}; header is: {', '.join(header)}")
    clinical = [h for h in header if h not in RESERVED]
    ids = index.series[["patient_id", "study_uid"]].astype(str)
    studies_of: dict[str, set[str]] = ids.groupby("patient_id")["study_uid"].agg(set).to_dict()

    def parse(n: int, v: dict[str, str], errs: list[str]) -> LabelRow:
        pid = v["patient_id"]
        if not errs and pid not in studies_of:
            errs.append("unknown patient (not in the index)")
        b, f = parse_date(v, "baseline_date", errs), parse_date(v, "followup_date", errs)
        if not v["followup_date"]:
            errs.append("missing followup_date")
        uid = v.get("baseline_study_uid", "") or None
        if uid is None and not v.get("baseline_date"):
            errs.append("missing baseline (neither baseline_date nor baseline_study_uid)")
        if uid is not None and pid in studies_of and uid not in studies_of[pid]:
            errs.append(f"baseline_study_uid {uid} is not a study of this patient in the index")
        if b is not None and f is not None and f <= b:
            errs.append(f"impossible dates: followup_date {f} is not after baseline_date {b}")
        return LabelRow(row=n, patient_id=pid, baseline_date=b, baseline_study_uid=uid,
                        followup_date=f, outcome=parse_outcome(v, errs),
                        baseline_deformity=parse_deformity(v, errs), site=v.get("site", ""),
                        clinical={c: v[c] for c in clinical})

    good, problems = parse_rows(path, header, body, parse)
    return LabelSheet(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), good, clinical), problems


def load_labels(path: str | Path, index: ArchiveIndex) -> LabelSheet:
    """Like :func:`read_labels` but strict: any bad row raises :class:`LabelSheetError` listing all."""
    sheet, problems = read_labels(path, index)
    if problems:
        raise LabelSheetError(path, problems)
    return sheet


def read_image_table(path: str | Path, task: str = "cervical_ra",
                     clinical_csv: str | Path | None = None) -> LabelSheet:
    """Read and validate an image table for ``task``; raises LabelSheetError listing every bad row."""
    from ..tasks import get_task

    spec, path = get_task(task), Path(path)
    header, body = _read_csv(path)
    roles = list(spec.roles) + ([spec.roi.kind] if spec.roi else [])
    image = spec.roles[0] if len(spec.roles) == 1 and spec.roles[0] not in header else None  # "image" col
    cols = {r: "image" if r == image else r for r in roles}
    missing = [c for c in ("patient_id", *cols.values()) if c not in header]
    if "outcome" not in header and "label" not in header:
        missing.append("outcome or label")
    if missing:
        raise InputError(path, f"image table lacks the column(s) {', '.join(missing)}; it has: "
                               f"{', '.join(header)}")
    clinical = [h for h in header if h and h not in IMAGE_RESERVED and h not in roles]
    has_followup = "followup_days" in header or ("baseline_date" in header and "followup_date" in header)

    def parse(n: int, v: dict[str, str], errs: list[str]) -> LabelRow:
        errs += [f"missing {c} path" for c in cols.values() if not v[c]]
        days = None
        if v.get("followup_days"):
            try:
                days = int(v["followup_days"])
            except ValueError:
                errs.append(f"followup_days must be a whole number of days, not '{v['followup_days']}'")
        elif v.get("baseline_date") and v.get("followup_date"):
            b, f = parse_date(v, "baseline_date", errs), parse_date(v, "followup_date", errs)
            days = (f - b).days if b and f else None
        if v.get("split", "") not in ("", *SPLITS):
            errs.append(f"split must be one of {', '.join(SPLITS)} or blank, not '{v['split']}'")
        inputs = {r: str((path.parent / Path(v[c]).expanduser()).resolve()) for r, c in cols.items()}
        return LabelRow(n, v["patient_id"], parse_outcome(v, errs, label_column=True),
                        parse_deformity(v, errs), v.get("site", ""), {c: v[c] for c in clinical},
                        inputs=inputs, followup_days=days, split=v.get("split", ""))

    rows, problems = parse_rows(path, header, body, parse, what="image table")
    if problems:
        raise LabelSheetError(path, problems)
    if len({bool(r.split) for r in rows}) > 1:
        raise InputError(path, "the split column is filled on some rows only: "
                               "fill it on every row or on none")
    if clinical_csv is not None:
        extra_header, extra_body = _read_csv(Path(clinical_csv))
        names = [c for c in extra_header if c != "patient_id"]
        extra = {v["patient_id"]: v for v in (dict(zip(extra_header, map(str.strip, b))) for b in extra_body)
                 if v.get("patient_id")}  # blank lines and rows without an ID are skipped
        clinical += [c for c in names if c not in clinical]
        for r in rows:
            r.clinical.update({c: extra.get(r.patient_id, {}).get(c, "") for c in names})
    if spec.clinical:
        clinical = [c.name for c in spec.clinical]
        raw = pd.DataFrame([{"patient_id": r.patient_id, **r.clinical} for r in rows])
        parsed = spec.entry("clinical_table")(raw, clinical_csv if clinical_csv is not None else path)
        for r, (_, values) in zip(rows, parsed.iterrows()):
            r.clinical.clear()
            r.clinical.update({c: "" if pd.isna(values[c]) else repr(float(values[c])) for c in clinical})
    return LabelSheet(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), rows, clinical, has_followup,
                      spec.roi.kind if spec.roi else None)
