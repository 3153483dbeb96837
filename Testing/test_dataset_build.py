"""End to end on a generated 44-patient export: index -> labels -> cohort -> split -> cache -> manifest.

Every included series is a complete re-identified copy of the real Siemens series (35 slices,
downsampled in-plane to 64x64 to keep the test fast) and is read through the imaging core.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import json
import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rheumai.dataset import CohortRules, SplitConfig, build_dataset, index_archive
from rheumai.dataset import cli as dataset_cli
from rheumai.dataset.archive_tools import write_demo_archive
from rheumai.dataset.build import MANIFEST_COLUMNS
from rheumai.errors import InputError
from rheumai.tasks.cervical_ra.slices import SliceParams, SliceSelection

PARAMS = SliceParams(n_slices=6, spacing_mm=2.0, size=(64, 64))
QUIET = lambda *a: None  # noqa: E731 - progress callback that prints nothing


@pytest.fixture(scope="module")
def demo(tmp_path_factory, dicom_t1_dir):
    base = tmp_path_factory.mktemp("dataset")
    d = write_demo_archive(dicom_t1_dir, base / "export", base / "labels.csv", n_patients=44, downsample=4)
    index_archive(d.root, base / "index.sqlite", progress=QUIET)
    return d, base


@pytest.fixture(scope="module")
def built(demo):
    d, base = demo
    res = build_dataset(base / "index.sqlite", d.labels_csv, base / "out", CohortRules(), SplitConfig(), PARAMS,
                        workers=2, progress=QUIET)
    return d, base, res


def _manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_flow_counts_and_exclusion_reasons(built):
    d, base, res = built
    flow = json.loads((base / "out" / "flow.json").read_text())
    assert flow["start"] == 44
    assert [(s["key"], s["remaining"], s["n_excluded"]) for s in flow["steps"]] == [
        ("baseline_study", 42, 2), ("baseline_series", 40, 2), ("followup", 38, 2),
        ("baseline_deformity", 36, 2), ("intermediate", 34, 2), ("input", 34, 0),
    ]
    assert flow["not_in_label_sheet"] == ["X999"]
    expected_step = {"no_study": "baseline_study", "no_t2": "baseline_series", "short_followup": "followup",
                     "deformity": "baseline_deformity", "intermediate": "intermediate"}
    rows = list(csv.DictReader(open(base / "out" / "excluded.csv")))
    assert {r["patient_id"]: r["step"] for r in rows} == {
        p: expected_step[k] for p, k in d.scenarios.items() if k in expected_step}
    why = {r["patient_id"]: r["reason"] for r in rows}
    assert why["P015"].startswith("no MRI study on baseline date ")
    assert why["P016"].startswith("no eligible series in baseline study of ")
    assert "'t2_tse_tra' (axial, 4 slices)" in why["P016"] and "'t1_tse_sag' (sequence T1, 4 slices)" in why["P016"]
    assert why["P017"].startswith("follow-up 700 days < 1000")
    assert why["P018"] == "deformity at baseline"
    assert why["P019"] == "intermediate outcome (policy: exclude)"
    text = (base / "out" / "flow.txt").read_text()
    assert "  5  Intermediate outcome: exclude" in text and re.search(r"\n  P016 +baseline_series +no eligible series", text)
    png = (base / "out" / "flow.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_manifest_series_choice_split_and_cache(built):
    d, base, res = built
    rows = _manifest(base / "out" / "manifest.csv")
    assert list(rows[0]) == MANIFEST_COLUMNS + ["age", "sex"]
    assert [r["patient_id"] for r in rows] == sorted(p for p, k in d.scenarios.items()
                                                     if k in ("ok", "two_t2", "by_uid"))
    for r in rows:
        assert r["series_uid"] == d.t2_series[r["patient_id"]]  # the complete sagittal T2, also for two_t2
        assert r["label"] == ("1" if d.outcomes[r["patient_id"]] == "yes" else "0")
        sel = SliceSelection.load(base / "out" / r["cache_file"])
        assert sel.array.shape == (6, 64, 64) and sel.array.dtype == np.float32
        assert sel.provenance["series_uid"] == r["series_uid"]
        assert sel.provenance["source_path"] == r["source_path"]
    # Patient level (one row each), stratified 60:40: 11 positive / 23 negative in total.
    split = {r["patient_id"]: r["split"] for r in rows}
    assert len(split) == len(rows) == 34
    pos = {s: sum(r["label"] == "1" for r in rows if r["split"] == s) for s in ("train", "test")}
    n = {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}
    assert n == {"train": 20, "test": 14} and pos == {"train": 6, "test": 5}
    meta = json.loads((base / "out" / "dataset.json").read_text())
    assert meta["preprocessing"] == PARAMS.to_dict() and meta["rules"]["min_followup_days"] == 1000
    assert meta["counts"]["included"] == 34 and meta["params_hash"] == rows[0]["params_hash"]
    assert sorted(res.cache.computed) == sorted(split) and not res.cache.failed


def _subset_labels(labels: Path, out: Path, n: int) -> Path:
    """The first ``n`` rows of a label sheet (a smaller cohort over the same archive and index)."""
    lines = labels.read_text().splitlines()
    out.write_text("\n".join(lines[: n + 1]) + "\n")
    return out


def test_rebuild_is_byte_identical_and_reuses_cache(built, tmp_path):
    d, base, res = built
    out = base / "out"
    names = ("manifest.csv", "dataset.json", "flow.txt", "flow.json", "excluded.csv", "cohort.csv")
    before = {n: (out / n).read_bytes() for n in names}
    again = build_dataset(base / "index.sqlite", d.labels_csv, out, CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    assert again.cache.computed == [] and len(again.cache.reused) == 34
    assert {n: (out / n).read_bytes() for n in names} == before
    # A fresh output folder gives the same manifest (cache paths relative, hashes content-based).
    small = _subset_labels(d.labels_csv, tmp_path / "labels9.csv", 9)
    one = build_dataset(base / "index.sqlite", small, tmp_path / "o1", CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    two = build_dataset(base / "index.sqlite", small, tmp_path / "o2", CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    assert len(two.cache.computed) == 9
    assert filecmp.cmp(one.manifest, two.manifest, shallow=False)
    assert set(_manifest(two.manifest)[0].items()) <= set().union(*(r.items() for r in _manifest(out / "manifest.csv")))


def test_changed_parameter_recomputes_every_entry(built, tmp_path):
    d, base, _ = built
    small = _subset_labels(d.labels_csv, tmp_path / "labels9.csv", 9)
    out = tmp_path / "out"
    other = SliceParams(n_slices=4, spacing_mm=2.0, size=(64, 64))
    res = build_dataset(base / "index.sqlite", small, out, CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    a = _manifest(res.manifest)
    res2 = build_dataset(base / "index.sqlite", small, out, CohortRules(), SplitConfig(), other, workers=2, progress=QUIET)
    assert res2.cache.reused == [] and len(res2.cache.computed) == 9
    b = _manifest(res2.manifest)
    assert [r["source_hash"] for r in a] == [r["source_hash"] for r in b]
    assert a[0]["params_hash"] != b[0]["params_hash"]
    assert SliceSelection.load(out / b[0]["cache_file"]).array.shape == (4, 64, 64)
    # Back to the first parameters: all entries still there, nothing recomputed.
    res3 = build_dataset(base / "index.sqlite", small, out, CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    assert res3.cache.computed == [] and len(res3.cache.reused) == 9


def test_changed_and_broken_source_series(tmp_path, dicom_t1_dir):
    """One edited series is recomputed alone; an unreadable one excludes its patient with the reason."""
    d = write_demo_archive(dicom_t1_dir, tmp_path / "export", tmp_path / "labels.csv", n_patients=9, downsample=4)
    root, labels = d.root, d.labels_csv
    idx = tmp_path / "index.sqlite"
    index_archive(root, idx, progress=QUIET)
    first = build_dataset(idx, labels, tmp_path / "out", CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    assert len(first.cache.computed) == 9

    t2_of = {r["patient_id"]: r["source_path"] for r in _manifest(first.manifest)}
    f = sorted(Path(t2_of["P001"]).iterdir())[17]
    ds = pydicom.dcmread(f)
    arr = ds.pixel_array.copy()
    arr[10:20, 10:20] = 900
    ds.PixelData = arr.tobytes()
    ds.save_as(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    g = sorted(Path(t2_of["P002"]).iterdir())[5]
    g.write_bytes(g.read_bytes()[:5000])  # truncated pixel data: headers still parse
    summary = index_archive(root, idx, progress=QUIET)
    assert summary.files_read == 2

    second = build_dataset(idx, labels, tmp_path / "out", CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    assert second.cache.computed == ["P001"] and not second.cache.failed
    assert len(second.cache.reused) == 7
    # The index saw the cut pixel data, so the series is not eligible and the file is named.
    step = second.flow["steps"][1]
    assert step["key"] == "baseline_series" and [e["patient_id"] for e in step["excluded"]] == ["P002"]
    assert f"{g.name}: truncated: its pixel data needs" in step["excluded"][0]["reason"]
    assert "P002" not in {r["patient_id"] for r in _manifest(second.manifest)}
    excluded = (tmp_path / "out" / "excluded.csv").read_text()
    assert "P002,baseline_series,\"no eligible series" in excluded
    # An entry left half-written (its .json missing, e.g. a killed run) is computed again.
    p3 = next(r for r in _manifest(second.manifest) if r["patient_id"] == "P003")
    (tmp_path / "out" / (p3["cache_file"] + ".json")).unlink()
    third = build_dataset(idx, labels, tmp_path / "out", CohortRules(), SplitConfig(), PARAMS, progress=QUIET)
    assert third.cache.computed == ["P003"] and filecmp.cmp(third.manifest, second.manifest, shallow=False)


def test_intermediate_policies_and_split_options(built, tmp_path):
    d, base, _ = built
    idx, labels = base / "index.sqlite", d.labels_csv
    pos = build_dataset(idx, labels, tmp_path / "a", CohortRules(intermediate="positive"), SplitConfig(), PARAMS,
                        compute_cache=False)
    assert pos.flow["included"] == 36 and pos.flow["steps"][4]["note"] == "2 intermediate relabelled positive"
    assert all(e.label == 1 for e in pos.cohort.included if e.outcome == "intermediate")
    assert not (tmp_path / "a" / "manifest.csv").exists() and (tmp_path / "a" / "flow.txt").exists()
    neg = build_dataset(idx, labels, tmp_path / "b", CohortRules(intermediate="negative", min_followup_days=500),
                        SplitConfig(), PARAMS, compute_cache=False)
    assert neg.flow["included"] == 38 and neg.flow["steps"][2]["n_excluded"] == 0
    ext = build_dataset(idx, labels, tmp_path / "c", CohortRules(), SplitConfig(test_sites=("B",), kfold=3), PARAMS,
                        compute_cache=False)
    site = {e.patient_id: e.site for e in ext.cohort.included}
    assert all((s == "test") == (site[p] == "B") for p, (s, _) in ext.split.items())
    assert {f for s, f in ext.split.values() if s == "train"} == {0, 1, 2}
    tol = build_dataset(idx, labels, tmp_path / "d", CohortRules(baseline_date_tolerance_days=45), SplitConfig(),
                        PARAMS, compute_cache=False)
    assert tol.flow["steps"][0]["n_excluded"] == 0 and tol.flow["included"] == 36
    with pytest.raises(InputError, match="no included patient from test site\\(s\\) Z") as err:
        build_dataset(idx, labels, tmp_path / "e", CohortRules(), SplitConfig(test_sites=("Z",)), PARAMS,
                      compute_cache=False)
    assert "Included" in str(err.value)  # the flow comes with the error; nothing is written
    assert not (tmp_path / "e").exists()


def test_cli_index_and_build(demo, tmp_path, capsys):
    d, base = demo
    parser = argparse.ArgumentParser(prog="rheumai")
    dataset_cli.register(parser.add_subparsers(dest="command"))
    idx = tmp_path / "index.sqlite"
    args = parser.parse_args(["dataset", "index", str(d.root), "--out", str(idx), "--unreadable-csv", str(tmp_path / "bad.csv")])
    assert args.func(args) == 0
    assert "holds 45 patients, 89 studies, 177 series" in capsys.readouterr().out
    assert len((tmp_path / "bad.csv").read_text().splitlines()) == 3  # header + 2 debris files
    args = parser.parse_args(["dataset", "build", "--index", str(idx), "--labels", str(d.labels_csv), "--out",
                              str(tmp_path / "out"), "--flow-only", "--min-followup-days", "600",
                              "--intermediate", "negative", "--split", "0.5", "--seed", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"Patients in the label sheet +44\n", out)
    assert re.search(r"  3  Follow-up >= 600 days +40 +0\n", out)
    assert re.search(r"  5  Intermediate outcome: negative +38 +0 +\(2 intermediate relabelled negative\)", out)
    assert "random 50% train / 50% test" in out
