"""The fused conv + Deep Control + activation block as a registered PyTorch custom op.

``torch.ops.dcgraph.conv_deep_control(x, weight, bias, a, g, b, stride, padding, dilation,
groups, act, negative_slope)`` computes, for 1, 2 or 3 spatial dims and zero padding,

    out = act(g * (y - a * m) + b),    y = conv(x, weight) + bias,   m = mean_S(y)

**Forward.** Two exact plans (spec section 3), both here and tested against each other:

- *hoisted* (:func:`forward_hoisted`): ``m`` from the input (:mod:`dcgraph.hoisting`),
  then one convolution with a per-sample bias and the activation as its epilogue. This is
  the plan for compiled kernels, where the epilogue fuses into the convolution (TVM).
- *reduced* (:func:`forward_reduced`): the convolution, a mean over its output, then the
  epilogue ``out = act(y * g + o)`` with ``o = b - g * a * m``, in place.

The op runs *reduced*: in eager PyTorch neither the mean nor the epilogue fuses into
oneDNN's convolution, and measured here (ResNet-18 shapes, 2 threads) the output mean
costs 0.01-0.2 ms where the hoisted mean's small matmuls cost 0.15-2.9 ms; the whole
epilogue (mean, affine, relu) is about 3% of the convolution.

**Backward** (spec section 4) keeps the block input ``x`` and the block output ``out``
(nothing besides ``x`` for silu/hardswish, whose pre-activation cannot be read back from
``out``; those recompute it). The small means are recomputed from ``x`` by hoisting, and
only when ``a`` needs a gradient. With ``u = y - a * m`` and ``dz = dout * act'(z)``::

    db = sum_{n,s} dz                      dg = sum_{n,s} dz * u,   u = (z - b) / g
    da = -g * sum_n m[n] * sum_s dz[n]     dy = g * dz - (a * g / |S|) * sum_s dz
    dx, dW, dc0 = the convolution's own backward from dy

``u = (z - b) / g`` loses precision when ``|g|`` is tiny next to ``|b|``; then ``y`` is
recomputed from ``x`` (one extra convolution) instead. The backward is itself a custom op,
``dcgraph::conv_deep_control_backward``, so that tracers (torch.export, AOTAutograd) see
one opaque node and the eager-only choices above stay eager.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dcgraph import activations
from dcgraph.hoisting import conv_output_size, hoisted_mean

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _view(v: torch.Tensor, nd: int) -> torch.Tensor:
    """A per-channel ``(C,)`` or per-sample ``(N, C)`` vector broadcast over ``nd`` spatial dims."""
    if v.dim() == 1:
        return v.reshape((1, -1) + (1,) * nd)
    return v.reshape(v.shape + (1,) * nd)


def _check_args(x: torch.Tensor, weight: torch.Tensor, act: str) -> int:
    nd = x.dim() - 2
    if nd not in _CONV:
        raise ValueError(f"expected input (N, C, *spatial) with 1-3 spatial dims, got {tuple(x.shape)}")
    if weight.dim() != x.dim():
        raise ValueError(f"weight {tuple(weight.shape)} does not match input {tuple(x.shape)}")
    activations.check(act)
    return nd


def forward_hoisted(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float,
) -> torch.Tensor:
    """``act(conv(x, g * W) + o[n, c])``, ``o = b + g * (c0 - a * (m + c0))``, ``m`` from ``x``."""
    nd = _check_args(x, weight, act)
    m = hoisted_mean(x, weight, stride, padding, dilation, groups)
    o = b - g * a * m if bias is None else b + g * (bias - a * (m + bias))
    out = _CONV[nd](x, weight * _view(g, nd + 1)[0], None, stride, padding, dilation, groups)
    out.add_(_view(o, nd))
    return activations.apply_(out, act, negative_slope)


def forward_reduced(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float,
) -> torch.Tensor:
    """``act(y * g + o[n, c])``, ``o = b - g * a * m``, ``m`` the mean of ``y = conv(x) + c0``."""
    nd = _check_args(x, weight, act)
    y = _CONV[nd](x, weight, bias, stride, padding, dilation, groups)
    if a.any():
        o = b - g * a * y.mean(dim=tuple(range(2, y.dim())))
    else:  # a = 0 (BatchNorm converted with "preserve"): an affine epilogue, no mean pass
        o = b.expand(y.shape[0], -1)
    out = y.mul_(_view(g, nd)).add_(_view(o, nd))
    return activations.apply_(out, act, negative_slope)


@torch.library.custom_op("dcgraph::conv_deep_control", mutates_args=())
def conv_deep_control_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float,
) -> torch.Tensor:
    """The fused block (see the module docstring). Zero padding given per spatial dim."""
    return forward_reduced(x, weight, bias, a, g, b, stride, padding, dilation, groups,
                           act, negative_slope)


@conv_deep_control_op.register_fake
def _(x, weight, bias, a, g, b, stride, padding, dilation, groups, act, negative_slope):
    _check_args(x, weight, act)
    out_size = conv_output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], *out_size))


def _channel_dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum over n and S of p * q`` per channel, as batched dot products (no full-size temporary:
    fresh full-size buffers page-fault, which costs more than the arithmetic here)."""
    n, c = p.shape[:2]
    return torch.einsum("ncs,ncs->nc", p.reshape(n, c, -1), q.reshape(n, c, -1)).sum(0)


