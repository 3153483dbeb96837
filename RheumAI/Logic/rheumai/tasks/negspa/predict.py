"""NegSpA-AI prediction with per-sequence Grad-CAM mapped back into each series' own geometry.

Grad-CAM is :func:`rheumai.saliency.gradcam_backward` (the shared implementation, hooks removed
after each call) at ``branches.<role>.layer4`` of the tri-input network, once per sequence and
joint half, each time explaining that half's logit (class index = half). The branch sees the
three slices as channels, so each half gets one in-plane map, repeated over its slices (as for
the cervical task). Per sequence, the map of both halves is divided by its maximum over both
halves (0 = no positive evidence, 1 = strongest point; left/right contrast is kept), then
resampled onto the series' exact grid (:meth:`SequenceSample.to_source`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

from ...atomic import atomic_path, write_json, write_text
from ...errors import RheumAIError
from ...paths import safe_child
from ...saliency import gradcam_backward
from .clinical import NAMES, ClinicalEncoder, parse_table
from .model import pack
from .preprocess import HALVES, ROLES, NegSpaParams, NegSpaSample, preprocess
from .train import _device, load_negspa_checkpoint


class _HalvesOf(torch.nn.Module):
    """Single-input view of the tri-input network for Grad-CAM: x -> (N, 2) half logits."""

    def __init__(self, net: torch.nn.Module, clinical: torch.Tensor):
        super().__init__()
        self.net = net
        self.clinical = clinical

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.clinical, output="halves", mode="fusion")


@dataclass
class NegSpaResult:
    """probability / label at the card's threshold; half_probabilities {"right", "left"};
    saliency_grids {role: float32 (2, C, H, W) in [0, 1]}; saliency_volumes {role: sitk.Image on
    that series' grid}; clinical_missing: variables absent from the given clinical values."""

    probability: float
    label: int
    threshold: float
    half_probabilities: dict[str, float]
    model_id: str | None
    sources: dict[str, str | None]
    clinical_missing: list[str]
    sample: NegSpaSample
    saliency_grids: dict[str, np.ndarray] = field(default_factory=dict)
    saliency_volumes: dict[str, sitk.Image] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": "negspa", "probability": self.probability, "label": self.label, "threshold": self.threshold,
                "half_probabilities": self.half_probabilities, "model_id": self.model_id, "sources": self.sources,
                "clinical_missing": self.clinical_missing, "box": self.sample.box.to_dict(),
                "saliency": sorted(self.saliency_volumes)}


class NegSpaPredictor:
    """Loads a NegSpA checkpoint once; :meth:`predict` one study at a time."""

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        self.device = _device(device)
        self.model, self.card = load_negspa_checkpoint(checkpoint, self.device)
        self.encoder = ClinicalEncoder.from_dict(self.card["clinical_encoder"])
        self.params = NegSpaParams.from_dict(self.card["preprocessing"])
        self.threshold = float(self.card["threshold"])

    def predict(self, study_inputs: Mapping[str, Any], clinical: Mapping[str, Any] | None = None,
                saliency: bool = True) -> NegSpaResult:
        """``study_inputs``: {"t1", "t2", "stir": path | Study | image, "box": Box | dict | path};
        ``clinical``: raw values by variable name (strings or numbers; absent / empty = missing)."""
        sample = preprocess(study_inputs, self.params)
        raw = {k: ("" if v is None else v) for k, v in dict(clinical or {}).items() if k in NAMES}
        parsed = parse_table(pd.DataFrame([raw]) if raw else pd.DataFrame(index=[0]))
        missing = [n for n in NAMES if math.isnan(float(parsed[n].iloc[0]))]
        clin = torch.from_numpy(self.encoder.encode(parsed)).to(self.device)
        x = pack(torch.from_numpy(sample.stacked())[None]).to(self.device)
        with torch.no_grad():
            halves = torch.sigmoid(self.model(x, clin, output="halves", mode="fusion"))[0].cpu().numpy()
        prob = float(halves.max())  # sigmoid is monotone: max of half probabilities = patient probability
        res = NegSpaResult(probability=prob, label=int(prob >= self.threshold), threshold=self.threshold,
                           half_probabilities={h: float(p) for h, p in zip(HALVES, halves)},
                           model_id=self.card.get("model_id"), sources=dict(sample.provenance.get("sources", {})),
                           clinical_missing=missing, sample=sample)
        if saliency:
            for role in ROLES:
                grid = self.saliency_for(role, x, clin, sample)
                res.saliency_grids[role] = grid
                res.saliency_volumes[role] = sample.sequences[role].to_source(grid)
        return res

    def saliency_for(self, role: str, x: torch.Tensor, clin: torch.Tensor, sample: NegSpaSample) -> np.ndarray:
        """(2, C, H, W) Grad-CAM of one sequence's branch, normalised over both halves."""
        if self.card["architecture"].get("shared_backbone"):
            raise RheumAIError("per-sequence Grad-CAM needs separate branches; this model shares one backbone")
        layer = f"net.branches.{role}.{self.card.get('saliency_layer', 'layer4')}"
        view = _HalvesOf(self.model, clin)
        maps = []
        for h in range(2):
            _, cam = gradcam_backward(view, x, layer, class_idx=h)  # cam: (2 halves, 1, H, W)
            maps.append(cam[h, 0].cpu().numpy())
        m = np.clip(np.stack(maps), 0, None)
        peak = float(m.max())
        m = m / peak if peak > 0 else np.zeros_like(m)
        c = sample.sequences[role].array.shape[1]
        return np.repeat(m[:, None], c, axis=1).astype(np.float32)


