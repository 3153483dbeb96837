"""Cohorts without DICOM: a table of image paths + labels, through the same rules, flow, split and cache.

CSV (comma, semicolon or tab separated; UTF-8), one row per patient:

=====================  ========================================================================
patient_id             required, unique
image                  required: a NIfTI / NRRD / MHA file or a DICOM folder holding one series;
                       relative paths are relative to the table's folder
outcome | label        required, one of them: outcome yes | no | intermediate, or label 1 | 0
followup_days          optional: days from the baseline image to the follow-up, or
baseline_date +        optional (YYYY-MM-DD) instead of followup_days
followup_date
baseline_deformity     yes | no, optional (blank = not recorded)
site                   optional (used by the external-site split)
anything else          clinical variables, copied verbatim into the manifest
=====================  ========================================================================

Steps of the inclusion flow (each excluded patient with the reason): image found, follow-up
(only where the table records it), deformity at baseline, intermediate outcome, then "task input
computed" when the cache reads the image through the imaging core (:func:`rheumai.io.read_study`).
Every bad row is reported at once (:class:`~rheumai.dataset.labels.LabelSheetError`) before
anything is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import is_image_file
from ..tasks.cervical_ra.slices import SliceParams
from .build import DatasetResult, ProgressFn, _build_staged
from .cache import CacheJob, FileHasher, entry_name
from .cohort import INTERMEDIATE_POLICIES, CohortEntry, CohortResult, Step
from .labels import LabelSheetError, RowProblem, _parse_date, _read_csv
from .split import SplitConfig

RESERVED = ("patient_id", "image", "outcome", "label", "followup_days", "baseline_date", "followup_date",
            "baseline_deformity", "site")


@dataclass(frozen=True)
class ImageRules:
    """Rules for an image table (the DICOM series rules do not apply: the table names the image)."""

    min_followup_days: int = 1000
    intermediate: str = "exclude"
    exclude_baseline_deformity: bool = True
    baseline_date_tolerance_days: int = 0  # unused; kept so flow reports read both rule kinds alike

    def __post_init__(self) -> None:
        if self.intermediate not in INTERMEDIATE_POLICIES:
            raise ValueError(f"intermediate policy must be one of {INTERMEDIATE_POLICIES}, not {self.intermediate!r}")
        if self.min_followup_days < 0:
            raise ValueError(f"invalid rules: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def series_rule_text(self) -> str:
        return "the table's image, read as one 3D volume (NIfTI / NRRD / MHA file or a DICOM folder with one series)"

    def rule_lines(self) -> list[str]:
        return [f"  image: {self.series_rule_text()}",
                f"  follow-up: >= {self.min_followup_days} days (where the table records it)",
                f"  deformity at baseline: {'excluded' if self.exclude_baseline_deformity else 'kept'}",
                f"  intermediate outcome: {self.intermediate}"]


@dataclass(frozen=True)
class ImageRow:
    row: int
    patient_id: str
    image: str  # absolute path
    outcome: str  # yes | no | intermediate
    followup_days: int | None
    baseline_deformity: str | None
    site: str
    clinical: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageTable:
    path: str
    sha256: str
    rows: list[ImageRow]
    clinical_columns: list[str]
    has_followup: bool


def read_image_table(path: str | Path) -> ImageTable:
    """Read and validate an image table; raises LabelSheetError listing every bad row."""
    path = Path(path)
    header, body = _read_csv(path)
    missing = [c for c in ("patient_id", "image") if c not in header]
    if "outcome" not in header and "label" not in header:
        missing.append("outcome or label")
    if missing:
        raise InputError(path, f"image table lacks the column(s) {', '.join(missing)}; it has: {', '.join(header)}")
    if not body:
        raise InputError(path, "image table has a header but no rows")
    clinical = [h for h in header if h not in RESERVED and h]
    has_followup = "followup_days" in header or ("baseline_date" in header and "followup_date" in header)
    problems: list[RowProblem] = []
    rows: list[ImageRow] = []
    first: dict[str, int] = {}
    for n, raw in enumerate(body, start=2):
        if not any(c.strip() for c in raw):
            continue
        v = {h: (raw[i].strip() if i < len(raw) else "") for i, h in enumerate(header)}
        pid, errs = v["patient_id"], []
        if not pid:
            errs.append("missing patient_id")
        elif pid in first:
            errs.append(f"duplicate patient_id (first on row {first[pid]})")
        else:
            first[pid] = n
        if not v["image"]:
            errs.append("missing image path")
        outcome = _outcome(v, errs)
        days = _followup_days(v, errs) if has_followup else None
        deform = v.get("baseline_deformity", "").lower() or None
        if deform not in (None, "yes", "no"):
            errs.append(f"baseline_deformity must be yes, no or blank, not '{v['baseline_deformity']}'")
        if errs:
            problems += [RowProblem(n, pid, e) for e in errs]
            continue
        image = Path(v["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        rows.append(ImageRow(n, pid, str(image.resolve()), outcome, days, deform, v.get("site", ""),
                             {c: v.get(c, "") for c in clinical}))
    if problems:
        raise LabelSheetError(path, problems)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return ImageTable(str(path), sha, rows, clinical, has_followup)


def _outcome(v: dict[str, str], errs: list[str]) -> str:
    if v.get("outcome"):
        o = v["outcome"].lower()
        if o not in ("yes", "no", "intermediate"):
            errs.append(f"outcome must be yes, no or intermediate, not '{v['outcome']}'")
        return o
    lab = v.get("label", "")
    if lab in ("0", "1"):
        return "yes" if lab == "1" else "no"
    errs.append(f"label must be 0 or 1, not '{lab}'" if lab else "missing outcome / label")
    return ""


def _followup_days(v: dict[str, str], errs: list[str]) -> int | None:
    if v.get("followup_days"):
        try:
            return int(v["followup_days"])
        except ValueError:
            errs.append(f"followup_days must be a whole number of days, not '{v['followup_days']}'")
            return None
    if v.get("baseline_date") and v.get("followup_date"):
        try:
            return (_parse_date(v["followup_date"]) - _parse_date(v["baseline_date"])).days
        except ValueError as exc:
            errs.append(str(exc))
    return None


def apply_image_rules(table: ImageTable, rules: ImageRules) -> CohortResult:
    """The inclusion steps on an image table (the last step, reading the image, runs in the cache)."""
    steps = [Step("image", "Image found"),
             Step("followup", f"Follow-up >= {rules.min_followup_days} days"),
             Step("baseline_deformity", "No deformity at baseline"),
             Step("intermediate", f"Intermediate outcome: {rules.intermediate}")]
    kept: list[ImageRow] = []
    for r in sorted(table.rows, key=lambda r: r.patient_id):
        p = Path(r.image)
        if not p.exists():
            steps[0].excluded.append((r.patient_id, f"image not found: {r.image}"))
        elif p.is_file() and not is_image_file(p) and p.suffix.lower() not in ("", ".dcm", ".ima"):
            steps[0].excluded.append((r.patient_id, f"not an image file (NIfTI / NRRD / MHA) or DICOM folder: {r.image}"))
        else:
            kept.append(r)
    steps[0].remaining = len(kept)
    nxt = []
    for r in kept:
        if not table.has_followup:
            nxt.append(r)
        elif r.followup_days is None:
            steps[1].excluded.append((r.patient_id, "follow-up not recorded"))
        elif r.followup_days < rules.min_followup_days:
            steps[1].excluded.append((r.patient_id, f"follow-up {r.followup_days} days < {rules.min_followup_days}"))
        else:
            nxt.append(r)
    if not table.has_followup:
        steps[1].note = "not applied: the table records no follow-up"
    kept, steps[1].remaining = nxt, len(nxt)
    nxt = []
    for r in kept:
        if rules.exclude_baseline_deformity and r.baseline_deformity == "yes":
            steps[2].excluded.append((r.patient_id, "deformity at baseline"))
        else:
            nxt.append(r)
    kept, steps[2].remaining = nxt, len(nxt)
    nxt = []
    relabelled = 0
    for r in kept:
        if r.outcome == "intermediate" and rules.intermediate == "exclude":
            steps[3].excluded.append((r.patient_id, "intermediate outcome (policy: exclude)"))
        else:
            relabelled += r.outcome == "intermediate"
            nxt.append(r)
    kept, steps[3].remaining = nxt, len(nxt)
    if relabelled:
        steps[3].note = f"{relabelled} intermediate relabelled {rules.intermediate}"
    included = [CohortEntry(
        patient_id=r.patient_id, outcome=r.outcome, site=r.site,
        label=1 if r.outcome == "yes" or (r.outcome == "intermediate" and rules.intermediate == "positive") else 0,
        baseline_date=None, followup_date=None, followup_days=r.followup_days,  # type: ignore[arg-type]
        study_uid="", series_uid="", series_description=Path(r.image).name, n_slices=0, folder=r.image,
        clinical=r.clinical) for r in kept]
    return CohortResult(rules=rules, n_start=len(table.rows), steps=steps, included=included,  # type: ignore[arg-type]
                        not_in_sheet=[])


def _image_files(image: str) -> list[str]:
    p = Path(image)
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))


def build_image_dataset(
    table_csv: str | Path,
    out_dir: str | Path,
    rules: ImageRules = ImageRules(),
    split_cfg: SplitConfig = SplitConfig(),
    slice_params: SliceParams = SliceParams(),
    workers: int = 1,
    progress: ProgressFn | None = None,
    compute_cache: bool = True,
    task: str = "cervical_ra",
) -> DatasetResult:
    """Build a dataset from an image table: the same outputs as
    :func:`rheumai.dataset.build.build_dataset` (manifest, flow, split, cache, dataset.json), the
    same staging and swap (a failed build changes nothing)."""
    table = read_image_table(table_csv)
    cohort = apply_image_rules(table, rules)
    header = f"image table: {Path(table_csv).name} ({len(table.rows)} rows)"

    def jobs_for(cache_dir: Path, p_hash: str, hashes: dict[str, str]) -> list[CacheJob]:
        hasher = FileHasher(cache_dir / "filehash.sqlite")
        jobs = []
        try:
            for k, e in enumerate(cohort.included, 1):
                files = _image_files(e.folder)
                hashes[e.patient_id] = hasher.series(files)
                jobs.append(CacheJob(e.patient_id, "", tuple(files), e.folder,
                                     str(cache_dir / entry_name(hashes[e.patient_id], p_hash))))
                if progress is not None:
                    progress("hashing source images", k, len(cohort.included))
        finally:
            hasher.close()
        return jobs

    return _build_staged(Path(out_dir), cohort, table, header, None, table_csv, task, rules, split_cfg,
                         slice_params, jobs_for, workers, progress, compute_cache)
