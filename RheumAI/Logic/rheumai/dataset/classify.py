"""Classify a DICOM MR series from its header tags: slice orientation, sequence weighting, region.

Orientation: the slice normal (row x column cosines of ImageOrientationPatient, LPS) picks the
plane by its dominant axis (x sagittal, y coronal, z axial); more than ``oblique_deg`` degrees from
every axis is "oblique". Sequence: a documented heuristic (no library classifies MR weightings
from tags): description keywords first, then EchoTime / RepetitionTime / InversionTime (ms),
ScanningSequence and ScanOptions; a disagreement keeps the keyword guess and records a problem.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from ..multiframe import finite_floats

ORIENTATIONS = ("sagittal", "coronal", "axial", "oblique", "unknown")
SEQUENCES = ("T1", "T2", "PD", "STIR", "FLAIR", "unknown")


def orientation_class(iop: Sequence[float] | None, oblique_deg: float = 30.0) -> str:
    """A value of :data:`ORIENTATIONS` from ImageOrientationPatient (see the module docstring)."""
    v = finite_floats(iop, 6)
    n = np.cross(v[:3], v[3:]) if v is not None else np.zeros(3)
    axis, norm = int(np.argmax(np.abs(n))), float(np.linalg.norm(n))
    if norm < 1e-6:
        return "unknown"
    return "oblique" if abs(n[axis]) / norm < math.cos(math.radians(oblique_deg)) else ORIENTATIONS[axis]


# Tested in this order on the lower-cased description; the look-arounds keep "t2" from matching
# inside "st2x" while accepting "t2_tse", "t2w", "sag-t2".
_KEYWORDS: list[tuple[str, re.Pattern[str]]] = [
    ("STIR", re.compile(r"(?<![a-z0-9])(stir|tirm|t2[ _-]?stir)(?![a-z])")),
    ("FLAIR", re.compile(r"(?<![a-z0-9])(flair|dark[ _-]?fluid)")),
    ("T2", re.compile(r"(?<![a-z0-9])t2(?![0-9])")),
    ("T1", re.compile(r"(?<![a-z0-9])t1(?![0-9])|mprage|spgr|vibe")),
    ("PD", re.compile(r"(?<![a-z0-9])pd(?![a-z0-9])|proton[ _-]?density")),
]
_FAT_SUPPRESSED = re.compile(r"(?<![a-z0-9])(fs|fatsat|fat[ _-]sat|spair|spir|dixon|stir|tirm|water)(?![a-z])")


def as_float(v: object) -> float | None:
    """``v`` as a finite float, else None."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def sequence_from_tags(te: float | None, tr: float | None, ti: float | None, scanning_sequence: str) -> str:
    """Weighting from timing (ms); thresholds are the textbook 1.5 / 3 T spin-echo ranges."""
    if "IR" in scanning_sequence.upper().split("\\") and ti is not None:
        if ti < 300:
            return "STIR"
        if ti > 1500 and te is not None and te > 60:
            return "FLAIR"
    if te is None or tr is None:
        return "unknown"
    if tr < 1000 and te < 30:
        return "T1"
    if tr >= 1500:
        return "T2" if te >= 60 else "PD" if te < 40 else "unknown"
    return "unknown"


def guess_sequence(description: str, te: object = None, tr: object = None, ti: object = None,
                   scanning_sequence: str = "", scan_options: str = "") -> tuple[str, bool, str, list[str]]:
    """``(sequence, fat_suppressed, source, problems)``: ``sequence`` in :data:`SEQUENCES`, ``source``
    "description" | "tags" | "none", ``problems`` the disagreements between keywords and tags."""
    text = description.lower()
    te_f, tr_f = as_float(te), as_float(tr)
    by_tags = sequence_from_tags(te_f, tr_f, as_float(ti), scanning_sequence or "")
    by_words = next((name for name, pat in _KEYWORDS if pat.search(text)), "unknown")
    options = (scan_options or "").upper().replace("\\", " ").split()
    fat_sup = bool(_FAT_SUPPRESSED.search(text)) or "FS" in options or "SFS" in options
    problems: list[str] = []
    if by_words != "unknown":
        seq, source = by_words, "description"
        if by_tags not in ("unknown", by_words) and not (by_words == "STIR" and by_tags == "T2"):
            problems.append(f"description suggests {by_words} but TE {te_f} ms / TR {tr_f} ms suggest {by_tags}")
    else:
        seq, source = by_tags, "tags" if by_tags != "unknown" else "none"
    return seq, fat_sup or seq == "STIR", source, problems


# Includes the Dutch / German spine abbreviations (CWK / HWK cervical, BWK / TWK thoracic, LWK lumbar).
_REGION_WORDS: list[tuple[str, re.Pattern[str]]] = [
    ("cervical", re.compile(r"cervical|c[ _-]?spine|cspine|(?<![a-z])cwk(?![a-z])|(?<![a-z])hwk(?![a-z])|neck|"
                            r"(?<![a-z])hals|(?<![a-z])c[ _-]?wk")),
    ("thoracic", re.compile(r"thoracic|t[ _-]?spine|tspine|(?<![a-z])twk(?![a-z])|(?<![a-z])bwk(?![a-z])")),
    ("lumbar", re.compile(r"lumbar|l[ _-]?spine|lspine|(?<![a-z])lwk(?![a-z])")),
    ("brain", re.compile(r"brain|head|(?<![a-z])cerebr|hersenen|(?<![a-z])schedel")),
    ("hand", re.compile(r"(?<![a-z])hand|wrist|(?<![a-z])pols")),
]


def guess_region(body_part: str, *descriptions: str) -> str:
    """Anatomical region from BodyPartExamined, then the study / series descriptions."""
    return next((name for text in (body_part, *descriptions) for name, pat in _REGION_WORDS
                 if pat.search((text or "").lower())), "unknown")
