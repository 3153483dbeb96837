"""Label sheet: read and validate strictly, naming every bad row.

CSV (comma, semicolon or tab separated; UTF-8, Excel's BOM accepted), one row per patient:
``patient_id`` (a patient of the index), ``baseline_date`` (YYYY-MM-DD, of the baseline MRI study)
and / or ``baseline_study_uid``, ``followup_date`` (after the baseline), ``outcome`` yes | no |
intermediate (deformity at follow-up), optional ``baseline_deformity`` yes | no (blank = not
recorded) and ``site`` (external-site split); any other column is clinical, copied verbatim into
the manifest. Rows are numbered as a spreadsheet shows them (header = row 1); values are
stripped; yes / no / intermediate are case-insensitive.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from .index import ArchiveIndex

OUTCOMES = ("yes", "no", "intermediate")
RESERVED = ("patient_id", "baseline_date", "baseline_study_uid", "followup_date", "outcome",
            "baseline_deformity", "site")


@dataclass(frozen=True)
class LabelRow:
    """One valid row: of a label sheet (dates; ``baseline_date`` None when the row names
    ``baseline_study_uid``) or of an image table (``inputs`` role -> absolute path, follow-up days, split)."""

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
    split: str = ""


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
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
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
