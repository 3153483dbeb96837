"""Cohorts without DICOM: an image table (NIfTI / NRRD paths + labels) through the same rules,
flow report, split, cache and manifest as a DICOM archive."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from rheumai.dataset import ImageRules, SplitConfig, build_image_dataset, read_image_table
from rheumai.dataset import cli as dataset_cli
from rheumai.dataset.build import MANIFEST_COLUMNS
from rheumai.dataset.labels import LabelSheetError
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.slices import SliceParams, SliceSelection

PARAMS = SliceParams(n_slices=4, spacing_mm=2.0, size=(32, 32))
QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def table(tmp_path_factory, t2_crop_path):
    """14 patients: 12 readable images (NIfTI, two NRRD), one missing, one that is not an image."""
    base = tmp_path_factory.mktemp("images")
    (base / "img").mkdir()
    src = sitk.ReadImage(str(t2_crop_path), sitk.sitkFloat32)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(12):
        arr = sitk.GetArrayFromImage(src) * (1 + 0.05 * k) + rng.normal(0, 1, src.GetSize()[::-1]).astype(np.float32)
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.CopyInformation(src)
        name = f"img/S{k:02d}.nrrd" if k in (3, 7) else f"img/S{k:02d}.nii.gz"
        sitk.WriteImage(img, str(base / name))
        outcome = "intermediate" if k == 5 else ("yes" if k % 3 == 0 else "no")
        rows.append([f"S{k:02d}", name, outcome, "A" if k % 2 else "B", 400 if k == 9 else 1500, 40 + k])
    rows.append(["S12", "img/missing.nii.gz", "no", "A", 1500, 60])
    (base / "img" / "notes.nii.gz").write_text("not an image")
    rows.append(["S13", "img/notes.nii.gz", "yes", "B", 1500, 61])
    path = base / "images.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "image", "outcome", "site", "followup_days", "age"])
        w.writerows(rows)
    return base, path


def test_image_table_runs_rules_flow_split_and_cache(table, tmp_path):
    base, path = table
    res = build_image_dataset(path, tmp_path / "ds", ImageRules(), SplitConfig(train_fraction=0.5), PARAMS,
                              progress=QUIET)
    flow = json.loads((tmp_path / "ds" / "flow.json").read_text())
    assert flow["start"] == 14
    assert [(s["key"], s["remaining"], s["n_excluded"]) for s in flow["steps"]] == [
        ("image", 13, 1), ("followup", 12, 1), ("baseline_deformity", 12, 0), ("intermediate", 11, 1),
        ("input", 10, 1)]
    why = {e["patient_id"]: e["reason"] for s in flow["steps"] for e in s["excluded"]}
    assert why["S12"].startswith("image not found: ") and why["S09"] == "follow-up 400 days < 1000"
    assert why["S13"].startswith("series could not be read or sampled: ") and "notes.nii.gz" in why["S13"]
    text = (tmp_path / "ds" / "flow.txt").read_text()
    assert "  image: the table's image, read as one 3D volume" in text and "baseline study" not in text
    rows = list(csv.DictReader(open(res.manifest)))
    assert list(rows[0]) == MANIFEST_COLUMNS + ["age"]
    assert [r["patient_id"] for r in rows] == ["S00", "S01", "S02", "S03", "S04", "S06", "S07", "S08", "S10", "S11"]
    assert {r["split"] for r in rows} == {"train", "test"}
    assert sum(r["label"] == "1" for r in rows) == 3
    for r in rows:
        sel = SliceSelection.load(tmp_path / "ds" / r["cache_file"])
        assert sel.array.shape == (4, 32, 32) and sel.provenance["source_path"] == r["source_path"]
        assert r["source_path"] == str((base / "img").resolve() / (r["patient_id"] + (".nrrd" if r["patient_id"] in ("S03", "S07") else ".nii.gz")))
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["counts"]["included"] == 10 and meta["clinical_columns"] == ["age"] and meta["index"] is None
    # Re-running reuses every cache entry and writes the same manifest.
    before = res.manifest.read_bytes()
    again = build_image_dataset(path, tmp_path / "ds", ImageRules(), SplitConfig(train_fraction=0.5), PARAMS,
                                progress=QUIET)
    assert again.cache.computed == [] and len(again.cache.reused) == 10 and list(again.cache.failed) == ["S13"]
    assert again.manifest.read_bytes() == before


def test_bad_tables_are_named_row_by_row(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("patient_id,image,label,followup_days\nA,a.nii.gz,2,x\nA,,1,10\n")
    with pytest.raises(LabelSheetError) as err:
        read_image_table(t)
    msg = str(err.value)
    assert "row 2 (patient A): label must be 0 or 1, not '2'" in msg
    assert "row 2 (patient A): followup_days must be a whole number of days, not 'x'" in msg
    assert "row 3 (patient A): duplicate patient_id (first on row 2)" in msg and "missing image path" in msg
    t.write_text("patient_id,image,outcome\n")
    with pytest.raises(InputError, match="header but no rows"):
        read_image_table(t)
    t.write_text("patient_id,path,outcome\nA,a,yes\n")
    with pytest.raises(InputError, match="lacks the column\\(s\\) image"):
        read_image_table(t)
    t.write_text("patient_id,t1,t2,label\nA,a,b,1\n")  # NegSpA-AI: one column per input role + its box
    with pytest.raises(InputError, match="lacks the column\\(s\\) stir, box"):
        read_image_table(t, task="negspa")


def test_cli_build_from_image_table(table, tmp_path, capsys):
    _, path = table
    parser = argparse.ArgumentParser(prog="rheumai")
    dataset_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dataset", "build", "--images", str(path), "--out", str(tmp_path / "o"), "--flow-only",
                              "--min-followup-days", "300", "--intermediate", "negative"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "  2  Follow-up >= 300 days" in out and "image table: images.csv (14 rows)" in out
    args = parser.parse_args(["dataset", "build", "--images", str(path), "--out", str(tmp_path / "site"), "--flow-only",
                              "--test-site", "A"])
    assert args.func(args) == 0 and "external site: test = site(s) A" in capsys.readouterr().out
    split = json.loads((tmp_path / "site" / "flow.json").read_text())["split"]
    assert (split["test"]["n"], split["train"]["n"]) == (4, 7)  # site A: S01 S03 S07 S11; B the rest (S13 unread)
    args = parser.parse_args(["dataset", "build", "--images", str(path), "--labels", str(path), "--out", "x"])
    assert args.func(args) == 2
    assert "give either --images TABLE, or both --index and --labels" in capsys.readouterr().err


def test_hostile_patient_ids_never_name_a_path(table, tmp_path):
    """IDs from the table end up in the manifest verbatim; no file is named after them, so none
    can land outside the output folder (cache entries are named by content hashes)."""
    base, _ = table
    hostile = ["../../escape", "/abs/olute", "a/b", "..", "CON", "x\\y", " sp ", "é/..", "~root"]
    t = tmp_path / "hostile.csv"
    with open(t, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "image", "label"])
        for k, pid in enumerate(hostile):
            w.writerow([pid, str(base / "img" / f"S{k:02d}.nii.gz" if k not in (3, 7) else base / "img" / f"S{k:02d}.nrrd"),
                        k % 2])
    before = {p for p in tmp_path.parent.rglob("*")}
    res = build_image_dataset(t, tmp_path / "out" / "ds", ImageRules(), SplitConfig(train_fraction=1.0), PARAMS,
                              progress=QUIET)
    written = {p for p in tmp_path.parent.rglob("*")} - before
    outside = [p for p in written if not p.is_relative_to(tmp_path / "out")]
    assert outside == [] and res.n_included == len(hostile)
    ids = [r["patient_id"] for r in csv.DictReader(open(res.manifest))]
    assert sorted(ids) == sorted(h.strip() for h in hostile)


def test_table_split_column_clinical_csv_and_task_params(table, tmp_path, capsys):
    """The table's own split column is kept (no split is drawn), clinical columns come from a
    second CSV by patient_id, and preprocessing parameters are checked against the task."""
    base, path = table
    header, *rows = list(csv.reader(open(path)))
    t = base / "with_split.csv"
    with open(t, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header + ["split"])
        w.writerows(r + ["test" if k % 3 == 0 else "val" if k % 3 == 1 else "train"] for k, r in enumerate(rows[:12]))
    clin = base / "clinical_extra.csv"
    clin.write_text("patient_id,crp\nS00,5\nS02,7\n")
    res = build_image_dataset(t, tmp_path / "ds", ImageRules(), SplitConfig(), PARAMS, progress=QUIET,
                              clinical_csv=clin)
    got = {r["patient_id"]: r for r in csv.DictReader(open(res.manifest))}
    assert (got["S00"]["split"], got["S01"]["split"], got["S02"]["split"]) == ("test", "val", "train")
    assert (got["S00"]["crp"], got["S02"]["crp"], got["S01"]["crp"], got["S00"]["age"]) == ("5", "7", "", "40")
    assert "Split: the table's split column" in (tmp_path / "ds" / "flow.txt").read_text()
    with open(t, "a", newline="") as fh:
        fh.write("S12,img/S00.nii.gz,no,A,1500,70,\n")
    with pytest.raises(InputError, match="split column is filled on some rows only"):
        read_image_table(t)
    parser = argparse.ArgumentParser(prog="rheumai")
    dataset_cli.register(parser.add_subparsers(dest="command"))
    for argv, message in ((["--param", "no_such=1"], "task cervical_ra has no preprocessing parameter(s) no_such"),
                          (["--task", "negspa", "--index", str(path), "--labels", str(path)],
                           "--index / --labels build")):
        args = parser.parse_args(["dataset", "build", "--out", str(tmp_path / "x")]
                                 + (["--images", str(path)] if "--index" not in argv else []) + argv)
        assert args.func(args) == 2 and message in capsys.readouterr().err


def test_clinical_csv_blank_lines_are_skipped(tmp_path):
    """A clinical CSV with blank lines (Excel leaves some) or rows without a patient_id is read."""
    (tmp_path / "t.csv").write_text("patient_id,image,outcome\nA,a.nii.gz,yes\nB,b.nii.gz,no\n")
    (tmp_path / "c.csv").write_text("patient_id,crp\nA,5\n\n,9\nB,7\n\n")
    sheet = read_image_table(tmp_path / "t.csv", clinical_csv=tmp_path / "c.csv")
    assert [r.clinical for r in sheet.rows] == [{"crp": "5"}, {"crp": "7"}]
