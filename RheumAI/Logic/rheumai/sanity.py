"""Is the saliency map trustworthy? Two measurements per study, as JSON-able dicts.

1. Model-parameter randomisation (Adebayo et al. 2018): Spearman (and Pearson) correlation over
   all grid points between the trained model's map and a re-initialised copy's; low is good.
2. Deletion / insertion (Petsiuk et al. 2018): grid points removed in order of decreasing
   saliency (set to 0), or added to a blurred copy; a faithful map's deletion curve falls faster
   (lower area) and its insertion curve rises faster (higher area) than a random order's.
Curves: probability of the explained class (index 0 of a one-logit network) at fractions 0, 1/n, ..., 1.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats
from sklearn.metrics import auc

from .saliency import compute_saliency, probability


def randomized_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A deep copy of ``model`` with every layer re-initialised by its ``reset_parameters`` (forked RNG)."""
    clone = copy.deepcopy(model)
    layers = [m for m in clone.modules() if callable(getattr(m, "reset_parameters", None))]
    if not layers:
        raise ValueError("no layer of this network can be re-initialised (no reset_parameters)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in layers:
            m.reset_parameters()
    return clone.eval()


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None  # undefined: one map is constant
    return float(stats.spearmanr(a, b).statistic), float(np.corrcoef(a, b)[0, 1])


def randomization_check(model: torch.nn.Module, x: torch.Tensor, saliency_map: np.ndarray,
                        method: str = "gradcam", target_layer: str | None = None, seed: int = 0,
                        **options: Any) -> dict[str, Any]:
    """Rank correlation between ``saliency_map`` (C, H, W) of the trained model and a randomised copy's
    on x (1, C, H, W); passed when Spearman < 0.5 or the randomised map is constant."""
    rnd = randomized_copy(model, seed)
    _, rmap = compute_saliency(rnd, x, method, target_layer, **options)
    rho, r = _correlations(saliency_map, rmap[0])
    return {"method": method, "target_layer": target_layer, "spearman": rho, "pearson": r,
            "randomized_map_constant": bool(np.ptp(rmap[0]) == 0),
            "passed": bool(rho is None or rho < 0.5),
            "rule": "passed when Spearman(trained, randomised) < 0.5 or the randomised map is constant"}


def _curve(model: torch.nn.Module, start: torch.Tensor, end: torch.Tensor, order: np.ndarray,
           fractions: np.ndarray, class_idx: int, batch_size: int = 4) -> np.ndarray:
    """Probabilities as the points ``order[:k]`` go from ``start`` values to ``end`` values."""
    flat_start, flat_end = start.reshape(-1), end.reshape(-1)
    order_t = torch.as_tensor(order, device=start.device)

    def mixed(f: float) -> torch.Tensor:
        idx = order_t[: int(round(f * flat_start.numel()))]
        return flat_start.index_copy(0, idx, flat_end[idx]).reshape(start.shape)

    with torch.inference_mode():
        logits = torch.cat([model(torch.stack([mixed(f) for f in fractions[i:i + batch_size]]))
                            for i in range(0, len(fractions), batch_size)])
    return probability(logits)[:, class_idx].float().cpu().numpy().astype(np.float64)


def deletion_insertion(model: torch.nn.Module, x: torch.Tensor, saliency_map: np.ndarray, n_steps: int = 10,
                       blur_sigma_px: float = 5.0, seed: int = 0, class_idx: int = 0) -> dict[str, Any]:
    """Deletion (points set to 0) and insertion (from x blurred in-plane, ``blur_sigma_px`` grid points)
    curves for ``saliency_map`` (C, H, W) on x (1, C, H, W), saliency vs random order."""
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    sal = np.asarray(saliency_map, dtype=np.float32).ravel()
    order = np.argsort(-sal, kind="stable")
    rand = np.random.default_rng(seed).permutation(sal.size)
    x0, sigma = x[0], (0, blur_sigma_px, blur_sigma_px)
    blurred = x0.new_tensor(ndimage.gaussian_filter(x0.detach().cpu().numpy(), sigma))
    out: dict[str, Any] = {"fractions": fractions.tolist(), "n_steps": n_steps, "deletion_baseline": "zero",
                           "insertion_baseline": f"gaussian blur sigma {blur_sigma_px} px"}
    # faithful: deletion falls faster (lower area) / insertion rises faster (higher area) than random
    for name, start, end, sign in (("deletion", x0, torch.zeros_like(x0), 1), ("insertion", blurred, x0, -1)):
        ordered, random = (_curve(model, start, end, o, fractions, class_idx) for o in (order, rand))
        a, a_random = float(auc(fractions, ordered)), float(auc(fractions, random))
        out[name] = {"saliency_order": ordered.tolist(), "random_order": random.tolist(), "auc": a,
                     "auc_random": a_random, "faithful": bool(sign * (a - a_random) < 0)}
    return out


def run_sanity(model: torch.nn.Module, x: torch.Tensor, saliency_map: np.ndarray, method: str = "gradcam",
               target_layer: str | None = None, n_steps: int = 10, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Both checks for one input x (1, C, H, W) and its map (C, H, W); a JSON-able dict."""
    return {"randomization": randomization_check(model, x, saliency_map, method, target_layer, seed, **options),
            "faithfulness": deletion_insertion(model, x, saliency_map, n_steps=n_steps, seed=seed)}


def save_sanity_plot(path: str | Path, sanity: dict[str, Any], title: str | None = None) -> Path:
    """PNG of the deletion and insertion curves (saliency order vs random order)."""
    from .report import _save_fig, _subplots

    faith = sanity["faithfulness"]
    f = faith["fractions"]
    fig, axes = _subplots(1, 2, figsize=(7.5, 3))
    for ax, name in zip(axes, ("deletion", "insertion")):
        c = faith[name]
        ax.plot(f, c["saliency_order"], "-o", ms=3, label=f"saliency order (AUC {c['auc']:.3f})")
        ax.plot(f, c["random_order"], "--", color="gray", label=f"random order (AUC {c['auc_random']:.3f})")
        ax.set(xlabel="fraction of grid points " + ("removed" if name == "deletion" else "inserted"),
               ylabel="probability", ylim=(-0.02, 1.02))
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    rnd = sanity["randomization"]
    rho = "undefined" if rnd["spearman"] is None else f"{rnd['spearman']:.3f}"
    fig.suptitle((title + ": " if title else "") + f"randomisation check: Spearman {rho}", fontsize=9)
    fig.tight_layout()
    return _save_fig(fig, Path(path))
