"""Predict-side hooks of NegSpA-AI for :class:`rheumai.engine.predict.Predictor`.

Sample: the three sequences on the two joint-half grids of the box and the encoded clinical vector
(missing values flagged). Output: one logit per joint half; the patient probability is the larger.
Saliency: Grad-CAM at ``branches.<role>.<layer>`` per sequence and half (explaining that half's
logit), one in-plane map repeated over the half's slices; both halves of a sequence share one
maximum (left/right contrast kept), then go onto that series' exact grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from ...errors import InputError, RheumAIError
from ...io import as_study
from ...saliency import gradcam_backward, normalize_max
from .clinical import NAMES, ClinicalEncoder, parse_table
from .model import pack
from .preprocess import HALVES, ROLES, NegSpaParams, NegSpaSample, preprocess

SALIENCY_METHODS = ("gradcam",)


@dataclass
class NegSpaStudy:
    """One study for the network: sampled sequences, encoded clinical vector (D,), the names of the
    missing clinical variables, and the source images (LPS) by role."""

    sample: NegSpaSample
    clinical: np.ndarray
    clinical_missing: list[str]
    source_images: dict[str, sitk.Image] = field(default_factory=dict, repr=False)

    sources = property(lambda self: dict(self.sample.provenance.get("sources", {})))

    def describe(self) -> dict[str, Any]:
        return {"box": self.sample.box.to_dict(), "params": self.sample.params.to_dict()}


def encode_clinical(clinical: Mapping[str, Any] | None, card: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Raw clinical values (strings or numbers; absent / empty = missing) -> (encoded (D,), missing names)."""
    unknown = sorted(set(clinical or {}) - set(NAMES))
    if unknown:
        raise InputError(None, f"unknown clinical variable(s) {', '.join(unknown)}; NegSpA-AI knows {', '.join(NAMES)}")
    raw = {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in (clinical or {}).items()}
    parsed = parse_table(pd.DataFrame([raw]) if raw else pd.DataFrame(index=[0]))
    missing = [n for n in NAMES if math.isnan(float(parsed[n].iloc[0]))]
    enc = ClinicalEncoder.from_dict(card["clinical_encoder"]).encode(parsed)
    return np.asarray(enc, np.float32).reshape(-1), missing


def load_sample(inputs: Mapping[str, Any], card: dict[str, Any]) -> NegSpaStudy:
    """``inputs``: {"t1", "t2", "stir": path | Study | image, "roi" (or "box"): box file / dict /
    Box, "clinical": {name: value}}; sampled with the card's ``preprocessing``."""
    box = inputs.get("roi", inputs.get("box"))
    missing = [r for r in ROLES if inputs.get(r) is None] + ([] if box is not None else ["roi"])
    if missing:
        raise InputError(None, "NegSpA-AI needs the T1, T2 and fat-suppressed (STIR/SPAIR) series and a box around "
                               f"both sacroiliac joints; missing: {', '.join(missing)}")
    studies = {r: as_study(inputs[r]) for r in ROLES}
    sample = preprocess({**studies, "box": box}, NegSpaParams.from_dict(card["preprocessing"]))
    clin, miss = encode_clinical(inputs.get("clinical"), card)
    return NegSpaStudy(sample, clin, miss, {r: s.image for r, s in studies.items()})


def to_tensors(study: NegSpaStudy, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{"x": float32 (S*2*C, H, W) packed sequences/halves/slices, "clinical": float32 (D,)}."""
    return {"x": pack(torch.from_numpy(study.sample.stacked())[None])[0], "clinical": torch.from_numpy(study.clinical)}


def forward(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"halves": (N, 2) logits (right, left)} from the fusion head."""
    return {"halves": model(batch["x"], batch["clinical"], output="halves", mode="fusion")}


def postprocess(outputs: dict[str, torch.Tensor], card: dict[str, Any], study: NegSpaStudy) -> dict[str, Any]:
    """Patient probability (max over halves), class, per-half probabilities, missing clinical variables."""
    halves = torch.sigmoid(outputs["halves"].reshape(-1)).tolist()
    prob, thr = float(max(halves)), float(card["threshold"])
    return {"probability": prob, "label": int(prob >= thr), "threshold": thr,
            **{f"p_{h}": float(p) for h, p in zip(HALVES, halves)}, "clinical_missing": list(study.clinical_missing)}


class _HalvesOf(torch.nn.Module):
    """Single-input view of the tri-input network for Grad-CAM: x -> (N, 2) half logits."""

    def __init__(self, net: torch.nn.Module, clinical: torch.Tensor):
        super().__init__()
        self.net, self.clinical = net, clinical

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.clinical, output="halves", mode="fusion")


def saliency_maps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], studies: Sequence[NegSpaStudy],
                  card: dict[str, Any], method: str, target_layer: str | None) -> tuple[None, list[dict[str, Any]]]:
    """Grad-CAM per sequence and half, normalised per sequence, each in its own series' geometry."""
    from ...engine.predict import RoleMap

    if card["architecture"].get("shared_backbone"):
        raise RheumAIError("per-sequence Grad-CAM needs separate branches; this model shares one backbone")
    layer = target_layer or card.get("saliency_layer", "layer4")
    view = _HalvesOf(model, batch["clinical"]).eval()  # gradcam_backward restores the view's mode on the net
    n = len(studies)
    out: list[dict[str, Any]] = [{} for _ in studies]
    for role in ROLES:
        # The branch folds the halves into its batch: maps come as (N * 2, 1, H, W), half-minor.
        per_half = [gradcam_backward(view, batch["x"], f"net.branches.{role}.{layer}", class_idx=h)[1]
                    for h in range(2)]
        cams = normalize_max(torch.stack([c.reshape(n, 2, *c.shape[-2:])[:, h] for h, c in enumerate(per_half)], 1))
        for i, (st, m) in enumerate(zip(studies, cams)):  # m: (2 halves, H, W), one maximum per study
            seq = st.sample.sequences[role]
            c = seq.array.shape[1]
            grid = np.repeat(m[:, None], c, axis=1).astype(np.float32) * seq.mask
            out[i][role] = RoleMap(role=role, grid=grid, to_source=seq.to_source,
                                   images=np.concatenate([seq.array[0], seq.array[1]]),
                                   overlay=np.concatenate([grid[0], grid[1]]),
                                   titles=[f"{s} s{k}" for s in "RL" for k in range(c)])
    return None, out
