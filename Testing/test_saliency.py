"""Saliency: the forward-only CAM path equals MONAI's Grad-CAM on a trained model; maps find a known region;
the general backward paths match MONAI; the trust checks and TTA behave."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import stats

from rheumai.tasks.cervical_ra.model import build_model, default_architecture
from rheumai.saliency import compute_saliency, forward_with_cam, gradcam_backward, has_cam_head, normalize_max
from rheumai.sanity import deletion_insertion, randomization_check, randomized_copy
from rheumai.tta import augmentations, tta_probabilities

SIZE = 64


def _blob_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 6, SIZE, SIZE) noise images; label 1 images hold a bright disc at a random place."""
    x = rng.normal(0.3, 0.1, size=(n, 6, SIZE, SIZE)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        if y[i]:
            cy, cx = rng.integers(12, SIZE - 12, size=2)
            x[i, :, (yy - cy) ** 2 + (xx - cx) ** 2 < 36] += 0.8
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def trained_model() -> torch.nn.Module:
    """ResNet-18 (MONAI, 6 channels) trained a few Adam steps on the blob task: not random weights."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(default_architecture(depth=18, input_size=(SIZE, SIZE)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(10):
        x, y = _blob_batch(8, rng)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Re-estimate BatchNorm statistics (cumulative average): after a few steps the running
    # averages still lag the weights and the eval-mode network would be degenerate.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            model(_blob_batch(16, rng)[0])
    return model.eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    x, _ = _blob_batch(4, np.random.default_rng(1))
    return x[1:2]  # a positive example


def _monai_map(model: torch.nn.Module, x: torch.Tensor, layer: str, plusplus: bool = False) -> torch.Tensor:
    from monai.visualize import GradCAM, GradCAMpp

    cls = GradCAMpp if plusplus else GradCAM
    # A private copy: MONAI's hooks stay on the module for ever. Identity post-processing (MONAI's
    # default normaliser inverts the map).
    cam = cls(nn_module=copy.deepcopy(model), target_layers=layer, postprocessing=lambda m: m)
    return cam(x).detach()


def test_cam_identity_equals_monai_gradcam(trained_model, inputs):
    assert has_cam_head(trained_model, "layer4")
    logits, ours = forward_with_cam(trained_model, inputs)
    ref = _monai_map(trained_model, inputs, "layer4")
    assert ours.shape == ref.shape == (1, 1, SIZE, SIZE)
    assert float(ref.max()) > 0, "degenerate reference map: the test would prove nothing"
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.max()))
    a, b = normalize_max(ours), normalize_max(ref)
    assert np.abs(a - b).max() < 1e-4
    assert stats.spearmanr(a.ravel(), b.ravel()).statistic > 0.999
    with torch.inference_mode():
        assert torch.allclose(logits, trained_model(inputs), atol=1e-5)
    # The hook used for the CAM is gone again.
    assert len(trained_model.layer4._forward_hooks) == 0


def test_compute_saliency_default_is_the_forward_only_path(trained_model, inputs):
    logits, maps = compute_saliency(trained_model, inputs, "gradcam")
    assert maps.shape == (1, 6, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.max() == pytest.approx(1.0) and maps.min() >= 0
    assert np.array_equal(maps[0, 0], maps[0, 5]), "one in-plane map repeated over the six slices"
    _, ref = forward_with_cam(trained_model, inputs)
    assert np.allclose(maps[0, 0], normalize_max(ref)[0, 0])


@pytest.mark.parametrize("layer,plusplus", [("layer3", False), ("layer4", True)])
def test_backward_path_matches_monai(trained_model, inputs, layer, plusplus):
    _, ours = gradcam_backward(trained_model, inputs, layer, plusplus=plusplus)
    ref = _monai_map(trained_model, inputs, layer, plusplus=plusplus)
    assert float(ref.max()) > 0
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-5 * float(ref.max()))
    assert not any(len(m._forward_hooks) for m in trained_model.modules())


def test_gradcampp_works_at_batch_2(trained_model):
    x, _ = _blob_batch(2, np.random.default_rng(3))
    logits, maps = compute_saliency(trained_model, x, "gradcampp")
    assert maps.shape == (2, 6, SIZE, SIZE) and logits.shape == (2, 1)


class _Gate(torch.nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.mask


class _BoxModel(torch.nn.Module):
    """Hand-built: the logit depends only on the input inside a fixed box (rows r0:r1, cols c0:c1).

    Same layout as a ResNet head (layer4 -> global average pooling -> linear), so every path runs.
    """

    def __init__(self, box: tuple[int, int, int, int], channels: int = 6, size: int = SIZE):
        super().__init__()
        self.layer3 = torch.nn.Conv2d(channels, 4, 1)
        torch.nn.init.constant_(self.layer3.weight, 1.0 / channels)
        torch.nn.init.zeros_(self.layer3.bias)
        mask = torch.zeros(1, 1, size, size)
        r0, r1, c0, c1 = box
        mask[..., r0:r1, c0:c1] = 1.0
        self.layer4 = _Gate(mask)
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 1)
        torch.nn.init.constant_(self.fc.weight, 2.0)
        torch.nn.init.constant_(self.fc.bias, -1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layer4(torch.relu(self.layer3(x)))
        return self.fc(torch.flatten(self.avgpool(a), 1))


BOX = (20, 44, 8, 32)


@pytest.fixture(scope="module")
def box_model_and_input() -> tuple[torch.nn.Module, torch.Tensor]:
    model = _BoxModel(BOX)
    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 0.3, size=(1, 6, SIZE, SIZE)).astype(np.float32)
    x[..., 5:15, 45:60] = 1.0  # the brightest structure lies OUTSIDE the box
    x[..., 28:34, 14:22] = 0.7  # a weaker one inside
    return model.eval(), torch.from_numpy(x)


@pytest.mark.parametrize("method", ["gradxinput_smooth", "gradcam", "gradcampp", "occlusion", "gradxinput"])
def test_saliency_peak_inside_known_region(box_model_and_input, method):
    model, x = box_model_and_input
    opts = {"mask_size": 8} if method == "occlusion" else {}
    _, maps = compute_saliency(model, x, method, **opts)
    peak = np.unravel_index(np.argmax(maps[0].max(axis=0)), maps.shape[-2:])
    r0, r1, c0, c1 = BOX
    assert r0 <= peak[0] < r1 and c0 <= peak[1] < c1, f"{method}: peak {peak} outside box {BOX}"
    # Nearly all of the map's mass lies in (or, for occlusion, next to) the box.
    m = maps[0].max(axis=0)
    inside = m[max(r0 - 8, 0):r1 + 8, max(c0 - 8, 0):c1 + 8].sum()
    assert inside / m.sum() > 0.95


def test_gradcam_backward_on_box_model(box_model_and_input):
    model, x = box_model_and_input
    _, fast = forward_with_cam(model, x)
    _, slow = gradcam_backward(model, x, "layer4")
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-7)


def test_deletion_insertion_faithful_on_box_model(box_model_and_input):
    model, x = box_model_and_input
    _, maps = compute_saliency(model, x, "gradxinput")
    res = deletion_insertion(model, x, maps[0], n_steps=8)
    assert len(res["deletion"]["saliency_order"]) == 9
    assert res["deletion"]["auc"] < res["deletion"]["auc_random"]
    assert res["insertion"]["auc"] > res["insertion"]["auc_random"]
    assert res["deletion"]["faithful"] and res["insertion"]["faithful"]
    # A map pointing at the wrong place is found out.
    wrong = np.roll(maps[0], 32, axis=-1)
    bad = deletion_insertion(model, x, wrong, n_steps=8)
    assert bad["deletion"]["auc"] > res["deletion"]["auc"]


def test_randomization_check(trained_model, inputs):
    _, maps = compute_saliency(trained_model, inputs, "gradxinput")
    rnd = randomized_copy(trained_model)
    assert not torch.equal(rnd.conv1.weight, trained_model.conv1.weight)
    state = torch.get_rng_state()
    res = randomization_check(trained_model, inputs, maps[0], "gradxinput")
    assert torch.equal(state, torch.get_rng_state()), "the caller's RNG must be untouched"
    assert res["spearman"] is not None and -1 <= res["spearman"] <= 1
    assert res["passed"] == (res["spearman"] < 0.5)
    # A map that does not depend on the learned weights (here: the randomised copy's own map) fails.
    _, rmap = compute_saliency(randomized_copy(trained_model, seed=0), inputs, "gradxinput")
    same = randomization_check(trained_model, inputs, rmap[0], "gradxinput", seed=0)
    assert same["spearman"] == pytest.approx(1.0) and not same["passed"]


def test_tta(trained_model, inputs):
    augs = augmentations(5)
    assert augs[0].mirror is False and augs[0].gain == 1.0 and augs[1].mirror is True
    probs = tta_probabilities(trained_model, inputs, 5)
    assert probs.shape == (5,)
    with torch.inference_mode():
        p0 = torch.sigmoid(trained_model(inputs))[0, 0].item()
    assert probs[0] == pytest.approx(p0, abs=1e-5)
    assert np.all((probs >= 0) & (probs <= 1))
    assert np.array_equal(probs, tta_probabilities(trained_model, inputs, 5)), "deterministic for a seed"


def test_gaussian_blur_is_a_normalised_separable_gaussian():
    from rheumai.saliency import gaussian_blur

    m = torch.zeros(1, 2, 21, 21)
    m[0, 1, 10, 10] = 1.0
    assert torch.equal(gaussian_blur(m, 0.0), m)
    b = gaussian_blur(m, 1.5)
    assert float(b[0, 0].abs().max()) == 0.0, "channels are smoothed on their own"
    assert float(b.sum()) == pytest.approx(1.0, abs=1e-5)
    t = np.arange(-10, 11)
    g = np.exp(-0.5 * (t / 1.5) ** 2)
    g[np.abs(t) > 5] = 0  # truncated at ceil(3 sigma) = 5 px
    g /= g.sum()
    assert np.allclose(b[0, 1].numpy(), np.outer(g, g), atol=1e-6)


def test_gradxinput_smooth_is_smoothed_absolute_gradxinput(trained_model, inputs):
    """Equals the hand computation; also sees evidence that lowers the input (|.|, not ReLU)."""
    from rheumai.saliency import gaussian_blur

    _, maps = compute_saliency(trained_model, inputs, "gradxinput_smooth", sigma_px=1.0)
    x = inputs.clone().requires_grad_(True)
    trained_model.eval()
    (g,) = torch.autograd.grad(trained_model(x)[:, 0].sum(), x)
    ref = normalize_max(gaussian_blur((g * inputs).abs(), 1.0))
    assert maps.shape == (1, 6, SIZE, SIZE)
    assert np.allclose(maps, ref, atol=1e-5)
    assert not np.array_equal(maps[0, 0], maps[0, 5]), "one map per slice"


def _selection_and_mask(t2_crop_path):
    from rheumai.tasks.cervical_ra.slices import SliceParams, select_slices

    sel = select_slices(sitk.ReadImage(str(t2_crop_path)), SliceParams(size=(40, 40), spacing_mm=2.0))
    arr = np.zeros(sel.array.shape, np.uint8)
    arr[2, 10:15, 20:26] = 1  # lesion on one of the six slices only
    return sel, sel.grid_image(arr.astype(np.float32))


def test_peak_distance_mm_uses_the_lesion_projected_over_the_slices(t2_crop_path):
    from rheumai.saliency import peak_distance_mm

    sel, mask = _selection_and_mask(t2_crop_path)
    mask = sitk.Resample(mask, sitk.ReadImage(str(t2_crop_path)), sitk.Transform(), sitk.sitkNearestNeighbor)
    sel_mask = sitk.GetArrayFromImage(sitk.Resample(mask, sel.grid.reference_image(), sitk.Transform(),
                                                    sitk.sitkNearestNeighbor)) > 0
    assert sel_mask[2].any() and not sel_mask[0].any()
    proj = sel_mask.any(0)
    rows, cols = np.nonzero(proj)
    grid = np.zeros(sel.array.shape, np.float32)
    grid[5, rows[0], cols[0]] = 1.0  # peak on another slice, inside the projected lesion: a hit
    assert peak_distance_mm(grid, sel, mask) == 0.0
    grid[:] = 0
    r, c = int(rows.mean()), int(cols.max()) + 3  # 3 px = 6 mm posterior of the lesion's edge
    grid[0, r, c] = 1.0
    assert peak_distance_mm(grid, sel, mask) == pytest.approx(6.0)
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    assert np.isnan(peak_distance_mm(grid, sel, empty))


def test_slice_attention_gradcam_is_per_slice():
    torch.manual_seed(0)
    model = build_model(default_architecture(10, 6, (64, 64), conv1_t_stride=1, family="slice_attention")).eval()
    x = torch.rand(1, 6, 64, 64)
    _, maps = compute_saliency(model, x, "gradcam")
    _, maps_pp = compute_saliency(model, x, "gradcampp")
    assert maps.shape == maps_pp.shape == (1, 6, 64, 64)
    assert maps[0, 0].max() > 0 and maps[0, 3].max() > 0, "degenerate maps: the test would prove nothing"
    assert not np.allclose(maps[0, 0], maps[0, 3]), "one map per slice, not one repeated map"