def _tiny_gain(g: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``(z - b) / g`` would lose more than about half the mantissa for some channel."""
    tol = torch.finfo(g.dtype).eps ** 0.5
    return bool((g.abs() <= tol * (1.0 + b.abs())).any())


def backward(
    grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float, output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dW, dc0, da, dg, db)`` of the fused block; ``out`` may be None.

    ``output_mask`` says which of the six are needed; unneeded ones, and ``dc0`` when there
    is no bias, come back as empty tensors.
    """
    nd = _check_args(x, weight, act)
    need_dx, need_dw, need_dc0, need_da, need_dg, need_db = output_mask
    spatial = tuple(range(2, nd + 2))
    count = 1
    for s in grad.shape[2:]:
        count = count * s
    empty = x.new_empty(0)
    m = None
    if out is not None and activations.invertible(act, negative_slope) and not _tiny_gain(g, b):
        dz, p = activations.backward_from_output(grad, out, act, negative_slope)
        sum_dz = dz.sum(dim=spatial)  # (N, C)
        db = sum_dz.sum(0)
        # dg = sum dz * (z - b) / g = (sum dz * z - b * db) / g
        dg = (_channel_dot(p, out) - b * db) / g if need_dg else empty.clone()
    else:  # recompute the raw conv output from the saved input: one extra convolution
        y = _CONV[nd](x, weight, bias, stride, padding, dilation, groups)
        m = y.mean(dim=spatial)
        u = y.sub_(_view(a * m, nd))
        dz = activations.backward_from_preact(
            grad, _view(g, nd) * u + _view(b, nd), act, negative_slope)
        sum_dz = dz.sum(dim=spatial)
        db = sum_dz.sum(0)
        dg = _channel_dot(dz, u) if need_dg else empty.clone()
    if not need_db:
        db = empty.clone()
    if need_da:
        if m is None:  # hoisted: the conv's map means from its input, no convolution
            m = hoisted_mean(x, weight, stride, padding, dilation, groups)
            if bias is not None:
                m = m + bias
        da = -g * (m * sum_dz).sum(0)
    else:
        da = empty.clone()
    dx = dw = dc0 = None
    if need_dx or need_dw or (need_dc0 and bias is not None):
        # dy = g * dz - (a * g / |S|) * sum_s dz, in dz's own memory when dz is ours
        dy = dz.mul_(_view(g, nd)) if dz is not grad else dz * _view(g, nd)
        dy.sub_(_view((a * g / count) * sum_dz, nd))
        bias_sizes = [weight.shape[0]] if bias is not None else None
        dx, dw, dc0 = torch.ops.aten.convolution_backward(
            dy, x, weight, bias_sizes, stride, padding, dilation, False, [0] * nd, groups,
            [need_dx, need_dw, need_dc0 and bias is not None])
    return (
        dx if dx is not None else empty.clone(),
        dw if dw is not None else empty.clone(),
        dc0 if dc0 is not None else empty.clone(),
        da, dg, db,
    )


@torch.library.custom_op("dcgraph::conv_deep_control_backward", mutates_args=())
def conv_deep_control_backward_op(
    grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float, output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`backward` as an opaque op, for tracers (torch.export, AOTAutograd)."""
    return backward(grad, x, out, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                    negative_slope, output_mask)


@conv_deep_control_backward_op.register_fake
def _(grad, x, out, weight, bias, a, g, b, stride, padding, dilation, groups, act,
      negative_slope, output_mask):
    like = (x, weight, bias, a, g, b)
    return tuple(
        torch.empty_like(t) if need and t is not None else x.new_empty(0)
        for t, need in zip(like, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, g, b, stride, padding, dilation, groups, act, negative_slope = inputs
    keep_out = activations.invertible(act, negative_slope)
    ctx.save_for_backward(x, output if keep_out else None, weight, bias, a, g, b)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups, act, negative_slope)


def _grads_from_context(ctx, grad, backward_fn) -> tuple:
    """Autograd's gradient tuple from what :func:`_setup_context` saved, via ``backward_fn``
    (:func:`backward` itself, or the opaque backward op for tracers)."""
    x, out, weight, bias, a, g, b = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:6])
    grads = backward_fn(grad.contiguous(), x, out, weight, bias, a, g, b, *ctx.conv_args, need)
    return *(gr if n else None for gr, n in zip(grads, need, strict=True)), *(None,) * 6


def _backward(ctx, grad):
    return _grads_from_context(ctx, grad, conv_deep_control_backward_op)


conv_deep_control_op.register_autograd(_backward, setup_context=_setup_context)


class ConvDeepControlFunction(torch.autograd.Function):
    """The op's forward and backward without the custom-op dispatch, for plain eager training.

    Same implementations (:func:`forward_reduced`, :func:`backward`), same saved tensors;
    used by :func:`dcgraph.functional.conv_deep_control` only when no tracer or mode can
    observe the call, where the dispatch costs about 0.2-0.5 ms per block and step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                negative_slope):
        out = forward_reduced(x, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                              negative_slope)
        _setup_context(ctx, (x, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                             negative_slope), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _grads_from_context(ctx, grad, backward)
