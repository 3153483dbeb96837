"""SimpleITK image <-> MRML volume node geometry, against Slicer's real MRML (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
vtk = pytest.importorskip("vtk")

from rheumai.errors import InputError  # noqa: E402
from rheumai_mrml.nodes import (LPS_TO_RAS, image_from_volume_node, ijk_to_ras_matrix,  # noqa: E402
                                read_volume_node, volume_node_from_image, write_volume_node)




def oblique_image() -> sitk.Image:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(size=(7, 9, 11)).astype(np.float32))  # (k, j, i)
    img.SetSpacing((0.43, 0.77, 2.9))
    img.SetOrigin((12.5, -40.25, 77.0))
    img.SetDirection(sitk.VersorTransform((0.2, -0.5, 0.8), 0.6).GetMatrix())
    return img


def matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def test_ijk_to_ras_matches_reference_formula(mrml):
    img = oblique_image()
    node = volume_node_from_image(mrml.scene, img, "oblique")
    d = np.array(img.GetDirection()).reshape(3, 3)
    ref = np.eye(4)
    ref[:3, :3] = np.diag([-1, -1, 1]) @ d @ np.diag(img.GetSpacing())
    ref[:3, 3] = np.diag([-1, -1, 1]) @ np.array(img.GetOrigin())
    np.testing.assert_allclose(matrix(node), ref, atol=1e-12)
    np.testing.assert_allclose(ijk_to_ras_matrix(img), ref, atol=1e-12)
    # A voxel's RAS position from the node equals its LPS position from ITK, flipped.
    ijk = (3, 5, 2)
    lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
    ras = matrix(node) @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(ras[:3], LPS_TO_RAS @ lps, atol=1e-9)


def test_round_trip_is_exact(mrml):
    img = oblique_image()
    node = volume_node_from_image(mrml.scene, img, "oblique")
    back = image_from_volume_node(node)
    assert back.GetOrigin() == img.GetOrigin()
    assert back.GetSpacing() == img.GetSpacing()
    assert back.GetDirection() == img.GetDirection()
    assert back.GetPixelID() == img.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    # arrays agree in (k, j, i) order on both sides
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(img))


def test_nrrd_written_by_storage_node_keeps_lps_geometry(mrml, tmp_path):
    img = oblique_image()
    node = volume_node_from_image(mrml.scene, img, "oblique")
    path = write_volume_node(node, tmp_path / "oblique.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oblique.nrrd"]  # no temporary left
    read = sitk.ReadImage(str(path))
    np.testing.assert_allclose(read.GetOrigin(), img.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(read.GetSpacing(), img.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(read.GetDirection(), img.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(img))


def test_real_study_read_into_node(mrml, t2_path):
    node = read_volume_node(mrml.scene, t2_path)
    ref = sitk.ReadImage(str(t2_path), sitk.sitkFloat32)
    assert node.GetName() == "t2"
    assert node.GetAttribute("RheumAI.SourcePath") == str(t2_path)
    np.testing.assert_allclose(matrix(node), ijk_to_ras_matrix(ref), atol=1e-6)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(ref))


def test_linear_parent_transform_is_applied(mrml):
    img = oblique_image()
    node = volume_node_from_image(mrml.scene, img, "moved")
    t = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.0)  # RAS mm
    t.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(t.GetID())
    world = image_from_volume_node(node)
    np.testing.assert_allclose(np.array(world.GetOrigin()) - np.array(img.GetOrigin()), (-10.0, 5.0, 2.0), atol=1e-9)
    np.testing.assert_allclose(world.GetDirection(), img.GetDirection(), atol=1e-12)
    local = image_from_volume_node(node, world=False)
    assert local.GetOrigin() == img.GetOrigin()


def test_bad_images_are_refused(mrml):
    with pytest.raises(InputError, match="2D"):
        volume_node_from_image(mrml.scene, sitk.Image(4, 4, sitk.sitkFloat32), "flat")
    vec = sitk.Image([3, 3, 3], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InputError, match="components"):
        volume_node_from_image(mrml.scene, vec, "vector")
