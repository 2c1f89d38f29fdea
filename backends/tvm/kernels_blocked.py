"""The fused Deep Control kernels in the blocked layout ``NCHW[x]c`` (2-d convs, CPU targets).

A blocked tensor of logical shape ``(N, C, H, W)`` is stored as ``(N, C/x, H, W, x)``: channel
``c`` lives in chunk ``c // x``, lane ``c % x``. ``x`` comes from the target's SIMD width
(:func:`channel_block`), so one output pixel's channel block is one vector register: the
convolution (:func:`conv`) accumulates ``reg_n`` output columns x one or two channel blocks in
registers, each FMA a broadcast input scalar times a weight vector (weights packed once, at
compile time, as ``OIHW[x]i[y]o``: :func:`pack_weight`), and writes the Deep Control epilogue
``act(scale[c] * acc + shift[n, c])`` from the register tile (the same math as
:func:`.kernels.conv_epilogue`).

- :func:`hoisted_shift` is :func:`.kernels.hoisted_shift` (spec section 3) reading a blocked ``x``;
  it returns the unblocked ``(N, C_out)`` shift.
- :func:`depthwise` (one input channel per output channel) vectorises over the channel block;
  :func:`deep_control` is the two-pass form on a blocked ``y`` (map sum, then epilogue);
  :func:`depthwise_deep_control` the two in one kernel (a depthwise channel's mean needs only
  its own map).
- :func:`to_blocked` / :func:`from_blocked` are the layout changes at the graph's edges
  (:mod:`.layout` places them).

Block names (``pad``, ``blocked_conv``, ``epilogue``, ``map_sum``) are what :mod:`.schedules.cpu_blocked`
looks for. Strided convs need no phase split here: the input is read as broadcast scalars.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tvm import te, tirx

from .kernels import _tap_sum, activation, output_size, shift_value

__all__ = ["blocking", "channel_block", "conv", "deep_control", "depthwise", "depthwise_deep_control",
           "from_blocked", "hoisted_shift", "pack_depthwise", "pack_mean_weight", "pack_weight",
           "padded_channels", "read_or_zero", "to_blocked"]


def channel_block(channels: int, lanes: int) -> int:
    """The channel block for ``channels``: the largest of ``lanes, lanes/2, ..., 1`` dividing it."""
    cb = lanes
    while cb > 1 and channels % cb:
        cb //= 2
    return max(cb, 1)


def padded_channels(channels: int, lanes: int) -> int:
    """The channels a blocked tensor stores: ``channels`` rounded up to whole vectors when it is
    more than one vector but not a whole number of them (24 or 40 at 16 lanes -> 32, 48), else
    ``channels``. A conv writing 24 channels as 3 half-vector blocks of 8 ran 1.5-1.8x slower than
    2 full blocks of 16 with 8 zero channels (MobileNetV2's projections, 2-core Zen 5)."""
    if channels > lanes and channels % lanes:
        return -(-channels // lanes) * lanes
    return channels


def blocking(channels: int, lanes: int) -> tuple[int, int]:
    """``(stored channels, channel block)`` of a tensor of ``channels`` (:func:`padded_channels`,
    :func:`channel_block`). The padding channels hold zeros after a conv (its packed weight is
    zero there); whatever they hold, no conv reads them into a real channel (zero weights; the
    convs skip them), and :func:`from_blocked` drops them."""
    stored = padded_channels(channels, lanes)
    return stored, channel_block(stored, lanes)


def read_or_zero(t: te.Tensor, index: Sequence, limits: Sequence[int | None]) -> tirx.PrimExpr:
    """``t[index]`` where each index is below its limit (None: no limit), else 0: a padded
    block's read. The index is clamped too, so a vectorised select stays in bounds."""
    bounded = [(v, lim) for v, lim in zip(index, limits, strict=True) if lim is not None]
    if not bounded:
        return t[tuple(index)]
    inside = tirx.all(*[v < lim for v, lim in bounded])
    clamped = [v if lim is None else tirx.min(v, lim - 1) for v, lim in zip(index, limits, strict=True)]
    return tirx.if_then_else(inside, t[tuple(clamped)], tirx.const(0.0, t.dtype))


def to_blocked(x: te.Tensor, cb: int, stored: int | None = None) -> te.Tensor:
    """``(N, C, H, W) -> (N, S/cb, H, W, cb)``, ``S = stored`` channels (zeros past ``C``)."""
    n, c, h, w = x.shape
    c = int(c)
    stored = stored or c
    limits = [None, c if stored != c else None, None, None]
    return te.compute((n, stored // cb, h, w, cb),
                      lambda i, k, y, z, j: read_or_zero(x, [i, k * cb + j, y, z], limits), name="to_blocked")


def from_blocked(xb: te.Tensor, channels: int | None = None) -> te.Tensor:
    """``(N, S/cb, H, W, cb) -> (N, C, H, W)``: the first ``C = channels`` (default all) of the
    ``S`` stored channels."""
    n, k, h, w, cb = xb.shape
    cb = int(cb)
    return te.compute((n, channels or int(k) * cb, h, w), lambda i, c, y, z: xb[i, c // cb, y, z, c % cb],
                      name="from_blocked")


def _pad_axis(a: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``a`` with zeros appended along ``axis`` up to a multiple of ``block``."""
    extra = -a.shape[axis] % block
    if not extra:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, extra)
    return np.pad(a, pad)


def pack_weight(w: np.ndarray, cbi: int, cbo: int) -> np.ndarray:
    """``OIHW -> OIHW[cbi]i[cbo]o``: ``(C_out/cbo, C_in/cbi, kh, kw, cbi, cbo)``, both channel
    counts zero-padded to whole blocks."""
    w = _pad_axis(_pad_axis(w, 0, cbo), 1, cbi)
    co, ci, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(co // cbo, cbo, ci // cbi, cbi, kh, kw).transpose(0, 2, 4, 5, 3, 1))


def pack_depthwise(w: np.ndarray, cb: int) -> np.ndarray:
    """Depthwise ``(C, 1, kh, kw) -> (C/cb, kh, kw, cb)`` (``C`` zero-padded to whole blocks)."""
    w = _pad_axis(w, 0, cb)
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c // cb, cb, kh, kw).transpose(0, 2, 3, 1))


def _padded(xb: te.Tensor, padding: Sequence[int], size: Sequence[int] | None = None) -> te.Tensor:
    """Zero padding as its own stage (inlined, it would put a branch in the conv's inner loop):
    ``padding`` zeros before each map, and after it up to ``size`` (default: ``padding`` again)."""
    if not any(padding) and size is None:
        return xb
    n, k, h, w, cb = xb.shape
    ph, pw = padding
    h, w = int(h), int(w)
    size = size or (h + 2 * ph, w + 2 * pw)

    def value(i, c, y, z, j):
        inside = tirx.all(y >= ph, y < h + ph, z >= pw, z < w + pw)
        return tirx.if_then_else(inside, xb[i, c, y - ph, z - pw, j], tirx.const(0.0, xb.dtype))

    return te.compute((n, k, *size, cb), value, name="pad")


def _epilogue(acc: te.Tensor, scale: te.Tensor | None, shift: te.Tensor | None, act: str,
              negative_slope: float) -> te.Tensor:
    cb = int(acc.shape[-1])

    def value(n, k, y, z, j):
        v = acc[n, k, y, z, j]
        if scale is not None:
            v = v * scale[k * cb + j]
        if shift is not None:
            v = v + shift[n, k * cb + j]
        return activation(v, act, negative_slope, acc.dtype)

    return te.compute(acc.shape, value, name="epilogue")


def conv(xb: te.Tensor, wp: te.Tensor, scale: te.Tensor | None, shift: te.Tensor | None, *,
         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
         act: str = "identity", negative_slope: float = 0.01, in_channels: int | None = None) -> te.Tensor:
    """Dense blocked conv with the Deep Control epilogue:
    ``out[n, k, y, z, j] = act(scale[c] * acc + shift[n, c])``,
    ``acc = sum_{ci, r, s} x[n, ci, y*sh + r*dh - ph, z*sw + s*dw - pw] * W[c, ci, r, s]``, with
    ``c = k * cbo + j``; ``wp`` packed by :func:`pack_weight`. ``scale``/``shift`` None: 1/0.
    ``in_channels``: the real input channels when ``x`` stores padding channels past them (the
    sum skips those)."""
    n, _, h, w, _ = xb.shape
    ko, ki, kh, kw, cbi, cbo = (int(d) for d in wp.shape)
    ho, wo = output_size([int(h), int(w)], [kh, kw], stride, padding, dilation)
    xp = _padded(xb, padding)
    rk = te.reduce_axis((0, ki), name="rk")
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, cbi), name="rc")
    (sh, sw), (dh, dw) = stride, dilation
    if in_channels is not None and in_channels < ki * cbi:  # one reduction over the real channels
        ri = te.reduce_axis((0, in_channels), name="ri")
        acc = te.compute(
            (n, ko, ho, wo, cbo),
            lambda i, k, y, z, j: te.sum(
                xp[i, ri // cbi, y * sh + rh * dh, z * sw + rw * dw, ri % cbi]
                * wp[k, ri // cbi, rh, rw, ri % cbi, j], axis=[rh, rw, ri]),
            name="blocked_conv")
        return _epilogue(acc, scale, shift, act, negative_slope)
    acc = te.compute(
        (n, ko, ho, wo, cbo),
        lambda i, k, y, z, j: te.sum(
            xp[i, rk, y * sh + rh * dh, z * sw + rw * dw, rc] * wp[k, rk, rh, rw, rc, j],
            axis=[rk, rh, rw, rc]),
        name="blocked_conv")
    return _epilogue(acc, scale, shift, act, negative_slope)


def _depthwise_sum(xb: te.Tensor, wp: te.Tensor, stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int]) -> te.Tensor:
    """The raw blocked depthwise conv
    ``sum_{r, s} x[n, c, y*sh + r*dh - ph, z*sw + s*dw - pw] * W[c, 0, r, s]``."""
    n, _, h, w, _ = xb.shape
    k_, kh, kw, cb = (int(d) for d in wp.shape)
    ho, wo = output_size([int(h), int(w)], [kh, kw], stride, padding, dilation)
    xp = _padded(xb, padding)
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    (sh, sw), (dh, dw) = stride, dilation
    return te.compute(
        (n, k_, ho, wo, cb),
        lambda i, k, y, z, j: te.sum(xp[i, k, y * sh + rh * dh, z * sw + rw * dw, j] * wp[k, rh, rw, j],
                                     axis=[rh, rw]),
        name="blocked_conv")


def depthwise(xb: te.Tensor, wp: te.Tensor, scale: te.Tensor | None, shift: te.Tensor | None, *,
              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], act: str = "identity",
              negative_slope: float = 0.01) -> te.Tensor:
    """Blocked depthwise conv ``y[n, k, y, z, j] = sum_{r, s} x[n, c, ...] * W[c, 0, r, s]``
    (``c = k*cb + j``) with the epilogue of :func:`conv`, vectorised over the channel block; ``wp`` packed by
    :func:`pack_depthwise`."""
    acc = _depthwise_sum(xb, wp, stride, padding, dilation)
    return _epilogue(acc, scale, shift, act, negative_slope)


def depthwise_deep_control(xb: te.Tensor, wp: te.Tensor, a: te.Tensor, g: te.Tensor, b: te.Tensor, *,
                           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                           act: str = "identity", negative_slope: float = 0.01) -> te.Tensor:
    """Depthwise conv + two-pass Deep Control in one kernel: ``act(g * (y - a * mean_S(y)) + b)``
    with ``y`` = :func:`depthwise`'s raw sum. A channel's mean reads only its own output map, so
    the schedule (:func:`.schedules.cpu_blocked.schedule_blocked_depthwise_dc`) computes one
    channel block's whole map into a scratch tile that stays in cache, sums it and writes the
    epilogue: the output crosses memory once (two kernels wrote the raw map and read it back)."""
    acc = _depthwise_sum(xb, wp, stride, padding, dilation)
    return deep_control(acc, a, g, b, act, negative_slope)


def pack_mean_weight(w: np.ndarray, cbo: int) -> np.ndarray:
    """``OIHW -> OIHW[cbo]o`` (``(C_out/cbo, C_in/groups, kh, kw, cbo)``, ``C_out`` zero-padded to
    whole blocks): the hoisted mean's product reads the weight as vectors over output channels,
    each channel block's slice contiguous (a plain ``IHWO`` matrix read 64 bytes per 2 KB stride
    and ran 3x slower)."""
    w = _pad_axis(w, 0, cbo)
    co, ci, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(co // cbo, cbo, ci, kh, kw).transpose(0, 2, 3, 4, 1))


def hoisted_shift(xb: te.Tensor, wm: te.Tensor, bias: te.Tensor | None, a: te.Tensor, g: te.Tensor,
                  b: te.Tensor, *, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int) -> te.Tensor:
    """:func:`.kernels.hoisted_shift` on a blocked ``x``: ``o (N, C_out) = b + g * (c0 - a * (m + c0))``,
    ``m[n, c] = (1/|O|) sum_{ci, r, s} W[c, ci, r, s] T[n, ci, r, s]`` from per-tap box sums ``T`` of
    ``x``; ``wm`` is the weight packed by :func:`pack_mean_weight`."""
    n, _, h, wd, cbi = (int(d) if i else d for i, d in enumerate(xb.shape))
    kos, cig, kh, kw, cbo = (int(d) for d in wm.shape)
    c_out = kos * cbo
    out = output_size([h, wd], [kh, kw], stride, padding, dilation)
    # rows first (tap_sum0: (N, C_in/cbi, kh, W, cbi), each a sum of whole input rows, contiguous
    # over (W, cbi) whatever the channel block), then columns of that small array (tap_sum1)
    t = _tap_sum(xb, 2, h, kh, stride[0], padding[0], dilation[0], out[0])
    t = _tap_sum(t, 3, wd, kw, stride[1], padding[1], dilation[1], out[1])  # (N, C_in/cbi, kh, kw, cbi)
    cog = c_out // groups
    rc = te.reduce_axis((0, cig), name="rc")
    rh = te.reduce_axis((0, kh), name="r0")
    rw = te.reduce_axis((0, kw), name="r1")

    def mean_value(i, c):
        ci = rc if groups == 1 else (c // cog) * cig + rc
        return te.sum(wm[c // cbo, rc, rh, rw, c % cbo] * t[i, ci // cbi, rh, rw, ci % cbi],
                      axis=[rc, rh, rw])

    m = te.compute((n, c_out), mean_value, name="blocked_mean")
    inv = tirx.const(1.0 / (out[0] * out[1]), xb.dtype)

    return te.compute((n, c_out), lambda i, c: shift_value(m[i, c] * inv, c, bias, a, g, b), name="shift")


def deep_control(yb: te.Tensor, a: te.Tensor, g: te.Tensor, b: te.Tensor, act: str = "identity",
                 negative_slope: float = 0.01) -> te.Tensor:
    """Two-pass Deep Control on a blocked ``y``: ``act(g * (y - a * mean_S(y)) + b)`` per channel."""
    n, k_, h, w, cb = yb.shape
    cb = int(cb)
    rh = te.reduce_axis((0, int(h)), name="s0")
    rw = te.reduce_axis((0, int(w)), name="s1")
    total = te.compute((n, k_, cb), lambda i, k, j: te.sum(yb[i, k, rh, rw, j], axis=[rh, rw]),
                       name="map_sum")
    inv = tirx.const(1.0 / (int(h) * int(w)), yb.dtype)

    def value(i, k, y, z, j):
        c = k * cb + j
        v = g[c] * (yb[i, k, y, z, j] - a[c] * total[i, k, j] * inv) + b[c]
        return activation(v, act, negative_slope, yb.dtype)

    return te.compute(yb.shape, value, name="epilogue")
