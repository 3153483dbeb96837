"""PNG montages of selected slices, optionally with a map (saliency, mask) overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path


def save_montage(path: str | Path, slices: np.ndarray, overlay: np.ndarray | None = None,
                 titles: list[str] | None = None, suptitle: str | None = None,
                 contour: np.ndarray | None = None) -> Path:
    """A one-row PNG of the (C, H, W) ``slices`` (rows superior -> inferior, columns anterior ->
    posterior: the profile faces left, head up); ``overlay`` (C, H, W) in [0, 1] blended with
    inferno, ``contour`` (C, H, W) bool outlined in cyan (truth masks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = np.asarray(slices, dtype=np.float32)
    c = slices.shape[0]
    fig, axes = plt.subplots(1, c, figsize=(2.4 * c, 2.6), squeeze=False)
    for k, ax in enumerate(axes[0]):
        ax.imshow(slices[k], cmap="gray", vmin=0, vmax=max(float(slices.max()), 1e-6), interpolation="nearest")
        if overlay is not None:
            ov = np.ma.masked_less(np.asarray(overlay[k], dtype=np.float32), 0.05)
            im = ax.imshow(ov, cmap="inferno", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear")
        if contour is not None and np.any(contour[k]):
            ax.contour(np.asarray(contour[k], dtype=float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(titles[k] if titles else f"slice {k}", fontsize=8)
        ax.axis("off")
    if overlay is not None:
        fig.colorbar(im, ax=axes[0, :].tolist(), fraction=0.015, pad=0.01, label="saliency")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)
