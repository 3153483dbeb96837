"""Predict-side hooks of the cervical RA task for :class:`rheumai.engine.predict.Predictor`.

Sample: the six sagittal slices (C, H, W) = (right -> left, superior -> inferior, anterior ->
posterior) and the source image. Network input: the selection through the card's inference
transform (centre crop, resize; skipped when it is the identity). Saliency on the network input is
sent back into the crop box, zeroed outside the field of view and resampled into the source's grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ...io import as_study
from .slices import SliceParams, SliceSelection, select_slices

ROLE = "t2_sag"


@dataclass
class CervicalSample:
    """The task input of one study and the image it was sampled from (LPS)."""

    selection: SliceSelection
    image: sitk.Image

    sources = property(lambda self: {ROLE: self.selection.provenance.get("source_path")})
    series_uid = property(lambda self: self.selection.provenance.get("series_uid"))
    source_images = property(lambda self: {ROLE: self.image})

    def describe(self) -> dict[str, Any]:
        return {"grid": self.selection.grid.to_dict(), "params": self.selection.params.to_dict()}


def load_sample(inputs: Mapping[str, Any], card: dict[str, Any]) -> CervicalSample:
    """``inputs[ROLE]``: path / DICOM folder (``inputs["series_uid"]`` picks a series) / Study / LPS
    image; slices sampled with the card's ``preprocessing``."""
    study = as_study(inputs[ROLE], inputs.get("series_uid"))
    return CervicalSample(select_slices(study, SliceParams.from_dict(card["preprocessing"])), study.image)


def _crop_box(card: dict[str, Any], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(r0, c0, r1, c1) of the card's centre crop on the (H, W) selection; None when the network
    input is the selection. Found by sending an index image through MONAI's own crop."""
    arch_size = tuple(int(v) for v in card.get("architecture", {}).get("input_size") or size)
    frac = float(card.get("input_transform", {}).get("center_crop_fraction", 1.0))
    if arch_size == tuple(size) and frac >= 1.0:
        return None
    h, w = size
    if frac >= 1.0:
        return 0, 0, h - 1, w - 1
    from monai.transforms import CenterScaleCrop

    idx = np.asarray(CenterScaleCrop(roi_scale=frac)(np.arange(h * w, dtype=np.int64).reshape(1, h, w)))
    return (*divmod(int(idx.min()), w), *divmod(int(idx.max()), w))


def to_tensors(sample: CervicalSample, card: dict[str, Any]) -> torch.Tensor:
    """float32 (C, H', W'): the selection through the card's inference transform."""
    arr = np.ascontiguousarray(sample.selection.array, dtype=np.float32)
    if _crop_box(card, tuple(sample.selection.params.size)) is None:
        return torch.from_numpy(arr)
    from .train import eval_transform_from_card

    return torch.as_tensor(np.asarray(eval_transform_from_card(card)(arr)), dtype=torch.float32)


def _to_selection(m: np.ndarray, card: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) on the network input -> (C, H, W) on the selection grid (bilinear into the crop
    box, zero outside it)."""
    box = _crop_box(card, size)
    if box is None:
        return m
    from ...saliency import upsample

    r0, c0, r1, c1 = box
    out = np.zeros((m.shape[0], *size), np.float32)
    inner = upsample(torch.as_tensor(m, dtype=torch.float32)[None], (r1 - r0 + 1, c1 - c0 + 1))[0]
    out[:, r0:r1 + 1, c0:c1 + 1] = inner.clamp(0, 1).numpy()
    return out


def postprocess(outputs: dict[str, torch.Tensor], card: dict[str, Any], sample: CervicalSample) -> dict[str, Any]:
    """Probability of deformity at follow-up and the class at the card's threshold."""
    from ...metrics import apply_card_recalibration

    prob = float(apply_card_recalibration(torch.sigmoid(outputs["out"].reshape(-1)[0].double()).item(), card))
    thr = float(card["threshold"])
    return {"probability": prob, "label": int(prob >= thr), "threshold": thr}


def saliency_maps(model: torch.nn.Module, batch: torch.Tensor, samples: Sequence[CervicalSample], card: dict[str, Any],
                  method: str, target_layer: str | None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Logits of the same pass and one map per study on the sagittal T2 (see module docstring)."""
    from ...engine.predict import RoleMap
    from ...saliency import compute_saliency

    logits, maps = compute_saliency(model, batch, method, target_layer)
    out = []
    for sample, input_map in zip(samples, maps):
        sel = sample.selection
        grid = _to_selection(input_map, card, tuple(sel.params.size)) * sel.mask
        out.append({ROLE: RoleMap(role=ROLE, grid=grid, images=sel.array, overlay=grid, input_map=input_map,
                                  to_source=sel.to_source)})  # grid is zero outside the field of view
    return {"out": logits}, out
