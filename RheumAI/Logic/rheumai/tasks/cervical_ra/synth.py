"""Generated cervical RA cohort with known truth, made from the real cervical T2 of the repository.

Per subject (template ``Testing/Data/cervical_t2_sag/t2.nii.gz``, 1 mm, LPS): a lesion planted in
template space (:mod:`.lesions`; it sits at the upper axis, the highest craniocervical part the
template holds); a rigid jitter + B-spline deformation mapping the subject grid into the template,
applied to image and soft mask alike (the mask stays truthful); a random standard sagittal DICOM
grid (AP 200-250 mm, SI 150-180 mm, 36-44 slices of 1 mm, in-plane 0.90-1.10 mm); gain, gamma,
smooth bias and Rician noise, stored as unsigned 16 bit.

Cohort roles in exact (rounded) counts: ``intermediate``, ``baseline_deformity``,
``short_followup`` (< 1000 days) and ``included``, of which round(prevalence * n_included) are
positive. Deterministic: a subject draws from ``default_rng([seed, index])``, the plan from
``default_rng([seed])``; UIDs hash (seed, patient, series).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ...atomic import atomic_path, write_json, write_text
from ...errors import InputError
from ...geometry import Grid, voxel_center
from ...montage import save_montage
from ...paths import safe_child
from .dicom_writer import SeriesHeader, deterministic_uid, read_series, write_series
from .lesions import AXIS_BODY_CENTRE, TEMPLATE_MIDLINE_X, TEMPLATE_TOP_Z, LesionSpec, plant_lesions, sample_lesions
from .slices import SliceParams, select_slices

GENERATOR_VERSION = "1"
# Repository checkout: RheumAI/Logic/rheumai/tasks/cervical_ra/synth.py -> repo root is parents[5].
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[5] / "Testing" / "Data" / "cervical_t2_sag" / "t2.nii.gz"
# Standard sagittal DICOM grid: i -> posterior (+y), j -> inferior (-z), k -> right (-x); row-major.
SAGITTAL_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
STORE_SCALE = 2.0  # stored value = 2 x template-scaled signal (uses ~12 bits)
LESION_MIXES = (("pannus",), ("pannus", "erosion"), ("erosion",))
ROLES = ("included", "intermediate", "baseline_deformity", "short_followup")
# Allowed range of each scalar CohortParams field.
RANGES = {**dict.fromkeys(("prevalence", "p_intermediate", "p_baseline_deformity", "p_short_followup",
                           "p_followup_series", "p_axial_distractor"), (0.0, 1.0)),
          "lesion_scale": (0.3, 3.0)}


@dataclass(frozen=True)
class CohortParams:
    """All knobs of the generator (rates: fractions of ``n_subjects``, rounded to counts).

    lesion_mix: weights of (pannus, pannus + erosion, erosion) for a positive; deform_mm: std of the
    B-spline displacements (LR gets 40 %); noise: Rician std range as a fraction of the template's
    99th percentile; lesion_scale, pannus_level: see :func:`.lesions.sample_lesions`.
    """

    n_subjects: int = 60
    prevalence: float = 0.15
    seed: int = 0
    p_intermediate: float = 0.05
    p_baseline_deformity: float = 0.03
    p_short_followup: float = 0.07
    p_followup_series: float = 0.5
    p_axial_distractor: float = 0.5
    lesion_mix: tuple[float, float, float] = (0.5, 0.35, 0.15)
    sites: tuple[str, ...] = ("A", "B", "C")
    deform_mm: float = 2.5
    noise: tuple[float, float] = (0.01, 0.025)
    lesion_scale: float = 1.0
    pannus_level: tuple[float, float] = (0.42, 0.58)

    def __post_init__(self) -> None:
        for name in ("lesion_mix", "sites", "noise", "pannus_level"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1, got {self.n_subjects}")
        for name, (lo, hi) in RANGES.items():
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be within [{lo:g}, {hi:g}], got {getattr(self, name)}")
        if self.p_intermediate + self.p_baseline_deformity + self.p_short_followup >= 1.0:
            raise ValueError("the exclusion rates (intermediate, baseline deformity, short follow-up) sum to >= 1")
        if len(self.lesion_mix) != 3 or min(self.lesion_mix) < 0 or sum(self.lesion_mix) <= 0:
            raise ValueError(f"lesion_mix must be 3 non-negative weights, got {self.lesion_mix}")
        if not self.sites:
            raise ValueError("sites must not be empty")
        if len(self.pannus_level) != 2 or not 0 < self.pannus_level[0] <= self.pannus_level[1] <= 1.5:
            raise ValueError(f"pannus_level must be (low, high) with 0 < low <= high <= 1.5, got {self.pannus_level}")


@dataclass(frozen=True)
class SubjectPlan:
    """What one subject is (drawn up front, before any image is made). Dates are ISO strings."""

    index: int
    patient_id: str
    role: str
    outcome: str  # yes | no | intermediate
    baseline_deformity: bool
    lesion_kinds: tuple[str, ...]  # () for no lesion
    small_lesion: bool
    site: str
    baseline_date: str
    followup_date: str
    age: int
    sex: str
    disease_duration_years: float
    rf_positive: bool
    followup_series: bool
    axial_distractor: bool

    @property
    def label(self) -> int | None:
        return {"yes": 1, "no": 0}.get(self.outcome)

    def uid(self, seed: int, *what: object) -> str:
        return deterministic_uid("rheumai-synth", GENERATOR_VERSION, seed, self.patient_id, *what)


@dataclass
class SubjectVolumes:
    """Generated images of one subject (stored-value scale) and its truth."""

    plan: SubjectPlan
    t2: sitk.Image  # float32, baseline sagittal T2 (LPS)
    mask: sitk.Image  # uint8, same grid as t2: 1 inside the planted lesion
    t1: sitk.Image  # distractor sagittal T1 (3 mm slices)
    t2_axial: sitk.Image | None
    t2_followup: sitk.Image | None


@dataclass
class CohortInfo:
    """What :func:`generate_cohort` wrote."""

    out_dir: Path
    dicom_dir: Path
    labels_csv: Path
    truth_csv: Path
    masks_dir: Path
    params: CohortParams
    plans: list[SubjectPlan]
    truth: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        inc = [p.outcome for p in self.plans if p.role == "included"]
        return (f"{len(self.plans)} subjects, {len(inc)} included ({inc.count('yes')} positive), "
                f"labels {self.labels_csv}, truth {self.truth_csv}")


def plan_cohort(params: CohortParams) -> list[SubjectPlan]:
    """Draw every subject's role, outcome, lesion kinds, dates, site and clinical values."""
    rng = np.random.default_rng([params.seed])
    n = params.n_subjects
    counts = {r: int(round(getattr(params, "p_" + r) * n)) for r in ROLES[1:]}
    while sum(counts.values()) >= n:  # keep at least one included subject
        counts[max(counts, key=counts.get)] -= 1
    counts["included"] = n - sum(counts.values())
    roles = np.repeat(ROLES, [counts[r] for r in ROLES])[rng.permutation(n)]
    included = np.flatnonzero(roles == "included")
    n_pos = int(round(params.prevalence * len(included)))
    if params.prevalence > 0 and len(included) >= 2:
        n_pos = min(max(n_pos, 1), len(included) - 1)
    positives = set(rng.choice(included, size=n_pos, replace=False).tolist()) if n_pos else set()
    mix = np.array(params.lesion_mix, float) / sum(params.lesion_mix)
    plans = []
    start = dt.date(2006, 1, 1)
    for i in range(n):
        role = str(roles[i])
        # a short follow-up draws its outcome at the prevalence; the other roles fix it
        outcome = ({"included": "yes" if i in positives else "no", "intermediate": "intermediate",
                    "baseline_deformity": "yes"}.get(role)
                   or ("yes" if rng.random() < params.prevalence else "no"))
        pos_like = outcome != "no"
        kinds = LESION_MIXES[int(rng.choice(3, p=mix))] if pos_like else ()
        baseline = start + dt.timedelta(days=int(rng.integers(0, 2500)))
        fu_days = (250, 950) if role == "short_followup" else (1100, 2600)
        followup = baseline + dt.timedelta(days=int(rng.integers(*fu_days)))
        plans.append(SubjectPlan(
            index=i,
            patient_id=f"SYN{i + 1:04d}",
            role=role,
            outcome=outcome,
            baseline_deformity=role == "baseline_deformity",
            lesion_kinds=kinds,
            small_lesion=role == "intermediate",
            site=str(params.sites[int(rng.integers(len(params.sites)))]),
            baseline_date=baseline.isoformat(),
            followup_date=followup.isoformat(),
            age=int(np.clip(rng.normal(57, 12), 25, 85)),
            sex="F" if rng.random() < 0.7 else "M",
            disease_duration_years=round(float(rng.gamma(2.0, 3.0 if pos_like else 2.5)), 1),
            rf_positive=bool(rng.random() < (0.75 if pos_like else 0.55)),
            followup_series=bool(rng.random() < params.p_followup_series),
            axial_distractor=bool(rng.random() < params.p_axial_distractor),
        ))
    return plans


