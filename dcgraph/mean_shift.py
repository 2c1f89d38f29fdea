"""Mean Shift Rejection (arXiv 1911.13173, the Deep Control author's follow-up): keep every conv
filter channel-wise zero-mean, so a layer adds no mean shift to its input, without batch
statistics.

For a conv weight ``W (C_out, C_in / groups, *k)``, filter ``c`` is ``W[c]``:

- :func:`zero_mean_init_`: ``W[c] <- gain * (W[c] - mean(W[c])) / ||W[c] - mean(W[c])||``: zero
  mean and unit L2 norm per output channel (``gain`` 1, the paper's initialisation; ``sqrt(2)``
  keeps He's expected norm, which a relu stack without variance normalisation needs);
- :func:`reject_mean_shift`: an optimizer hook that, before every step, replaces each conv
  weight's gradient by ``G[c] - mean(G[c])``. The update then has zero mean per filter, so
  filters that start zero-mean stay zero-mean under SGD (with momentum too: a sum of zero-mean
  gradients). Usable with any model and optimizer; conv weights are the parameters of rank >= 3.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dcgraph.nn import _DeepControlConvNd

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, _DeepControlConvNd)


def _centre(t: torch.Tensor) -> torch.Tensor:
    """``t`` minus its mean over every dim but the first (per output channel)."""
    return t - t.mean(dim=tuple(range(1, t.dim())), keepdim=True)


@torch.no_grad()
def zero_mean_init_(model: nn.Module, gain: float = 1.0, eps: float = 1e-12) -> int:
    """Re-initialise every conv weight of ``model`` zero-mean with norm ``gain`` per output
    channel (unit norm by default; ``sqrt(2)`` is He's expected norm for relu), from its current
    values: call after the usual init. Returns the number of convs."""
    n = 0
    for m in model.modules():
        if isinstance(m, _CONVS):
            w = _centre(m.weight)
            norm = w.flatten(1).norm(dim=1).clamp_min(eps)
            m.weight.copy_(gain * w / norm.reshape((-1,) + (1,) * (w.dim() - 1)))
            n += 1
    return n


def conv_weights(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters a conv filter's gradient mean is taken over: rank >= 3."""
    return [p for p in params if p.dim() >= 3]


def reject_mean_shift(optimizer: torch.optim.Optimizer):
    """Subtract each conv filter's gradient mean before every ``optimizer.step()``; returns the
    hook's handle (``.remove()`` undoes it)."""

    def hook(opt: torch.optim.Optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                for p in conv_weights(group["params"]):
                    if p.grad is not None:
                        p.grad.copy_(_centre(p.grad))

    return optimizer.register_step_pre_hook(hook)


def filter_means(model: nn.Module) -> float:
    """The largest ``|mean(W[c])|`` over every conv filter of ``model`` (0 when zero-mean)."""
    worst = 0.0
    for m in model.modules():
        if isinstance(m, _CONVS):
            w = m.weight.detach()
            worst = max(worst, float(w.flatten(1).mean(dim=1).abs().max()))
    return worst
