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



@pytest.fixture(scope="session")
def make_cervical_checkpoint(tmp_path_factory):
    """``make(seed, model_id) -> checkpoint folder``: an untrained ResNet-10 cervical checkpoint at
    32 x 32 px, 2 mm slices (fast predict tests; outputs are the network's, not a trained model's)."""

    def make(seed: int, model_id: str) -> Path:
        import torch

        from rheumai.checkpoint import save_checkpoint
        from rheumai.tasks.cervical_ra.model import build_model, default_architecture
        from rheumai.tasks.cervical_ra.slices import SliceParams

        torch.manual_seed(seed)
        arch = default_architecture(depth=10, input_size=(32, 32))
        card = {"architecture": arch, "preprocessing": SliceParams(size=(32, 32), spacing_mm=2.0).to_dict(),
                "threshold": 0.5, "threshold_rule": "fixed", "task": "cervical_ra", "model_id": model_id}
        return save_checkpoint(tmp_path_factory.mktemp("ck") / "m", build_model(arch), card)

    return make
