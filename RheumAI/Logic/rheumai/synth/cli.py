"""`rheumai synth`: generate synthetic cohorts with known truth (``rheumai synth cervical``) and
look at one subject (``rheumai synth preview``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic cohort with known truth",
                       description="Synthetic cohorts made from the real test images, with planted lesions.")
    ssub = p.add_subparsers(dest="synth_command", metavar="KIND")
    c = ssub.add_parser("cervical", help="cervical RA cohort: DICOM archive + labels.csv + lesion masks",
                        description="Generate the cervical RA demo cohort (DICOM archive, label sheet, truth "
                                    "masks) from the real cervical T2. Resumes into an existing --out folder.")
    c.add_argument("--out", required=True, type=Path, help="output folder")
    c.add_argument("--n", type=int, default=60, help="number of subjects (60)")
    c.add_argument("--seed", type=int, default=0, help="random seed (0); same seed, same cohort")
    c.add_argument("--prevalence", type=float, default=0.15, help="share of positives among included (0.15)")
    c.add_argument("--p-intermediate", type=float, default=0.05, help="share with outcome 'intermediate' (0.05)")
    c.add_argument("--p-baseline-deformity", type=float, default=0.03,
                   help="share with deformity already at baseline (0.03)")
    c.add_argument("--p-short-followup", type=float, default=0.07, help="share with follow-up < 1000 days (0.07)")
    c.add_argument("--p-followup-series", type=float, default=0.5,
                   help="share whose follow-up study holds a small T2 SAG series (0.5)")
    c.add_argument("--p-axial-distractor", type=float, default=0.5,
                   help="share of baseline studies with an extra T2 axial series (0.5)")
    c.add_argument("--deform-mm", type=float, default=2.5, help="B-spline control-point std in mm (2.5)")
    c.add_argument("--lesion-scale", type=float, default=1.0, help="multiplies the lesion size (1.0)")
    c.add_argument("--pannus-level", type=float, nargs=2, default=[0.42, 0.58], metavar=("LO", "HI"),
                   help="pannus T2 signal as a fraction of CSF (0.42 0.58)")
    c.add_argument("--sites", nargs="+", default=["A", "B", "C"], help="site names (A B C)")
    c.add_argument("--template", type=Path, default=None, help="template T2 (default: the repository's real T2)")
    c.add_argument("--preview", type=int, default=0, metavar="N",
                   help="also write PNG previews of the first N subjects with a lesion into OUT/preview/")
    c.set_defaults(func=_cervical)
    v = ssub.add_parser("preview", help="PNG of a generated subject's mid-sagittal slices with the mask outlined")
    v.add_argument("--out", required=True, type=Path, help="cohort folder (as given to 'synth cervical')")
    v.add_argument("--patient", required=True, help="patient id, e.g. SYN0003")
    v.add_argument("--png", type=Path, default=None, help="PNG path (default OUT/preview/<patient>.png)")
    v.add_argument("--zoom-mm", type=float, default=None, help="in-plane view size in mm, centred on the lesion")
    v.set_defaults(func=_preview)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _cervical(args: argparse.Namespace) -> int:
    from ..paths import safe_child
    from ..tasks.cervical_ra.synth import generate_cohort
    from ..tasks.cervical_ra.preview import save_cohort_subject_png

    info = generate_cohort(
        args.out, n_subjects=args.n, prevalence=args.prevalence, seed=args.seed, template_path=args.template,
        p_intermediate=args.p_intermediate, p_baseline_deformity=args.p_baseline_deformity,
        p_short_followup=args.p_short_followup, p_followup_series=args.p_followup_series,
        p_axial_distractor=args.p_axial_distractor, deform_mm=args.deform_mm, sites=tuple(args.sites),
        lesion_scale=args.lesion_scale, pannus_level=tuple(args.pannus_level),
    )
    with_lesion = [r["patient_id"] for r in info.truth if r["lesion_type"] != "none"]
    for pid in with_lesion[: max(args.preview, 0)]:
        save_cohort_subject_png(info.out_dir, pid, safe_child(info.out_dir / "preview", pid, ".png", what="patient ID"), size_mm=90,
                                zoom_on_mask=True)
    print(f"wrote {info.n_subjects} subjects to {info.out_dir}: {info.n_included} included "
          f"({info.n_positive_included} positive), labels {info.labels_csv}, truth {info.truth_csv}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from ..tasks.cervical_ra.preview import save_cohort_subject_png

    from ..paths import safe_child

    png = args.png or safe_child(args.out / "preview", args.patient, ".png", what="patient ID")
    save_cohort_subject_png(args.out, args.patient, png, size_mm=args.zoom_mm, zoom_on_mask=args.zoom_mm is not None)
    print(png)
    return 0
