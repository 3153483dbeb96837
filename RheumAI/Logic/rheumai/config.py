"""Training configuration: one TOML file holds the whole protocol and is saved beside the results.

``task = "<name>"``, the engine's sections and the task recipe's; unknown keys are errors naming the file.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .atomic import write_text
from .errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_TASK = "cervical_ra"


def option(default: Any, choices: tuple[Any, ...] = (), lo: float | None = None, below: float | None = None
           ) -> Any:
    """A config field with its rule for :meth:`TrainConfig.validate`: one of ``choices``, or ``lo`` <= value
    (< ``below``)."""
    return field(default=default, metadata={"choices": choices, "lo": lo, "below": below})


def check_fields(section: str, values: Any, src: str | None) -> None:
    """Apply the :func:`option` rules of a section dataclass; InputError naming the section and key."""
    for f in fields(values):
        v, rule = getattr(values, f.name), f.metadata
        choices, lo, below = rule.get("choices"), rule.get("lo"), rule.get("below")
        if choices and v not in choices:
            raise InputError(src, f"[{section}] {f.name} {v!r}: use one of {', '.join(map(str, choices))}")
        if (lo is not None and v < lo) or (below is not None and v >= below):
            raise InputError(src, f"[{section}] {f.name} = {v!r} must be in [{lo}, {below or 'inf'})")


@dataclass
class DataConfig:
    manifest: str = ""          # manifest.csv; relative paths are relative to the config file
    val_fraction: float = option(0.15, lo=0.0, below=1.0)  # only without `val` rows (stratified, per patient)
    num_workers: int = 2


@dataclass
class TrainSection:
    loss: str = option("bce", ("bce",))
    optimizer: str = "adam"         # "adam" | "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 4             # global batch (all processes, all accumulation steps)
    accumulate_steps: int = 1       # micro-batches per optimiser step
    epochs: int = 100
    class_weighting: str = option("none", ("none", "balanced"))  # balanced: BCE pos_weight = neg. / pos.
    early_stopping_patience: int = 0  # epochs without val-AUC improvement; 0 = off
    select: str = option("best_val_auc", ("best_val_auc", "last"))  # which weights become the checkpoint
    seed: int = 0
    device: str = "auto"            # "auto" | "cpu" | "cuda"
    amp: bool = True                # mixed precision, CUDA only
    channels_last: bool = True      # CUDA only
    sync_batchnorm: bool = True     # under DDP on CUDA (gloo/CPU has no SyncBatchNorm)
    eval_batch_size: int = 8
    pretrained: bool = False        # the papers trained from random initialisation
    # BatchNorm statistics recomputed on the un-augmented training images (rheumai.engine.batchnorm):
    # "epoch" (before every validation) | "final" (on the selected weights only) | "none"
    bn_recalibration: str = "epoch"
    state_every: int = 1            # resume state every N epochs (0: at the end of each stage only)

    def check(self, src: str | None) -> None:
        if self.pretrained:
            raise InputError(src, "[train] pretrained=true: no pretrained weights for these inputs exist; "
                                  "the papers used random initialisation")
        try:
            self.fit_config()
        except ValueError as exc:
            raise InputError(src, f"[train] {exc}") from None

    def fit_config(self, **override: Any) -> Any:
        """The engine loop's :class:`rheumai.engine.fit.FitConfig` from this section (+ ``override``)."""
        from .engine.fit import FitConfig

        names = {f.name for f in fields(FitConfig)}
        return FitConfig.from_any({**{k: v for k, v in asdict(self).items() if k in names}, **override})


@dataclass
class ThresholdConfig:
    rule: str = "youden"            # "youden" | "fixed:0.5" | "sensitivity:0.75"

    def check(self, src: str | None) -> None:
        from .metrics import parse_threshold_rule

        try:
            parse_threshold_rule(self.rule)
        except ValueError as exc:
            raise InputError(src, f"[threshold] {exc}") from None


@dataclass
class SelectionConfig:
    """Epoch count and threshold (rheumai.engine.crossfit): "auto" selects out of fold when the
    validation split has fewer than ``min_val_positives`` positives or negatives."""

    method: str = option("auto", ("auto", "oof", "validation"))
    min_val_positives: int = option(10, lo=0)
    folds: int = option(5, lo=2)
    epoch_smoothing: int = option(3, lo=1)
    min_threshold_positives: int = option(3, lo=1)
    threshold_ci_bootstrap: int = 1000


