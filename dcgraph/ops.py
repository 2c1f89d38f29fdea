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

**Residual tail** (spec section 4a): an optional ``skip`` input, ``out = act(z + skip)``
(ResNet's ``relu(DC(conv(h)) + h)``), broadcast to the output like the add it replaces.

**Backward** (spec section 4) keeps the block input ``x``, the block output ``out`` only
where the activation's mask is read from it (relu, relu6, leaky_relu), the small per-sample
means ``m`` (eager; traced programs recompute them from ``x`` by hoisting, only when ``a``
learns), and ``skip`` only for silu/hardswish, whose pre-activation is recomputed. So a
residual tail saves nothing extra. With ``u = y - a * m`` and ``dz = dout * act'(z)``::

    db = sum_{n,s} dz                      dskip = dz
    da = -g * sum_n m[n] * sum_s dz[n]     dy = g * dz - (a * g / |S|) * sum_s dz
    dx, dW = the convolution's own backward from dy
    dg = sum_{n,s} dz * u = (<W[c], dW[c]> + c0 * dc0) / g,   dc0 = g * (1 - a) * db

The last form holds because ``z`` depends on ``g`` only through ``g * W`` and ``g * c0``; it
costs no pass over the output (``dz * u`` needs one, plus ``u``). It divides by ``g``, so
for tiny ``|g|`` the raw output is recomputed from ``x`` (one extra convolution) and
``dz * u`` summed directly. Per block and step that leaves the activation mask, one
reduction and the ``dy`` pass: what BatchNorm's backward costs. The backward is itself a
custom op, ``dcgraph::conv_deep_control_backward``, so that tracers (torch.export,
AOTAutograd) see one opaque node and the eager-only choices above stay eager.
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
    act: str, negative_slope: float, skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(conv(x, g * W) + o[n, c] [+ skip])``, ``o = b + g * (c0 - a * (m + c0))``, ``m`` from ``x``."""
    nd = _check_args(x, weight, act)
    m = hoisted_mean(x, weight, stride, padding, dilation, groups)
    o = b - g * a * m if bias is None else b + g * (bias - a * (m + bias))
    out = _CONV[nd](x, weight * _view(g, nd + 1)[0], None, stride, padding, dilation, groups)
    out.add_(_view(o, nd))
    _check_skip(skip, out)
    if skip is not None:
        out.add_(skip)
    return activations.apply_(out, act, negative_slope)


def forward_reduced(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float, skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(y * g + o[n, c] [+ skip])``, ``o = b - g * a * m``, ``m`` the mean of ``y = conv(x) + c0``."""
    return _forward(x, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                    negative_slope, skip, False)[0]


def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float, skip: torch.Tensor | None, keep_mean: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`forward_reduced` and the map means ``m`` (None unless computed: ``a != 0`` or
    ``keep_mean``, which the backward's ``da`` wants: keeping them saves a hoisted recompute)."""
    nd = _check_args(x, weight, act)
    y = _CONV[nd](x, weight, bias, stride, padding, dilation, groups)
    _check_skip(skip, y)
    m = y.mean(dim=tuple(range(2, y.dim()))) if keep_mean or a.any() else None
    # a = 0 (BatchNorm converted with "preserve"): an affine epilogue, no mean pass
    o = b - g * a * m if m is not None else b.expand(y.shape[0], -1)
    out = y.mul_(_view(g, nd)).add_(_view(o, nd))
    if skip is not None:
        out.add_(skip)
    return activations.apply_(out, act, negative_slope), m


def _check_skip(skip: torch.Tensor | None, y: torch.Tensor) -> None:
    if skip is None:
        return
    try:
        fits = torch.broadcast_shapes(skip.shape, y.shape) == y.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"the residual input {tuple(skip.shape)} does not broadcast to the block "
                         f"output {tuple(y.shape)}")


@torch.library.custom_op("dcgraph::conv_deep_control", mutates_args=())
def conv_deep_control_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float, skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused block (see the module docstring). Zero padding given per spatial dim."""
    return forward_reduced(x, weight, bias, a, g, b, stride, padding, dilation, groups,
                           act, negative_slope, skip)


@conv_deep_control_op.register_fake
def _(x, weight, bias, a, g, b, stride, padding, dilation, groups, act, negative_slope, skip=None):
    _check_args(x, weight, act)
    out_size = conv_output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], *out_size))


def _channel_dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum over n and S of p * q`` per channel (``vecdot``: einsum's batched matmul of
    ``1 x S`` rows ran 2-3x slower on 28x28 and 56x56 maps)."""
    n, c = p.shape[:2]
    return torch.linalg.vecdot(p.reshape(n, c, -1), q.reshape(n, c, -1)).sum(0)


def _tiny_gain(g: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``dg`` from ``g``-scaled quantities (``(z - b) / g`` or ``<W, dW> / g``) would
    lose more than about half the mantissa for some channel."""
    tol = torch.finfo(g.dtype).eps ** 0.5
    return bool((g.abs() <= tol * (1.0 + b.abs())).any())


def _masked(act: str, negative_slope: float) -> bool:
    """True if the backward reads the activation's mask from the block output."""
    return act != "identity" and activations.invertible(act, negative_slope)


def backward(
    grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float, output_mask: Sequence[bool],
    skip: torch.Tensor | None = None, mean: torch.Tensor | None = None,
    skip_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dx, dW, dc0, da, dg, db, dskip)`` of the fused block.

    ``out`` is needed for relu / relu6 / leaky_relu (their mask), ``skip`` only for silu and
    hardswish (whose pre-activation is recomputed), ``mean`` (the forward's map means) only
    saves a hoisted recompute when ``a`` learns. ``output_mask`` says which of the seven are
    needed (six entries: no residual); unneeded ones, ``dc0`` without a bias and ``dskip``
    without a residual come back as empty tensors. ``skip_shape``: the residual's shape when
    it broadcasts (``dskip`` is summed to it).
    """
    nd = _check_args(x, weight, act)
    need_dx, need_dw, need_dc0, need_da, need_dg, need_db, *rest = output_mask
    need_dskip = bool(rest and rest[0])
    spatial = tuple(range(2, nd + 2))
    count = 1
    for s in grad.shape[2:]:
        count = count * s
    empty = x.new_empty(0)
    m, u = mean, None

    def recompute():  # the raw conv output from the saved input: one extra convolution
        y = _CONV[nd](x, weight, bias, stride, padding, dilation, groups)
        m_y = y.mean(dim=spatial)
        return m_y, y.sub_(_view(a * m_y, nd))

    p = None
    if act == "identity":
        dz = grad
    elif _masked(act, negative_slope) and out is not None:
        dz, p = activations.backward_from_output(grad, out, act, negative_slope)
    else:  # silu, hardswish: z = g * u + b (+ skip) from the recomputed conv
        m, u = recompute()
        z = _view(g, nd) * u + _view(b, nd)
        dz = activations.backward_from_preact(grad, z if skip is None else z.add_(skip), act,
                                              negative_slope)
    sum_dz = dz.sum(dim=spatial)  # (N, C)
    db = sum_dz.sum(0) if need_db or need_dg else empty.clone()
    # dg: z depends on g only through g * W and g * c0 (homogeneous), so
    #   g * dg = <W, dW> + c0 * dc0,   dc0 = g * (1 - a) * db,
    # which costs no pass over the output; tiny gains take the direct sum dz * u instead.
    # Where the output is smaller than the weights (deep layers), sum over the output instead:
    #   g * dg = sum dz * (z - b - skip),  sum dz * z = sum p * out  (activations.backward_from_output)
    dg_direct = need_dg and _tiny_gain(g, b)
    dg_small = (need_dg and not dg_direct and p is not None and grad.numel() < weight.numel()
                and (skip is not None or skip_shape is None))
    if dg_direct:
        if u is None:
            m, u = recompute()
        dg = _channel_dot(dz, u)
    elif dg_small:
        dot = _channel_dot(p, out) - b * db
        dg = (dot if skip is None else dot - _channel_dot(dz, skip.expand_as(dz))) / g
    if need_da:
        if m is None:  # hoisted: the conv's map means from its input, no convolution
            m = hoisted_mean(x, weight, stride, padding, dilation, groups)
            if bias is not None:
                m = m + bias
        da = -g * (m * sum_dz).sum(0)
    else:
        da = empty.clone()
    dskip = empty.clone()
    if need_dskip:
        dskip = dz if skip_shape is None or list(skip_shape) == list(dz.shape) else dz.sum_to_size(
            list(skip_shape))
    dx = dw = dc0 = None
    want_dw = need_dw or (need_dg and not dg_direct and not dg_small)
    if need_dx or want_dw or (need_dc0 and bias is not None):
        # dy = g * dz - (a * g / |S|) * sum_s dz, in dz's own memory when dz is ours alone
        own = dz is not grad and not need_dskip
        dy = dz.mul_(_view(g, nd)) if own else dz * _view(g, nd)
        dy.sub_(_view((a * g / count) * sum_dz, nd))
        bias_sizes = [weight.shape[0]] if bias is not None else None
        dx, dw, dc0 = torch.ops.aten.convolution_backward(
            dy, x, weight, bias_sizes, stride, padding, dilation, False, [0] * nd, groups,
            [need_dx, want_dw, need_dc0 and bias is not None])
    if need_dg and not dg_direct and not dg_small:
        dg = torch.linalg.vecdot(weight.flatten(1), dw.flatten(1)) / g
        if bias is not None:
            dg = dg + bias * (1 - a) * db
    if not need_dg:
        dg = empty.clone()
    return (
        dx if dx is not None else empty.clone(),
        dw if dw is not None and need_dw else empty.clone(),
        dc0 if dc0 is not None else empty.clone(),
        da, dg, db if need_db else empty.clone(), dskip,
    )


@torch.library.custom_op("dcgraph::conv_deep_control_backward", mutates_args=())
def conv_deep_control_backward_op(
    grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None,
    weight: torch.Tensor, bias: torch.Tensor | None,
    a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str, negative_slope: float, output_mask: Sequence[bool],
    skip: torch.Tensor | None = None, mean: torch.Tensor | None = None,
    skip_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """:func:`backward` as an opaque op, for tracers (torch.export, AOTAutograd); an output
    that is one of its inputs (``dskip = grad``) is copied, as custom ops require."""
    grads = backward(grad, x, out, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                     negative_slope, output_mask, skip, mean, skip_shape)
    return tuple(t.clone() if t is grad else t for t in grads)


@conv_deep_control_backward_op.register_fake
def _(grad, x, out, weight, bias, a, g, b, stride, padding, dilation, groups, act,
      negative_slope, output_mask, skip=None, mean=None, skip_shape=None):
    like = (x, weight, bias, a, g, b)
    grads = [torch.empty_like(t) if need and t is not None else x.new_empty(0)
             for t, need in zip(like, output_mask[:6], strict=True)]
    need_dskip = len(output_mask) > 6 and output_mask[6]
    grads.append(grad.new_empty(list(skip_shape) if skip_shape is not None else grad.shape)
                 if need_dskip else x.new_empty(0))
    return tuple(grads)


def _save(ctx, inputs: tuple, output: torch.Tensor, mean: torch.Tensor | None, eager: bool) -> None:
    """Keep what :func:`backward` reads: ``x``; ``out`` for a masked activation; ``skip`` for
    silu / hardswish (their recompute) and where the output is smaller than the weights (``dg``
    sums over the output there, see :func:`backward`; eager only: a size test would put a guard
    on the batch size into traced programs); the small ``mean`` when the forward had it."""
    x, weight, bias, a, g, b, stride, padding, dilation, groups, act, negative_slope, skip = inputs
    keep_out = _masked(act, negative_slope)
    # skip also where the output is smaller than the weights: dg then sums over the output
    keep_skip = skip is not None and (not activations.invertible(act, negative_slope) or (
        eager and keep_out and output.numel() < weight.numel()))
    ctx.save_for_backward(x, output if keep_out else None, weight, bias, a, g, b,
                          skip if keep_skip else None, mean)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups, act, negative_slope)
    ctx.skip_shape = list(skip.shape) if skip is not None else None


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output, None, eager=False)


def _grads_from_context(ctx, grad, backward_fn) -> tuple:
    """Autograd's gradient tuple from what :func:`_save` kept, via ``backward_fn``
    (:func:`backward` itself, or the opaque backward op for tracers)."""
    x, out, weight, bias, a, g, b, skip, mean = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:6])
    # (under AOTAutograd, needs_input_grad can stop before a trailing None input)
    need_skip = len(ctx.needs_input_grad) > 12 and ctx.needs_input_grad[12]
    grads = backward_fn(grad.contiguous(), x, out, weight, bias, a, g, b, *ctx.conv_args,
                        [*need, need_skip], skip, mean, ctx.skip_shape)
    return (*(gr if n else None for gr, n in zip(grads[:6], need, strict=True)), *(None,) * 6,
            grads[6] if need_skip else None)


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
                negative_slope, skip=None):
        out, m = _forward(x, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                          negative_slope, skip, a.requires_grad)
        _save(ctx, (x, weight, bias, a, g, b, stride, padding, dilation, groups, act,
                    negative_slope, skip), out, m, eager=True)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _grads_from_context(ctx, grad, backward)
