"""Synthetic cohorts with known truth, generated from the real images of the repository.

:func:`generate_cohort` (cervical RA demo cohort: DICOM archive + label sheet + lesion masks).
"""

from ..tasks.cervical_ra.synth import CohortInfo, CohortParams, SubjectPlan, generate_cohort, plan_cohort, synthesize_subject

__all__ = ["CohortInfo", "CohortParams", "SubjectPlan", "generate_cohort", "plan_cohort", "synthesize_subject"]
