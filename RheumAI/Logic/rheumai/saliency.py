"""Saliency maps for the 2D cervical classifiers, and their way back to the source volume.

Methods (all explain the single logit, i.e. evidence *for* the positive class, whatever the
predicted class):

``gradxinput_smooth``  (default) |gradient x input| per slice, smoothed in-plane by a Gaussian
                (``sigma_px``, default 1 px = 2 mm at the demo's 2 mm grid). Pixel-resolution
                attribution: the peak of its sum over the slices is where the network's evidence
                lies in the sagittal plane, and each slice keeps its own share. Absolute value:
                a dark finding (bone erosion) raises the logit through a *negative* gradient.
``gradxinput``  ReLU(x * dY/dx) per slice, unsmoothed (positive evidence only).
``gradcam``     Grad-CAM (Selvaraju et al.). COARSE: at the default target, the last
                convolutional block (``layer4``, 1/16-1/32 of the input size: an 8 x 8 map for a
                128 x 128 input, 32 mm cells at 2 mm) it cannot point at a 10-20 mm finding; it is
                kept because the paper reports it. With ``layer4`` followed by global average
                pooling and one linear layer, Grad-CAM is class activation mapping up to a
                constant: dY/dA_k(u) = w_k / (h w), so ReLU(sum_k mean_u(dY/dA_k) A_k) =
                ReLU(sum_k w_k A_k) / (h w); the map comes from the same forward pass as the
                probability (``Testing/test_saliency.py`` proves equality with
                ``monai.visualize.GradCAM``). Other layers take the general backward path.
``gradcampp``   Grad-CAM++ (Chattopadhyay et al.), MONAI's formula; works at any batch size. Coarse
                like Grad-CAM.
``occlusion``   ``monai.visualize.OcclusionSensitivity``; saliency = ReLU(p - p_occluded).
                Costs one forward pass per window (~225 at 512 x 512 with the default window).

Slices as channels (family ``resnet``): the network sees the six sagittal slices as the channels of
one 2D image, so Grad-CAM, Grad-CAM++ and occlusion give ONE in-plane map (H, W), repeated on each
of the six slices: it says *where in the sagittal plane* the evidence lies, not *in which slice*.
The gradient x input methods attribute per slice. With the ``slice_attention`` family
(:mod:`rheumai.tasks.cervical_ra.model`) Grad-CAM at ``encoder.layer4`` is computed per slice.

Normalisation rule: every map is >= 0; it is divided by its maximum over the whole study (all
slices and pixels jointly), so 0 means "no evidence" and 1 is the strongest point; an all-zero map
stays zero. Maps are returned as float32 (N, C, H, W) arrays on the selection grid (C: right ->
left, H: superior -> inferior, W: anterior -> posterior).
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
DEFAULT_METHOD = "gradxinput_smooth"
# One line per method for reports and result files.
METHOD_NOTES = {
    "gradxinput_smooth": "|gradient x input| per slice, Gaussian-smoothed in-plane (pixel resolution)",
    "gradxinput": "ReLU(gradient x input) per slice (pixel resolution, unsmoothed)",
    "gradcam": "Grad-CAM: coarse (one cell per 16-32 px at layer4); one in-plane map repeated on every "
               "slice when the slices are channels",
    "gradcampp": "Grad-CAM++: coarse like Grad-CAM",
    "occlusion": "occlusion sensitivity: one in-plane map repeated on every slice when the slices are channels",
}
# Layers before the head that make sense as Grad-CAM targets in a MONAI ResNet (every depth has
# the same four stages; layer4 is the last convolutional block at 1/32 of the input resolution).
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def default_target_layer(model: torch.nn.Module) -> str:
    """The default Grad-CAM target: ``layer4`` for MONAI ResNets of every depth (10 ... 200),
    ``encoder.layer4`` for the slice-attention network (per-slice maps).

    It is the last convolutional block, directly followed by global average pooling and the
    linear head, where Grad-CAM equals CAM (one forward pass). At 512 x 512 input it is a 16 x 16
    map (32 px = 32 mm per cell); ``layer3`` (32 x 32) is the finer alternative (backward path).
    """
    names = {n for n, _ in model.named_modules()}
    for name in ("layer4", "encoder.layer4"):
        if name in names:
            return name
    raise ValueError("no default target layer for this network; pass target_layer explicitly "
                     f"(one of its modules, e.g. {sorted(n for n in names if n)[-3:]})")


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    for n, m in model.named_modules():
        if n == name:
            return m
    raise ValueError(f"target layer '{name}' not found in the network; "
                     f"choose one of {[n for n in RESNET_LAYERS if n in dict(model.named_modules())] or 'its modules'}")


def has_cam_head(model: torch.nn.Module, layer: str) -> bool:
    """True when ``layer`` is followed only by global average pooling and one linear layer.

    That is MONAI's ResNet structure at ``layer4`` (forward: ... layer4 -> avgpool -> flatten -> fc).
    """
    avg = getattr(model, "avgpool", None)
    fc = getattr(model, "fc", None)
    return (layer == "layer4" and hasattr(model, "layer4") and isinstance(fc, torch.nn.Linear)
            and isinstance(avg, (torch.nn.AdaptiveAvgPool2d,))
            and tuple(np.atleast_1d(avg.output_size)) in ((1,), (1, 1)))


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


def forward_with_cam(model: torch.nn.Module, x: torch.Tensor, class_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass giving the logits and the Grad-CAM map at ``layer4`` (no backward).

    x: (N, C, H, W). Returns logits (N, K) and the raw Grad-CAM map (N, 1, H, W) upsampled to the
    input size: ReLU(sum_k w_k A_k) / (h w), which is exactly what MONAI's GradCAM computes before
    its post-processing. Requires :func:`has_cam_head`.
    """
    if not has_cam_head(model, "layer4"):
        raise ValueError("forward_with_cam needs layer4 -> global average pooling -> linear (a MONAI ResNet)")
    store: dict[str, torch.Tensor] = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        handle.remove()
    with torch.inference_mode():
        acts = store["a"]  # (N, K, h, w)
        w = model.fc.weight[class_idx]  # (K,)
        h_, w_ = acts.shape[-2:]
        cam = torch.einsum("k,nkhw->nhw", w.to(acts.dtype), acts)[:, None] / float(h_ * w_)
        cam = upsample(F.relu(cam), tuple(x.shape[-2:]))
    return logits, cam


