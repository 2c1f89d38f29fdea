"""Winograd F(m x m, 3 x 3) convolution in the blocked layout, with the Deep Control epilogue.

A 3x3 stride-1 conv computes each ``m x m`` output tile from an ``(m+2) x (m+2)`` input tile
with ``(m+2)^2`` multiplies per (input, output) channel pair instead of ``9 m^2`` (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016):

    Y_tile = A^T [ (G g G^T) * (B^T d_tile B) ] A        (* elementwise)

F(2x2, 3x3) does 16 multiplies where the direct conv does 36 (2.25x fewer), F(4x4, 3x3) 36
where it does 144 (4x). The matrices ``A, B, G`` are TVM's Cook-Toom construction
(``tvm.topi.nn.winograd_util``; interpolation points chosen for accuracy, Barabasz et al. 2018);
:func:`transform_matrices` returns them as numpy arrays.

The kernel (:func:`conv`) is three stages in one PrimFunc, all on ``NCHW[x]c`` data:

1. ``winograd_input``: ``V[e, u, n, c, p, l] = (B^T d_p B)[e, u]`` (``B^T d_p`` first, in
   ``winograd_input_rows``) for tile ``p`` of channel
   ``c * cb + l`` of the zero-padded input (tiles of ``(m+2)^2`` pixels at stride ``m``);
   the tile count is rounded up to whole register tiles (:data:`PIXEL_TILE`), the extra tiles
   repeat the last one and are never read back.
2. ``winograd_gemm``: ``(m+2)^2`` independent GEMMs over the input channels,
   ``M[n, k, p, e, u, j] = sum_c V[e, u, n, c, p, :] . U[e*(m+2) + u, k, c, :, j]`` with
   ``U = G g G^T`` packed once at compile time (:func:`pack_weight`); the register tile is
   :data:`PIXEL_TILE` tiles x two output-channel blocks, like the direct kernel's.
3. ``winograd_output`` (``A^T M_p`` first, in ``winograd_output_rows``):
   ``out[n, k, y, z, j] = act(scale[c] * (A^T M_p A)[y % m, z % m] + shift[n, c])``,
   the direct kernel's epilogue (:func:`.kernels_blocked.conv`) applied after the output
   transform: the transforms are linear, so Deep Control's shift (hoisted from the input, spec
   section 3) and scale are unchanged.

The transforms are written out as sums with constant coefficients (zero terms dropped, +-1 as
adds and subtracts), so after unrolling each transform element costs only its non-zero terms.
:mod:`.schedules.cpu_winograd` schedules the three stages.

Measured (2-core AMD EPYC Zen 3, AVX2, conv + Deep Control epilogue alone, batch 1, medians): the
ResNet-18 3x3 shapes 64@56, 128@28 (F(4,3)), 256@14, 512@7 (F(2,3)) ran 2.25x, 2.6x, 1.7x and 1.3x
faster than the direct blocked kernel (64@56 at batch 8: 2.4x); the relative error against the
direct conv was 1.4-1.7e-6 (F(2,3)) and 1.7-2.5e-6 (F(4,3)) of the output's largest value. The
cost: ``U`` holds ``(m+2)^2 / 9`` times the direct weight (1.8x for F(2,3), 4x for F(4,3)).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
from tvm import te, tirx

from .kernels import activation
from .kernels_blocked import _padded

__all__ = ["LARGE_TILE_MIN", "MIN_MAP", "PIXEL_TILE", "applies", "conv", "output_tile", "pack_weight",
           "transform_matrices"]

#: output tiles per register tile of the batched GEMM (x 2 channel blocks = 12 vector accumulators:
#: on AVX2 12 ran 10% ahead of 8, and 14 spilled)
PIXEL_TILE = 6
#: F(4,3) on maps at least this wide and high, F(2,3) below: 4x4 tiles leave too few tiles for the
#: GEMM's register tile on small maps (at 14x14: F(2,3) 0.82 ms, F(4,3) 0.85; at 7x7 1.3 vs 1.7)
LARGE_TILE_MIN = 20
#: maps smaller than this (either side) keep the direct kernel: a 2x2 tile would be mostly padding
MIN_MAP = 4


@cache
def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, B, G)`` of F(m x m, 3 x 3) in float64: ``A (m+2, m)``, ``B (m+2, m+2)``, ``G (m+2, 3)``."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(m + 1), m, 3)
    return np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(g, np.float64)


def output_tile(ho: int, wo: int) -> int:
    """``m`` for an ``ho x wo`` output map: 4 on maps of :data:`LARGE_TILE_MIN` or more, else 2."""
    return 4 if min(ho, wo) >= LARGE_TILE_MIN else 2


def applies(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], groups: int,
            padding: Sequence[int]) -> str | None:
    """None if the conv can run as Winograd F(m, 3), else why not (a readable reason)."""
    if tuple(kernel) != (3, 3):
        return f"kernel {tuple(kernel)} is not 3x3"
    if tuple(stride) != (1, 1):
        return f"stride {tuple(stride)} is not 1"
    if tuple(dilation) != (1, 1):
        return f"dilation {tuple(dilation)} is not 1"
    if groups != 1:
        return f"{groups} groups"
    if any(p > 2 for p in padding):
        return f"padding {tuple(padding)} is more than the kernel's reach"
    return None


def pack_weight(w: np.ndarray, m: int, cbi: int, cbo: int) -> np.ndarray:
    """``(K, C, 3, 3) -> U = G g G^T`` packed as ``((m+2)^2, K/cbo, C/cbi, cbi, cbo)`` (computed
    in float64, stored in ``w``'s dtype; both channel counts zero-padded to whole blocks)."""
    _, _, g = transform_matrices(m)
    k, c = w.shape[:2]
    kp, cp = -(-k // cbo) * cbo, -(-c // cbi) * cbi
    wpad = np.zeros((kp, cp, 3, 3), np.float64)
    wpad[:k, :c] = w
    u = (g @ wpad @ g.T).transpose(2, 3, 0, 1)  # (a, b, K, C): G g G^T per channel pair, batched
    a = m + 2
    u = u.reshape(a * a, kp // cbo, cbo, cp // cbi, cbi).transpose(0, 1, 3, 4, 2)
    return np.ascontiguousarray(u.astype(w.dtype))


def _dot(coefs: np.ndarray, load) -> tirx.PrimExpr:
    """``sum_a coefs[a] * load(a)``, zero terms dropped and +-1 as adds/subtracts."""
    acc = None
    for a, coef in enumerate(coefs):
        if coef == 0.0:
            continue
        v = load(a)
        if coef == -1.0:
            v = -v
        elif coef != 1.0:
            v = v * tirx.const(float(coef), v.dtype)
        acc = v if acc is None else acc + v
    return acc if acc is not None else tirx.const(0.0, "float32")


def _apply(mat: np.ndarray, row: tirx.PrimExpr, load) -> tirx.PrimExpr:
    """``sum_a mat[a, row] * load(a)`` for a symbolic ``row`` (one Select per value of ``row``;
    the schedule unrolls ``row``, so each copy folds to its own constant-coefficient sum)."""
    cases = [_dot(mat[:, r], load) for r in range(mat.shape[1])]
    expr = cases[-1]
    for r in range(len(cases) - 2, -1, -1):
        expr = tirx.Select(row == r, cases[r], expr)
    return expr


def conv(xb: te.Tensor, u: te.Tensor, scale: te.Tensor | None, shift: te.Tensor | None, *,
         tile: int, padding: Sequence[int], act: str = "identity", negative_slope: float = 0.01
         ) -> te.Tensor:
    """The 3x3 stride-1 conv of blocked ``xb`` with ``u`` (:func:`pack_weight` for ``tile``) and the
    Deep Control epilogue ``act(scale[c] * y + shift[n, c])`` (``scale``/``shift`` None: 1/0);
    ``padding``: ``(ph, pw)`` zeros on each side. Stages and names: the module docstring."""
    n, cc, h, w, cbi = (int(d) for d in xb.shape)
    aa, kc, _, _, cbo = (int(d) for d in u.shape)
    m, alpha = tile, tile + 2
    assert alpha * alpha == aa, "u was packed for another tile size"
    a_mat, b_mat, _ = transform_matrices(m)
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // m), -(-wo // m)
    tiles = th * tw
    stored = -(-tiles // PIXEL_TILE) * PIXEL_TILE

    xp = _padded(xb, padding, (th * m + 2, tw * m + 2))  # whole tiles: zeros past the map too

    def rows_value(i, c, p, e, b, j):  # (B^T d)[e, b]
        q = tirx.min(p, tiles - 1)  # the rounding-up tiles repeat the last one
        y0, z0 = (q // tw) * m, (q % tw) * m
        return _apply(b_mat, e, lambda a: xp[i, c, y0 + a, z0 + b, j])

    rows = te.compute((n, cc, stored, alpha, alpha, cbi), rows_value, name="winograd_input_rows")
    vt = te.compute((alpha, alpha, n, cc, stored, cbi), lambda e, v, i, c, p, j: _apply(
        b_mat, v, lambda b: rows[i, c, p, e, b, j]), name="winograd_input")  # (B^T d B)[e, v]
    rk = te.reduce_axis((0, cc), name="rk")
    rc = te.reduce_axis((0, cbi), name="rc")
    mt = te.compute((n, kc, stored, alpha, alpha, cbo), lambda i, k, p, e, v, j: te.sum(
        vt[e, v, i, rk, p, rc] * u[e * alpha + v, k, rk, rc, j], axis=[rk, rc]), name="winograd_gemm")

    orows = te.compute((n, kc, stored, m, alpha, cbo), lambda i, k, p, y, b, j: _apply(
        a_mat, y, lambda a: mt[i, k, p, a, b, j]), name="winograd_output_rows")  # (A^T M)[y, b]

    def out_value(i, k, y, z, j):  # (A^T M A)[y % m, z % m] of tile p, then the epilogue
        p = (y // m) * tw + z // m
        val = _apply(a_mat, z % m, lambda b: orows[i, k, p, y % m, b, j])
        if scale is not None:
            val = val * scale[k * cbo + j]
        if shift is not None:
            val = val + shift[i, k * cbo + j]
        return activation(val, act, negative_slope, xb.dtype)

    return te.compute((n, kc, ho, wo, cbo), out_value, name="winograd_output")