def write_result(res: NegSpaResult, out_dir: str | Path, fmt: str = "nii.gz", montage: bool = True) -> dict[str, Path]:
    """result.json, saliency_<role>.<fmt> (each in its series' geometry) and a montage PNG per sequence."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for role, img in res.saliency_volumes.items():
        p = out / f"saliency_{role}.{fmt}"
        with atomic_path(p) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=True)
        paths[f"saliency_{role}"] = p
        if montage:
            from ...montage import save_montage

            seq = res.sample.sequences[role]
            arr = np.concatenate([seq.array[0], seq.array[1]])  # right-joint slices, then left-joint slices
            ov = np.concatenate([res.saliency_grids[role][0], res.saliency_grids[role][1]])
            c = seq.array.shape[1]
            titles = [f"R s{i}" for i in range(c)] + [f"L s{i}" for i in range(c)]
            paths[f"montage_{role}"] = save_montage(out / f"montage_{role}.png", arr, overlay=ov, titles=titles,
                                                    suptitle=f"{role}: p={res.probability:.3f} (columns lateral -> medial)")
    d = res.to_dict()
    d["files"] = {k: p.name for k, p in paths.items()}
    paths["json"] = write_json(out / "result.json", d)
    return paths


def predict_negspa(study_inputs: Mapping[str, Any], checkpoint: str | Path, out_dir: str | Path | None = None,
                   clinical: Mapping[str, Any] | None = None, saliency: bool = True, device: str = "auto") -> NegSpaResult:
    """Console API: predict one study (and write its outputs when ``out_dir`` is given)."""
    res = NegSpaPredictor(checkpoint, device).predict(study_inputs, clinical, saliency)
    if out_dir is not None:
        write_result(res, out_dir)
    return res


def predict_cohort(cohort_csv: str | Path, checkpoint: str | Path, out_dir: str | Path,
                   clinical_csv: str | Path | None = None, saliency: bool = True, device: str = "auto",
                   show_progress: bool = True) -> list[dict[str, Any]]:
    """Predict every study of a cohort CSV (patient_id, t1, t2, stir, box); clinical values from
    ``clinical_csv`` (default: clinical.csv beside it, if any) or the cohort's own columns.
    Writes ``<out>/<patient_id>/`` per study and ``predictions.csv``/``.json``; studies already in
    predictions.csv are skipped (resume); a failing study gets a row with its error."""
    from .synth import read_cohort

    cohort_csv = Path(cohort_csv)
    df = read_cohort(cohort_csv)
    if clinical_csv is None and (cohort_csv.parent / "clinical.csv").is_file():
        clinical_csv = cohort_csv.parent / "clinical.csv"
    if clinical_csv is not None:
        clin = pd.read_csv(clinical_csv, dtype=str, keep_default_na=False)
        df = df.drop(columns=[c for c in NAMES if c in df.columns]).merge(clin, on="patient_id", how="left")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "predictions.csv"
    done = pd.read_csv(table, dtype={"patient_id": str}) if table.is_file() else pd.DataFrame()
    rows = [r for r in done.to_dict("records") if not (isinstance(r.get("error"), str) and r["error"])] if len(done) else []
    have = {r["patient_id"] for r in rows}
    pred = NegSpaPredictor(checkpoint, device)
    for _, r in tqdm(df.iterrows(), total=len(df), desc="negspa predict", disable=not show_progress):
        pid = str(r["patient_id"])
        if pid in have:
            continue
        try:
            clinical = {c: r[c] for c in NAMES if c in r and isinstance(r[c], str)}
            res = pred.predict({k: r[k] for k in ("t1", "t2", "stir", "box")}, clinical, saliency)
            write_result(res, safe_child(out, pid, what="patient ID", source=cohort_csv))
            row = {"patient_id": pid, "probability": res.probability, "label": res.label, "threshold": res.threshold,
                   "p_right": res.half_probabilities["right"], "p_left": res.half_probabilities["left"],
                   "clinical_missing": ";".join(res.clinical_missing), "error": ""}
        except RheumAIError as exc:
            print(f"negspa predict: {pid}: {exc}")
            row = {"patient_id": pid, "error": str(exc)}
        if "label" in df.columns and "true_label" not in row:
            row["true_label"] = r["label"]
        rows.append(row)
        write_text(table, pd.DataFrame(rows).to_csv(index=False))  # after each study: a kill loses at most one
    write_json(out / "predictions.json", rows)
    return rows
