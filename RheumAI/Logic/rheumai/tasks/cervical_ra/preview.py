"""PNG look at a generated subject: middle sagittal slices with the truth mask outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ...errors import InputError
from ...montage import save_montage
from .synth import mask_truth, subject_series_dir
from .dicom_writer import read_series


def mid_sagittal(image: sitk.Image, n_slices: int = 6, spacing_mm: float = 1.0, size_mm: float | None = None,
                 pixel_mm: float | None = None, centre_yz: tuple[float, float] | None = None) -> np.ndarray:
    """(C, H, W) middle sagittal slices of a sagittal-grid image (C: right -> left, H: superior ->
    inferior, W: anterior -> posterior), linear resampling on a pure-LPS grid centred on the volume
    centre. ``size_mm`` / ``pixel_mm``: in-plane field of view and pixel (default: the image's);
    ``centre_yz``: in-plane centre (LPS y, z in mm) instead of the volume centre (for a zoom)."""
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    if centre_yz is not None:
        centre[1:] = centre_yz
    sp = image.GetSpacing()
    pixel_mm = pixel_mm or sp[0]
    ext = np.abs(np.array(image.GetDirection()).reshape(3, 3) @ (np.array(image.GetSize()) * np.array(sp)))
    h = int(round((size_mm or ext[2]) / pixel_mm))
    w = int(round((size_mm or ext[1]) / pixel_mm))
    ref = sitk.Image([w, h, n_slices], sitk.sitkFloat32)
    ref.SetSpacing((pixel_mm, pixel_mm, spacing_mm))
    ref.SetDirection((0, 0, 1, 1, 0, 0, 0, -1, 0))  # i posterior, j inferior, k left (+x)
    ref.SetOrigin((centre[0] - (n_slices - 1) / 2 * spacing_mm, centre[1] - (w - 1) / 2 * pixel_mm,
                   centre[2] + (h - 1) / 2 * pixel_mm))
    return sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(),
                                                sitk.sitkLinear, 0.0))


def save_subject_png(png: str | Path, image: sitk.Image, mask: sitk.Image | None = None, title: str = "",
                     n_slices: int = 6, spacing_mm: float = 1.0, size_mm: float | None = None,
                     pixel_mm: float | None = None, zoom_on_mask: bool = False) -> Path:
    """Montage of the middle sagittal slices (percentile-windowed) with the mask outlined in cyan.

    ``zoom_on_mask``: centre the view in-plane on the mask's centroid (with ``size_mm``).
    """
    centre_yz = None
    if zoom_on_mask and mask is not None:
        t = mask_truth(mask)
        if t["lesion_volume_mm3"]:
            centre_yz = (t["lesion_centre_lps_y"], t["lesion_centre_lps_z"])
    sl = mid_sagittal(image, n_slices, spacing_mm, size_mm, pixel_mm, centre_yz)
    lo, hi = np.percentile(sl, [1, 99])
    sl = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
    contour = None
    if mask is not None:
        contour = mid_sagittal(mask, n_slices, spacing_mm, size_mm, pixel_mm, centre_yz) >= 0.5
    return save_montage(png, sl, contour=contour, suptitle=title or None,
                        titles=[f"x{(c - (n_slices - 1) / 2) * spacing_mm:+.1f} mm" for c in range(n_slices)])


def save_cohort_subject_png(cohort_dir: str | Path, patient_id: str, png: str | Path, **kw) -> Path:
    """Read a generated patient's baseline T2 SAG (DICOM) and mask, and write :func:`save_subject_png`."""
    series = subject_series_dir(cohort_dir, patient_id)
    mpath = Path(cohort_dir) / "masks" / f"{patient_id}.nii.gz"
    if not series.is_dir() or not mpath.is_file():
        raise InputError(series if not series.is_dir() else mpath, f"no generated subject {patient_id} here")
    image = read_series(series)
    mask = sitk.ReadImage(str(mpath))
    return save_subject_png(png, image, mask, title=patient_id, **kw)
