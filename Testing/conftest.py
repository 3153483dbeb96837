"""Shared pytest fixtures: paths to the real test data copied into Testing/Data."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "Data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def t2_path() -> Path:
    """Real 3D sagittal cervical T2 (PSR storage, 1 mm, 384x185x52, NeuroPoly SCT, MIT)."""
    return DATA / "cervical_t2_sag" / "t2.nii.gz"


@pytest.fixture(scope="session")
def t2_crop_path() -> Path:
    """60x55x52 mm crop of the same T2 (small field of view), with C3/C5 point labels."""
    return DATA / "sct_t2_crop" / "t2.nii.gz"


@pytest.fixture(scope="session")
def dicom_t1_dir() -> Path:
    """Real sagittal T1 DICOM series (Siemens, 35 slices, head-first supine; BSD-2)."""
    return DATA / "dicom_t1_sag_HFS"


@pytest.fixture(scope="session")
def dcm2niix_ref() -> Path:
    """dcm2niix's NIfTI of the same HFS series: an independent geometry reference."""
    return DATA / "dcm2niix_ref" / "t1_fl2d_sag_20220407150138.nii.gz"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for the requesting test's module (restored after it): on a shared
    2-core box two contending threads run several times slower than one (measured by the training
    tests), and one thread makes CPU reductions reproducible."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def mrml():
    """An application-free MRML scene with Slicer's logics (slicer-core), also set as
    ``slicer.mrmlScene`` for code that uses the global, restored afterwards."""
    slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install rheumai[mrml])")
    from rheumai_mrml.scene import new_scene

    ctx = new_scene()
    old = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = ctx.scene
    yield ctx
    slicer.mrmlScene = old
    ctx.close()