def gradcam_backward(model: torch.nn.Module, x: torch.Tensor, layer: str, plusplus: bool = False,
                     class_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """General Grad-CAM / Grad-CAM++ with one forward and one backward pass.

    Same formulas as ``monai.visualize.GradCAM`` / ``GradCAMpp``; hand-written rather than calling
    MONAI because MONAI's hooks stay registered on the model for ever (they accumulate when the
    explainer is rebuilt) and its Grad-CAM++ fails at batch > 1. Hooks here are removed on return.
    Returns logits (N, K) (detached) and the raw map (N, 1, H, W) upsampled to the input size.
    """
    target = _module(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, _i: Any, out: torch.Tensor) -> None:
        store["a"] = out
        if out.requires_grad:
            out.register_hook(lambda g: store.__setitem__("g", g))

    handle = target.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xin = x.detach()
            if not any(p.requires_grad for p in model.parameters()):
                xin = xin.clone().requires_grad_(True)  # something must carry a graph to the target
            logits = model(xin)
            score = logits[:, class_idx]
            score.sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if "g" not in store:
        raise RuntimeError(f"no gradient reached target layer '{layer}'")
    acts, grad = store["a"].detach(), store["g"].detach()
    b, c = grad.shape[:2]
    if plusplus:
        alpha_nr = grad.pow(2)
        alpha_dr = alpha_nr.mul(2) + acts.mul(grad.pow(3)).reshape(b, c, -1).sum(-1).reshape(b, c, 1, 1)
        alpha_dr = torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr))
        alpha = alpha_nr.div(alpha_dr + 1e-7)
        per_map = score.detach().exp().repeat_interleave(b // score.shape[0])  # one score per slice map
        relu_grad = F.relu(per_map.reshape(b, 1, 1, 1) * grad)
        weights = (alpha * relu_grad).reshape(b, c, -1).sum(-1).reshape(b, c, 1, 1)
    else:
        weights = grad.reshape(b, c, -1).mean(2).reshape(b, c, 1, 1)
    cam = F.relu((weights * acts).sum(1, keepdim=True))
    n, c = x.shape[:2]
    if cam.shape[0] == n * c and c > 1:  # a shared encoder ran on every slice: one map per slice
        cam = cam.reshape(n, c, *cam.shape[-2:])
    return logits.detach(), upsample(cam, tuple(x.shape[-2:]))


def occlusion(model: torch.nn.Module, x: torch.Tensor, class_idx: int = 0, mask_size: int | None = None,
              overlap: float = 0.5, n_batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion sensitivity via ``monai.visualize.OcclusionSensitivity`` (gaussian occlusion).

    x: (1, C, H, W) (MONAI supports batch 1 only; larger batches are looped). ``mask_size``
    defaults to max(8, H // 8) px. Returns logits (N, K) and ReLU(p - p_occluded) (N, 1, H, W),
    p = sigmoid(logit) for one output, softmax otherwise.
    """
    from monai.visualize import OcclusionSensitivity

    size = mask_size or max(8, int(x.shape[-2]) // 8)
    logits_all, maps = [], []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        with torch.inference_mode():
            logits = model(xi)

        def activate(out: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, 1)

        # activate passed explicitly: MONAI's default picks sigmoid vs softmax from the number of
        # *input* channels, so a 6-channel input with one logit gets softmax over one value == 1.
        occ = OcclusionSensitivity(model, mask_size=size, n_batch=n_batch, verbose=False, overlap=overlap,
                                   activate=activate)
        p = activate(logits)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI's indexing deprecation notices
            occ_map, _ = occ(xi)  # (1, K, H, W): probability with each window occluded
        maps.append(F.relu(p[:, class_idx].reshape(1, 1, 1, 1) - torch.as_tensor(occ_map)[:, class_idx:class_idx + 1]))
        logits_all.append(logits)
    return torch.cat(logits_all), torch.cat(maps).float()


def _gradient(model: torch.nn.Module, x: torch.Tensor, class_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) and dY/dx (N, C, H, W) in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)
            logits = model(xin)
            (grad,) = torch.autograd.grad(logits[:, class_idx].sum(), xin)
    finally:
        model.train(was_training)
    return logits.detach(), grad


def grad_x_input(model: torch.nn.Module, x: torch.Tensor, class_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU(x * dY/dx): a per-channel (per-slice) attribution. Returns logits and (N, C, H, W)."""
    logits, grad = _gradient(model, x, class_idx)
    return logits, F.relu(grad * x.detach())


def gaussian_blur(maps: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """In-plane Gaussian smoothing of (N, C, H, W) maps (separable, truncated at 3 sigma,
    zero padding), each channel on its own. ``sigma_px`` <= 0 returns the maps unchanged."""
    if sigma_px <= 0:
        return maps
    r = max(1, int(np.ceil(3 * sigma_px)))
    t = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (t / sigma_px) ** 2)
    k = k / k.sum()
    n, c, h, w = maps.shape
    m = maps.reshape(n * c, 1, h, w)
    m = F.conv2d(m, k.reshape(1, 1, -1, 1), padding=(r, 0))
    m = F.conv2d(m, k.reshape(1, 1, 1, -1), padding=(0, r))
    return m.reshape(n, c, h, w)


def grad_x_input_smooth(model: torch.nn.Module, x: torch.Tensor, class_idx: int = 0, sigma_px: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-smoothed |x * dY/dx| per slice (sigma in pixels of the network input).

    Returns logits (N, K) and maps (N, C, H, W); their sum over C is the in-plane evidence map
    whose peak :func:`peak_in_plane` reports."""
    logits, grad = _gradient(model, x, class_idx)
    return logits, gaussian_blur((grad * x.detach()).abs(), float(sigma_px))


def peak_in_plane(grid_map: np.ndarray) -> tuple[int, int]:
    """(h, w) of the maximum of a (C, H, W) map summed over its slices (C)."""
    plane = np.asarray(grid_map, dtype=np.float64).sum(axis=0)
    h, w = np.unravel_index(int(np.argmax(plane)), plane.shape)
    return int(h), int(w)


def compute_saliency(model: torch.nn.Module, x: torch.Tensor, method: str = DEFAULT_METHOD,
                     target_layer: str | None = None, class_idx: int = 0,
                     **options: Any) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (N, K) and normalised saliency maps (N, C, H, W) float32 in [0, 1] for input x (N, C, H, W).

    Maps that are one in-plane map per input (Grad-CAM, Grad-CAM++ and occlusion on the
    slices-as-channels ResNet) are repeated over the C channels. The default Grad-CAM target
    (``layer4``) uses the forward-only CAM identity. ``options``: ``sigma_px`` for
    ``gradxinput_smooth``; ``mask_size``, ``overlap``, ``n_batch`` for ``occlusion``.
    """
    if method not in METHODS:
        raise ValueError(f"saliency method '{method}' unknown; choose one of {METHODS}")
    if method in ("gradcam", "gradcampp"):
        layer = target_layer or default_target_layer(model)
        if method == "gradcam" and has_cam_head(model, layer):
            logits, raw = forward_with_cam(model, x, class_idx)
        else:
            logits, raw = gradcam_backward(model, x, layer, plusplus=method == "gradcampp", class_idx=class_idx)
    elif method == "occlusion":
        logits, raw = occlusion(model, x, class_idx, **options)
    elif method == "gradxinput_smooth":
        logits, raw = grad_x_input_smooth(model, x, class_idx, **options)
    else:
        logits, raw = grad_x_input(model, x, class_idx)
    if raw.shape[1] == 1:
        raw = raw.expand(-1, x.shape[1], -1, -1)
    return logits, normalize_max(raw)


def saliency_volume(selection: SliceSelection, grid_map: np.ndarray, on_grid: bool = False) -> sitk.Image:
    """A (C, H, W) map on the selection grid as an image in the source's exact grid (LPS).

    Points outside the source's field of view are zeroed first (they were padding). With
    ``on_grid`` the image is returned on the 1 mm selection grid instead of the source grid.
    """
    arr = np.asarray(grid_map, dtype=np.float32) * selection.mask
    return selection.grid_image(arr) if on_grid else selection.to_source(arr)


def peak_distance_mm(grid_map: np.ndarray, selection: SliceSelection, mask: sitk.Image) -> float:
    """In-plane distance (mm) from the saliency peak to a lesion mask; 0 when the peak is inside.

    ``grid_map`` (C, H, W) on the selection grid; its peak is taken on the sum over the slices
    (:func:`peak_in_plane`). ``mask`` (any grid, LPS) is resampled onto the selection grid
    (nearest neighbour) and projected over the C slices: the peak is inside when any selected
    slice holds lesion at that (H, W) position. Distances use the grid's in-plane spacing.
    Returns NaN when no lesion voxel falls on the selected slices (nothing to point at).
    """
    from scipy import ndimage

    ref = selection.grid.reference_image(sitk.sitkUInt8)
    m = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                      sitk.sitkUInt8)
    proj = sitk.GetArrayViewFromImage(m).astype(bool).any(axis=0)  # (H, W)
    if not proj.any():
        return float("nan")
    h, w = peak_in_plane(grid_map)
    sp_w, sp_h = selection.grid.spacing[0], selection.grid.spacing[1]  # (i, j) = (W, H)
    return float(ndimage.distance_transform_edt(~proj, sampling=(sp_h, sp_w))[h, w])