@dataclass
class EvaluateConfig:
    auc_ci: str = option("delong", ("delong", "bootstrap"))
    n_bootstrap: int = 2000
    alpha: float = 0.05
    calibration_bins: int = 10


ENGINE_SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainSection, "threshold": ThresholdConfig,
                                    "selection": SelectionConfig, "evaluate": EvaluateConfig}


def _task(name: str, source: str | Path | None) -> Any:
    from .tasks import get_task

    try:
        return get_task(name)
    except KeyError as exc:
        raise InputError(source, f"task {name!r}: {exc.args[0]}") from None


@dataclass
class TrainConfig:
    """A parsed config: ``cfg.task`` and one dataclass per section (``cfg.train.epochs``, ...)."""

    task: str
    sections: dict[str, Any]
    source: str = ""

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **{k: asdict(v) for k, v in self.sections.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | Path | None = None, task: str | None = None
                  ) -> "TrainConfig":
        """``task``: used when ``d`` names none (default ``cervical_ra``)."""
        d = dict(d)
        name = str(d.pop("task", None) or task or DEFAULT_TASK)
        t = _task(name, source)
        if not t.recipe:
            raise InputError(source, f"task {name!r} trains from its own configuration (its api['train'])")
        schema = {**ENGINE_SECTIONS, **t.training_recipe().sections}
        unknown = sorted(set(d) - set(schema))
        if unknown:
            raise InputError(source, f"unknown config section(s) {unknown}; expected {sorted(schema)}")
        sections: dict[str, Any] = {}
        for sec, sec_cls in schema.items():
            values = d.get(sec, {})
            if not isinstance(values, dict):
                raise InputError(source, f"[{sec}] must be a table")
            allowed = {f.name for f in fields(sec_cls)}
            bad = sorted(set(values) - allowed)
            if bad:
                raise InputError(source, f"unknown key(s) {bad} in [{sec}]; allowed: {sorted(allowed)}")
            try:
                sections[sec] = sec_cls(**values)
            except TypeError as exc:
                raise InputError(source, f"[{sec}] bad value: {exc}") from None
        cfg = cls(name, sections, str(source or ""))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name, sec in self.sections.items():
            check_fields(name, sec, self.source or None)
            if hasattr(sec, "check"):
                sec.check(self.source or None)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid TOML: {exc}") from None


def load_config(path: str | Path, task: str | None = None) -> Any:
    """Read a training config (the file's ``task``, else ``task``, else cervical_ra). Tasks with
    their own format (no recipe) parse it with their ``api["load_config"]``, else get the TOML dict."""
    d = read_toml(path)
    name = str(d.get("task") or task or DEFAULT_TASK)
    t = _task(name, path)
    if not t.recipe:
        return t.entry("load_config")(path) if "load_config" in t.api else d
    return TrainConfig.from_dict(d, source=path, task=name)


def resolve_manifest(cfg: TrainConfig) -> Path | None:
    """The config's [data] manifest, relative to the config file's folder."""
    if not cfg.data.manifest:
        return None
    p = Path(cfg.data.manifest)
    return Path(cfg.source).parent / p if not p.is_absolute() and cfg.source else p


def dumps_toml(d: Mapping[str, Any]) -> str:
    """A config dict (top-level scalars, then one level of tables of scalars / lists) as TOML (the
    standard library reads TOML but cannot write it): JSON numbers, booleans, strings and arrays are TOML."""

    def val(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if v is None or isinstance(v, Mapping):
            raise TypeError(f"cannot write {type(v).__name__} to TOML")
        if isinstance(v, float) and not math.isfinite(v):
            return repr(v)  # TOML's nan, inf, -inf
        return json.dumps(v, ensure_ascii=False)  # raw UTF-8: TOML has no surrogate-pair escapes

    out = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, Mapping)] + [""]
    for section, values in d.items():
        if isinstance(values, Mapping):
            out += [f"[{section}]", *(f"{k} = {val(v)}" for k, v in values.items()), ""]
    return "\n".join(out)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the full, resolved config (every default spelled out) atomically."""
    head = "# RheumAI training config (resolved: every value spelled out)\n"
    return write_text(path, head + dumps_toml(cfg.to_dict()))
