"""MRI intensity normalisation over the voxels inside the source's field of view.

MRI intensities have no unit and vary by scanner, coil and bias field, so every input is rescaled
after sampling, from the voxels where ``mask`` is True only (padding must not pull the statistics
towards the pad value; MONAI's percentile scaler has no mask). Outside the mask: 0 (the pad value).
"""

from __future__ import annotations

import numpy as np

METHODS = ("percentile", "zscore", "minmax", "none")


def normalize_intensity(array: np.ndarray, mask: np.ndarray | None = None, method: str = "percentile",
                        lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """float32 copy of ``array``: percentile: (x - P_lower) / (P_upper - P_lower) clipped to [0, 1];
    zscore: (x - mean) / std; minmax: to [0, 1]; none: unchanged. A constant region gives zeros."""
    if method not in METHODS:
        raise ValueError(f"unknown normalisation '{method}'; choose one of {', '.join(METHODS)}")
    x = np.asarray(array, dtype=np.float32)
    m = np.ones(x.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    vals = x[m]
    if method == "none" or vals.size == 0:
        out = x.copy()
    elif method == "percentile":  # float64 percentiles: the arithmetic runs in float64
        lo, hi = np.percentile(vals, [lower, upper])
        out = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32) if hi > lo else np.zeros_like(x)
    else:
        lo, hi = float(vals.min()), float(vals.max())
        lo, scale = (float(vals.mean()), float(vals.std())) if method == "zscore" else (lo, hi - lo)
        out = (x - lo) / scale if scale > 0 else np.zeros_like(x)
    out[~m] = 0.0
    return out
