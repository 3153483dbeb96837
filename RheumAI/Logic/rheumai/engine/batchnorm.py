"""BatchNorm running statistics recomputed on un-augmented training images: the running averages,
which drift with small batches and strong augmentation, become the exact pooled mean and unbiased
variance of each layer's input (unlike ``torch.optim.swa_utils.update_bn``, independent of the batch size).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def trainable_batchnorms(model: torch.nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers that keep running statistics and whose affine weights are trained
    (a frozen layer, ``weight.requires_grad == False``, keeps its statistics)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and (m.weight is None or m.weight.requires_grad)]


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches: Iterable[Any],
                          forward: Callable[[torch.nn.Module, Any], Any]) -> int:
    """Set the running statistics of :func:`trainable_batchnorms` to the pooled statistics of their
    inputs over ``batches`` (``forward(model, batch)`` runs one on the device; only BatchNorm layers in
    training mode). Returns the number of layers recalibrated; the model is left in eval mode."""
    layers = trainable_batchnorms(model)
    sums: dict[_BatchNorm, list[Any]] = {m: [0.0, 0.0, 0] for m in layers}  # per channel: sum, squares; n

    def hook(mod: _BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().to(torch.float64)
        dims, s = [0, *range(2, x.dim())], sums[mod]
        s[0], s[1], s[2] = s[0] + x.sum(dim=dims), s[1] + (x * x).sum(dim=dims), s[2] + x[:, 0].numel()

    was_training, n_batches = model.training, 0
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    model.eval()
    for m in layers:
        m.train()
    try:
        for batch in batches if layers else ():
            forward(model, batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    model.eval()
    if layers and n_batches == 0:
        raise ValueError("recalibrate_batchnorm: no batches")
    for m, (s, ss, n) in sums.items():
        mean = s / n
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(((ss - n * mean * mean) / max(n - 1, 1)).clamp_min(0).to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(n_batches)
    return len(layers)
