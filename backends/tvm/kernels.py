"""The fused Deep Control kernels as TVM tensor expressions (TE), for 1-, 2- and 3-d convs, NC* layout.

Spec section 3 (mean hoisting). For ``y = conv(x, W) + c0`` and per-channel ``a, g, b``::

    m[n, c]   = mean over S of conv(x, W)[n, c]                       (hoisted: from x, not y)
    o[n, c]   = b[c] + g[c] * (c0[c] - a[c] * (m[n, c] + c0[c]))        (per-sample shift)
    out       = act(g[c] * conv(x, W)[n, c, s] + o[n, c])             (one pass over the output)

Two kernels, so that each schedules (and tunes) on its own:

- :func:`hoisted_shift` computes ``o (N, C_out)`` from ``x`` alone: per spatial dim a
  strided box sum per kernel tap, ``T[n, ci, i] = sum_{o < O} x[n, ci, o*s + i*d - p]``
  (out-of-range reads are the zero padding), then ``m = (1/|O|) W . T`` per group.
- :func:`conv_epilogue` is the convolution with ``g`` as a per-channel scale and ``o`` as a
  per-sample bias applied to the accumulator, then the activation: the epilogue costs one
  multiply-add per output, like a bias.

:func:`deep_control` is the two-pass form for a given ``y`` (the standalone ``DeepControl``
ONNX node, or anything hoisting does not cover): a mean over the output, then the epilogue.
Block names (``pad``, ``conv``, ``epilogue``) are what :mod:`.schedules` looks for.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx

from dcgraph.activations import ACTIVATIONS

from .fast_math import fast_silu


def activation(z: tirx.PrimExpr, act: str, negative_slope: float, dtype: str) -> tirx.PrimExpr:
    """The spec's pointwise activations as TIR expressions (same definitions as the reference)."""
    zero = tirx.const(0.0, dtype)
    if act == "identity":
        return z
    if act == "relu":
        return tirx.max(z, zero)
    if act == "relu6":
        return tirx.min(tirx.max(z, zero), tirx.const(6.0, dtype))
    if act == "leaky_relu":
        return tirx.Select(z > zero, z, z * tirx.const(negative_slope, dtype))
    if act == "hardswish":
        clip = tirx.min(tirx.max(z + tirx.const(3.0, dtype), zero), tirx.const(6.0, dtype))
        return z * clip * tirx.const(1.0 / 6.0, dtype)
    if act == "silu":  # float32: vectorisable arithmetic, not a scalar expf call per element
        return fast_silu(z) if dtype == "float32" else z * tirx.sigmoid(z)
    raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def output_size(in_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Output spatial size of a zero-padded convolution, per dim (static sizes only)."""
    return [(int(h) + 2 * p - d * (k - 1) - 1) // s + 1
            for h, k, s, p, d in zip(in_size, kernel, stride, padding, dilation, strict=True)]


def _spatial(x: te.Tensor) -> list[int]:
    sizes = []
    for s in x.shape[2:]:
        if not isinstance(s, tirx.IntImm | int):
            raise ValueError("the Deep Control kernels need static spatial sizes (batch may be dynamic)")
        sizes.append(int(s))
    return sizes


def _staged_input(x: te.Tensor, padding: Sequence[int], stride_last: int):
    """Zero padding, and for a strided conv the last dim split by phase, as one stage.

    Returns ``(t, read)``: ``read(n, c, pos)`` reads padded ``x`` at spatial ``pos``. With
    ``stride_last = s > 1`` the stage stores column ``q*s + ph`` at ``[..., ph, q]``, so the
    conv's output columns ``o*s + r*d`` read consecutive ``q = o + (r*d)//s`` and vectorise
    without gathers. Inlined into the conv, padding would put a branch in its inner loop.
    """
    if not any(padding) and stride_last == 1:
        return x, lambda n, c, pos: x[(n, c, *pos)]
    sizes = _spatial(x)
    padded = [h + 2 * p for h, p in zip(sizes, padding, strict=True)]
    s = stride_last
    shape = [*x.shape[:2], *padded[:-1]]
    if s > 1:
        shape += [s, (padded[-1] + s - 1) // s]
    else:
        shape += [padded[-1]]

    def value(n, c, *idx):
        pos = [*idx[:-2], idx[-1] * s + idx[-2]] if s > 1 else list(idx)
        inside = tirx.const(True, "bool")
        src = []
        for i, (q, p) in enumerate(zip(pos, padding, strict=True)):
            lo, hi = p, sizes[i] + p
            if p or (s > 1 and i == len(pos) - 1):
                inside = tirx.all(inside, q >= lo, q < hi)
            src.append(q - p)
        return tirx.if_then_else(inside, x[(n, c, *src)], tirx.const(0.0, x.dtype))

    t = te.compute(shape, value, name="pad")
    if s == 1:
        return t, lambda n, c, pos: t[(n, c, *pos)]

    def read(n, c, pos):
        return t[(n, c, *pos[:-1], pos[-1] % s, pos[-1] // s)]

    return t, read


def conv_epilogue(
    x: te.Tensor, w: te.Tensor, scale: te.Tensor | None, shift: te.Tensor | None, *,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    act: str = "identity", negative_slope: float = 0.01,
) -> te.Tensor:
    """``out[n, c, s] = act(scale[c] * conv(x, w)[n, c, s] + shift[n, c])``.

    ``scale`` (C_out,) or None for 1; ``shift`` (N, C_out) or None for 0. Zero padding.
    """
    nd = len(x.shape) - 2
    kernel = [int(k) for k in w.shape[2:]]
    out_size = output_size(_spatial(x), kernel, stride, padding, dilation)
    c_out, cig = int(w.shape[0]), int(w.shape[1])
    cog = c_out // groups
    _, read = _staged_input(x, padding, stride[-1])
    rc = te.reduce_axis((0, cig), name="rc")
    rk = [te.reduce_axis((0, k), name=f"r{i}") for i, k in enumerate(kernel)]
    s_last = stride[-1]

    def conv_value(n, c, *o):
        ci = rc if groups == 1 else (c // cog) * cig + rc
        pos = [o[i] * stride[i] + rk[i] * dilation[i] for i in range(nd)]
        if s_last > 1:  # phase-split last dim: (o*s + r*d) -> phase (r*d) % s, column o + (r*d) // s
            r_last = rk[-1] * dilation[-1]
            pos[-1] = (o[-1] + r_last // s_last) * s_last + r_last % s_last
        return te.sum(read(n, ci, pos) * w[(c, rc, *rk)], axis=[rc, *rk])

    conv = te.compute([x.shape[0], c_out, *out_size], conv_value, name="conv")

    def epilogue(n, c, *o):
        z = conv[(n, c, *o)]
        if scale is not None:
            z = z * scale[c]
        if shift is not None:
            z = z + shift[n, c]
        return activation(z, act, negative_slope, x.dtype)

    return te.compute(conv.shape, epilogue, name="epilogue")


def _tap_sum(t: te.Tensor, axis: int, size: int, k: int, s: int, p: int, d: int, out: int) -> te.Tensor:
    """Replace spatial ``axis`` (length ``size``) by ``k`` taps: ``sum_{o<out} t[.., o*s + i*d - p, ..]``."""
    ro = te.reduce_axis((0, out), name=f"o{axis}")

    def value(*idx):
        i = idx[axis]
        h = ro * s + i * d - p
        src = (*idx[:axis], h, *idx[axis + 1:])
        inside = tirx.all(h >= 0, h < size)
        return te.sum(tirx.if_then_else(inside, t[src], tirx.const(0.0, t.dtype)), axis=ro)

    shape = [*t.shape[:axis], k, *t.shape[axis + 1:]]
    return te.compute(shape, value, name=f"tap_sum{axis - 2}")


def shift_value(mean: tirx.PrimExpr, c: tirx.PrimExpr, bias: te.Tensor | None, a: te.Tensor, g: te.Tensor,
                b: te.Tensor) -> tirx.PrimExpr:
    """Channel ``c``'s per-sample shift from its map mean ``m`` (of the conv without its bias):
    ``b - g a m``, or with a conv bias ``c0``, ``b + g (c0 - a (m + c0))``."""
    if bias is None:
        return b[c] - g[c] * a[c] * mean
    return b[c] + g[c] * (bias[c] - a[c] * (mean + bias[c]))


def hoisted_shift(
    x: te.Tensor, w: te.Tensor, bias: te.Tensor | None, a: te.Tensor, g: te.Tensor, b: te.Tensor, *,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> te.Tensor:
    """``o (N, C_out) = b + g * (c0 - a * (m + c0))``, with ``m`` the hoisted map mean of ``conv(x, w)``."""
    nd = len(x.shape) - 2
    sizes = _spatial(x)
    kernel = [int(k) for k in w.shape[2:]]
    out_size = output_size(sizes, kernel, stride, padding, dilation)
    t = x
    for i in reversed(range(nd)):
        t = _tap_sum(t, 2 + i, sizes[i], kernel[i], stride[i], padding[i], dilation[i], out_size[i])
    c_out, cig = int(w.shape[0]), int(w.shape[1])
    cog = c_out // groups
    inv = 1.0
    for o in out_size:
        inv /= o
    rc = te.reduce_axis((0, cig), name="rc")
    rk = [te.reduce_axis((0, k), name=f"r{i}") for i, k in enumerate(kernel)]

    def mean_value(n, c):
        ci = rc if groups == 1 else (c // cog) * cig + rc
        return te.sum(w[(c, rc, *rk)] * t[(n, ci, *rk)], axis=[rc, *rk])

    m = te.compute([x.shape[0], c_out], mean_value, name="hoisted_mean")
    scale = tirx.const(inv, x.dtype)

    def shift(n, c):
        return shift_value(m[n, c] * scale, c, bias, a, g, b)

    return te.compute([x.shape[0], c_out], shift, name="shift")


def deep_control(
    y: te.Tensor, a: te.Tensor, g: te.Tensor, b: te.Tensor, act: str = "identity",
    negative_slope: float = 0.01,
) -> te.Tensor:
    """Two-pass Deep Control on a given ``y (N, C, *S)``: ``act(g * (y - a * mean_S(y)) + b)``."""
    spatial = [int(s) for s in y.shape[2:]]
    red = [te.reduce_axis((0, s), name=f"s{i}") for i, s in enumerate(spatial)]
    inv = 1.0
    for s in spatial:
        inv /= s
    total = te.compute(y.shape[:2], lambda n, c: te.sum(y[(n, c, *red)], axis=red), name="map_sum")
    scale = tirx.const(inv, y.dtype)

    def value(n, c, *s):
        z = g[c] * (y[(n, c, *s)] - a[c] * total[n, c] * scale) + b[c]
        return activation(z, act, negative_slope, y.dtype)

    return te.compute(y.shape, value, name="epilogue")
