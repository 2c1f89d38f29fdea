"""The reference semantics of Deep Control: the oracle every other implementation is tested against.

Spec: ``shared/DEEP_CONTROL.md`` section 1. For a convolution's raw output ``y`` of shape
``(N, C, *S)`` and per-channel parameters ``a, g, b`` of shape ``(C,)``::

    m[n, c]    = mean over S of y[n, c]
    z[n, c, s] = g[c] * (y[n, c, s] - a[c] * m[n, c]) + b[c]
    out        = act(z)

This module is deliberately plain: no in-place ops, no hoisting, no shared helpers with the
fast paths (its activations are written out here, not imported), so that a bug in the fast
code cannot hide in the oracle too. Do not optimise it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: the activations of the spec (section 1): the one list every implementation takes its names from
ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "hardswish", "silu")


def activation(z: torch.Tensor, act: str, negative_slope: float = 0.01) -> torch.Tensor:
    """The pointwise activations of the spec, written from their textbook definitions."""
    if act == "identity":
        return z
    if act == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if act == "relu6":
        return torch.minimum(torch.where(z > 0, z, torch.zeros_like(z)), torch.full_like(z, 6.0))
    if act == "leaky_relu":
        return torch.where(z > 0, z, negative_slope * z)
    if act == "hardswish":
        return z * torch.clamp(z + 3.0, 0.0, 6.0) / 6.0
    if act == "silu":
        return z / (1.0 + torch.exp(-z))
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def deep_control(
    y: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    act: str = "identity",
    negative_slope: float = 0.01,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deep Control on a raw conv output ``y`` of shape ``(N, C, *S)``, any number of dims S;
    ``skip`` (a residual, spec section 4a) is added before the activation."""
    if y.dim() < 3:
        raise ValueError(f"expected (N, C, *spatial) with at least one spatial dim, got {tuple(y.shape)}")
    spatial = tuple(range(2, y.dim()))
    shape = (1, -1) + (1,) * len(spatial)
    m = y.mean(dim=spatial, keepdim=True)
    z = g.reshape(shape) * (y - a.reshape(shape) * m) + b.reshape(shape)
    if skip is not None:
        z = z + skip
    return activation(z, act, negative_slope)


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """A plain N-d convolution (1, 2 or 3 spatial dims), ``nn.ConvNd`` semantics."""
    nd = x.dim() - 2
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    if padding_mode != "zeros":
        pad = (padding,) * nd if isinstance(padding, int) else tuple(padding)
        x = F.pad(x, [p for p in reversed(pad) for _ in range(2)], mode=padding_mode)
        padding = 0
    return fn(x, weight, bias, stride, padding, dilation, groups)


def conv_deep_control(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    act: str = "identity",
    negative_slope: float = 0.01,
    padding_mode: str = "zeros",
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(DeepControl(conv(x)) [+ skip])``: the semantics of the fused conv block, two plain steps."""
    y = conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)
    return deep_control(y, a, g, b, act, negative_slope, skip)
