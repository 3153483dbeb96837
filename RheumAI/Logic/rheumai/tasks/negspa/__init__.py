"""NegSpA-AI (Lu et al., QIMS 2024): HLA-B27-negative axial SpA from sacroiliac MRI + clinical features.

Console API (works in Slicer's Python console)::

    from rheumai import api
    from rheumai.dataset import build_image_dataset
    from rheumai.tasks import negspa
    cohort = negspa.make_cohort("/tmp/spa", n=24)                  # generated cohort with truth
    manifest = build_image_dataset(cohort, "/tmp/spa/ds", params={"size": (64, 64)}, task="negspa",
                                   clinical_csv="/tmp/spa/clinical.csv").manifest
    run = api.train("configs/negspa.toml", manifest, "/tmp/spa/run")  # two stages on the engine
    api.evaluate(run.checkpoint, manifest, "/tmp/spa/eval")
    res = api.predict(run.checkpoint, {"t1": ..., "t2": ..., "stir": ..., "roi": "box.json",
                                       "clinical": {"crp": 12, "inflammatory_back_pain": "yes"}}, "/tmp/spa/pred")

Modules: preprocess (box, half grids), clinical (variables, missing-value encoding), model
(tri-input ResNet + fusion), mixcut, train (the engine recipe: config sections, two stages),
predict (the engine's predict hooks), synth (generated cohort), task (declaration).
Names below are imported on first use, so importing the package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"make_cohort": "synth", "read_box": "preprocess", "Box": "preprocess", "NegSpaParams": "preprocess",
            "TASK": "task"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
