"""Predict: geometry of the saliency volume, batches (corrupt study, resume, kill), checkpoints, CLI."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rheumai.checkpoint import save_checkpoint
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.model import build_model, default_architecture
from rheumai.engine.predict import Predictor, predict_batch, study_stem
from rheumai.tasks.cervical_ra.slices import SliceParams

SIZE = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny RheumAI checkpoint: ResNet-18, 6 x 64 x 64 at 2 mm, random weights, threshold 0.5."""
    torch.manual_seed(0)
    arch = default_architecture(depth=18, input_size=(SIZE, SIZE))
    card = {"architecture": arch, "preprocessing": SliceParams(size=(SIZE, SIZE), spacing_mm=2.0).to_dict(),
            "threshold": 0.5, "threshold_rule": "fixed for the test", "task": "cervical_ra", "model_id": "tiny18"}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", build_model(arch), card)


@pytest.fixture(scope="module")
def predictor(ckpt) -> Predictor:
    return Predictor(ckpt)


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)


@pytest.mark.parametrize("method", ["gradcam", "gradxinput"])
def test_saliency_volume_in_source_geometry(predictor, t2_crop_path, method):
    res = predictor.predict(t2_crop_path, saliency=method)
    src = sitk.ReadImage(str(t2_crop_path))
    _same_geometry(res.saliency_volume, src)
    vol = sitk.GetArrayFromImage(res.saliency_volume)
    assert vol.min() >= 0 and vol.max() <= 1 + 1e-6
    assert res.saliency_grid.shape == (6, SIZE, SIZE)
    assert not res.saliency_grid[~res.selection.mask].any(), "no saliency outside the field of view"
    # The map lands on the selected slab: every non-zero voxel is within the slab's left-right extent.
    nz = np.argwhere(vol > 0)
    if len(nz):
        pts = np.array([src.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]])
                        for p in nz[:: max(1, len(nz) // 200)]])
        lr = res.selection.grid.physical_to_index(pts)[:, 2]  # k index = slice (right -> left)
        assert lr.min() >= -1 - 1e-6 and lr.max() <= 6 + 1e-6
    assert res.label == int(res.probability >= res.threshold) and res.model_id == "tiny18"
    json.dumps(res.to_dict())
    # The identical probability without saliency: the CAM comes from the same forward pass.
    plain = predictor.predict(t2_crop_path, saliency=None)
    assert plain.probability == pytest.approx(res.probability, abs=1e-6) and plain.saliency_volume is None


def test_predict_accepts_image_and_tta(predictor, t2_crop_path):
    img = sitk.ReadImage(str(t2_crop_path), sitk.sitkFloat32)
    res = predictor.predict(img, saliency=None, tta=3)
    assert res.tta["n"] == 3 and len(res.tta["probabilities"]) == 3
    assert res.tta["probabilities"][0] == pytest.approx(res.probability, abs=1e-5)
    assert res.tta_std >= 0 and 0 <= res.tta_mean <= 1


def test_sanity_figures_in_result(predictor, t2_crop_path, tmp_path):
    from rheumai.engine.write import write_study

    res = predictor.predict(t2_crop_path, saliency="gradxinput", sanity=True)
    files = write_study(res, tmp_path, "s")
    saved = json.loads(Path(files["result_file"]).read_text())
    assert set(saved["sanity"]) == {"randomization", "faithfulness"}
    assert len(saved["sanity"]["faithfulness"]["deletion"]["saliency_order"]) == 11
    assert Path(files["sanity_plot"]).stat().st_size > 0


def test_batch_goes_on_past_corrupt_study_and_resumes(ckpt, t2_crop_path, t2_path, tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"this is not an image")
    out = tmp_path / "out"
    studies = [str(t2_crop_path), str(bad), str(t2_path)]
    seen = []
    rows = predict_batch(studies, ckpt, out, progress=lambda i, n, s: seen.append((i, n)), show_progress=False)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    by_study = {r["study"]: r for r in rows}
    assert by_study[str(bad)]["error"] and "corrupt.nii.gz" in by_study[str(bad)]["error"]
    assert not by_study[str(t2_path)]["error"] and not by_study[str(t2_crop_path)]["error"]
    with open(out / "predictions.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["study"] for r in table] == studies
    assert float(table[0]["probability"]) == pytest.approx(by_study[str(t2_crop_path)]["probability"])
    vol = Path(by_study[str(t2_path)]["saliency_file"])
    _same_geometry(sitk.ReadImage(str(vol)), sitk.ReadImage(str(t2_path)))
    assert Path(by_study[str(t2_path)]["montage_file"]).is_file()
    # Re-run: the done studies are skipped (files untouched), the failed one is tried again.
    mtime = vol.stat().st_mtime_ns
    rows2 = predict_batch(studies, ckpt, out, show_progress=False)
    assert vol.stat().st_mtime_ns == mtime
    assert len(rows2) == 3 and sum(bool(r["error"]) for r in rows2) == 1
    # Cancel: should_stop before the first study leaves the table as it was.
    rows3 = predict_batch([str(t2_crop_path) + "_missing"], ckpt, out, should_stop=lambda: True, show_progress=False)
    assert len(rows3) == 3


_KILL_SCRIPT = """
import sys
from rheumai.engine.predict import predict_batch
predict_batch(sys.argv[3:], sys.argv[1], sys.argv[2], show_progress=False)
"""


def test_kill_mid_batch_leaves_consistent_outputs(ckpt, t2_crop_path, tmp_path):
    """SIGKILL while a batch runs: every visible output is complete, and a re-run finishes the rest."""
    out = tmp_path / "out"
    studies = []
    for i in range(6):  # the same small study under several names
        p = tmp_path / f"s{i:02d}.nii.gz"
        shutil.copyfile(t2_crop_path, p)
        studies.append(str(p))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(ckpt), str(out), *studies])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "predictions.json").exists():
            break
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = json.loads((out / "predictions.json").read_text())  # parses: never half-written
    done = data["predictions"]
    assert 1 <= len(done) < 6
    with open(out / "predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(done)
    for row in done:
        img = sitk.ReadImage(row["saliency_file"])  # complete, readable files
        assert img.GetSize() == sitk.ReadImage(str(t2_crop_path)).GetSize()
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    stems = {study_stem(s) for s in studies}
    for p in visible:
        if p.name.startswith("predictions."):
            continue
        if p.name == "rows":  # one row file per finished study, each complete JSON
            for r in p.iterdir():
                assert r.name.startswith(".") or (r.stem in stems and json.loads(r.read_text())["key"] == r.stem)
            continue
        assert any(p.name.startswith(s) for s in stems)
    rows = predict_batch(studies, ckpt, out, show_progress=False)
    assert len(rows) == 6 and not any(r["error"] for r in rows)


def test_pickled_checkpoint_refused(ckpt, tmp_path):
    model = build_model(default_architecture(depth=18, input_size=(SIZE, SIZE)))
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(InputError, match="pickle"):
        Predictor(pt)
    # A pickle disguised as safetensors inside a checkpoint folder fails to parse, it is not executed.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model_card.json").write_text((Path(ckpt) / "model_card.json").read_text())
    torch.save(model.state_dict(), fake / "model.safetensors")
    with pytest.raises(InputError, match="safetensors"):
        Predictor(fake)


def test_bad_inputs(predictor, tmp_path):
    with pytest.raises(InputError, match="nothing_here"):
        predictor.predict(tmp_path / "nothing_here.nii.gz")
    with pytest.raises(ValueError, match="saliency method"):
        predictor.predict(sitk.Image([20, 20, 20], sitk.sitkFloat32), saliency="smoothgrad")


def _cli(argv: list[str]) -> int:
    from rheumai import predict_cli

    parser = argparse.ArgumentParser(prog="rheumai")
    predict_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_on_real_t2(ckpt, t2_path, tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli(["predict", str(t2_path), "--model", str(ckpt), "--out", str(out), "--format", "nrrd"]) == 0
    assert "class" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "predictions.csv", newline="")))
    assert len(rows) == 1 and rows[0]["model_id"] == "tiny18" and rows[0]["threshold"] == "0.5"
    assert rows[0]["saliency_file"].endswith(".nrrd")
    _same_geometry(sitk.ReadImage(rows[0]["saliency_file"]), sitk.ReadImage(str(t2_path)))


