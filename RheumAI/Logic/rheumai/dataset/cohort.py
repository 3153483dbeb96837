"""Cohort rules (as in Lebouille-Veldman et al. 2025, configurable) and the inclusion flow.

Steps, applied in this order to the patients of the label sheet; each step keeps a list of the
patients it excluded with the reason:

1. baseline study: an MR study of the patient on the baseline date (± ``baseline_date_tolerance_days``;
   the closest date wins, all studies of that date are candidates) or the named StudyInstanceUID.
2. baseline series: within it, a series that is ``orientation`` (sagittal), ``sequence`` (T2),
   not fat-suppressed unless allowed, of an accepted region (cervical; unknown region accepted by
   default), with at least ``min_slices`` slices and no severe header problem. Choice among
   several: most slices, then lowest SeriesNumber, then lowest SeriesInstanceUID.
3. follow-up: follow-up date at least ``min_followup_days`` after the baseline study date.
4. baseline deformity: patients with deformity at baseline excluded (blank = not recorded, kept).
5. intermediate outcome: ``intermediate`` policy "exclude" | "negative" | "positive".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from .index import ArchiveIndex
from .labels import LabelRow, LabelSheet

INTERMEDIATE_POLICIES = ("exclude", "negative", "positive")


@dataclass(frozen=True)
class CohortRules:
    """Inclusion rules. Days are calendar days between DICOM StudyDate and the label-sheet dates."""

    min_followup_days: int = 1000
    intermediate: str = "exclude"
    exclude_baseline_deformity: bool = True
    orientation: str = "sagittal"
    sequence: str = "T2"
    allow_fat_suppressed: bool = False
    regions: tuple[str, ...] = ("cervical",)
    accept_unknown_region: bool = True
    min_slices: int = 8
    modality: str = "MR"
    baseline_date_tolerance_days: int = 0

    def __post_init__(self) -> None:
        if self.intermediate not in INTERMEDIATE_POLICIES:
            raise ValueError(f"intermediate policy must be one of {INTERMEDIATE_POLICIES}, not {self.intermediate!r}")
        if self.min_followup_days < 0 or self.min_slices < 1 or self.baseline_date_tolerance_days < 0:
            raise ValueError(f"invalid cohort rules: {self}")
        object.__setattr__(self, "regions", tuple(self.regions))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["regions"] = list(self.regions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CohortRules":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def series_rule_text(self) -> str:
        fs = "" if self.allow_fat_suppressed else ", not fat-suppressed"
        reg = " or ".join(self.regions) + (" (or unknown)" if self.accept_unknown_region else "")
        return (f"{self.modality} {self.orientation} {self.sequence}{fs}, region {reg}, >= {self.min_slices} slices, "
                "no severe header problem; ties: most slices, then lowest SeriesNumber, then lowest SeriesInstanceUID")


@dataclass
class Step:
    key: str
    title: str
    remaining: int = 0
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (patient_id, reason)
    note: str = ""


@dataclass
class CohortEntry:
    """An included patient with the chosen baseline series (folder = its files' folder)."""

    patient_id: str
    label: int
    outcome: str
    site: str
    baseline_date: dt.date
    followup_date: dt.date
    followup_days: int
    study_uid: str
    series_uid: str
    series_description: str
    n_slices: int
    folder: str
    clinical: dict[str, str]


@dataclass
class CohortResult:
    rules: CohortRules
    n_start: int
    steps: list[Step]
    included: list[CohortEntry]
    not_in_sheet: list[str]  # index patients without a label row (informational)

    @property
    def excluded(self) -> list[tuple[str, str, str]]:
        """(patient_id, step key, reason) for every excluded patient, in step order."""
        return [(p, s.key, r) for s in self.steps for p, r in s.excluded]


def _series_fails(s: pd.Series, rules: CohortRules) -> list[str]:
    why = []
    if str(s["modality"]).upper() != rules.modality.upper():
        why.append(f"modality {s['modality'] or 'unknown'}")
    if s["orientation"] != rules.orientation:
        why.append(str(s["orientation"]))
    if s["sequence"] != rules.sequence:
        why.append(f"sequence {s['sequence']}")
    if s["fat_suppressed"] and not rules.allow_fat_suppressed:
        why.append("fat-suppressed")
    if not (s["region"] in rules.regions or (s["region"] == "unknown" and rules.accept_unknown_region)):
        why.append(f"region {s['region']}")
    if int(s["n_slices"]) < rules.min_slices:
        why.append(f"{s['n_slices']} slices")
    if s["severe"]:
        why.append("; ".join(s["problems"]))
    return why


def apply_cohort(index: ArchiveIndex, sheet: LabelSheet, rules: CohortRules) -> CohortResult:
    """Run the inclusion steps on the valid rows of ``sheet``; see the module docstring."""
    series = index.series
    by_patient = {p: g for p, g in series.groupby("patient_id", sort=True)}
    labelled = {r.patient_id for r in sheet.rows}
    rows = sorted(sheet.rows, key=lambda r: r.patient_id)
    steps = [
        Step("baseline_study", "Baseline MRI study found"),
        Step("baseline_series", f"Baseline {rules.orientation} {rules.sequence} series"),
        Step("followup", f"Follow-up >= {rules.min_followup_days} days"),
        Step("baseline_deformity", "No deformity at baseline"),
        Step("intermediate", f"Intermediate outcome: {rules.intermediate}"),
    ]
    kept: list[tuple[LabelRow, pd.Series, dt.date]] = []
    for r in rows:
        g = by_patient.get(r.patient_id)
        if g is None:  # only when validated without an index
            steps[0].excluded.append((r.patient_id, "patient not in the index"))
            continue
        # Step 1: the baseline study (or studies on the baseline date).
        if r.baseline_study_uid:
            cands = g[g["study_uid"] == r.baseline_study_uid]
            if cands.empty:
                steps[0].excluded.append((r.patient_id, f"no study {r.baseline_study_uid}"))
                continue
        else:
            dates = g["study_date"].dropna().map(dt.date.fromisoformat)
            delta = (dates - r.baseline_date).map(lambda d: abs(d.days))
            ok = delta[delta <= rules.baseline_date_tolerance_days]
            if ok.empty:
                have = ", ".join(sorted(set(g["study_date"].dropna())))
                tol = f" (± {rules.baseline_date_tolerance_days} days)" if rules.baseline_date_tolerance_days else ""
                steps[0].excluded.append((r.patient_id, f"no MRI study on baseline date {r.baseline_date}{tol}; studies on: {have or 'none'}"))
                continue
            cands = g.loc[delta.index[delta == ok.min()]]
        base_date = dt.date.fromisoformat(str(cands["study_date"].dropna().iloc[0])) if cands["study_date"].notna().any() else r.baseline_date
        # Step 2: the series.
        fails = {i: _series_fails(s, rules) for i, s in cands.iterrows()}
        good = cands.loc[[i for i, f in fails.items() if not f]]
        if good.empty:
            listing = "; ".join(f"'{cands.loc[i, 'description']}' ({', '.join(f)})" for i, f in sorted(fails.items(), key=lambda kv: str(cands.loc[kv[0], "series_uid"])))
            steps[1].excluded.append((r.patient_id, f"no eligible series in baseline study of {base_date}: {listing}"))
            continue
        good = good.assign(_sn=good["series_number"].fillna(10**9))
        chosen = good.sort_values(["n_slices", "_sn", "series_uid"], ascending=[False, True, True]).iloc[0]
        kept.append((r, chosen, base_date))
    steps[0].remaining = len(rows) - len(steps[0].excluded)
    steps[1].remaining = len(kept)

    # Step 3: follow-up length, from the baseline study date.
    nxt = []
    for r, s, b in kept:
        days = (r.followup_date - b).days
        if days < rules.min_followup_days:
            steps[2].excluded.append((r.patient_id, f"follow-up {days} days < {rules.min_followup_days} (baseline {b}, follow-up {r.followup_date})"))
        else:
            nxt.append((r, s, b))
    kept, steps[2].remaining = nxt, len(nxt)

    # Step 4: deformity at baseline.
    nxt = []
    unknown = 0
    for r, s, b in kept:
        if r.baseline_deformity is None:
            unknown += 1
        if rules.exclude_baseline_deformity and r.baseline_deformity == "yes":
            steps[3].excluded.append((r.patient_id, "deformity at baseline"))
        else:
            nxt.append((r, s, b))
    kept, steps[3].remaining = nxt, len(nxt)
    if unknown:
        steps[3].note = f"{unknown} with baseline deformity not recorded (kept)"
    if not rules.exclude_baseline_deformity:
        steps[3].note = "rule off: patients with deformity at baseline kept"

    # Step 5: intermediate outcome policy.
    included: list[CohortEntry] = []
    relabelled = 0
    for r, s, b in kept:
        if r.outcome == "intermediate":
            if rules.intermediate == "exclude":
                steps[4].excluded.append((r.patient_id, "intermediate outcome (policy: exclude)"))
                continue
            relabelled += 1
            label = 1 if rules.intermediate == "positive" else 0
        else:
            label = 1 if r.outcome == "yes" else 0
        included.append(CohortEntry(
            patient_id=r.patient_id, label=label, outcome=r.outcome, site=r.site, baseline_date=b,
            followup_date=r.followup_date, followup_days=(r.followup_date - b).days,
            study_uid=str(s["study_uid"]), series_uid=str(s["series_uid"]),
            series_description=str(s["description"]), n_slices=int(s["n_slices"]), folder=str(s["folder"]),
            clinical=dict(r.clinical),
        ))
    steps[4].remaining = len(included)
    if relabelled:
        steps[4].note = f"{relabelled} intermediate relabelled {rules.intermediate}"
    return CohortResult(rules=rules, n_start=len(rows), steps=steps, included=included,
                        not_in_sheet=sorted(index.patients - labelled))
