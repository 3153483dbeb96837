"""Cohort rules (Lebouille-Veldman et al. 2025, configurable) and the inclusion flow.

DICOM steps, each keeping its excluded patients with the reason: 1. baseline study (MR study on
the baseline date ± ``baseline_date_tolerance_days``, closest date, or the named StudyInstanceUID);
2. baseline series (``orientation`` ``sequence``, not fat-suppressed unless allowed, accepted
region, >= ``min_slices`` slices, no severe header problem; ties: most slices, lowest
SeriesNumber, lowest SeriesInstanceUID); 3. follow-up >= ``min_followup_days``; 4. no baseline
deformity (blank = not recorded, kept); 5. intermediate outcome "exclude" | "negative" |
"positive". An image table replaces 1-2 by "image found" (:func:`apply_image_rules`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..io import is_image_file
from .index import ArchiveIndex
from .labels import LabelRow, LabelSheet

INTERMEDIATE_POLICIES = ("exclude", "negative", "positive")


@dataclass(frozen=True)
class ImageRules:
    """Rules shared by image tables and DICOM cohorts (days: calendar days)."""

    min_followup_days: int = 1000
    intermediate: str = "exclude"
    exclude_baseline_deformity: bool = True

    def __post_init__(self) -> None:
        if self.intermediate not in INTERMEDIATE_POLICIES:
            raise ValueError(f"intermediate policy must be one of {INTERMEDIATE_POLICIES}, not {self.intermediate!r}")
        if self.min_followup_days < 0:
            raise ValueError(f"invalid cohort rules: {self}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def series_rule_text(self) -> str:
        return "the table's image, read as one 3D volume (NIfTI / NRRD / MHA file or a DICOM folder with one series)"

    def rule_lines(self) -> list[str]:
        return [f"  image: {self.series_rule_text()}",
                f"  follow-up: >= {self.min_followup_days} days (where the table records it)", *self._outcome_lines()]

    def _outcome_lines(self) -> list[str]:
        return [f"  deformity at baseline: {'excluded' if self.exclude_baseline_deformity else 'kept'}",
                f"  intermediate outcome: {self.intermediate}"]


@dataclass(frozen=True)
class CohortRules(ImageRules):
    """The DICOM series rules on top of :class:`ImageRules`."""

    orientation: str = "sagittal"
    sequence: str = "T2"
    allow_fat_suppressed: bool = False
    regions: tuple[str, ...] = ("cervical",)
    accept_unknown_region: bool = True
    min_slices: int = 8
    modality: str = "MR"
    baseline_date_tolerance_days: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_slices < 1 or self.baseline_date_tolerance_days < 0:
            raise ValueError(f"invalid cohort rules: {self}")
        object.__setattr__(self, "regions", tuple(self.regions))

    def series_rule_text(self) -> str:
        fs = "" if self.allow_fat_suppressed else ", not fat-suppressed"
        reg = " or ".join(self.regions) + (" (or unknown)" if self.accept_unknown_region else "")
        return (f"{self.modality} {self.orientation} {self.sequence}{fs}, region {reg}, >= {self.min_slices} slices, "
                "no severe header problem; ties: most slices, then lowest SeriesNumber, then lowest SeriesInstanceUID")

    def rule_lines(self) -> list[str]:
        return [f"  baseline study: MR study on the baseline date (± {self.baseline_date_tolerance_days} days) or the "
                "named StudyInstanceUID", f"  baseline series: {self.series_rule_text()}",
                f"  follow-up: >= {self.min_followup_days} days after the baseline study date", *self._outcome_lines()]


@dataclass
class Step:
    key: str
    title: str
    remaining: int = 0
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (patient_id, reason)
    note: str = ""


@dataclass
class CohortResult:
    rules: ImageRules
    n_start: int
    steps: list[Step]
    included: list[LabelRow]
    not_in_sheet: list[str]  # index patients without a label row (informational)


def outcome_steps(rows: Sequence[LabelRow], rules: ImageRules, steps: list[Step],
                  has_followup: bool = True) -> list[LabelRow]:
    """Follow-up, baseline deformity and intermediate steps, appended to ``steps``; returns the
    rows kept, with their label."""
    fu, deform, inter = (Step("followup", f"Follow-up >= {rules.min_followup_days} days"),
                         Step("baseline_deformity", "No deformity at baseline"),
                         Step("intermediate", f"Intermediate outcome: {rules.intermediate}"))
    steps += [fu, deform, inter]
    kept = []
    for r in rows:
        days = r.followup_days
        if not has_followup or (days is not None and days >= rules.min_followup_days):
            kept.append(r)
        elif days is None:
            fu.excluded.append((r.patient_id, "follow-up not recorded"))
        else:
            detail = f" (baseline {r.baseline_date}, follow-up {r.followup_date})" if r.followup_date else ""
            fu.excluded.append((r.patient_id, f"follow-up {days} days < {rules.min_followup_days}{detail}"))
    fu.remaining, fu.note = len(kept), "" if has_followup else "not applied: the table records no follow-up"
    unknown = sum(r.baseline_deformity is None for r in kept)
    if rules.exclude_baseline_deformity:
        deform.excluded = [(r.patient_id, "deformity at baseline") for r in kept if r.baseline_deformity == "yes"]
        kept = [r for r in kept if r.baseline_deformity != "yes"]
        deform.note = f"{unknown} with baseline deformity not recorded (kept)" if unknown else ""
    else:
        deform.note = "rule off: patients with deformity at baseline kept"
    deform.remaining = len(kept)
    if rules.intermediate == "exclude":
        inter.excluded = [(r.patient_id, "intermediate outcome (policy: exclude)") for r in kept
                          if r.outcome == "intermediate"]
        kept = [r for r in kept if r.outcome != "intermediate"]
    relabelled = sum(r.outcome == "intermediate" for r in kept)
    inter.remaining = len(kept)
    inter.note = f"{relabelled} intermediate relabelled {rules.intermediate}" if relabelled else ""
    positive = ("yes", "intermediate") if rules.intermediate == "positive" else ("yes",)
    return [replace(r, label=int(r.outcome in positive)) for r in kept]


def _series_fails(s: pd.Series, rules: CohortRules) -> list[str]:
    region_ok = s["region"] in rules.regions or (s["region"] == "unknown" and rules.accept_unknown_region)
    checks = [(str(s["modality"]).upper() != rules.modality.upper(), f"modality {s['modality'] or 'unknown'}"),
              (s["orientation"] != rules.orientation, str(s["orientation"])),
              (s["sequence"] != rules.sequence, f"sequence {s['sequence']}"),
              (s["fat_suppressed"] and not rules.allow_fat_suppressed, "fat-suppressed"),
              (not region_ok, f"region {s['region']}"),
              (int(s["n_slices"]) < rules.min_slices, f"{s['n_slices']} slices"),
              (s["severe"], "; ".join(s["problems"]))]
    return [why for bad, why in checks if bad]


def apply_cohort(index: ArchiveIndex, sheet: LabelSheet, rules: CohortRules, role: str = "t2_sag") -> CohortResult:
    """Run the inclusion steps on the valid rows of ``sheet``; the chosen series is input ``role``."""
    by_patient = {p: g for p, g in index.series.groupby("patient_id", sort=True)}
    rows = sorted(sheet.rows, key=lambda r: r.patient_id)
    steps = [Step("baseline_study", "Baseline MRI study found"),
             Step("baseline_series", f"Baseline {rules.orientation} {rules.sequence} series")]
    kept: list[LabelRow] = []
    for r in rows:
        g = by_patient[r.patient_id]  # the label sheet was validated against the index
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
                steps[0].excluded.append((r.patient_id, f"no MRI study on baseline date {r.baseline_date}{tol}; "
                                                        f"studies on: {have or 'none'}"))
                continue
            cands = g.loc[delta.index[delta == ok.min()]]
        have_date = cands["study_date"].notna().any()
        base = dt.date.fromisoformat(str(cands["study_date"].dropna().iloc[0])) if have_date else r.baseline_date
        fails = {i: _series_fails(s, rules) for i, s in cands.sort_values("series_uid").iterrows()}
        good = cands.loc[[i for i, f in fails.items() if not f]]
        if good.empty:
            listing = "; ".join(f"'{cands.loc[i, 'description']}' ({', '.join(f)})" for i, f in fails.items())
            steps[1].excluded.append((r.patient_id, f"no eligible series in baseline study of {base}: {listing}"))
            continue
        s = good.sort_values(["n_slices", "series_number", "series_uid"], ascending=[False, True, True],
                             na_position="last").iloc[0]  # a missing SeriesNumber ranks last
        kept.append(replace(r, inputs={role: str(s["folder"])}, baseline_date=base,
                            followup_days=(r.followup_date - base).days, study_uid=str(s["study_uid"]),
                            series_uid=str(s["series_uid"]), series_description=str(s["description"]),
                            n_slices=int(s["n_slices"])))
    steps[0].remaining = len(rows) - len(steps[0].excluded)
    steps[1].remaining = len(kept)
    return CohortResult(rules, len(rows), steps, outcome_steps(kept, rules, steps),
                        not_in_sheet=sorted(index.patients - {r.patient_id for r in sheet.rows}))


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
            kept.append(replace(r, series_description=Path(r.folder).name))
    steps[0].remaining = len(kept)
    return CohortResult(rules=rules, n_start=len(table.rows), steps=steps,
                        included=outcome_steps(kept, rules, steps, table.has_followup), not_in_sheet=[])
