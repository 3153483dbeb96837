"""Generated NegSpA cohort with known truth: three co-registered MRI series per subject.

An analytic pelvis in LPS mm (coronal cross-section: sacrum, the two sacroiliac clefts as thin
bands, iliac bones lateral, soft tissue around), tilted and warped per subject; each series samples
the same phantom on its own grid (co-registered, stored in different geometries): ``t1`` oblique
coronal (tilted about LPS x like the sacrum), in-plane ``spacing``; ``t2`` axial, 1.25 x ``spacing``;
``stir`` oblique coronal, 1.5 x ``spacing``; 4 mm slices. Signal per sequence follows the usual
contrast (marrow bright on T1, dark on STIR; fluid bright on T2 / STIR; oedema dark on T1, bright on
STIR). Positives carry one or two oedema ellipsoids in subchondral bone next to a joint (truth mask
on the STIR grid); clinical features have label-dependent prevalences, ~10 % left empty.

Writes ``<id>/t1.nii.gz, t2.nii.gz, stir.nii.gz, box.json, truth_oedema.nii.gz``, ``cohort.csv``
(patient_id, label, split, paths relative to out_dir, oedema side) and ``clinical.csv``.
Deterministic per ``seed``; complete subjects are kept, and a resumed run equals a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from ...atomic import atomic_path, write_json, write_text
from ...errors import InputError
from ...geometry import Grid, image_from_array
from .clinical import BINARY

# Tissue classes and their signal per sequence (arbitrary MR units).
BG, SOFT, BONE, CLEFT, OEDEMA = range(5)
SIGNAL = {"t1": [0.0, 300.0, 620.0, 140.0, 260.0],
          "t2": [0.0, 260.0, 380.0, 720.0, 560.0],
          "stir": [0.0, 190.0, 90.0, 620.0, 760.0]}
SLICE_MM = 4.0
FOV_MM = (200.0, 150.0, 140.0)  # LR, AP, SI extent of every series (mm)
# Clinical feature prevalence (positive, negative).
PREVALENCE = {"inflammatory_back_pain": (0.85, 0.35), "arthritis": (0.35, 0.12), "uveitis": (0.15, 0.03),
              "heel_enthesitis": (0.3, 0.08), "dactylitis": (0.1, 0.03), "psoriasis": (0.12, 0.05),
              "ibd": (0.1, 0.03), "nsaid_response": (0.75, 0.3), "family_history": (0.3, 0.08)}


@dataclass
class Subject:
    """Anatomy of one phantom (LPS mm)."""

    centre: np.ndarray  # pelvis centre
    tilt_rad: float  # sacral tilt about the LPS x axis
    sacrum_half_width: float  # mm at the centre height
    cleft_mm: float
    warp_mm: float
    warp_phase: float
    lesions: list[tuple[np.ndarray, np.ndarray]]  # (centre offset in the pelvis frame, radii)


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], float)


def tissue(points: np.ndarray, sub: Subject) -> np.ndarray:
    """Tissue class (int8) at (N, 3) LPS points."""
    p = (points - sub.centre) @ _rot_x(sub.tilt_rad)  # pelvis frame: x LR, y AP, z SI (LPS axes)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    x = x + sub.warp_mm * np.sin(z / 18.0 + sub.warp_phase)  # smooth deformation
    out = np.zeros(len(p), np.int8)
    out[(x / 95.0) ** 2 + (y / 70.0) ** 2 <= 1.0] = SOFT
    in_slab = (np.abs(z) <= 50.0) & (np.abs(y) <= 28.0)
    ws = sub.sacrum_half_width + 0.22 * z  # sacrum widens superiorly (LPS +z = superior)
    ax = np.abs(x)
    out[in_slab & (ax < ws)] = BONE
    out[in_slab & (ax >= ws) & (ax < ws + sub.cleft_mm)] = CLEFT
    out[in_slab & (ax >= ws + sub.cleft_mm) & (ax < ws + sub.cleft_mm + 42.0)] = BONE
    for c, r in sub.lesions:
        inside = (((p - c) / r) ** 2).sum(axis=1) <= 1.0
        out[inside & (out == BONE)] = OEDEMA
    return out


def _series_grid(kind: str, centre: np.ndarray, spacing: float, tilt: float) -> Grid:
    if kind == "axial":
        d, fov = np.eye(3), np.array(FOV_MM)  # i: R->L, j: A->P, k: I->S
    else:  # oblique coronal: i R->L, j S->I, k A->P, tilted about x
        c, s = np.cos(tilt), np.sin(tilt)
        d = np.array([[1, 0, 0], [0, s, c], [0, -c, s]], float)
        fov = np.array(FOV_MM)[[0, 2, 1]]
    sp = np.array([spacing, spacing, SLICE_MM])
    size = np.maximum(np.round(fov / sp).astype(int), 4)
    origin = centre - d @ (sp * (size - 1) / 2)
    return Grid.from_dict({"origin": origin, "direction": d, "spacing": sp, "size": size})


def _points(grid: Grid) -> np.ndarray:
    """(N, 3) LPS points of the voxel centres, in (k, j, i) array order."""
    return grid.index_to_physical(np.indices(grid.size[::-1]).reshape(3, -1)[::-1].T)


def make_subject(rng: np.random.Generator, positive: bool) -> tuple[Subject, str]:
    ws = float(rng.uniform(30, 38))
    sub = Subject(centre=rng.normal(0, 4, 3), tilt_rad=float(np.radians(rng.uniform(10, 25))),
                  sacrum_half_width=ws, cleft_mm=float(rng.uniform(2.5, 4.0)),
                  warp_mm=float(rng.uniform(0, 3)), warp_phase=float(rng.uniform(0, 2 * np.pi)), lesions=[])
    side = "none"
    if positive:
        side = str(rng.choice(["right", "left", "both"]))
        for sgn, name in ((-1.0, "right"), (1.0, "left")):
            if side in (name, "both"):
                z = float(rng.uniform(-30, 30))
                wz = ws + 0.22 * z
                lateral = bool(rng.integers(2))  # iliac (lateral) or sacral (medial) side of the cleft
                x = sgn * (wz + 3 + 8.0 if lateral else wz - 8.0)
                sub.lesions.append((np.array([x, rng.uniform(-12, 12), z]),
                                    np.array([rng.uniform(6, 9), rng.uniform(7, 11), rng.uniform(8, 12)])))
    return sub, side


def clinical_row(rng: np.random.Generator, positive: bool, missing_rate: float = 0.1) -> dict[str, str]:
    """Raw clinical values (strings; empty = missing), prevalences depending on the label."""
    col = 0 if positive else 1
    row: dict[str, str] = {n: ("yes" if rng.random() < PREVALENCE[n][col] else "no") for n, _ in BINARY}
    row["crp"] = f"{float(np.exp(rng.normal(2.6 if positive else 1.2, 0.8))):.1f}"
    row["age"] = f"{float(np.clip(rng.normal(31 if positive else 36, 8), 16, 70)):.0f}"
    row["sex"] = "M" if rng.random() < (0.6 if positive else 0.45) else "F"
    row["disease_duration"] = f"{float(np.clip(rng.gamma(2.0, 18 if positive else 12), 3, 400)):.0f}"
    return {k: "" if rng.random() < missing_rate else v for k, v in row.items()}


def _write(img: sitk.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def make_cohort(out_dir: str | Path, n: int = 24, seed: int = 0, spacing: float = 1.0,
                split: tuple[float, float, float] = (0.6, 0.2, 0.2), noise: float = 0.04,
                show_progress: bool = True) -> Path:
    """Write ``n`` subjects (half positive) and return the path of ``cohort.csv``.

    spacing: T1 in-plane step (mm); T2 and STIR use 1.25x and 1.5x. Larger = smaller files (tests
    use 3-4 mm). split: train/val/test fractions, stratified by label, assigned deterministically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % 2
    np.random.default_rng(seed).shuffle(labels)
    splits = np.empty(n, dtype=object)
    for lab in (0, 1):
        idx = np.flatnonzero(labels == lab)
        n_tr, n_va = (int(round(f * len(idx))) for f in split[:2])
        for name, part in zip(("train", "val", "test"), np.split(idx, [n_tr, n_tr + n_va])):
            splits[part] = name
    rows, clin = [], []
    for i in tqdm(range(n), desc="negspa synth", disable=not show_progress):
        pid = f"SPA{i:04d}"
        rng = np.random.default_rng([seed, i])
        positive = bool(labels[i])
        sub, side = make_subject(rng, positive)
        files = {**{r: out / pid / f"{r}.nii.gz" for r in ("t1", "t2", "stir")},
                 "box": out / pid / "box.json", "truth": out / pid / "truth_oedema.nii.gz"}
        grids = {"t1": _series_grid("coronal", sub.centre, spacing, sub.tilt_rad),
                 "t2": _series_grid("axial", sub.centre, spacing * 1.25, 0.0),
                 "stir": _series_grid("coronal", sub.centre, spacing * 1.5, sub.tilt_rad)}
        done = all(f.is_file() for f in files.values())
        for role, grid in grids.items():  # same draws whether or not files exist
            gain, jitter = float(rng.uniform(0.8, 1.2)), rng.normal(0, noise * 500.0, tuple(grid.size[::-1]))
            if not done:
                t = tissue(_points(grid), sub).reshape(grid.size[::-1])
                sig = np.asarray(SIGNAL[role], np.float32)[t] * gain + jitter.astype(np.float32)
                _write(image_from_array(np.maximum(sig, 0).astype(np.float32), grid), files[role])
                if role == "stir":
                    _write(image_from_array((t == OEDEMA).astype(np.uint8), grid), files["truth"])
        c = sub.centre + rng.normal(0, 2, 3)
        if not done:
            half = np.array([sub.sacrum_half_width + 56.0, 34.0, 55.0])  # both joints + margin; LR, AP, SI mm
            write_json(files["box"], {"min_lps": list(c - half), "max_lps": list(c + half),
                                      "coordinate_system": "LPS", "unit": "mm",
                                      "description": "box around both sacroiliac joints"})
        rows.append({"patient_id": pid, "label": int(positive), "split": splits[i],
                     **{r: str(f.relative_to(out)) for r, f in files.items()}, "oedema_side": side})
        clin.append({"patient_id": pid, **clinical_row(rng, positive)})
    write_text(out / "clinical.csv", pd.DataFrame(clin).to_csv(index=False))
    write_json(out / "synth.json", {"n": n, "seed": seed, "spacing_mm": spacing, "noise": noise,
                                    "signal": SIGNAL, "fov_mm": FOV_MM, "slice_mm": SLICE_MM})
    return write_text(out / "cohort.csv", pd.DataFrame(rows).to_csv(index=False))


def read_cohort(path: str | Path) -> pd.DataFrame:
    """cohort.csv with the image / box paths made absolute (relative to the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "cohort CSV not found")
    df = pd.read_csv(path, dtype={"patient_id": str})
    need = ["patient_id", "t1", "t2", "stir", "box"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(path, f"cohort CSV lacks columns {missing} (needs {need}, optional label, split)")
    for c in df.columns.intersection(["t1", "t2", "stir", "box", "truth"]):
        df[c] = [str((path.parent / str(v)).resolve()) if isinstance(v, str) and v else v for v in df[c]]
    return df
