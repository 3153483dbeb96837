"""Index vs reader vs dcm2niix on enhanced (multi-frame) DICOM studies.

For every image series (or part: image type / echo / stack) under each sub-folder of ROOT:
what ``rheumai dataset index`` records (slice count, severe or clean), what ``read_study`` does
(reads a 3D volume or refuses), and, where a dcm2niix reference NIfTI named after the sub-folder
lies in REF, how far our voxel centres fall from its grid (in voxels) and the correlation of the
voxel values after nearest-neighbour resampling in physical space.

    .venv/bin/python benchmarks/dicom_agreement.py /work/shared/data/dcm_qa_xa30_enhanced_study/In \
        /work/shared/data/dcm_qa_xa30_enhanced_study/Ref
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from rheumai.dataset.index import ArchiveIndex, index_archive
from rheumai.errors import InputError
from rheumai.io import read_study, scan_folder


def _against_reference(img: sitk.Image, ref: sitk.Image) -> tuple[float, float]:
    """(largest off-grid distance of our corner voxels in the reference grid, in voxels; value correlation)."""
    if ref.GetDimension() == 4:
        ref = ref[:, :, :, 0]
    size = img.GetSize()
    worst = 0.0
    for corner in np.ndindex(2, 2, 2):
        p = img.TransformIndexToPhysicalPoint([int(corner[i] * (size[i] - 1)) for i in range(3)])
        ci = np.array(ref.TransformPhysicalPointToContinuousIndex(p))
        worst = max(worst, float(np.abs(ci - np.round(ci)).max()))
    same = sitk.Resample(ref, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    a, b = sitk.GetArrayFromImage(img).ravel(), sitk.GetArrayFromImage(same).ravel()
    return worst, float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("ref", type=Path, nargs="?")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        index_archive(args.root, Path(d) / "index.sqlite", progress=lambda *a: None)
        series = ArchiveIndex.open(Path(d) / "index.sqlite").series.set_index("series_uid")
    agree = total = 0
    for sub in sorted(p for p in args.root.iterdir() if p.is_dir()):
        parts = [s for s in scan_folder(sub).series if s.is_image]
        refs = sorted(args.ref.glob(sub.name + "*.nii*")) if args.ref else []
        for info in parts:
            total += 1
            row = series.loc[info.uid] if info.uid in series.index else None
            indexed = "-" if row is None else f"{row['n_slices']} {'severe' if row['severe'] else 'clean'}"
            extra = ""
            try:
                img = read_study(sub, series_uid=info.uid, require_modality=None).image
                got = "read " + "x".join(map(str, img.GetSize()))
                ok = row is not None and not row["severe"] and row["n_slices"] == img.GetSize()[2]
                if refs:  # the reference this part matches best (dcm2niix names parts its own way)
                    scored = [(_against_reference(img, sitk.ReadImage(str(r))), r) for r in refs]
                    (off, corr), ref = max(scored, key=lambda t: t[0][1])
                    extra = f"  vs {ref.name}: off-grid {off:.1e} voxel, r = {corr:.6f}"
            except InputError as exc:
                got = "refused (" + exc.problem.split(" is ", 1)[-1][:40] + ")"
                ok = row is not None and bool(row["severe"])
            agree += ok
            print(f"{sub.name[:24]:24} {info.part or '-':10} index {indexed:10} reader {got:32} "
                  f"{'agree' if ok else 'DISAGREE'}{extra}")
    print(f"index and reader agree on {agree}/{total} image series")


if __name__ == "__main__":
    main()