@dataclass
class Template:
    """The real T2 (float32, LPS) and its 99th intensity percentile (signal reference)."""

    image: sitk.Image
    ref: float
    path: Path


def load_template(path: str | Path | None = None) -> Template:
    """Read the template T2; raises InputError naming the file if it is missing or not 3D."""
    path = Path(path) if path is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise InputError(path, "template T2 not found (the real cervical T2 of Testing/Data; pass --template)")
    try:
        img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(path, f"cannot read the template image: {exc}") from exc
    if img.GetDimension() != 3:
        raise InputError(path, f"template must be a 3D image, got {img.GetDimension()}D")
    ijk = np.array(img.TransformPhysicalPointToContinuousIndex(AXIS_BODY_CENTRE))
    if not np.all((ijk > 0) & (ijk < np.array(img.GetSize()) - 1)):
        raise InputError(path, "template does not hold the craniocervical landmark "
                               f"{AXIS_BODY_CENTRE} (LPS mm): not the expected cervical T2")
    arr = sitk.GetArrayViewFromImage(img)
    ref = float(np.percentile(arr[arr > 0], 99))
    return Template(img, ref, path)


def _subject_grid(rng: np.random.Generator) -> sitk.Image:
    """Random sagittal field of view (see module docstring); origin / spacing rounded to 0.01 mm."""
    s = round(float(rng.uniform(0.9, 1.1)), 2)
    n_lr = int(rng.integers(36, 45))
    x_c = TEMPLATE_MIDLINE_X + float(rng.uniform(-1.5, 1.5))
    width_ap, height_si = rng.uniform(200, 250), rng.uniform(150, 180)
    y_c = float(rng.uniform(-22, 2))
    z_top = TEMPLATE_TOP_Z - float(rng.uniform(1.0, 2.5))
    n_ap, n_si = int(round(width_ap / s)), int(round(height_si / s))
    origin = (round(x_c + (n_lr - 1) / 2, 2), round(y_c - width_ap / 2, 2), round(z_top, 2))
    grid = Grid.from_dict({"origin": origin, "direction": np.reshape(SAGITTAL_DIRECTION, (3, 3)),
                           "spacing": (s, s, 1.0), "size": (n_ap, n_si, n_lr)})
    return grid.reference_image(sitk.sitkUInt8)


