"""Dataset building: index a DICOM export, validate a label sheet, apply cohort rules, split,
cache the task inputs and write a manifest (see docs/CONTRACT.md, "Dataset manifest").

    index_archive(root, "index.sqlite")                       # headers only, incremental
    build_dataset("index.sqlite", "labels.csv", "out/", CohortRules(), SplitConfig(), SliceParams())
    build_image_dataset("images.csv", "out/", ImageRules(), SplitConfig(), SliceParams())  # NIfTI / NRRD cohorts
"""

from .build import MANIFEST_COLUMNS, DatasetResult, build_dataset
from .cohort import CohortResult, CohortRules, apply_cohort
from .images import ImageRules, build_image_dataset, read_image_table
from .index import ArchiveIndex, IndexSummary, index_archive
from .labels import LabelSheet, LabelSheetError, RowProblem, load_labels, read_labels
from .split import SplitConfig, assign_splits

__all__ = [
    "ArchiveIndex", "CohortResult", "CohortRules", "DatasetResult", "IndexSummary", "LabelSheet",
    "LabelSheetError", "MANIFEST_COLUMNS", "RowProblem", "SplitConfig", "apply_cohort", "assign_splits",
    "build_dataset", "build_image_dataset", "ImageRules", "index_archive", "load_labels", "read_image_table",
    "read_labels",
]
