"""Nothing is written outside the output folder, whatever IDs and paths the data holds.

Generated hostile names (traversal, absolute paths, separators, NUL / control characters, device
names, over-long names, trailing dots and spaces) go through :func:`rheumai.paths.safe_child` and
through every writer that builds a path from data: batch prediction (study IDs from a study
table, both tasks), one study's files, shard merging, the NegSpA dataset cache and the synth
preview. Each writer either refuses the name with an InputError naming it, or writes inside its
output folder; a snapshot of the folder around it shows no file appeared outside.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from rheumai.checkpoint import save_checkpoint
from rheumai.errors import InputError
from rheumai.paths import check_name, safe_child

FRAGMENTS = ["..", ".", "/", "\\", "\x00", "\n", "\t", "CON", "nul", "aux.txt", "COM1", "~", "$HOME", "%2e%2e",
             " ", "-", "*", "?", ":", "é", "患者", "P001", "x" * 300, "/etc/passwd", "../../outside", "a/../../b"]
KNOWN_BAD = ["../../x", "..", ".", "", "   ", "/tmp/abs", "a/b", "a\\b", "x\x00y", "line\nbreak", "CON", "nul.txt",
             "trailing.", " lead", "y" * 256, "../" * 10 + "etc"]


def hostile_names(n: int, seed: int = 0) -> list[str]:
    """``n`` names drawn from dangerous fragments (seeded), plus the known-bad list."""
    rng = random.Random(seed)
    out = list(KNOWN_BAD)
    while len(out) < n:
        out.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 4))))
    return out


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), to compare before / after a writer runs."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def outside(root: Path, out: Path, before: set[str]) -> set[str]:
    """New paths under ``root`` that are neither inside ``out`` nor ``out`` and its parents."""
    rel = out.relative_to(root)
    allowed = {str(rel), *(str(q) for q in rel.parents)}
    return {p for p in tree(root) - before if p not in allowed and not p.startswith(str(rel) + os.sep)}


def test_safe_child_refuses_or_confines_every_generated_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in KNOWN_BAD:
        with pytest.raises(InputError, match="cannot name|outside"):
            safe_child(out, name, ".json")
    accepted = 0
    for name in hostile_names(600, seed=1):
        try:
            p = safe_child(out, name, "_saliency.nii.gz")
        except InputError as exc:
            assert "cannot name" in str(exc) or "outside" in str(exc)
            continue
        accepted += 1
        assert p.parent == out and p.resolve().parent == out.resolve(), name
        assert check_name(name) == name  # accepted names are used as given, never rewritten
    assert accepted > 20  # the generator also yields harmless names (e.g. "P001é", "患者-")
    # A link inside the output folder that points outside is refused too.
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside"):
        safe_child(out, "link")


@pytest.fixture(scope="module")
def cervical_ckpt(make_cervical_checkpoint) -> Path:
    return make_cervical_checkpoint(0, "hostile")


def test_batch_predict_with_hostile_study_ids(cervical_ckpt, t2_crop_path, tmp_path, one_torch_thread):
    """Study IDs from a study table: hostile ones become error rows, the good one is predicted,
    and every file lands inside --out."""
    from rheumai.engine.predict import predict_batch

    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    before = tree(tmp_path)
    names = hostile_names(24, seed=2)
    studies = [{"id": n, "t2_sag": str(t2_crop_path)} for n in names] + [{"id": "GOOD", "t2_sag": str(t2_crop_path)}]
    rows = predict_batch(studies, cervical_ckpt, out, show_progress=False, workers=1)
    assert outside(tmp_path, out, before) == set()
    by_study = {r["study"]: r for r in rows}
    assert not by_study["GOOD"]["error"] and (out / "GOOD_saliency.nii.gz").is_file()
    refused = [r for r in rows if r["error"]]
    assert len(refused) >= len(KNOWN_BAD) and all("cannot name" in r["error"] for r in refused)
    for f in (out / "rows").iterdir():
        assert f.parent == out / "rows"


def test_hostile_study_file_names_stay_inside(cervical_ckpt, t2_crop_path, tmp_path, one_torch_thread):
    """Study files whose names carry newlines, dots and spaces: outputs get sanitised stems inside --out."""
    from rheumai.engine.predict import predict_batch

    src = tmp_path / "in"
    src.mkdir()
    studies = []
    for name in ["..nii.gz", "a\nb.nii.gz", " .. .nii.gz", "-rf .nii.gz"]:
        p = src / name
        shutil.copyfile(t2_crop_path, p)
        studies.append(str(p))
    out = tmp_path / "out"
    before = tree(tmp_path)
    rows = predict_batch(studies, cervical_ckpt, out, saliency=None, show_progress=False, montage=False)
    assert outside(tmp_path, out, before) == set()
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert all(Path(r["result_file"]).parent == out.resolve() for r in rows)


def test_write_study_and_merge_refuse_hostile_keys(cervical_ckpt, t2_crop_path, tmp_path, one_torch_thread):
    from rheumai.engine.predict import Predictor
    from rheumai.engine.write import merge_folders, write_study

    res = Predictor(cervical_ckpt).predict(t2_crop_path, saliency="gradcam")
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    before = tree(tmp_path)
    for key in KNOWN_BAD:
        with pytest.raises(InputError):
            write_study(res, out, key)
    assert outside(tmp_path, out, before) == set()
    # A shard folder whose row file was edited to carry a traversal key: the merge refuses it.
    shard = tmp_path / "a" / "shard"
    (shard / "rows").mkdir(parents=True)
    (shard / "rows" / "x.json").write_text(json.dumps({"key": "../../evil", "study": "x", "finished": 1.0}))
    before = tree(tmp_path)
    with pytest.raises(InputError, match="evil"):
        merge_folders([shard], out)
    assert outside(tmp_path, out, before) == set()


@pytest.fixture(scope="module")
def negspa_setup(tmp_path_factory):
    """A 2-subject generated NegSpA cohort and a random-weight tiny checkpoint (no training)."""
    from rheumai.tasks.negspa.clinical import NAMES, ClinicalEncoder
    from rheumai.tasks.negspa.model import build_model, default_architecture
    from rheumai.tasks.negspa.preprocess import NegSpaParams
    from rheumai.tasks.negspa.synth import make_cohort

    root = tmp_path_factory.mktemp("spa")
    cohort = make_cohort(root / "cohort", n=2, seed=3, spacing=4.0, show_progress=False)
    torch.manual_seed(0)
    arch = default_architecture(depth=10, input_size=(16, 16))
    enc = ClinicalEncoder.fit(pd.DataFrame({n: [1.0, 0.0] for n in NAMES}))
    card = {"architecture": arch, "preprocessing": NegSpaParams(size=(16, 16)).to_dict(), "threshold": 0.5,
            "threshold_rule": "fixed", "task": "negspa", "clinical_encoder": enc.to_dict(), "model_id": "spa-hostile"}
    return cohort, save_checkpoint(root / "model", build_model(arch), card)


def _hostile_cohort(cohort: Path, dest: Path, names: list[str]) -> Path:
    """The cohort's first subject under every name (absolute paths, so the table can live anywhere)."""
    from rheumai.tasks.negspa.synth import read_cohort

    row = read_cohort(cohort).iloc[0]
    df = pd.DataFrame([{"patient_id": n, **{k: row[k] for k in ("t1", "t2", "stir", "box")}, "label": 0,
                        "split": "train"} for n in names])
    dest.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(dest, index=False)
    return dest


