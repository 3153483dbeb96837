"""Synthetic cervical cohort: plan, truth masks, DICOM round trip, determinism, resume, CLI."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from rheumai.errors import InputError
from rheumai import demo as general_cli
from rheumai.tasks.cervical_ra import cli as cervical_cli
from rheumai.tasks.cervical_ra.synth import (
    CohortParams,
    LABEL_COLUMNS,
    TRUTH_COLUMNS,
    baseline_t2_series_uid,
    generate_cohort,
    load_template,
    mask_truth,
    mid_sagittal,
    plan_cohort,
    save_cohort_subject_png,
    subject_series_dir,
    synthesize_subject,
)
from rheumai.tasks.cervical_ra.dicom_writer import SeriesHeader, read_series, write_series
from rheumai.tasks.cervical_ra.lesions import C2_C3_DISC_Z, TEMPLATE_TOP_Z

# Small cohort: 5 subjects, 2 positives among the included, one short follow-up, every optional series.
OPTIONS = dict(prevalence=0.5, seed=7, p_intermediate=0.0, p_baseline_deformity=0.0, p_short_followup=0.2,
               p_followup_series=1.0, p_axial_distractor=1.0)
SMALL = dict(n_subjects=5, **OPTIONS)


@pytest.fixture(scope="module")
def template(t2_path):
    return load_template(t2_path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, t2_path):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return generate_cohort(out, 5, template_path=t2_path, progress=False, **OPTIONS)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_counts_and_prevalence():
    plans = plan_cohort(CohortParams())  # the demo's defaults: 60 subjects, 15 %
    roles = [p.role for p in plans]
    assert roles.count("intermediate") == 3 and roles.count("baseline_deformity") == 2
    assert roles.count("short_followup") == 4 and roles.count("included") == 51
    included = [p for p in plans if p.role == "included"]
    n_pos = sum(p.outcome == "yes" for p in included)
    assert n_pos == round(0.15 * 51) == 8
    for p in plans:
        days = (np.datetime64(p.followup_date) - np.datetime64(p.baseline_date)).astype(int)
        assert (days < 1000) == (p.role == "short_followup")
        assert bool(p.lesion_kinds) == (p.outcome in ("yes", "intermediate"))
        assert p.baseline_deformity == (p.role == "baseline_deformity")
        assert (p.outcome == "intermediate") == (p.role == "intermediate") == p.small_lesion
    assert len({p.site for p in plans}) == 3
    big = plan_cohort(CohortParams(n_subjects=400, prevalence=0.2, seed=3))
    inc = [p for p in big if p.role == "included"]
    assert abs(sum(p.outcome == "yes" for p in inc) / len(inc) - 0.2) < 0.01
    assert plans == plan_cohort(CohortParams())  # same seed, same plan
    assert plans != plan_cohort(CohortParams(seed=1))
    with pytest.raises(ValueError, match="prevalence"):
        CohortParams(prevalence=1.5)


def test_files_and_sheets(cohort):
    out = cohort.out_dir
    labels = _read_csv(out / "labels.csv")
    truth = _read_csv(out / "truth.csv")
    assert list(labels[0]) == LABEL_COLUMNS and list(truth[0]) == TRUTH_COLUMNS
    assert [r["patient_id"] for r in labels] == [f"SYN{i:04d}" for i in range(1, 6)]
    by_id = {p.patient_id: p for p in cohort.plans}
    for lab, tru in zip(labels, truth):
        plan = by_id[lab["patient_id"]]
        assert lab["outcome"] == plan.outcome in ("yes", "no", "intermediate")
        assert lab["baseline_deformity"] in ("yes", "no") and lab["rf_positive"] in ("yes", "no")
        assert tru["label"] == {"yes": "1", "no": "0"}[plan.outcome]
        assert (tru["lesion_type"] == "none") == (float(tru["lesion_volume_mm3"]) == 0.0)
        assert (out / "masks" / f"{plan.patient_id}.nii.gz").is_file()
        series = sorted(p.name for p in (out / "dicom" / plan.patient_id / "ST1").iterdir())
        assert series == ["SE1", "SE2", "SE3"]  # T1 SAG, T2 SAG, T2 AX
        assert (out / "dicom" / plan.patient_id / "ST2" / "SE1").is_dir()  # follow-up T2
    assert sum(r["outcome"] == "yes" for r in labels if by_id[r["patient_id"]].role == "included") == 2
    record = json.loads((out / "cohort.json").read_text())
    assert record["params"]["seed"] == 7
    details = json.loads((out / "truth.json").read_text())["subjects"]
    assert all(bool(d["lesions_template_lps"]) == (d["lesion_type"] != "none") for d in details)


def test_dicom_round_trip_and_tags(cohort, template):
    plan = next(p for p in cohort.plans if p.lesion_kinds)
    folder = subject_series_dir(cohort.out_dir, plan.patient_id)
    image = read_series(folder)
    mask = sitk.ReadImage(str(cohort.masks_dir / f"{plan.patient_id}.nii.gz"))
    vols = synthesize_subject(template, plan, cohort.params)  # regenerated: also checks determinism
    for img in (image, mask):
        assert img.GetSize() == vols.t2.GetSize()
        assert np.allclose(img.GetOrigin(), vols.t2.GetOrigin(), atol=1e-4)
        assert np.allclose(img.GetSpacing(), vols.t2.GetSpacing(), atol=1e-6)
        assert np.allclose(img.GetDirection(), vols.t2.GetDirection(), atol=1e-6)
    stored = np.clip(np.rint(sitk.GetArrayFromImage(vols.t2)), 0, 65535)
    assert np.array_equal(sitk.GetArrayFromImage(image), stored)
    assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(vols.mask))
    files = sorted(folder.glob("IM*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "MR" and ds.SeriesDescription == "T2 SAG" and ds.PatientPosition == "HFS"
    assert float(ds.EchoTime) == 100.0 and float(ds.RepetitionTime) == 3000.0 and ds.ScanningSequence == "SE"
    assert ds.StudyDate == plan.baseline_date.replace("-", "")
    assert ds.SeriesInstanceUID == baseline_t2_series_uid(plan, cohort.params.seed)
    normal = np.cross(np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float))
    assert abs(normal[0]) > 0.99  # sagittal
    t1 = pydicom.dcmread(next((folder.parent / "SE1").glob("IM*.dcm")), stop_before_pixels=True)
    assert t1.SeriesDescription == "T1 SAG" and float(t1.EchoTime) < 20
    fu = pydicom.dcmread(next((folder.parents[1] / "ST2" / "SE1").glob("IM*.dcm")), stop_before_pixels=True)
    assert fu.StudyDate == plan.followup_date.replace("-", "") and fu.StudyInstanceUID != ds.StudyInstanceUID
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID
            for f in cohort.dicom_dir.glob("*/*/*/IM0001.dcm")}
    assert len(uids) == len(list(cohort.dicom_dir.glob("*/*/*")))  # one UID per series folder


def test_lesion_mask_in_mid_slab_and_craniocervical_region(cohort):
    positives = [p for p in cohort.plans if p.lesion_kinds]
    assert positives
    for plan in positives:
        mask = sitk.ReadImage(str(cohort.masks_dir / f"{plan.patient_id}.nii.gz"))
        t = mask_truth(mask)
        centre = mask.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in mask.GetSize()])
        assert abs(t["lesion_centre_lps_x"] - centre[0]) < 3.0  # within the 6 mm mid-sagittal slab
        slab = mid_sagittal(mask, n_slices=6, spacing_mm=1.0) >= 0.5
        assert all(slab[c].sum() > 0 for c in range(6)), plan.patient_id  # seen on every input slice
        # craniocervical region of the template: upper axis (above C2/C3 - 10 mm), retro-axial space
        assert C2_C3_DISC_Z - 10 < t["lesion_centre_lps_z"] < TEMPLATE_TOP_Z
        assert -22 < t["lesion_centre_lps_y"] < 0
        assert 150 < t["lesion_volume_mm3"] < 4000
    for plan in (p for p in cohort.plans if not p.lesion_kinds):
        assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(cohort.masks_dir / f"{plan.patient_id}.nii.gz"))).max() == 0


def test_lesion_changes_the_image_inside_the_mask(template):
    """Same subject with and without the lesion painted in: the differences sit in the mask."""
    params = CohortParams(**SMALL)
    plan = next(p for p in plan_cohort(params) if "pannus" in p.lesion_kinds)
    with_lesion = synthesize_subject(template, plan, params)
    without = synthesize_subject(template, plan, params, plant=False)
    a = sitk.GetArrayFromImage(with_lesion.t2)
    b = sitk.GetArrayFromImage(without.t2)
    m = sitk.GetArrayFromImage(with_lesion.mask).astype(bool)
    assert np.array_equal(m, sitk.GetArrayFromImage(without.mask).astype(bool))
    diff = np.abs(a - b)
    assert diff[m].mean() > 20 * diff[~m].mean()
    assert diff[m].mean() > 0.15 * np.percentile(b, 99)  # conspicuous: pannus replaces CSF / bone signal
    # Not a global-intensity give-away: the lesion moves the image mean by well under 1 %.
    assert abs(a.mean() - b.mean()) < 0.01 * b.mean()


def test_subjects_differ_and_seed_is_deterministic(template):
    params = CohortParams(**SMALL)
    plans = plan_cohort(params)[:3]
    first = [synthesize_subject(template, p, params) for p in plans]
    again = synthesize_subject(template, plans[1], params)
    assert np.array_equal(sitk.GetArrayFromImage(first[1].t2), sitk.GetArrayFromImage(again.t2))
    assert first[1].t2.GetOrigin() == again.t2.GetOrigin()
    # Different subjects: compare on a common mid-sagittal grid.
    grids = [mid_sagittal(v.t2, 6, 2.0, 200) for v in first]
    for i in range(3):
        for j in range(i + 1, 3):
            ga, gb = grids[i] / grids[i].mean(), grids[j] / grids[j].mean()
            assert np.abs(ga - gb).mean() > 0.1
            assert first[i].t2.GetSize() != first[j].t2.GetSize() or first[i].t2.GetOrigin() != first[j].t2.GetOrigin()
    other = synthesize_subject(template, plans[1], dataclasses.replace(params, seed=8))
    assert not np.array_equal(sitk.GetArrayFromImage(other.t2)[:2], sitk.GetArrayFromImage(again.t2)[:2])


def test_resume_and_parameter_guard(cohort, t2_path):
    mtimes = {p.name: p.stat().st_mtime_ns for p in cohort.masks_dir.iterdir()}
    truth_before = (cohort.out_dir / "truth.csv").read_text()
    info = generate_cohort(cohort.out_dir, 5, template_path=t2_path, progress=False, **OPTIONS)
    assert {p.name: p.stat().st_mtime_ns for p in cohort.masks_dir.iterdir()} == mtimes  # nothing redone
    assert (cohort.out_dir / "truth.csv").read_text() == truth_before
    assert info.truth == cohort.truth
    with pytest.raises(InputError, match="cohort.json"):
        generate_cohort(cohort.out_dir, 5, template_path=t2_path, progress=False, **{**OPTIONS, "seed": 8})


def test_missing_template_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="nope.nii.gz"):
        generate_cohort(tmp_path / "c", n=1, template_path=tmp_path / "nope.nii.gz", progress=False)


def test_dicom_writer_axial_and_handedness(tmp_path):
    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) * 10)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.5, 33.25))
    header = SeriesHeader(patient_id="P1", study_uid="1.2.3", series_uid="1.2.3.4", frame_uid="1.2.3.5",
                          study_date=np.datetime64("2020-01-02").astype(object), series_number=4,
                          series_description="T2 AX")
    write_series(img, tmp_path / "ax", header)
    back = read_series(tmp_path / "ax")
    assert np.allclose(back.GetOrigin(), img.GetOrigin()) and np.allclose(back.GetSpacing(), img.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    left = sitk.Image(img)
    left.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    with pytest.raises(ValueError, match="right-handed"):
        write_series(left, tmp_path / "bad", header)


def test_cli_and_preview(tmp_path, t2_path, cohort):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    general_cli.register(sub)
    cervical_cli.register(sub)
    out = tmp_path / "c"
    args = parser.parse_args(["synth", "--task", "cervical_ra", "--out", str(out), "--n", "2", "--seed", "3",
                              "--prevalence", "1", "--p-short-followup", "0", "--p-intermediate", "0",
                              "--p-baseline-deformity", "0", "--template", str(t2_path), "--preview", "1"])
    assert args.func(args) == 0
    assert len(_read_csv(out / "labels.csv")) == 2
    pngs = list((out / "preview").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pid = cohort.plans[0].patient_id
    args = parser.parse_args(["synth-preview", "--out", str(cohort.out_dir), "--patient", pid,
                              "--png", str(tmp_path / "p.png"), "--zoom-mm", "80"])
    assert args.func(args) == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InputError, match="SYN9999"):
        save_cohort_subject_png(cohort.out_dir, "SYN9999", tmp_path / "q.png")
    with pytest.raises(InputError, match="--spacing"):  # another task's option
        args = parser.parse_args(["synth", "--task", "hand_svdh", "--out", str(tmp_path / "h"), "--spacing", "2"])
        args.func(args)


def test_parallel_generation_writes_the_same_files(cohort, tmp_path, t2_path):
    """workers > 1: the same cohort, byte for byte (every subject is a function of (seed, index))."""
    par = generate_cohort(tmp_path / "par", 5, template_path=t2_path, progress=False, workers=2, **OPTIONS)
    a = sorted(p.relative_to(cohort.out_dir) for p in cohort.out_dir.rglob("*") if p.is_file())
    b = sorted(p.relative_to(par.out_dir) for p in par.out_dir.rglob("*") if p.is_file())
    assert a == b and len(a) > 20
    differ = [str(p) for p in a if (cohort.out_dir / p).read_bytes() != (par.out_dir / p).read_bytes()]
    assert not differ, differ
