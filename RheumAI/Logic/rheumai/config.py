"""Training configuration: one TOML file holds the whole protocol and is saved beside the results.

Sections: ``[model]``, ``[data]``, ``[augment]``, ``[train]``, ``[threshold]``, ``[selection]``,
``[evaluate]``.
Unknown keys are errors (a typo must not silently fall back to a default). Defaults are the
paper's protocol (Lebouille-Veldman et al. 2025): ResNet-101, BCE, Adam 1e-4, batch 4, 100 epochs,
random initialisation.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text
from .errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    """Network: MONAI ResNet (spatial_dims=2), slices as channels, one logit."""

    family: str = "resnet"
    depth: int = 101
    in_channels: int = 6
    conv1_t_stride: int = 2
    # (H, W) pixels fed to the network; empty = the cached arrays' size (paper: 512 x 512).
    input_size: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    manifest: str = ""          # manifest.csv; relative paths are relative to the config file
    val_fraction: float = 0.15  # used only when the manifest has no `val` rows (stratified, per patient)
    num_workers: int = 2


@dataclass
class AugmentConfig:
    """On-the-fly augmentation (training only), MONAI array transforms on (C, H, W).

    crop: "none" | "center" (fixed centre crop, also applied at inference) | "random_center"
    (centre crop of random size in [crop_fraction, 1], training only) | "random" (crop_fraction
    at a random position, training only). After cropping the image is resized back to input_size.
    flip_axes: in-plane spatial axes, 0 = H (superior-inferior), 1 = W (anterior-posterior).
    flip_channels_prob: reverse channel order = mirror patient left-right (channels run R -> L).
    """

    enabled: bool = True
    crop: str = "random_center"
    crop_fraction: float = 0.85
    flip_prob: float = 0.5
    flip_axes: list[int] = field(default_factory=lambda: [1])
    flip_channels_prob: float = 0.0
    contrast_prob: float = 0.5
    contrast_gamma: list[float] = field(default_factory=lambda: [0.8, 1.25])
    scale_intensity_prob: float = 0.5
    scale_intensity_factor: float = 0.1   # multiply by 1 + U(-f, f)
    shift_intensity_prob: float = 0.5
    shift_intensity_offset: float = 0.1   # add U(-o, o) (intensities are normalised to ~[0, 1])


@dataclass
class TrainSection:
    loss: str = "bce"
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 4             # global batch (all processes, all accumulation steps)
    accumulate_steps: int = 1       # micro-batches per optimiser step
    epochs: int = 100
    class_weighting: str = "none"   # "none" | "balanced" (BCE pos_weight = negatives / positives)
    early_stopping_patience: int = 0  # epochs without val-AUC improvement; 0 = off
    select: str = "best_val_auc"    # which weights become the checkpoint: "best_val_auc" | "last"
    seed: int = 0
    device: str = "auto"            # "auto" | "cpu" | "cuda"
    amp: bool = True                # mixed precision, CUDA only
    channels_last: bool = True      # CUDA only
    sync_batchnorm: bool = True     # under DDP on CUDA (gloo/CPU has no SyncBatchNorm)
    eval_batch_size: int = 8
    pretrained: bool = False        # the paper trained from random initialisation
    # BatchNorm running statistics recomputed on the un-augmented training images (exact pooled
    # mean / variance, rheumai.engine.batchnorm): "epoch" (before every validation, so selection
    # sees eval-mode outputs as they will be) | "final" (on the selected weights only) | "none"
    bn_recalibration: str = "epoch"


@dataclass
class ThresholdConfig:
    rule: str = "youden"            # "youden" | "fixed:0.5" | "sensitivity:0.75"


@dataclass
class SelectionConfig:
    """How the epoch count and the operating threshold are chosen (rheumai.engine.crossfit).

    method: "auto" (out-of-fold selection when the validation split has fewer than
    ``min_val_positives`` positives or negatives, else the validation split) | "oof" | "validation".
    Out-of-fold: ``folds`` patient-level stratified folds over the train patients, each trained for
    [train] epochs; the pooled held-out probabilities choose the epoch count (highest AUC averaged
    over ``epoch_smoothing`` epochs) and the threshold; the final model is trained on all train
    patients for that many epochs (cost: folds + 1 trainings). A threshold is never chosen from
    fewer than ``min_threshold_positives`` positives or negatives: 0.5 is used and the card says so.
    The threshold's CI: stratified bootstrap (``threshold_ci_bootstrap`` resamples, 0 = none).
    """

    method: str = "auto"
    min_val_positives: int = 10
    folds: int = 5
    epoch_smoothing: int = 3
    min_threshold_positives: int = 3
    threshold_ci_bootstrap: int = 1000


@dataclass
class EvaluateConfig:
    auc_ci: str = "delong"          # "delong" | "bootstrap"
    n_bootstrap: int = 2000
    alpha: float = 0.05
    calibration_bins: int = 10


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainSection = field(default_factory=TrainSection)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    source: str = ""                # file it was read from (not saved)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "source"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> "TrainConfig":
        sections = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise InputError(source, f"unknown config section(s) {unknown}; expected {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        for name, f in sections.items():
            sec_cls = f.default_factory  # type: ignore[misc]
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise InputError(source, f"[{name}] must be a table")
            allowed = {x.name: x for x in dataclasses.fields(sec_cls)}
            bad = sorted(set(values) - set(allowed))
            if bad:
                raise InputError(source, f"unknown key(s) {bad} in [{name}]; allowed: {sorted(allowed)}")
            kwargs[name] = sec_cls(**values)
        cfg = cls(**kwargs, source=str(source or ""))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        src = self.source or None
        m, t, a = self.model, self.train, self.augment
        from .tasks.cervical_ra.model import FAMILIES

        if m.family not in FAMILIES:
            raise InputError(src, f"[model] family {m.family!r} not supported; choose one of {FAMILIES}")
        if m.depth not in (10, 18, 34, 50, 101, 152, 200):
            raise InputError(src, f"[model] depth {m.depth} not a MONAI ResNet depth (18, 34, 50, 101...)")
        if m.input_size and (len(m.input_size) != 2 or min(m.input_size) < 16):
            raise InputError(src, f"[model] input_size must be [H, W] >= 16 px, got {m.input_size}")
        if t.loss != "bce" or t.optimizer != "adam":
            raise InputError(src, "[train] only loss='bce' and optimizer='adam' are implemented")
        if t.batch_size < 1 or t.accumulate_steps < 1 or t.batch_size % t.accumulate_steps:
            raise InputError(src, f"[train] batch_size {t.batch_size} must be a positive multiple of accumulate_steps {t.accumulate_steps}")
        if t.class_weighting not in ("none", "balanced"):
            raise InputError(src, f"[train] class_weighting {t.class_weighting!r}: use 'none' or 'balanced'")
        if t.select not in ("best_val_auc", "last"):
            raise InputError(src, f"[train] select {t.select!r}: use 'best_val_auc' or 'last'")
        if t.bn_recalibration not in ("epoch", "final", "none"):
            raise InputError(src, f"[train] bn_recalibration {t.bn_recalibration!r}: use 'epoch', 'final' or 'none'")
        if t.device not in ("auto", "cpu", "cuda"):
            raise InputError(src, f"[train] device {t.device!r}: use auto, cpu or cuda")
        if t.epochs < 1:
            raise InputError(src, "[train] epochs must be >= 1")
        if t.pretrained:
            raise InputError(src, "[train] pretrained=true: no 2D 6-channel pretrained weights exist; the paper used random init")
        if a.crop not in ("none", "center", "random_center", "random"):
            raise InputError(src, f"[augment] crop {a.crop!r}: none, center, random_center or random")
        if not 0.1 <= a.crop_fraction <= 1.0:
            raise InputError(src, "[augment] crop_fraction must be in [0.1, 1]")
        if any(ax not in (0, 1) for ax in a.flip_axes):
            raise InputError(src, "[augment] flip_axes: in-plane axes only, 0 (H) and/or 1 (W)")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise InputError(src, "[data] val_fraction must be in [0, 1)")
        from .metrics import parse_threshold_rule

        try:
            parse_threshold_rule(self.threshold.rule)
        except ValueError as exc:
            raise InputError(src, f"[threshold] {exc}") from None
        sel = self.selection
        if sel.method not in ("auto", "oof", "validation"):
            raise InputError(src, f"[selection] method {sel.method!r}: use auto, oof or validation")
        if sel.folds < 2 or sel.epoch_smoothing < 1 or sel.min_threshold_positives < 1 or sel.min_val_positives < 0:
            raise InputError(src, "[selection] folds >= 2, epoch_smoothing >= 1, min_threshold_positives >= 1, "
                                  "min_val_positives >= 0")
        if self.evaluate.auc_ci not in ("delong", "bootstrap"):
            raise InputError(src, "[evaluate] auc_ci: delong or bootstrap")


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML config; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid TOML: {exc}") from None
    try:
        return TrainConfig.from_dict(d, source=path)
    except TypeError as exc:
        raise InputError(path, f"bad value: {exc}") from None


def resolve_manifest(cfg: TrainConfig) -> Path | None:
    """The config's [data] manifest, relative to the config file's folder."""
    if not cfg.data.manifest:
        return None
    p = Path(cfg.data.manifest)
    if not p.is_absolute() and cfg.source:
        p = Path(cfg.source).parent / p
    return p


def dumps_toml(d: dict[str, dict[str, Any]]) -> str:
    """Serialise a config dict (tables of scalars / flat lists) as TOML.

    Hand-written because the standard library reads TOML but cannot write it, and the config
    schema (one level of tables, scalar or list values) is small; round-trip tested with tomllib.
    """

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    out: list[str] = []
    for section, values in d.items():
        out.append(f"[{section}]")
        out += [f"{k} = {val(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the full, resolved config (every default spelled out) atomically."""
    return write_text(path, "# RheumAI training config (resolved: every value spelled out)\n" + dumps_toml(cfg.to_dict()))
