"""MRI intensity normalisation on selected slices.

MRI intensities have no physical unit and vary by scanner, coil and bias field, so every input is
rescaled after slice selection, using only voxels inside the source's field of view (``mask``):
padded voxels must not pull the statistics towards the pad value. MONAI's percentile scaler has no
mask argument, hence this small function. Voxels outside the mask are set to 0 (the pad value).
"""

from __future__ import annotations

import numpy as np

METHODS = ("percentile", "zscore", "minmax", "none")


def normalize_intensity(
    array: np.ndarray,
    mask: np.ndarray | None = None,
    method: str = "percentile",
    lower: float = 1.0,
    upper: float = 99.0,
) -> np.ndarray:
    """Return a float32 copy of ``array`` normalised over the voxels where ``mask`` is True.

    percentile: (x - P_lower) / (P_upper - P_lower), clipped to [0, 1] (robust to outliers);
    zscore: (x - mean) / std; minmax: to [0, 1]; none: unchanged. Outside ``mask``: 0.
    A constant region gives zeros rather than a division by zero.
    """
    if method not in METHODS:
        raise ValueError(f"unknown normalisation '{method}'; choose one of {', '.join(METHODS)}")
    x = np.asarray(array, dtype=np.float32)
    m = np.ones(x.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    vals = x[m]
    out = x.copy()
    if method == "none" or vals.size == 0:
        out[~m] = 0.0
        return out
    if method == "percentile":
        lo, hi = np.percentile(vals, [lower, upper])
        scale = hi - lo
        out = np.clip((x - lo) / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(x)
    elif method == "zscore":
        mu, sd = float(vals.mean()), float(vals.std())
        out = (x - mu) / sd if sd > 0 else np.zeros_like(x)
    elif method == "minmax":
        lo, hi = float(vals.min()), float(vals.max())
        out = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    out = out.astype(np.float32, copy=False)
    out[~m] = 0.0
    return out
