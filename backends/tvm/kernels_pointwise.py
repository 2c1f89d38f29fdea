"""A 1x1 conv + Deep Control kernel in NCHW: a GEMM over the map's pixels, for the layout's edges.

For a 1x1 stride-1 conv, ``NCHW`` is a GEMM layout already: with ``p`` the flat pixel index
(``P = H*W`` of them, contiguous), ::

    out[n, c, p] = act(scale[c] * sum_k w[c, k] * x[n, k, p] + shift[n, c])

with ``w`` the conv's own ``(C_out, C_in, 1, 1)`` weight (a constant or an input). The register tile
is ``oc_tile`` output channels x ``reg_p`` vectors of pixels; each FMA is a broadcast weight
scalar times a vector of ``lanes`` neighbouring pixels, contiguous in both ``x`` and ``out``.
The blocked layout (:mod:`.kernels_blocked`) vectorises over channels instead, which is what the
convs between blocked tensors need; but a pointwise conv whose input *and* output are ``NCHW``
(a block compiled alone, a model's first or last layer) would pay a layout change at each side,
and the one after an expanding conv moves its whole output (EfficientNet-B0's 40->240 1x1 at
28 px, batch 8: 0.36 ms of a 2.0 ms block). :mod:`.layout` uses this kernel there.

:func:`map_shift` is the hoisted shift of such a conv, from its NCHW input as it is: a
pointwise conv's map mean is ``W . mean_p(x)`` exactly (spec section 3, no borders to correct).

Block names ``pointwise_conv``, ``epilogue``, ``map_sum``, ``map_mean``, ``shift`` are what
:mod:`.schedules.cpu_pointwise` looks for.
"""

from __future__ import annotations

from tvm import te, tirx

from .kernels import activation, shift_value

__all__ = ["map_shift", "pointwise"]


def pointwise(x: te.Tensor, w: te.Tensor, scale: te.Tensor | None, shift: te.Tensor | None, *,
              act: str = "identity", negative_slope: float = 0.01) -> te.Tensor:
    """``x (N, C_in, H, W)``, ``w (C_out, C_in, 1, 1)`` -> ``(N, C_out, H, W)`` (see the module
    docstring); ``scale``/``shift`` None: 1/0. The sum runs over the flat pixel index ``q``
    (``x[n, k, q // W, q % W]``, which TVM's flattening simplifies back to ``q``), so the
    kernel needs no reshapes around it."""
    n, ci, h, wd = (int(d) for d in x.shape)
    co = int(w.shape[0])
    rk = te.reduce_axis((0, ci), name="rk")
    acc = te.compute((n, co, h * wd),
                     lambda i, c, q: te.sum(x[i, rk, q // wd, q % wd] * w[c, rk, 0, 0], axis=rk),
                     name="pointwise_conv")

    def value(i, c, y, z):
        v = acc[i, c, y * wd + z]
        if scale is not None:
            v = v * scale[c]
        if shift is not None:
            v = v + shift[i, c]
        return activation(v, act, negative_slope, acc.dtype)

    return te.compute((n, co, h, wd), value, name="epilogue")


def map_shift(x: te.Tensor, w: te.Tensor, bias: te.Tensor | None, a: te.Tensor, g: te.Tensor,
              b: te.Tensor) -> te.Tensor:
    """The per-sample shift ``o (N, C_out) = b + g * (c0 - a * (m + c0))`` of the pointwise conv
    of ``x (N, C_in, H, W)`` by ``w``: ``m[n, c] = sum_k w[c, k] * mean_p x[n, k, p]``, ``c0``
    the conv's bias (0 without one): what :func:`.kernels.hoisted_shift` computes for a 1x1 conv."""
    n, ci, h, wd = (int(d) for d in x.shape)
    co, p = int(w.shape[0]), h * wd
    rp = te.reduce_axis((0, p), name="rp")
    total = te.compute((n, ci), lambda i, k: te.sum(x[i, k, rp // wd, rp % wd], axis=rp), name="map_sum")
    rk = te.reduce_axis((0, ci), name="rk")
    dot = te.compute((n, co), lambda i, c: te.sum(w[c, rk, 0, 0] * total[i, rk], axis=rk), name="map_mean")
    inv = tirx.const(1.0 / p, x.dtype)

    return te.compute((n, co), lambda i, c: shift_value(dot[i, c] * inv, c, bias, a, g, b), name="shift")
