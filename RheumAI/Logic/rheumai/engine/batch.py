"""Study inputs for batch prediction: from command-line ``role=path`` pairs or from a study table.

A study's inputs are ``{role: path, "roi": path, "clinical": {name: value}, "id": str}``. A study
table (CSV, one row per study) has an ID column (``patient_id``, ``study_id`` or ``id``), one
column per input role of the task (paths relative to the table's folder), a ``roi`` (or ``box``)
column when the task needs a region, and the task's clinical variables as columns, or a
``clinical.csv`` beside it (``patient_id`` + variables). Other columns (``label`` ...) are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..tasks import Task

ID_COLUMNS = ("patient_id", "study_id", "id")


def parse_pairs(pairs: Sequence[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` -> {k: v}; InputError naming the bad item."""
    out: dict[str, str] = {}
    for item in pairs or ():
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise InputError(None, f"{what} must be given as NAME=VALUE, not {item!r}")
        if key in out:
            raise InputError(None, f"{what} {key!r} given twice")
        out[key] = value
    return out


def inputs_from_args(task: Task, inputs: Sequence[str], roi: str | None, clinical: Sequence[str],
                     study_id: str | None = None) -> dict[str, Any]:
    """One study's inputs from ``--input role=path`` / ``--roi`` / ``--clinical name=value`` / ``--id``."""
    d: dict[str, Any] = dict(parse_pairs(inputs, "--input"))
    name = task.name
    if set(d) - set(task.roles):
        raise InputError(None, f"task {name} has no input {', '.join(sorted(set(d) - set(task.roles)))}; its "
                               f"inputs: {', '.join(task.roles)}")
    missing = [s.role for s in task.inputs if not s.optional and s.role not in d]
    if missing:
        raise InputError(None, f"task {name} needs --input for {', '.join(missing)} "
                               f"({'; '.join(f'{s.role}: {s.description}' for s in task.inputs)})")
    if task.roi is not None and not roi:
        raise InputError(None, f"task {name} needs --roi ({task.roi.description}; {', '.join(task.roi.formats)})")
    if roi and task.roi is None:
        raise InputError(None, f"task {name} takes no --roi")
    known = {v.name for v in task.clinical}
    c = parse_pairs(clinical, "--clinical")
    if set(c) - known:
        raise InputError(None, f"task {name} has no clinical variable {', '.join(sorted(set(c) - known))}"
                               + (f"; it knows {', '.join(sorted(known))}" if known else ""))
    d.update({k: v for k, v in (("roi", roi), ("clinical", c), ("id", study_id)) if v})
    return d


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise InputError(path, "study table not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"not a readable CSV table ({exc})") from None


def read_study_table(path: str | Path, task: Task) -> list[dict[str, Any]]:
    """Study-input dicts, one per row of the table (see module docstring), in table order."""
    path = Path(path)
    cols, rows = _read_csv(path)
    id_col = next((c for c in ID_COLUMNS if c in cols), None)
    roi_col = next((c for c in ("roi", "box") if c in cols), None)
    need = [s.role for s in task.inputs if not s.optional and s.role not in cols]
    need += [" or ".join(ID_COLUMNS)] if id_col is None else []
    need += ["roi"] if task.roi is not None and roi_col is None else []
    if need:
        raise InputError(path, f"study table lacks column(s) {', '.join(need)} for task {task.name} "
                               f"(columns: {', '.join(cols) or 'none'})")
    names = [v.name for v in task.clinical]
    clinical: dict[str, dict[str, str]] = {}
    beside = path.parent / "clinical.csv"
    if names and not set(names) & set(cols) and beside.is_file() and beside.resolve() != path.resolve():
        ccols, crows = _read_csv(beside)
        if "patient_id" not in ccols:
            raise InputError(beside, "clinical table lacks the column patient_id")
        clinical = {r["patient_id"]: {k: r[k] for k in names if k in r} for r in crows}
    seen: set[str] = set()
    out = []
    for n, r in enumerate(rows, start=2):
        sid = (r.get(id_col) or "").strip()
        if not sid:
            raise InputError(path, f"line {n}: empty {id_col}")
        if sid in seen:
            raise InputError(path, f"line {n}: {id_col} {sid!r} appears twice")
        seen.add(sid)
        d: dict[str, Any] = {"id": sid}
        for key, col in [(s.role, s.role) for s in task.inputs] + [("roi", roi_col)]:
            v = (r.get(col) or "").strip() if col else ""
            if v:
                d[key] = v if Path(v).is_absolute() else str((path.parent / v).resolve())
        c = {k: r[k] for k in names if k in r} or clinical.get(sid, {})
        if c:
            d["clinical"] = c
        out.append(d)
    return out