def _random_transform(rng: np.random.Generator, template: sitk.Image, grid: sitk.Image,
                      deform_mm: float) -> sitk.Transform:
    """Subject -> template transform: rigid jitter + B-spline, baked into a dense 4 mm displacement
    field (resampling ~6x faster than evaluating the B-spline per voxel); image and mask share it."""
    eu = sitk.Euler3DTransform()
    eu.SetCenter(AXIS_BODY_CENTRE)
    ang = [np.clip(rng.normal(0, 2.0), -4, 4), np.clip(rng.normal(0, 1.5), -3, 3), np.clip(rng.normal(0, 1.5), -3, 3)]
    eu.SetRotation(*[float(np.deg2rad(a)) for a in ang])
    eu.SetTranslation([float(np.clip(rng.normal(0, 0.5), -1, 1)), float(np.clip(rng.normal(0, 2), -4, 4)),
                       float(np.clip(rng.normal(0, 1.5), -2.5, 2.5))])
    bs = sitk.BSplineTransformInitializer(template, [2, 6, 4])  # template axes (AP, SI, LR) mesh
    n = bs.GetNumberOfParameters() // 3
    scale = np.array([0.4, 1.0, 1.0])[:, None] * deform_mm  # LPS x (LR) kept small: slab stays put
    bs.SetParameters((rng.standard_normal((3, n)) * scale).ravel().tolist())
    step = 4.0
    size = [int(np.ceil(sz * sp / step)) + 3 for sz, sp in zip(grid.GetSize(), grid.GetSpacing())]
    origin = np.array(grid.GetOrigin()) - np.array(grid.GetDirection()).reshape(3, 3) @ np.full(3, step)
    field = sitk.TransformToDisplacementField(sitk.CompositeTransform([eu, bs]), sitk.sitkVectorFloat64, size,
                                              origin.tolist(), [step] * 3, grid.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], amp: float = 0.15) -> np.ndarray:
    """Smooth multiplicative bias (k, j, i): exp of a random 2nd-order polynomial on [-1, 1]^3."""
    w, v, u = (np.linspace(-1, 1, n).astype(np.float32) for n in shape)
    w, v, u = w[:, None, None], v[None, :, None], u[None, None, :]
    c = rng.normal(0, amp, 6).astype(np.float32)
    return np.exp(c[0] * u + c[1] * v + c[2] * w * 0.3 + c[3] * (u * u - 0.33) + c[4] * (v * v - 0.33) + c[5] * u * v)


