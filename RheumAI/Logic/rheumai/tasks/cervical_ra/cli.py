"""`rheumai slices` (the task input of one study: NIfTI/NRRD with geometry + PNG montage) and
`rheumai synth-preview` (PNG of a generated subject with its truth mask)."""

from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk

from ...atomic import atomic_path, write_json
from ...io import read_study
from ...montage import save_montage
from .slices import params_from, select_slices


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slices", help="select the task input slices of one study",
                       description="Write the selected slices as a volume with geometry, a JSON of the "
                                   "grid and provenance, and a PNG montage.")
    p.add_argument("study", help="NIfTI/NRRD/MHA file or DICOM folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several")
    p.add_argument("--format", choices=["nii.gz", "nrrd"], default="nii.gz")
    g = p.add_argument_group("slice selection (defaults: the paper's)")
    g.add_argument("--n-slices", type=int, help="sagittal slices / channels (6)")
    g.add_argument("--spacing", dest="spacing_mm", type=float, help="isotropic step in mm (1.0)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="in-plane size (512 512)")
    g.add_argument("--center-lps", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="slab centre in LPS mm (default: volume centre)")
    g.add_argument("--lr-mm", type=float, help="left-right centre only, as LPS x in mm (Slicer shows RAS: R = -x)")
    g.add_argument("--frame", choices=["acquisition", "patient"])
    g.add_argument("--norm", choices=["percentile", "zscore", "minmax", "none"])
    p.set_defaults(func=run)
    v = sub.add_parser("synth-preview", help="PNG of a generated cervical subject's mid-sagittal slices, mask outlined")
    v.add_argument("--out", required=True, type=Path, help="cohort folder (as given to 'rheumai synth')")
    v.add_argument("--patient", required=True, help="patient id, e.g. SYN0003")
    v.add_argument("--png", type=Path, default=None, help="PNG path (default OUT/preview/<patient>.png)")
    v.add_argument("--zoom-mm", type=float, default=None, help="in-plane view size in mm, centred on the lesion")
    v.set_defaults(func=_preview)


def _preview(args: argparse.Namespace) -> int:
    from ...paths import safe_child
    from .synth import save_cohort_subject_png

    png = args.png or safe_child(args.out / "preview", args.patient, ".png", what="patient ID")
    save_cohort_subject_png(args.out, args.patient, png, size_mm=args.zoom_mm)
    print(png)
    return 0


def run(args: argparse.Namespace) -> int:
    study = read_study(args.study, series_uid=args.series_uid)
    keys = ("n_slices", "spacing_mm", "size", "center_lps", "lr_mm", "frame", "norm")
    sel = select_slices(study, params_from(None, **{k: getattr(args, k) for k in keys}))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    vol = out / f"slices.{args.format}"
    with atomic_path(vol) as tmp:
        sitk.WriteImage(sel.grid_image(), str(tmp), useCompression=True)
    sel.save(out / "slices")
    write_json(out / "selection.json", {"grid": sel.grid.to_dict(), "source_grid": sel.source_grid.to_dict(),
                                        "provenance": sel.provenance})
    save_montage(out / "montage.png", sel.array,
                 suptitle=f"{Path(args.study).name}: {sel.params.n_slices} sagittal slices, "
                          f"{sel.params.spacing_mm} mm, right -> left")
    print(f"wrote {vol}, {out / 'slices.npy'}, {out / 'montage.png'}")
    return 0
