"""Clinical SpA features for NegSpA-AI: declaration, parsing, explicit missing-value encoding.

Variables: the ASAS SpA features Lu et al. (QIMS 2024) use for HLA-B27-negative patients, binary
(1 = present), CRP (mg/L), age (years), sex, disease duration (months). Each variable encodes as a
``value`` and a ``missing`` flag: a missing value takes the training cohort's median (continuous) or
prevalence (binary) and is flagged, so "absent" differs from "not recorded"; continuous values are
z-scored with the training mean / sd (after log1p for the right-skewed CRP). The fitted statistics
go into the model card, so prediction encodes exactly as training did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ...errors import InputError
from ..base import ClinicalVar

BINARY = [
    ("inflammatory_back_pain", "inflammatory back pain (ASAS definition)"),
    ("arthritis", "peripheral arthritis"),
    ("heel_enthesitis", "heel enthesitis"),
    ("uveitis", "anterior uveitis"),
    ("dactylitis", "dactylitis"),
    ("psoriasis", "psoriasis"),
    ("ibd", "Crohn's disease / ulcerative colitis"),
    ("nsaid_response", "good response to NSAIDs"),
    ("family_history", "family history of SpA"),
]
CLINICAL_VARIABLES: tuple[ClinicalVar, ...] = tuple(
    [ClinicalVar(n, "binary", d) for n, d in BINARY] + [
        ClinicalVar("crp", "continuous", "C-reactive protein", unit="mg/L", range=(0.0, 300.0)),
        ClinicalVar("age", "continuous", "age at MRI", unit="years", range=(0.0, 110.0)),
        ClinicalVar("sex", "binary", "sex (1 = male, 0 = female; M/F accepted)"),
        ClinicalVar("disease_duration", "continuous", "symptom duration", unit="months", range=(0.0, 1200.0)),
    ])
NAMES = tuple(v.name for v in CLINICAL_VARIABLES)
_LOG = {"crp"}  # log1p before z-scoring
_YES_NO = {**dict.fromkeys(("1", "yes", "y", "true", "t", "present", "pos", "positive", "m", "male"), 1.0),
           **dict.fromkeys(("0", "no", "n", "false", "f", "absent", "neg", "negative", "female", "w"), 0.0)}
_MISSING = {"", "na", "n/a", "nan", "none", "unknown", "?", "missing", "-"}


def parse_value(var: ClinicalVar, raw: Any, where: str = "") -> float:
    """One raw cell -> float (NaN when missing). Raises ValueError naming the variable on bad input."""
    s = str(raw).strip().lower()  # None and float NaN read as missing words
    if s in _MISSING:
        return math.nan
    try:
        v = _YES_NO[s] if var.kind == "binary" and s in _YES_NO else float(s)
    except ValueError:
        v = math.nan
    if var.kind == "binary" and v not in (0.0, 1.0):
        raise ValueError(f"{where}{var.name}: {raw!r} is not a yes/no value (1/0, yes/no, true/false"
                         f"{', M/F' if var.name == 'sex' else ''}; empty = missing)")
    if math.isnan(v):
        raise ValueError(f"{where}{var.name}: {raw!r} is not a number ({var.unit})")
    if var.range is not None and not (var.range[0] <= v <= var.range[1]):
        raise ValueError(f"{where}{var.name}: {v} {var.unit} outside the plausible range {list(var.range)}")
    return v


def parse_table(df: pd.DataFrame, source: str | Path | None = None) -> pd.DataFrame:
    """The clinical columns of ``df`` parsed to floats (NaN = missing); absent columns are all NaN."""
    pids = df["patient_id"] if "patient_id" in df.columns else df.index
    cells = df.reindex(columns=list(NAMES))
    try:
        return pd.DataFrame({var.name: np.array([parse_value(var, raw, f"patient {pid}: ")
                                                 for raw, pid in zip(cells[var.name], pids)], dtype=float)
                             for var in CLINICAL_VARIABLES}, index=df.index)
    except ValueError as exc:
        raise InputError(source, str(exc)) from None


def read_clinical_csv(path: str | Path) -> pd.DataFrame:
    """Read a clinical CSV (``patient_id`` + any of :data:`NAMES`); returns patient_id + parsed columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "clinical CSV not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable CSV: {exc}") from None
    if "patient_id" not in df.columns:
        raise InputError(path, "has no patient_id column")
    parsed = parse_table(df, path)
    parsed.insert(0, "patient_id", df["patient_id"].astype(str))
    return parsed


def _scaled(var: ClinicalVar, col: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(col, 0)) if var.name in _LOG else col


@dataclass
class ClinicalEncoder:
    """Fitted imputation + scaling. ``encode`` gives float32 (N, 2 * n_vars): [values..., missing flags...]."""

    fill: dict[str, float] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 2 * len(NAMES)

    @classmethod
    def fit(cls, parsed: pd.DataFrame) -> "ClinicalEncoder":
        enc = cls()
        parsed = parsed.reindex(columns=list(NAMES))
        for var in CLINICAL_VARIABLES:
            obs = _scaled(var, parsed[var.name].dropna().to_numpy(dtype=float))
            if var.kind == "binary":
                enc.fill[var.name] = float(obs.mean()) if obs.size else 0.0
                continue
            enc.fill[var.name] = float(np.median(obs)) if obs.size else 0.0
            enc.mean[var.name] = float(obs.mean()) if obs.size else 0.0
            sd = float(obs.std()) if obs.size > 1 else 1.0
            enc.std[var.name] = sd if sd > 0 else 1.0
        return enc

    def encode(self, parsed: pd.DataFrame | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> np.ndarray:
        """Parsed rows (DataFrame, or dict(s) of raw values) -> float32 (N, dim)."""
        if isinstance(parsed, Mapping):
            parsed = [parsed]
        if not isinstance(parsed, pd.DataFrame):
            parsed = parse_table(pd.DataFrame(list(parsed)))
        cols = parsed.reindex(columns=list(NAMES)).to_numpy(dtype=float)
        missing = np.isnan(cols)
        values = np.empty_like(cols)
        for j, var in enumerate(CLINICAL_VARIABLES):
            v = np.where(missing[:, j], self.fill[var.name], _scaled(var, cols[:, j]))
            values[:, j] = v if var.kind == "binary" else (v - self.mean[var.name]) / self.std[var.name]
        return np.concatenate([values, missing], axis=1).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"variables": list(NAMES), "fill": self.fill, "mean": self.mean, "std": self.std,
                "log1p": sorted(_LOG), "layout": "values then missing flags"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClinicalEncoder":
        if list(d.get("variables", [])) != list(NAMES):
            raise ValueError(f"clinical encoder variables {d.get('variables')} differ from this version's "
                             f"{list(NAMES)}")
        return cls(fill=dict(d["fill"]), mean=dict(d["mean"]), std=dict(d["std"]))