def _mri_intensity(rng: np.random.Generator, arr: np.ndarray, ref: float, params: CohortParams,
                   gain: float, gamma: float, bias: np.ndarray | float) -> np.ndarray:
    """gain * ref * (arr / ref) ** gamma * bias, plus Rician noise; returned in stored units."""
    sig = ref * gain * np.clip(arr / ref, 0, None) ** gamma * bias
    sigma = ref * gain * float(rng.uniform(*params.noise))
    n1, n2 = rng.standard_normal((2, *arr.shape), dtype=np.float32)
    out = np.sqrt((sig + sigma * n1) ** 2 + (sigma * n2) ** 2)  # Rician magnitude
    return (out * STORE_SCALE).astype(np.float32)


def _image(arr: np.ndarray, like: sitk.Image, first_k: int = 0, k_step: float | None = None) -> sitk.Image:
    """``arr`` (k, j, i) on ``like``'s grid from its slice ``first_k``; ``k_step``: other slice step (mm)."""
    img = sitk.GetImageFromArray(arr)
    sp = like.GetSpacing()
    img.SetSpacing((sp[0], sp[1], sp[2] if k_step is None else k_step))
    img.SetDirection(like.GetDirection())
    img.SetOrigin(like.TransformIndexToPhysicalPoint((0, 0, int(first_k))))
    return img


def _lesions(rng: np.random.Generator, plan: SubjectPlan, params: CohortParams) -> list[LesionSpec]:
    return sample_lesions(rng, plan.lesion_kinds, small=plan.small_lesion, scale=params.lesion_scale,
                          pannus_level=params.pannus_level)