def test_cli_scene(ckpt, t2_crop_path, tmp_path):
    pytest.importorskip("slicer")
    pytest.importorskip("rheumai_mrml.scene")
    out = tmp_path / "scene"
    assert _cli(["predict", str(t2_crop_path), "--model", str(ckpt), "--out", str(out), "--scene"]) == 0
    row = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert row["scene_file"] and Path(row["scene_file"]).exists()


def test_card_input_transform_crop_and_resize(t2_crop_path, tmp_path):
    """A network trained on a centre crop resized to 32 px: predict applies the card's transform,
    and the maps go back into the crop box of the 64 px selection grid."""
    from rheumai.tasks.cervical_ra.train import eval_transform_from_card

    torch.manual_seed(1)
    arch = default_architecture(depth=18, input_size=(32, 32))
    card = {"architecture": arch, "preprocessing": SliceParams(size=(SIZE, SIZE), spacing_mm=2.0).to_dict(),
            "input_transform": {"center_crop_fraction": 0.75, "resize": "bilinear", "input_size": [32, 32]},
            "threshold": 0.5, "threshold_rule": "fixed", "task": "cervical_ra", "model_id": "crop32"}
    pred = Predictor(save_checkpoint(tmp_path / "crop", build_model(arch), card))
    res = pred.predict(t2_crop_path, saliency="gradxinput")
    x = torch.as_tensor(np.asarray(eval_transform_from_card(pred.card)(res.selection.array)))[None].float()
    assert x.shape == (1, 6, 32, 32)
    with torch.inference_mode():
        assert res.probability == pytest.approx(torch.sigmoid(pred.model(x))[0, 0].item(), abs=1e-5)
    g = res.saliency_grid
    assert g.shape == (6, SIZE, SIZE) and g.max() > 0
    inside = np.zeros_like(g, dtype=bool)
    inside[:, 8:56, 8:56] = True  # the 48 px centre crop of 64
    assert not g[~inside].any()
    _same_geometry(res.saliency_volume, sitk.ReadImage(str(t2_crop_path)))
