"""Dataset building: index a DICOM export, validate a label sheet or an image table, apply cohort
rules, split, cache the task inputs and write a manifest.

    index_archive(root, "index.sqlite")                       # headers only, incremental
    build_dataset("index.sqlite", "labels.csv", "out/", CohortRules(), SplitConfig(), SliceParams())
    build_image_dataset("images.csv", "out/", ImageRules(), SplitConfig(), task="negspa")  # any task

Names are imported on first use, so ``import rheumai.dataset.cli`` (also re-imported by every
spawned cache worker) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build": ("MANIFEST_COLUMNS", "DatasetResult", "build_dataset", "build_image_dataset"),
    "cohort": ("CohortResult", "CohortRules", "ImageRules", "apply_cohort"),
    "index": ("ArchiveIndex", "IndexSummary", "index_archive"),
    "labels": ("LabelSheet", "LabelSheetError", "RowProblem", "load_labels", "read_labels",
               "read_image_table"),
    "split": ("SplitConfig", "assign_splits"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rheumai.dataset' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
