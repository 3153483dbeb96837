"""Imaging core on real data: reading, geometry, orientation invariance, selection, inverse."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from rheumai.errors import AmbiguousSeriesError, InputError
from rheumai.geometry import SAGITTAL_FRAME, Grid, snap_frame
from rheumai.io import list_series, read_study
from rheumai.normalize import normalize_intensity
from rheumai.tasks.cervical_ra.slices import SliceParams, SliceSelection, select_slices, select_slices_full_resample

SMALL = SliceParams(size=(256, 256))


# ---------------------------------------------------------------- reading
def test_read_nifti_lps_geometry(t2_path):
    s = read_study(t2_path)
    img = s.image
    assert img.GetSize() == (384, 185, 52)
    assert img.GetPixelID() == sitk.sitkFloat32
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()) == "PSR"
    # nibabel reads the same file in RAS: our LPS origin is its RAS origin with x, y negated.
    nib = pytest.importorskip("nibabel")
    aff = nib.load(str(t2_path)).affine
    assert np.allclose(np.array(img.GetOrigin()), aff[:3, 3] * [-1, -1, 1], atol=1e-3)


def test_dicom_geometry_matches_dcm2niix(dicom_t1_dir, dcm2niix_ref):
    s = read_study(dicom_t1_dir)
    assert s.meta["Modality"] == "MR" and s.series_uid
    ref = sitk.ReadImage(str(dcm2niix_ref), sitk.sitkFloat32)
    assert s.image.GetSize() == ref.GetSize()
    # Every voxel centre of the reference is a voxel centre of ours with the same value.
    res = sitk.Resample(s.image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    assert np.array_equal(sitk.GetArrayFromImage(res), sitk.GetArrayFromImage(ref))
    # And the grids coincide physically: same corner points (in any order).
    def corner_pts(im):
        sz = np.array(im.GetSize()) - 1
        return sorted(tuple(np.round(im.TransformContinuousIndexToPhysicalPoint((np.array(c) * sz).tolist()), 2))
                      for c in np.ndindex(2, 2, 2))
    assert np.allclose(corner_pts(s.image), corner_pts(ref), atol=0.01)


def test_dicom_geometry_from_tags(dicom_t1_dir):
    """Independent check from pydicom: origin = IPP of the first slice along the normal."""
    s = read_study(dicom_t1_dir)
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in s.files]
    iop = np.array(ds[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    assert np.allclose(s.image.GetOrigin(), np.array(ds[0].ImagePositionPatient, float), atol=1e-3)
    d = np.array(s.image.GetDirection()).reshape(3, 3)
    assert np.allclose(d[:, 0], iop[:3], atol=1e-5) and np.allclose(d[:, 1], iop[3:], atol=1e-5)
    assert np.allclose(d[:, 2], normal, atol=1e-5)
    steps = np.diff([np.array(x.ImagePositionPatient, float) @ normal for x in ds])
    assert np.allclose(s.image.GetSpacing()[2], steps.mean(), atol=1e-3)


def _copy_series(src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.glob("*.dcm")):
        out.append(Path(shutil.copy(f, dst / f.name)))
    return out


def test_rejects_missing_slice(dicom_t1_dir, tmp_path):
    files = _copy_series(dicom_t1_dir, tmp_path / "s")
    # Remove a slice from the middle of the stack (by position, not by name).
    ds = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    iop = np.array(ds[files[0]].ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])
    order = sorted(files, key=lambda f: np.array(ds[f].ImagePositionPatient, float) @ n)
    order[17].unlink()
    with pytest.raises(InputError, match=r"missing slice.*gap of 9\.600 mm after " + order[16].name):
        read_study(tmp_path / "s")


def test_rejects_duplicated_slice(dicom_t1_dir, tmp_path):
    files = _copy_series(dicom_t1_dir, tmp_path / "s")
    ds = pydicom.dcmread(files[5])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "s" / "dup.dcm")
    with pytest.raises(InputError, match="duplicates the slice position"):
        read_study(tmp_path / "s")


def test_rejects_uneven_spacing(dicom_t1_dir, tmp_path):
    files = _copy_series(dicom_t1_dir, tmp_path / "s")
    ds = pydicom.dcmread(files[10])
    iop = np.array(ds.ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])
    ds.ImagePositionPatient = (np.array(ds.ImagePositionPatient, float) + 1.5 * n).tolist()
    ds.save_as(files[10])
    with pytest.raises(InputError, match="uneven slice spacing|missing"):
        read_study(tmp_path / "s")


def test_rejects_non_mr(dicom_t1_dir, tmp_path):
    for f in _copy_series(dicom_t1_dir, tmp_path / "s"):
        ds = pydicom.dcmread(f)
        ds.Modality = "CT"
        ds.save_as(f)
    with pytest.raises(InputError, match="modality CT; a MR series is required"):
        read_study(tmp_path / "s")
    assert read_study(tmp_path / "s", require_modality=None).image.GetSize() == (256, 256, 35)


def test_rejects_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="contains no DICOM files") as e:
        read_study(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_rejects_2d_image(t2_path, tmp_path):
    im = sitk.ReadImage(str(t2_path))[:, :, 20]
    p = tmp_path / "slice.nii.gz"
    sitk.WriteImage(im, str(p))
    with pytest.raises(InputError, match=r"slice\.nii\.gz: is a 2D image"):
        read_study(p)


def test_rejects_single_dicom_slice(dicom_t1_dir, tmp_path):
    (tmp_path / "one").mkdir()
    shutil.copy(sorted(dicom_t1_dir.glob("*.dcm"))[0], tmp_path / "one" / "a.dcm")
    with pytest.raises(InputError, match="single slice: a 2D image"):
        read_study(tmp_path / "one")


def test_series_choice_and_listing(dicom_t1_dir, tmp_path):
    _copy_series(dicom_t1_dir, tmp_path / "a")
    uid2 = generate_uid()
    for f in _copy_series(dicom_t1_dir, tmp_path / "b"):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid2
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesDescription = "second copy"
        ds.save_as(f)
    with pytest.raises(AmbiguousSeriesError, match="holds 2 image series") as e:
        read_study(tmp_path)
    assert uid2 in str(e.value) and "second copy" in str(e.value)
    s = read_study(tmp_path, series_uid=uid2)
    assert s.series_uid == uid2 and len(s.files) == 35
    assert {x.uid for x in list_series(tmp_path)} >= {uid2}
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 1.2.3"):
        read_study(tmp_path, series_uid="1.2.3")


def test_unsupported_and_missing(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_study(tmp_path / "nope.nii.gz")
    p = tmp_path / "table.csv"
    p.write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported file type"):
        read_study(p)


# ---------------------------------------------------------------- orientation
def _restore(img: sitk.Image, orientation: str) -> sitk.Image:
    """The same physical volume stored with another axis order / handedness."""
    return sitk.DICOMOrient(img, orientation)


@pytest.mark.parametrize("orientation", ["RAS", "LPI", "SAR", "IRP"])
def test_orientation_invariance(t2_path, orientation):
    s = read_study(t2_path)
    ref = select_slices(s, SMALL)
    other = _restore(s.image, orientation)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(other.GetDirection()) == orientation
    sel = select_slices(other, SMALL)
    assert np.abs(sel.array - ref.array).max() < 1e-4
    assert np.array_equal(sel.mask, ref.mask)
    assert np.allclose(sel.grid.origin, ref.grid.origin, atol=1e-6)


def test_selection_frame_is_anatomical(t2_path):
    """Slices run right->left, rows superior->inferior, columns anterior->posterior."""
    sel = select_slices(read_study(t2_path), SMALL)
    assert np.allclose(sel.grid.direction_matrix, SAGITTAL_FRAME)
    p0 = sel.grid.index_to_physical([0, 0, 0])
    assert sel.grid.index_to_physical([1, 0, 0])[1] > p0[1]   # W: towards posterior (+y)
    assert sel.grid.index_to_physical([0, 1, 0])[2] < p0[2]   # H: towards inferior (-z)
    assert sel.grid.index_to_physical([0, 0, 1])[0] > p0[0]   # C: towards left (+x)


def test_slightly_oblique_acquisition(t2_path):
    """A 4-degree oblique re-acquisition: 'acquisition' frame follows its planes; 'patient' the LPS axes."""
    s = read_study(t2_path)
    rot = sitk.VersorTransform((0, 0, 1), np.radians(4.0))  # about the S axis (tilts sagittal planes)
    d = np.array(rot.GetMatrix()).reshape(3, 3) @ np.array(s.image.GetDirection()).reshape(3, 3)
    ref = sitk.Image(s.image.GetSize(), sitk.sitkFloat32)
    ref.SetSpacing(s.image.GetSpacing())
    ref.SetDirection(d.ravel().tolist())
    center = np.array(s.image.TransformContinuousIndexToPhysicalPoint(((np.array(s.image.GetSize()) - 1) / 2).tolist()))
    ref.SetOrigin((center - d @ (np.array(s.image.GetSpacing()) * (np.array(s.image.GetSize()) - 1) / 2)).tolist())
    oblique = sitk.Resample(s.image, ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    acq = select_slices(oblique, SMALL)
    assert 3.9 < np.degrees(np.arccos(acq.grid.direction_matrix[0, 2])) < 4.1
    pat = select_slices(oblique, SliceParams(size=(256, 256), frame="patient"))
    assert np.allclose(pat.grid.direction_matrix, SAGITTAL_FRAME)
    base = select_slices(s, SMALL)
    both = pat.mask & base.mask
    # Same anatomy on the same physical grid, up to two interpolations.
    r = np.corrcoef(pat.array[both], base.array[both])[0, 1]
    assert r > 0.95


def test_snap_frame_is_exact_for_axis_aligned():
    for o in ["RAS", "LPI", "PSR", "AIL"]:
        d = np.array(sitk.DICOMOrient(sitk.Image([2, 2, 2], sitk.sitkUInt8), o).GetDirection()).reshape(3, 3)
        assert np.array_equal(snap_frame(d), SAGITTAL_FRAME)


# ---------------------------------------------------------------- selection
def test_paper_defaults_shape_and_pad(t2_path):
    sel = select_slices(read_study(t2_path))
    assert sel.array.shape == (6, 512, 512) and sel.array.dtype == np.float32
    assert sel.grid.size == (512, 512, 6) and sel.grid.spacing == (1.0, 1.0, 1.0)
    assert sel.array[~sel.mask].max() == 0.0  # pad value 0
    assert 0.0 <= sel.array.min() and sel.array.max() <= 1.0
    # Six slices symmetric about the volume centre, 1 mm apart.
    xs = sel.grid.index_to_physical(np.array([[0, 0, c] for c in range(6)]))[:, 0]
    assert np.allclose(np.diff(xs), 1.0)
    c = read_study(t2_path).image
    centre = c.TransformContinuousIndexToPhysicalPoint(((np.array(c.GetSize()) - 1) / 2).tolist())
    assert np.isclose(xs.mean(), centre[0])


def test_matches_full_resample(t2_path, dicom_t1_dir):
    for src, params in [(t2_path, SliceParams()),
                        (dicom_t1_dir, SliceParams(n_slices=4, spacing_mm=0.8, size=(300, 200)))]:
        s = read_study(src)
        a, b = select_slices(s, params), select_slices_full_resample(s, params)
        assert np.array_equal(a.mask, b.mask)
        assert np.abs(a.array - b.array).max() < 1e-5


def test_options_centre_override_and_small_fov(t2_path, t2_crop_path):
    s = read_study(t2_path)
    sel = select_slices(s, SliceParams(n_slices=3, spacing_mm=2.0, size=(64, 96), lr_mm=-2.0))
    assert sel.array.shape == (3, 64, 96)
    xs = sel.grid.index_to_physical(np.array([[0, 0, c] for c in range(3)]))[:, 0]
    assert np.allclose(xs, [-4.0, -2.0, 0.0])
    centre = (10.0, -50.0, -20.0)
    sel = select_slices(s, SliceParams(size=(64, 64), center_lps=centre))
    assert np.allclose(sel.slab_center, centre)
    # A 60 x 55 mm crop is padded to 512 x 512 with zeros.
    crop = select_slices(read_study(t2_crop_path))
    frac = crop.mask.mean()
    assert 0.005 < frac < 0.02 and crop.array[~crop.mask].max() == 0


def test_slab_outside_image_is_refused(t2_path):
    with pytest.raises(InputError, match=r"t2\.nii\.gz: slice\(s\) .* lie outside the image"):
        select_slices(read_study(t2_path), SliceParams(size=(32, 32), lr_mm=500.0))


def test_normalisation_ignores_padding():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 10, (2, 8, 8)).astype(np.float32)
    m = np.zeros_like(x, bool)
    m[:, 2:6, 2:6] = True
    x[~m] = -1000  # padding must not shift the statistics
    y = normalize_intensity(x, m, "percentile", 1, 99)
    assert y[~m].max() == 0 and 0 <= y.min() and y.max() <= 1
    assert np.isclose(np.percentile(y[m], 50), 0.5, atol=0.15)
    z = normalize_intensity(x, m, "zscore")
    assert abs(z[m].mean()) < 1e-5 and abs(z[m].std() - 1) < 1e-4
    with pytest.raises(ValueError):
        normalize_intensity(x, m, "bogus")


# ---------------------------------------------------------------- inverse
def test_round_trip_point_lands_on_same_physical_point(t2_path):
    """A point marked in the source comes back at the same physical point after grid -> source."""
    s = read_study(t2_path)
    img = s.image
    q = (150, 90, 27)  # (i, j, k) index near the mid-sagittal plane
    p = np.array(img.TransformIndexToPhysicalPoint(q))
    marked = sitk.Image(img.GetSize(), sitk.sitkFloat32)
    marked.CopyInformation(img)
    marked[q] = 1000.0
    sel = select_slices(marked, SliceParams(norm="none", center_lps=tuple(p)))
    assert sel.array.max() > 0  # the marked voxel is sampled by the slab
    back = sel.to_source(sel.array)
    assert Grid.of(back) == Grid.of(img)
    arr = sitk.GetArrayFromImage(back)
    peak = np.unravel_index(np.argmax(arr), arr.shape)[::-1]
    assert np.linalg.norm(np.array(back.TransformIndexToPhysicalPoint([int(v) for v in peak])) - p) < 1e-6


def test_map_back_keeps_source_geometry_and_slab(dicom_t1_dir):
    s = read_study(dicom_t1_dir)
    sel = select_slices(s, SliceParams(size=(128, 128)))
    back = sel.to_source(np.ones_like(sel.array))
    for attr in ("GetOrigin", "GetSpacing", "GetDirection", "GetSize"):
        assert getattr(back, attr)() == getattr(s.image, attr)()
    arr = sitk.GetArrayFromImage(back)
    # Nonzero only within the slab: 6 mm thick about the centre along LR (x).
    idx = np.argwhere(arr > 0)
    xs = np.array([back.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]])[0]
                   for i in idx[:: max(1, len(idx) // 500)]])
    cx = sel.slab_center[0]
    assert np.all(np.abs(xs - cx) <= 3.0 + 1e-6) and len(idx) > 0


def test_save_load_round_trip(t2_path, tmp_path):
    sel = select_slices(read_study(t2_path), SMALL)
    sel.save(tmp_path / "x")
    back = SliceSelection.load(tmp_path / "x")
    assert np.array_equal(back.array, sel.array) and np.array_equal(back.mask, sel.mask)
    assert back.grid == sel.grid and back.source_grid == sel.source_grid and back.params == sel.params
    assert back.provenance["source_path"] == str(t2_path)
    with pytest.raises(InputError):
        SliceSelection.load(tmp_path / "missing")


def test_params_round_trip_and_validation():
    p = SliceParams(size=(64, 32), center_lps=(1, 2, 3))
    assert SliceParams.from_dict(p.to_dict()) == p and p.digest() == SliceParams.from_dict(p.to_dict()).digest()
    assert p.digest() != SliceParams().digest()
    for bad in (dict(n_slices=0), dict(spacing_mm=0), dict(frame="x"), dict(norm="x"), dict(interpolator="x")):
        with pytest.raises(ValueError):
            SliceParams(**bad)


def test_cli_slices(t2_path, tmp_path):
    from rheumai.cli import main

    assert main(["slices", str(t2_path), "--out", str(tmp_path), "--size", "128", "128", "--format", "nrrd"]) == 0
    vol = sitk.ReadImage(str(tmp_path / "slices.nrrd"))
    assert vol.GetSize() == (128, 128, 6)
    assert np.allclose(np.array(vol.GetDirection()).reshape(3, 3), SAGITTAL_FRAME)
    assert (tmp_path / "montage.png").stat().st_size > 1000
    assert main(["slices", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 1