def test_negspa_cohort_predict_with_hostile_ids(negspa_setup, tmp_path, one_torch_thread):
    """The reported failure: a NegSpA cohort prediction wrote outside --out for IDs like '../../x'.
    Now hostile IDs are error rows and nothing lands outside (`rheumai predict --cohort`)."""
    from rheumai.cli import main

    cohort, ckpt = negspa_setup
    names = [n for n in hostile_names(24, seed=4) if "\n" not in n and "\x00" not in n and n.strip()]
    names = list(dict.fromkeys(names)) + ["SAFE1"]
    table = _hostile_cohort(cohort, tmp_path / "tables" / "cohort.csv", names)
    out = tmp_path / "deep" / "er" / "out"
    before = tree(tmp_path)
    assert main(["predict", "--model", str(ckpt), "--out", str(out), "--cohort", str(table), "--device", "cpu",
                 "--saliency", "none"]) == 1  # some studies failed (refused IDs): the exit status says so
    assert outside(tmp_path, out, before) == set()
    rows = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert rows.loc[rows["study"] == "SAFE1", "error"].iloc[0] == ""
    assert (rows["error"] != "").sum() >= 8


def test_negspa_dataset_cache_never_names_a_file_after_an_id(negspa_setup, tmp_path):
    """`rheumai dataset build --task negspa`: cache entries are named by content hashes, so hostile
    IDs reach the manifest verbatim and nothing lands outside the output folder."""
    from rheumai.dataset import build_image_dataset

    cohort, _ = negspa_setup
    bad = ["../../escaped", "/abs/pid", "a/b"]
    table = _hostile_cohort(cohort, tmp_path / "t" / "cohort.csv", bad)
    out = tmp_path / "ds" / "out"
    before = tree(tmp_path)
    res = build_image_dataset(table, out, params={"size": [16, 16]}, task="negspa", progress=lambda *a: None)
    assert outside(tmp_path, out, before) == set()
    manifest = pd.read_csv(res.manifest, dtype=str)
    assert sorted(manifest["patient_id"]) == sorted(bad)
    assert all(c.startswith("cache/") and "/" not in c[len("cache/"):] for c in manifest["cache_file"])


def test_synth_preview_refuses_hostile_patient(tmp_path):
    from rheumai.tasks.cervical_ra import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    out = tmp_path / "o" / "cohort"
    out.mkdir(parents=True)
    before = tree(tmp_path)
    a = parser.parse_args(["synth-preview", "--out", str(out), "--patient", "../../../x"])
    with pytest.raises(InputError, match="patient ID"):
        a.func(a)
    assert outside(tmp_path, out, before) == set()
