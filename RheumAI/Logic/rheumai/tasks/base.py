"""The task declaration (:class:`Task`): plain data plus the callables every shared layer reads.

``preprocess`` returns the network input and the grids (LPS mm, arrays (k, j, i)) that map outputs
back into each source; ``api`` and ``recipe`` are ``"module:attribute"`` strings imported on use.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

# the engine's head kinds (rheumai.engine.heads.KINDS; kept literal so listing tasks imports no torch)
HEADS = ("binary", "regression", "ordinal", "multiclass", "keypoints")
CLINICAL_KINDS = ("binary", "continuous", "categorical")


def load_ref(ref: str) -> Any:
    """The object a ``"module:attribute"`` string names (imported on use)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class InputSpec:
    """One image input. role: key used everywhere ("t2_sag", "stir"); sequence: a value of
    :data:`rheumai.dataset.classify.SEQUENCES`; orientation: "sagittal" | "coronal" | "axial" | "any"."""

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
    to_tensors: Callable[[Any, dict[str, Any]], Any] | None = None  # (sample, card) -> unbatched network input
    forward: Callable[[Any, Any], Any] | None = None  # (model, batch) -> {head: Tensor}; None: model(x) / model(**x)
    postprocess: Callable[[dict[str, Any], dict[str, Any], Any], dict[str, Any]] | None = None  # one study's values
    saliency_maps: Callable[..., Any] | None = None  # (model, batch, samples, card, method, layer) -> (outputs, maps)
    saliency_methods: tuple[str, ...] = ()  # methods saliency_maps accepts (empty: none)
    # training side: the heads as make_head specs ({} = one head "out" of kind ``head``)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe: str = ""  # "module:attribute" of a binary task's rheumai.engine.train.Recipe (imported on use)

    def __post_init__(self) -> None:
        roles = [i.role for i in self.inputs]
        bad = {n: h.get("kind") for n, h in self.heads.items() if h.get("kind") not in HEADS}
        unknown = sorted(set(self.saliency_targets) - set(roles))
        for failed, why in ((self.head not in HEADS, f"head must be one of {HEADS}, not {self.head!r}"),
                            (bad, f"head kinds must be in {HEADS}, got {bad}"),
                            (len(set(roles)) != len(roles), f"input roles must be unique, got {roles}"),
                            (unknown, f"saliency targets for unknown roles {unknown}")):
            if failed:
                raise ValueError(f"task {self.name}: {why}")

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(i.role for i in self.inputs)

    def make_heads(self) -> dict[str, Any]:
        """The engine's head objects, ``{name: Head}`` (imports torch on use)."""
        from ..engine.heads import make_head

        specs = self.heads or {"out": {"kind": self.head}}
        return {n: make_head(spec["kind"], name=n, **{k: v for k, v in spec.items() if k != "kind"})
                for n, spec in specs.items()}

    def training_recipe(self) -> Any:
        """The task's :class:`rheumai.engine.train.Recipe` (binary tasks on the engine's recipe)."""
        if not self.recipe:
            raise KeyError(f"task {self.name} trains through its own api['train'], not the engine's binary recipe")
        return load_ref(self.recipe)

    def entry(self, name: str) -> Callable[..., Any]:
        """The console entry point ``name`` ("train", "evaluate", "predict", ...), imported on use."""
        if name not in self.api:
            raise KeyError(f"task {self.name} has no {name!r} entry point (has: {', '.join(sorted(self.api))})")
        return load_ref(self.api[name])

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (no callables), for `rheumai tasks --json` and the Slicer panels."""
        hooks = {f.name for f in fields(self) if "Callable" in str(f.type)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in hooks}
        return {**d, "default_params": self.default_params(), "default_architecture": self.default_architecture()}
