"""Radiograph loader and writer: real CR files from pydicom-data (MIT) and round trips."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from rheumai.errors import InputError
from rheumai.radiograph import read_radiograph, to_canonical, write_radiograph_dicom

import pydicom.data as pydicom_data  # real CR files come from the pydicom-data package (test extra)


def _real(name: str):
    path = pydicom_data.get_testdata_file(name)
    assert path is not None, f"{name} not found: install the test extra (pip install pydicom-data)"
    return path


def test_real_cr_monochrome1_zero_spacing_is_inverted_and_uncalibrated():
    """RG1_UNCR: chest CR, MONOCHROME1, 15 bits stored, PixelSpacing 0\\0."""
    rad = read_radiograph(_real("RG1_UNCR.dcm"))
    assert rad.photometric == "MONOCHROME1"
    assert rad.spacing_mm == (1.0, 1.0) and not rad.spacing_calibrated and rad.spacing_source == "none"
    assert rad.array.shape == (1955, 1841) and rad.image.GetSize() == (1841, 1955, 1)
    # bone bright after inversion: the spine (centre column) is brighter than the lung fields
    spine = rad.array[850:950, 880:960].mean()
    lungs = rad.array[850:950, 460:540].mean()
    assert spine > lungs + 3000
    raw = pydicom.dcmread(_real("RG1_UNCR.dcm")).pixel_array.astype(np.float64)
    np.testing.assert_allclose(rad.array, (2 ** 15 - 1) - raw)


def test_real_cr_laterality_and_missing_spacing():
    """RG3_UNCR: leg CR, MONOCHROME1, 10 bits, Laterality R, no spacing tag."""
    rad = read_radiograph(_real("RG3_UNCR.dcm"))
    assert rad.laterality == "R"
    assert rad.spacing_source == "none" and not rad.spacing_calibrated
    row = rad.array[400]
    assert row[500:600].mean() < 100  # air between collimator and leg: dark
    assert row[820:900].mean() > 600  # tibia: bright
    canon, tf = to_canonical(rad, want="L")
    assert tf.flip_x
    np.testing.assert_array_equal(canon[:, 0], rad.array[:, -1])


def test_real_cr_imager_spacing_rescale():
    """dicomdir CR 6154: ImagerPixelSpacing 0.1, RescaleSlope 0.684, intercept 200, 12 bits."""
    path = _real("6154")
    rad = read_radiograph(path)
    assert rad.spacing_source == "ImagerPixelSpacing" and not rad.spacing_calibrated
    assert rad.spacing_mm == pytest.approx((0.1, 0.1))
    assert rad.image.GetSpacing() == pytest.approx((0.1, 0.1, 1.0))
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    lo, hi = 200.0, 4095 * 0.684 + 200.0
    np.testing.assert_allclose(rad.array, lo + hi - (raw * 0.684 + 200.0), rtol=1e-5)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_write_read_round_trip(tmp_path, photometric, modality):
    rng = np.random.default_rng(0)
    arr = rng.random((40, 30))
    path = write_radiograph_dicom(tmp_path / "a.dcm", arr, (0.5, 0.25), modality=modality, laterality="L",
                                  photometric=photometric, patient_id="P1", spacing_tag="PixelSpacing",
                                  BodyPartExamined="HAND")
    rad = read_radiograph(path)
    assert rad.photometric == photometric and rad.laterality == "L"
    assert rad.spacing_mm == (0.5, 0.25) and rad.spacing_calibrated and rad.spacing_source == "PixelSpacing"
    assert rad.meta["PatientID"] == "P1" and rad.meta["BodyPartExamined"] == "HAND" and rad.meta["Modality"] == modality
    np.testing.assert_allclose(rad.array, np.rint(arr * 4095))
    assert rad.image.GetSpacing() == (0.25, 0.5, 1.0)


def test_geometry_from_position_and_orientation(tmp_path):
    arr = np.zeros((10, 20), np.float32)
    path = write_radiograph_dicom(tmp_path / "g.dcm", arr, (2.0, 1.0), spacing_tag="both",
                                  ImagePositionPatient=[10, 20, 30], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    rad = read_radiograph(path)
    assert rad.spacing_source == "PixelSpacing"
    # pixel (x=3, y=2): origin + 3 * 1 mm along the row direction + 2 * 2 mm along the column direction
    p = rad.image.TransformContinuousIndexToPhysicalPoint((3.0, 2.0, 0.0))
    assert p == pytest.approx((10.0, 23.0, 26.0))


def test_canonical_transform_round_trip():
    from rheumai.radiograph import radiograph_from_array

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    rad = radiograph_from_array(arr, (1.0, 1.0), laterality="R")
    canon, tf = to_canonical(rad, want="L")
    pts = np.array([[0.0, 1.0], [2.5, 2.0]])
    back = tf.points_from_canonical(tf.points_to_canonical(pts))
    np.testing.assert_allclose(back, pts)
    x, y = 1, 2
    cx, cy = tf.points_to_canonical(np.array([x, y]))
    assert canon[int(cy), int(cx)] == arr[y, x]
    np.testing.assert_array_equal(tf.map_from_canonical(canon), arr)
    same, tf2 = to_canonical(rad, want="R")
    assert not tf2.flip_x and np.array_equal(same, arr)


def test_raster_png_16bit(tmp_path):
    from PIL import Image

    arr = (np.arange(20 * 30).reshape(20, 30) * 50).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "h.png")
    rad = read_radiograph(tmp_path / "h.png", laterality="R")
    np.testing.assert_array_equal(rad.array, arr.astype(np.float32))
    assert rad.spacing_source == "none" and rad.laterality == "R"
    assert sitk.GetArrayFromImage(rad.image).shape == (1, 20, 30)


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(InputError, match="x.dcm"):
        read_radiograph(bad)
    with pytest.raises(InputError, match="no such file"):
        read_radiograph(tmp_path / "missing.dcm")
    png = tmp_path / "broken.png"
    png.write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match="broken.png"):
        read_radiograph(png)
