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
_TRUE = {"1", "yes", "y", "true", "t", "present", "pos", "positive", "m", "male"}
_FALSE = {"0", "no", "n", "false", "f", "absent", "neg", "negative", "f", "female", "w"}
_MISSING = {"", "na", "n/a", "nan", "none", "unknown", "?", "missing", "-"}


def parse_value(var: ClinicalVar, raw: Any, where: str = "") -> float:
    """One raw cell -> float (NaN when missing). Raises ValueError naming the variable on bad input."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return math.nan
    s = str(raw).strip().lower()
    if s in _MISSING:
        return math.nan
    if var.kind == "binary":
        if s in _TRUE:
            return 1.0
        if s in _FALSE:
            return 0.0
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if v in (0.0, 1.0):
            return v
        raise ValueError(f"{where}{var.name}: {raw!r} is not a yes/no value (1/0, yes/no, true/false"
                         f"{', M/F' if var.name == 'sex' else ''}; empty = missing)")
    try:
        v = float(s)
    except ValueError:
        raise ValueError(f"{where}{var.name}: {raw!r} is not a number ({var.unit})") from None
    if var.range is not None and not (var.range[0] <= v <= var.range[1]):
        raise ValueError(f"{where}{var.name}: {v} {var.unit} outside the plausible range {list(var.range)}")
    return v


def parse_table(df: pd.DataFrame, source: str | Path | None = None) -> pd.DataFrame:
    """The clinical columns of ``df`` parsed to floats (NaN = missing); absent columns are all NaN."""
    out = pd.DataFrame(index=df.index)
    for var in CLINICAL_VARIABLES:
        if var.name not in df.columns:
            out[var.name] = np.nan
            continue
        vals = []
        for idx, raw in df[var.name].items():
            pid = df.at[idx, "patient_id"] if "patient_id" in df.columns else idx
            try:
                vals.append(parse_value(var, raw, where=f"patient {pid}: "))
            except ValueError as exc:
                raise InputError(source, str(exc)) from None
        out[var.name] = np.asarray(vals, dtype=float)
    return out


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
        for var in CLINICAL_VARIABLES:
            col = parsed[var.name].to_numpy(dtype=float) if var.name in parsed else np.full(len(parsed), np.nan)
            obs = col[~np.isnan(col)]
            if var.kind == "binary":
                enc.fill[var.name] = float(obs.mean()) if obs.size else 0.0
                continue
            tr = np.log1p(obs) if var.name in _LOG else obs
            med = float(np.median(tr)) if tr.size else 0.0
            enc.fill[var.name] = med
            enc.mean[var.name] = float(tr.mean()) if tr.size else 0.0
            sd = float(tr.std()) if tr.size > 1 else 1.0
            enc.std[var.name] = sd if sd > 0 else 1.0
        return enc

    def encode(self, parsed: pd.DataFrame | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> np.ndarray:
        """Parsed rows (DataFrame, or dict(s) of raw values) -> float32 (N, dim)."""
        if isinstance(parsed, Mapping):
            parsed = [parsed]
        if not isinstance(parsed, pd.DataFrame):
            parsed = parse_table(pd.DataFrame(list(parsed)))
        n = len(parsed)
        values = np.zeros((n, len(NAMES)), np.float32)
        missing = np.zeros((n, len(NAMES)), np.float32)
        for j, var in enumerate(CLINICAL_VARIABLES):
            col = parsed[var.name].to_numpy(dtype=float) if var.name in parsed else np.full(n, np.nan)
            miss = np.isnan(col)
            missing[:, j] = miss
            if var.kind == "binary":
                values[:, j] = np.where(miss, self.fill[var.name], col)
            else:
                tr = np.log1p(np.maximum(col, 0)) if var.name in _LOG else col
                tr = np.where(miss, self.fill[var.name], tr)
                values[:, j] = (tr - self.mean[var.name]) / self.std[var.name]
        return np.concatenate([values, missing], axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"variables": list(NAMES), "fill": self.fill, "mean": self.mean, "std": self.std,
                "log1p": sorted(_LOG), "layout": "values then missing flags"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClinicalEncoder":
        if list(d.get("variables", [])) != list(NAMES):
            raise ValueError(f"clinical encoder variables {d.get('variables')} differ from this version's "
                             f"{list(NAMES)}")
        return cls(fill=dict(d["fill"]), mean=dict(d["mean"]), std=dict(d["std"]))