def synthesize_subject(template: Template, plan: SubjectPlan, params: CohortParams,
                       plant: bool = True) -> SubjectVolumes:
    """Make the images and truth mask of one subject (pure function of template, plan, params).

    ``plant=False`` gives the counterfactual: the same subject (same random draws, deformation,
    field of view, intensities, noise) with the lesion drawn and its mask kept but not painted in.
    """
    rng = np.random.default_rng([params.seed, plan.index])
    lesions = _lesions(rng, plan, params)
    src, soft = plant_lesions(template.image, lesions, rng)
    if not plant:
        src = template.image
    grid = _subject_grid(rng)
    tfm = _random_transform(rng, template.image, grid, params.deform_mm)
    clean = sitk.Resample(src, grid, tfm, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # uint8; without a lesion the (all-zero uint8) grid image itself
    mask = sitk.Resample(soft, grid, tfm, sitk.sitkLinear, 0.0, sitk.sitkFloat32) >= 0.5 if lesions else grid
    arr = sitk.GetArrayFromImage(clean)
    gain, gamma = float(rng.uniform(0.7, 1.4)), float(rng.uniform(0.85, 1.2))
    bias = _bias_field(rng, arr.shape)
    t2 = _image(_mri_intensity(rng, arr, template.ref, params, gain, gamma, bias), grid)

    # Distractor: sagittal T1, every third slice (3 mm) around the centre, same in-plane grid.
    n_lr = arr.shape[0]
    ks = np.arange((n_lr - 1) // 2 % 3, n_lr, 3)
    v = np.clip(arr[ks] / template.ref, 0, None)  # crude T1 look: fluid dark, soft tissue / marrow mid-grey
    t1_arr = template.ref * 2.2 * v * np.exp(-1.8 * v)
    t1 = _image(_mri_intensity(rng, t1_arr, template.ref, params, gain, 1.0, bias[ks]), grid,
                first_k=int(ks[0]), k_step=3.0 * grid.GetSpacing()[2])

    t2_ax = None
    if plan.axial_distractor:
        ax = sitk.Image([128, 128, 8], sitk.sitkFloat32)  # identity direction: axial
        ax.SetSpacing((1.0, 1.0, 5.0))
        x0 = grid.GetOrigin()[0] - (n_lr - 1) / 2
        ax.SetOrigin((round(x0 - 63.5, 2), round(AXIS_BODY_CENTRE[1] - 50, 2), round(AXIS_BODY_CENTRE[2] - 45, 2)))
        ax_arr = sitk.GetArrayFromImage(sitk.Resample(clean, ax, sitk.Transform(), sitk.sitkLinear, 0.0))
        t2_ax = _image(_mri_intensity(rng, ax_arr, template.ref, params, gain, gamma, 1.0), ax)

    t2_fu = None
    if plan.followup_series:
        lo = max(n_lr // 2 - 8, 0)
        fu_arr = arr[lo:lo + 16]
        t2_fu = _image(_mri_intensity(rng, fu_arr, template.ref, params, float(rng.uniform(0.7, 1.4)),
                                      float(rng.uniform(0.85, 1.2)), bias[lo:lo + 16]), grid, first_k=lo)
    return SubjectVolumes(plan, t2, mask, t1, t2_ax, t2_fu)


def mask_truth(mask: sitk.Image) -> dict:
    """Centre (LPS mm, mean of the mask's voxel centres) and volume (mm^3) of a binary mask."""
    kji = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    keys = [f"lesion_centre_lps_{a}" for a in "xyz"]
    if len(kji) == 0:
        return {**dict.fromkeys(keys, ""), "lesion_volume_mm3": 0.0}
    c = mask.TransformContinuousIndexToPhysicalPoint(kji[:, ::-1].mean(0).tolist())
    vol = len(kji) * float(np.prod(np.asarray(mask.GetSpacing(), np.float32)))  # as stored in NIfTI (float32)
    return {**{k: round(v, 2) for k, v in zip(keys, c)}, "lesion_volume_mm3": round(vol, 1)}


def baseline_t2_series_uid(plan: SubjectPlan, seed: int) -> str:
    """SeriesInstanceUID of the baseline sagittal T2 (the series the dataset builder should pick)."""
    return plan.uid(seed, "baseline", 2)


def write_subject(vols: SubjectVolumes, out_dir: Path, seed: int) -> None:
    """Write one subject's DICOM studies, then (last, as the completion marker) its mask."""
    plan = vols.plan
    pdir = out_dir / "dicom" / plan.patient_id
    if pdir.exists():
        shutil.rmtree(pdir)  # a half-written earlier attempt (its mask is missing)
    birth = dt.date.fromisoformat(plan.baseline_date) - dt.timedelta(days=int(plan.age * 365.25 + 100))
    for image, st, number, description in ((vols.t1, 1, 1, "T1 SAG"), (vols.t2, 1, 2, "T2 SAG"),
                                           (vols.t2_axial, 1, 3, "T2 AX"),
                                           (vols.t2_followup, 2, 1, "T2 SAG")):
        if image is None:
            continue
        study = ("baseline", "followup")[st - 1]
        date = dt.date.fromisoformat((plan.baseline_date, plan.followup_date)[st - 1])
        header = SeriesHeader(plan.patient_id, plan.uid(seed, study), plan.uid(seed, study, number),
                              plan.uid(seed, study, "frame"), date, number, description, description[:2],
                              accession_number=f"{plan.index + 1:04d}{st}{seed % 1000:03d}",
                              patient_sex=plan.sex,
                              patient_age_years=(date - birth).days // 365, birth_date=birth,
                              institution=f"Site {plan.site}")
        write_series(image, pdir / f"ST{st}" / f"SE{number}", header)
    with atomic_path(out_dir / "masks" / f"{plan.patient_id}.nii.gz") as tmp:
        sitk.WriteImage(vols.mask, str(tmp), useCompression=True)


LABEL_COLUMNS = ["patient_id", "baseline_date", "followup_date", "outcome", "baseline_deformity", "site",
                 "age", "sex", "disease_duration_years", "rf_positive"]
TRUTH_COLUMNS = ["patient_id", "label", "outcome", "role", "lesion_type", "lesion_centre_lps_x",
                 "lesion_centre_lps_y", "lesion_centre_lps_z", "lesion_volume_mm3", "baseline_t2_series_uid"]


def label_row(plan: SubjectPlan) -> dict:
    """The label sheet's row: the plan's fields, booleans as yes / no."""
    values = {c: getattr(plan, c) for c in LABEL_COLUMNS}
    return {c: ("yes" if v else "no") if isinstance(v, bool) else v for c, v in values.items()}


def _generate_chunk(template_path: str | Path | None, plans: list[SubjectPlan], params: CohortParams,
                    out_dir: Path) -> int:
    """Synthesise and write ``plans`` (a worker's share); returns how many."""
    template = load_template(template_path)
    for plan in plans:
        write_subject(synthesize_subject(template, plan, params), out_dir, params.seed)
    return len(plans)


def _generate(template_path: str | Path | None, todo: list[SubjectPlan], params: CohortParams, out_dir: Path,
              workers: int, progress: bool, should_stop: Callable[[], bool] | None) -> None:
    """Write the ``todo`` subjects, in chunks of a few subjects, in ``workers`` spawned processes when
    > 1 (the same files: every subject is a pure function of (seed, index)); polls ``should_stop``
    before the first chunk and after each."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    size = 1 if workers <= 1 else max(1, min(8, -(-len(todo) // (workers * 3))))
    jobs = [(template_path, todo[i:i + size], params, out_dir) for i in range(0, len(todo), size)]
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else nullcontext()
    with tqdm(total=len(todo), desc="synth cohort", unit="subject", disable=not progress) as bar, pool as ex:
        futures = [ex.submit(_generate_chunk, *j) for j in jobs] if ex else []
        done = (f.result() for f in as_completed(futures)) if ex else (_generate_chunk(*j) for j in jobs)
        for n in itertools.chain([0], done):
            bar.update(n)
            if should_stop is not None and should_stop():
                if ex:
                    ex.shutdown(cancel_futures=True)
                raise KeyboardInterrupt


def generate_cohort(out_dir: str | Path, n: int = 60, prevalence: float = 0.15, seed: int = 0,
                    template_path: str | Path | None = None, progress: bool = True,
                    should_stop: Callable[[], bool] | None = None, workers: int = 1, preview: int = 0,
                    **options) -> CohortInfo:
    """Generate the cohort into ``out_dir`` (resumable) and return what was written.

    Writes ``dicom/<patient>/ST1|ST2/SE<n>/IM<nnnn>.dcm``, ``labels.csv`` (the label sheet),
    ``masks/<patient>.nii.gz`` (uint8 lesion mask on the baseline T2 SAG grid, empty without a
    lesion), ``truth.csv`` / ``truth.json`` (per-patient truth; the JSON adds the template-space
    lesion specs) and ``cohort.json`` (parameters). ``options``: the other :class:`CohortParams`
    fields. A subject whose mask exists is kept; other parameters in an existing ``cohort.json``
    are an error. ``workers`` > 1: that many processes (identical files); ``preview``: PNGs of the
    first N subjects with a lesion in ``preview/`` (:func:`save_cohort_subject_png`).
    """
    params = CohortParams(n_subjects=n, prevalence=prevalence, seed=seed, **options)
    out = Path(out_dir)
    template = load_template(template_path)
    record = {"generator": "rheumai.synth.cervical", "version": GENERATOR_VERSION,
              "params": json.loads(json.dumps(asdict(params))), "template": template.path.name}
    cfile = out / "cohort.json"
    if cfile.exists():
        try:
            old = json.loads(cfile.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(cfile, f"unreadable cohort record: {exc}") from exc
        if old.get("params") != record["params"] or old.get("version") != GENERATOR_VERSION:
            raise InputError(cfile, "the folder holds a cohort made with other parameters; "
                                    "choose a new --out folder or delete this one")
    out.mkdir(parents=True, exist_ok=True)
    write_json(cfile, record)
    plans = plan_cohort(params)
    todo = [p for p in plans if not (out / "masks" / f"{p.patient_id}.nii.gz").exists()]
    _generate(template_path, todo, params, out, workers, progress, should_stop)
    truth, details = [], []
    for plan in plans:
        mask = sitk.ReadImage(str(out / "masks" / f"{plan.patient_id}.nii.gz"))
        # the lesion specs are the subject's first draws: a pure function of (seed, index)
        lesions = [asdict(les) for les in _lesions(np.random.default_rng([seed, plan.index]), plan, params)]
        row = {"patient_id": plan.patient_id, "label": "" if plan.label is None else plan.label,
               "outcome": plan.outcome, "role": plan.role,
               "lesion_type": "+".join(plan.lesion_kinds) if plan.lesion_kinds else "none",
               **mask_truth(mask), "baseline_t2_series_uid": baseline_t2_series_uid(plan, seed)}
        truth.append(row)
        details.append({**row, "plan": asdict(plan), "lesions_template_lps": lesions})
    labels = pd.DataFrame(map(label_row, plans), columns=LABEL_COLUMNS)
    write_text(out / "labels.csv", labels.to_csv(index=False))
    write_text(out / "truth.csv", pd.DataFrame(truth, columns=TRUTH_COLUMNS).to_csv(index=False))
    write_json(out / "truth.json", {"subjects": details})
    for pid in [r["patient_id"] for r in truth if r["lesion_type"] != "none"][:max(preview, 0)]:
        save_cohort_subject_png(out, pid, safe_child(out / "preview", pid, ".png", what="patient ID"), 90)
    return CohortInfo(out, out / "dicom", out / "labels.csv", out / "truth.csv", out / "masks", params, plans, truth)


def subject_series_dir(out_dir: str | Path, patient_id: str) -> Path:
    """Folder of a generated patient's baseline sagittal T2 series."""
    return Path(out_dir) / "dicom" / patient_id / "ST1" / "SE2"


def mid_sagittal(image: sitk.Image, n_slices: int = 6, spacing_mm: float = 1.0, size_mm: float | None = None,
                 centre_yz: tuple[float, float] | None = None) -> np.ndarray:
    """(C, H, W) middle sagittal slices (C right -> left, H superior -> inferior, W anterior ->
    posterior), :func:`.slices.select_slices` on a pure-LPS grid at ``spacing_mm``, not normalised.
    ``size_mm``: in-plane field of view (default the image's); ``centre_yz``: in-plane centre (LPS
    y, z in mm) instead of the volume centre."""
    centre = voxel_center(image)
    if centre_yz is not None:
        centre[1:] = centre_yz
    ext = np.abs(np.array(image.GetDirection()).reshape(3, 3) @ (np.array(image.GetSize()) * image.GetSpacing()))
    size = (round((size_mm or ext[2]) / spacing_mm), round((size_mm or ext[1]) / spacing_mm))
    params = SliceParams(n_slices, spacing_mm, size, tuple(centre), frame="patient", norm="none")
    return select_slices(image, params).array


def save_cohort_subject_png(cohort_dir: str | Path, patient_id: str, png: str | Path,
                            size_mm: float | None = None) -> Path:
    """Montage of a generated patient's 6 middle sagittal baseline T2 slices (1 mm, percentile-windowed),
    mask outlined in cyan; ``size_mm``: in-plane view (mm) centred on the mask's centroid."""
    series = subject_series_dir(cohort_dir, patient_id)
    mpath = Path(cohort_dir) / "masks" / f"{patient_id}.nii.gz"
    if not series.is_dir() or not mpath.is_file():
        raise InputError(series if not series.is_dir() else mpath, f"no generated subject {patient_id} here")
    image, mask = read_series(series), sitk.ReadImage(str(mpath))
    t = mask_truth(mask)
    zoom = size_mm is not None and t["lesion_volume_mm3"]
    centre_yz = (t["lesion_centre_lps_y"], t["lesion_centre_lps_z"]) if zoom else None
    sl = mid_sagittal(image, 6, 1.0, size_mm, centre_yz)
    lo, hi = np.percentile(sl, [1, 99])
    sl = np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1)
    contour = mid_sagittal(mask, 6, 1.0, size_mm, centre_yz) >= 0.5
    titles = [f"x{c - 2.5:+.1f} mm" for c in range(6)]  # slice offsets from the centre
    return save_montage(png, sl, contour=contour, suptitle=patient_id, titles=titles)
