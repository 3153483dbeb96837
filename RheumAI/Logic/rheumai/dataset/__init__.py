"""Dataset building: index a DICOM export, validate a label sheet, apply cohort rules, split,
cache the task inputs and write a manifest (see docs/CONTRACT.md, "Dataset manifest").

    index_archive(root, "index.sqlite")                       # headers only, incremental
    build_dataset("index.sqlite", "labels.csv", "out/", CohortRules(), SplitConfig(), SliceParams())
    build_image_dataset("images.csv", "out/", ImageRules(), SplitConfig(), SliceParams())  # NIfTI / NRRD cohorts

The names below are imported on first use, so ``import rheumai.dataset.cli`` (the command line,
also re-imported by every spawned cache worker) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build": ("MANIFEST_COLUMNS", "DatasetResult", "build_dataset"),
    "cohort": ("CohortResult", "CohortRules", "apply_cohort"),
    "images": ("ImageRules", "build_image_dataset", "read_image_table"),
    "index": ("ArchiveIndex", "IndexSummary", "index_archive"),
    "labels": ("LabelSheet", "LabelSheetError", "RowProblem", "load_labels", "read_labels"),
    "split": ("SplitConfig", "assign_splits"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rheumai.dataset' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
