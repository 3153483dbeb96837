"""SimpleITK image <-> MRML scalar volume node: the one adapter between LPS and RAS.

SimpleITK (and the ``rheumai`` package) store an image as origin / spacing / direction in
DICOM/ITK **LPS** physical space (mm). A Slicer volume node stores the same geometry as an
IJK-to-RAS matrix in **RAS** space: ``IJKToRAS = diag(-1, -1, 1, 1) @ [[D @ diag(spacing), origin],
[0, 0, 0, 1]]`` with D, spacing, origin the LPS values. Voxel arrays are numpy (k, j, i) on both
sides (``sitk.GetArrayFromImage`` and ``slicer.util.arrayFromVolume`` agree).

Works with the real Slicer and with ``slicer-core`` (no Qt application). Every function takes the
scene explicitly; nothing reads the global ``slicer.mrmlScene``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from rheumai.atomic import atomic_path
from rheumai.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix (mm) of a 3D SimpleITK image (whose geometry is LPS)."""
    _check_3d(image)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ d @ np.diag(image.GetSpacing())
    m[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return m


def volume_node_from_image(scene: "slicer.vtkMRMLScene", image: sitk.Image, name: str = "Volume",
                           node: "slicer.vtkMRMLScalarVolumeNode | None" = None,
                           class_name: str = "vtkMRMLScalarVolumeNode",
                           create_display: bool = True) -> "slicer.vtkMRMLScalarVolumeNode":
    """Put a 3D scalar SimpleITK image into a (new or given) volume node of ``scene``.

    Voxels are deep-copied with their pixel type. Origin, spacing and direction are set one by one
    (not through a matrix decomposition), so :func:`image_from_volume_node` gives them back exactly.
    """
    _check_3d(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(None, f"volume '{name}' has {image.GetNumberOfComponentsPerPixel()} components "
                               "per voxel; a scalar image is needed")
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    elif name:
        node.SetName(name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    set_node_geometry(node, image)
    if create_display and node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def set_node_geometry(node: "slicer.vtkMRMLVolumeNode", image: sitk.Image) -> None:
    """Copy a SimpleITK image's LPS origin / spacing / direction onto a volume node (as RAS)."""
    d_ras = LPS_TO_RAS @ np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    node.SetSpacing(*image.GetSpacing())
    node.SetOrigin(*(LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)))
    node.SetIJKToRASDirections(*(float(v) for v in d_ras.ravel()))


def image_from_volume_node(node: "slicer.vtkMRMLScalarVolumeNode", world: bool = True) -> sitk.Image:
    """The node's voxels and geometry as a SimpleITK image in LPS.

    ``world=True`` applies a linear parent transform (the image then lies where Slicer shows it);
    a non-linear parent transform is refused, since it cannot be expressed as image geometry.
    """
    if node is None or node.GetImageData() is None:
        raise InputError(None, f"volume node '{node.GetName() if node else None}' has no image data")
    arr = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if arr.ndim != 3:
        raise InputError(None, f"volume node '{node.GetName()}' is not a scalar volume (array {arr.shape})")
    dirs = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(dirs)
    d_ras = np.array([[dirs.GetElement(r, c) for c in range(3)] for r in range(3)])
    spacing = np.asarray(node.GetSpacing(), dtype=float)
    origin_ras = np.asarray(node.GetOrigin(), dtype=float)
    parent = node.GetParentTransformNode() if world else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(None, f"volume node '{node.GetName()}' is under a non-linear transform "
                                   f"('{parent.GetName()}'); harden it first")
        m = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(m)
        t = slicer.util.arrayFromVTKMatrix(m)
        m3 = t[:3, :3] @ d_ras @ np.diag(spacing)
        spacing = np.linalg.norm(m3, axis=0)
        d_ras = m3 / spacing[None, :]
        origin_ras = t[:3, :3] @ origin_ras + t[:3, 3]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ origin_ras))
    img.SetDirection(tuple(float(v) for v in (LPS_TO_RAS @ d_ras).ravel()))
    return img


def write_volume_node(node: "slicer.vtkMRMLVolumeNode", path: str | Path, compress: bool = True) -> Path:
    """Write a volume node to NRRD (or any ITK format named by the suffix) with Slicer's own
    storage node, atomically. The NRRD header keeps the geometry (in LPS, as ITK reads it)."""
    path = Path(path)
    scene = node.GetScene()
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        with atomic_path(path) as tmp:
            tmp.unlink()  # the storage node would log that it replaces the empty placeholder
            storage.SetFileName(str(tmp))
            storage.SetUseCompression(bool(compress))
            if not storage.WriteData(node):
                raise OSError(f"{path}: Slicer's volume storage node could not write it")
    finally:
        scene.RemoveNode(storage)
    return path


def read_volume_node(scene: "slicer.vtkMRMLScene", path: str | Path, name: str | None = None,
                     ) -> "slicer.vtkMRMLScalarVolumeNode":
    """Read an image file (NRRD, NIfTI, MHA...) or DICOM folder into a new scalar volume node.

    Reading goes through ``rheumai.io.read_study`` (the same reader as the command line), so a
    DICOM folder is handled the same way everywhere; the node gets the image's LPS geometry.
    """
    from rheumai.io import read_study

    study = read_study(path)
    node = volume_node_from_image(scene, study.image, name or _stem(Path(path)))
    node.SetAttribute("RheumAI.SourcePath", str(path))
    if study.series_uid:
        node.SetAttribute("RheumAI.SeriesInstanceUID", study.series_uid)
    return node


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_3d(image: sitk.Image) -> None:
    if not isinstance(image, sitk.Image):
        raise TypeError(f"expected a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(None, f"image is {image.GetDimension()}D; a 3D volume is needed")
