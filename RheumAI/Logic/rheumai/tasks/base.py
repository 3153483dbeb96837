"""The task declaration: what a seed system needs as input, how it samples it, what it outputs.

A :class:`Task` is plain data plus a few callables. The layers above (command line, console API,
Slicer panels, dataset builder) read it instead of hard-coding one paper:

* ``inputs``: the series a study must provide (role, required sequence / orientation for the
  dataset builder's series matching), whether a box ROI is needed, and the clinical variables.
* ``preprocess(study_inputs, params) -> sample``: network input arrays plus the grids needed to
  map maps back into each source series (LPS mm, arrays (k, j, i) as everywhere in RheumAI).
* ``build_model(architecture) -> torch.nn.Module`` and ``default_architecture(**kw) -> dict``
  (the model card's ``architecture`` entry).
* ``head``: the main head kind, "binary" | "regression" | "ordinal" | "multiclass" | "keypoints";
  ``heads``: every head as ``{name: {"kind": ..., **options}}`` (``make_heads()`` builds the
  engine's :mod:`rheumai.engine.heads` objects for :func:`rheumai.engine.fit.fit`); ``metrics``: names of the reported
  metrics; ``saliency_targets``: default Grad-CAM layer per input role; ``outputs``: what a
  prediction writes.
* ``api``: console entry points as ``"module:function"`` strings, resolved lazily by
  :meth:`Task.entry` so listing tasks never imports torch-heavy modules.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

# the engine's head kinds (rheumai.engine.heads.KINDS; kept literal so listing tasks imports no torch)
HEADS = ("binary", "regression", "ordinal", "multiclass", "keypoints")
CLINICAL_KINDS = ("binary", "continuous", "categorical")


@dataclass(frozen=True)
class InputSpec:
    """One image input of a task.

    role: short key used everywhere ("t2_sag", "t1", "t2", "stir"). sequence: the weighting the
    dataset builder must find (values of :data:`rheumai.dataset.classify.SEQUENCES`, "STIR" also
    accepting fat-suppressed T2 such as SPAIR). orientation: "sagittal" | "coronal" | "axial" |
    "any" (the preprocessing resamples, so "any" means the plane does not matter).
    """

    role: str
    description: str
    sequence: str
    orientation: str = "any"
    optional: bool = False
    accepts: tuple[str, ...] = ()  # other sequence labels accepted (e.g. fat-suppressed T2 for STIR)


@dataclass(frozen=True)
class ClinicalVar:
    """One clinical variable. kind: binary (0/1) | continuous (unit, [lo, hi]) | categorical (levels)."""

    name: str
    kind: str
    description: str
    unit: str = ""
    range: tuple[float, float] | None = None
    levels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CLINICAL_KINDS:
            raise ValueError(f"clinical variable {self.name}: kind must be one of {CLINICAL_KINDS}")


@dataclass(frozen=True)
class RoiSpec:
    """A region of interest the user marks. kind: "box" (axis-aligned in LPS mm)."""

    kind: str
    description: str
    formats: tuple[str, ...] = ()


@dataclass
class Task:
    """A seed system declared for the shared RheumAI layers (see module docstring)."""

    name: str
    title: str
    description: str
    reference: str
    inputs: tuple[InputSpec, ...]
    head: str
    preprocess: Callable[..., Any]
    build_model: Callable[[dict[str, Any]], Any]
    default_architecture: Callable[..., dict[str, Any]]
    default_params: Callable[[], dict[str, Any]]
    roi: RoiSpec | None = None
    clinical: tuple[ClinicalVar, ...] = ()
    metrics: tuple[str, ...] = ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "brier")
    saliency_targets: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    api: dict[str, str] = field(default_factory=dict)
    cli_modules: tuple[str, ...] = ()
    # Predict side, run by rheumai.engine.predict.Predictor (see its module docstring for the contract).
    load_sample: Callable[[Mapping[str, Any], dict[str, Any]], Any] | None = None  # (study inputs, card) -> sample
    to_tensors: Callable[[Any, dict[str, Any]], Any] | None = None  # (sample, card) -> Tensor | {name: Tensor}, unbatched
    forward: Callable[[Any, Any], Any] | None = None  # (model, batch) -> {head: Tensor}; None: model(x) / model(**x)
    postprocess: Callable[[dict[str, Any], dict[str, Any], Any], dict[str, Any]] | None = None  # one study's values
    saliency_maps: Callable[..., Any] | None = None  # (model, batch, samples, card, method, layer) -> (outputs, maps)
    saliency_methods: tuple[str, ...] = ()  # methods saliency_maps accepts (empty: none)
    # training side: the heads as make_head specs ({} = one head "out" of kind ``head``)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"task {self.name}: head must be one of {HEADS}, not {self.head!r}")
        bad = {n: h.get("kind") for n, h in self.heads.items() if h.get("kind") not in HEADS}
        if bad:
            raise ValueError(f"task {self.name}: head kinds must be in {HEADS}, got {bad}")
        roles = [i.role for i in self.inputs]
        if len(set(roles)) != len(roles):
            raise ValueError(f"task {self.name}: input roles must be unique, got {roles}")
        unknown = set(self.saliency_targets) - set(roles)
        if unknown:
            raise ValueError(f"task {self.name}: saliency targets for unknown roles {sorted(unknown)}")

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(i.role for i in self.inputs)

    def input(self, role: str) -> InputSpec:
        for spec in self.inputs:
            if spec.role == role:
                return spec
        raise KeyError(f"task {self.name} has no input {role!r} (inputs: {', '.join(self.roles)})")

    def make_heads(self) -> dict[str, Any]:
        """The engine's head objects, ``{name: Head}`` (imports torch on use)."""
        from ..engine.heads import make_head

        specs = self.heads or {"out": {"kind": self.head}}
        return {n: make_head(spec["kind"], name=n, **{k: v for k, v in spec.items() if k != "kind"})
                for n, spec in specs.items()}

    def entry(self, name: str) -> Callable[..., Any]:
        """The console entry point ``name`` ("train", "evaluate", "predict", ...), imported on use."""
        if name not in self.api:
            raise KeyError(f"task {self.name} has no {name!r} entry point (has: {', '.join(sorted(self.api))})")
        module, _, attr = self.api[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (no callables), for `rheumai tasks --json` and the Slicer panels."""
        return {
            "name": self.name, "title": self.title, "description": self.description, "reference": self.reference,
            "inputs": [asdict(i) for i in self.inputs], "roi": None if self.roi is None else asdict(self.roi),
            "clinical": [asdict(c) for c in self.clinical], "head": self.head, "heads": dict(self.heads),
            "metrics": list(self.metrics),
            "saliency_targets": dict(self.saliency_targets), "outputs": list(self.outputs),
            "api": dict(self.api), "cli_modules": list(self.cli_modules),
            "saliency_methods": list(self.saliency_methods),
            "default_params": self.default_params(), "default_architecture": self.default_architecture(),
        }
