"""Saliency maps for 2D classifiers, and their way back to the source volume.

Every method explains one logit (``class_idx``: evidence *for* that class, whatever is predicted).
``gradxinput_smooth`` (default): |gradient x input| per slice, Gaussian-smoothed in-plane (``sigma_px``;
|.| keeps dark findings such as erosions); ``gradxinput``: ReLU(x * dY/dx); ``gradcam`` / ``gradcampp``:
Grad-CAM(++), COARSE at the default ``layer4`` (1/16-1/32 of the input), kept because the paper reports
it (from the forward pass alone when layer4 -> global average pooling -> linear, :func:`forward_with_cam`);
``occlusion``: ReLU(p - p_occluded). Maps are >= 0 and divided by their maximum over the study: float32
(N, C, H, W) on the selection grid (C: right -> left, H: superior -> inferior, W: anterior -> posterior).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .tasks.cervical_ra.slices import SliceSelection

METHODS = ("gradxinput_smooth", "gradcam", "gradcampp", "occlusion", "gradxinput")


def has_cam_head(model: torch.nn.Module, layer: str) -> bool:
    """True when ``layer`` is ``layer4`` followed only by global average pooling and one linear layer."""
    avg = getattr(model, "avgpool", None)
    return (layer == "layer4" and hasattr(model, "layer4") and isinstance(getattr(model, "fc", None), torch.nn.Linear)
            and isinstance(avg, torch.nn.AdaptiveAvgPool2d) and tuple(np.atleast_1d(avg.output_size)) in ((1,), (1, 1)))


def normalize_max(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per sample: clip at 0 and divide by the maximum over all remaining axes. (N, ...) -> float32."""
    m = torch.as_tensor(maps).detach().float().clamp_min(0)
    peak = m.reshape(m.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (m.ndim - 1)))
    out = torch.where(peak > 0, m / peak.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(m))
    return out.cpu().numpy().astype(np.float32)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W), bilinear, align_corners=False (as MONAI's default upsampler)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def probability(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, K): sigmoid for one logit, softmax otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def forward_with_cam(model: torch.nn.Module, x: torch.Tensor, class_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) and the raw Grad-CAM map at ``layer4`` (N, 1, H, W) from one forward pass:
    ReLU(sum_k w_k A_k) / (h w), as MONAI's GradCAM before post-processing (needs :func:`has_cam_head`)."""
    if not has_cam_head(model, "layer4"):
        raise ValueError("forward_with_cam needs layer4 -> global average pooling -> linear (a MONAI ResNet)")
    store: dict[str, torch.Tensor] = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        with torch.inference_mode():
            logits = model(x)
            acts = store["a"]
            cam = torch.einsum("k,nkhw->nhw", model.fc.weight[class_idx].to(acts.dtype), acts)[:, None]
            cam = upsample(F.relu(cam) / float(acts.shape[-2] * acts.shape[-1]), tuple(x.shape[-2:]))
    finally:
        handle.remove()
    return logits, cam


def _grad_at(model: torch.nn.Module, x: torch.Tensor, class_idx: int, layer: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward + backward of logit ``class_idx`` in eval mode (the model's mode is restored): logits,
    and the activation and its gradient at module ``layer`` (default: the input), all detached."""
    store: dict[str, torch.Tensor] = {}
    handle = None
    if layer is not None:
        try:
            target = model.get_submodule(layer)
        except AttributeError:
            top = [n for n, _ in model.named_modules() if n and "." not in n]
            raise ValueError(f"target layer '{layer}' not found in the network; pass one of its modules "
                             f"as the target layer, e.g. {top[-3:]}") from None
        handle = target.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)
            logits = model(xin)
            acts = store.get("a", xin)
            (grad,) = torch.autograd.grad(logits[:, class_idx].sum(), acts, allow_unused=True)
    finally:
        model.train(was_training)
        if handle is not None:
            handle.remove()
    if grad is None or (layer is not None and "a" not in store):
        raise RuntimeError(f"no gradient reached target layer '{layer}'")
    return logits.detach(), acts.detach(), grad


def gradcam_backward(model: torch.nn.Module, x: torch.Tensor, layer: str, plusplus: bool = False,
                     class_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM / Grad-CAM++ at any layer (one forward, one backward): logits (N, K) and the raw map
    (N, 1, H, W) upsampled to the input, or (N, C, H, W) when a shared encoder ran per slice.

    MONAI's formulas; hand-written because MONAI's hooks stay on the model and its Grad-CAM++ fails at
    batch > 1. Hooks here are removed on return.
    """
    logits, acts, grad = _grad_at(model, x, class_idx, layer)
    b, c = grad.shape[:2]
    if plusplus:
        alpha_nr = grad.pow(2)
        alpha_dr = alpha_nr.mul(2) + acts.mul(grad.pow(3)).reshape(b, c, -1).sum(-1).reshape(b, c, 1, 1)
        alpha = alpha_nr.div(torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr)) + 1e-7)
        per_map = logits[:, class_idx].exp().repeat_interleave(b // logits.shape[0])  # a score per slice map
        weights = (alpha * F.relu(per_map.reshape(b, 1, 1, 1) * grad)).reshape(b, c, -1).sum(-1).reshape(b, c, 1, 1)
    else:
        weights = grad.reshape(b, c, -1).mean(2).reshape(b, c, 1, 1)
    cam = F.relu((weights * acts).sum(1, keepdim=True))
    n, c = x.shape[:2]
    if cam.shape[0] == n * c and c > 1:  # a shared encoder ran on every slice: one map per slice
        cam = cam.reshape(n, c, *cam.shape[-2:])
    return logits, upsample(cam, tuple(x.shape[-2:]))


def occlusion(model: torch.nn.Module, x: torch.Tensor, class_idx: int = 0, mask_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion sensitivity (``monai.visualize.OcclusionSensitivity``, windows overlapping by half):
    logits (N, K) and ReLU(p - p_occluded) (N, 1, H, W); window ``mask_size`` px (default max(8, H // 8))."""
    from monai.visualize import OcclusionSensitivity

    # activate passed explicitly: MONAI's default picks sigmoid vs softmax from the number of
    # *input* channels, so a 6-channel input with one logit would get softmax over one value == 1.
    occ = OcclusionSensitivity(model, mask_size=mask_size or max(8, int(x.shape[-2]) // 8), n_batch=8,
                               verbose=False, overlap=0.5, activate=probability)
    logits_all, maps = [], []
    for i in range(x.shape[0]):
        with torch.inference_mode():
            logits = model(x[i:i + 1])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI's indexing deprecation notices
            occ_map, _ = occ(x[i:i + 1])  # (1, K, H, W): probability with each window occluded
        p = probability(logits)[:, class_idx].reshape(1, 1, 1, 1)
        maps.append(F.relu(p - torch.as_tensor(occ_map)[:, class_idx:class_idx + 1]))
        logits_all.append(logits)
    return torch.cat(logits_all), torch.cat(maps).float()


def gaussian_blur(maps: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """In-plane Gaussian smoothing of (N, C, H, W) maps, each channel on its own (separable, truncated
    at 3 sigma, zero padding). ``sigma_px`` <= 0 returns the maps unchanged."""
    if sigma_px <= 0:
        return maps
    r = max(1, int(np.ceil(3 * sigma_px)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device) / sigma_px) ** 2)
    k = k / k.sum()
    n, c, h, w = maps.shape
    m = F.conv2d(maps.reshape(n * c, 1, h, w), k.reshape(1, 1, -1, 1), padding=(r, 0))
    return F.conv2d(m, k.reshape(1, 1, 1, -1), padding=(0, r)).reshape(n, c, h, w)


def compute_saliency(model: torch.nn.Module, x: torch.Tensor, method: str = METHODS[0],
                     target_layer: str | None = None, class_idx: int = 0,
                     **options: Any) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (N, K) and normalised maps (N, C, H, W) float32 in [0, 1] for input x (N, C, H, W); one
    in-plane map is repeated over the C channels. ``options``: ``sigma_px`` (default 1) for
    ``gradxinput_smooth``, ``mask_size`` for ``occlusion``."""
    if method not in METHODS:
        raise ValueError(f"saliency method '{method}' unknown; choose one of {METHODS}")
    if method in ("gradcam", "gradcampp"):
        # default: the last convolutional block (per slice for the slice-attention network)
        layer = target_layer or ("layer4" if hasattr(model, "layer4") else "encoder.layer4")
        if method == "gradcam" and has_cam_head(model, layer):
            logits, raw = forward_with_cam(model, x, class_idx)
        else:
            logits, raw = gradcam_backward(model, x, layer, plusplus=method == "gradcampp", class_idx=class_idx)
    elif method == "occlusion":
        logits, raw = occlusion(model, x, class_idx, **options)
    else:  # gradient x input, per slice
        logits, _, grad = _grad_at(model, x, class_idx)
        gx = grad * x.detach()
        smooth = method == "gradxinput_smooth"
        raw = gaussian_blur(gx.abs(), float(options.get("sigma_px", 1.0))) if smooth else F.relu(gx)
    if raw.shape[1] == 1:
        raw = raw.expand(-1, x.shape[1], -1, -1)
    return logits, normalize_max(raw)


def peak_distance_mm(grid_map: np.ndarray, selection: SliceSelection, mask: sitk.Image) -> float:
    """In-plane distance (mm) from the saliency peak to a lesion mask; 0 when the peak is inside.

    The peak is that of ``grid_map`` (C, H, W) summed over the slices; ``mask`` (any grid, LPS) is
    resampled onto the selection grid (nearest neighbour) and projected over the C slices. NaN when
    no lesion voxel falls on the selected slices (nothing to point at).
    """
    from scipy import ndimage

    ref = selection.grid.reference_image(sitk.sitkUInt8)
    m = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                      sitk.sitkUInt8)
    proj = sitk.GetArrayViewFromImage(m).astype(bool).any(axis=0)  # (H, W)
    if not proj.any():
        return float("nan")
    plane = np.asarray(grid_map, dtype=np.float64).sum(axis=0)
    h, w = np.unravel_index(int(np.argmax(plane)), plane.shape)
    sp_w, sp_h = selection.grid.spacing[0], selection.grid.spacing[1]  # (i, j) = (W, H)
    return float(ndimage.distance_transform_edt(~proj, sampling=(sp_h, sp_w))[h, w])
