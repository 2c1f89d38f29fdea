"""Matmuls with a constant weight, packed at compile time into column panels (CPU targets).

``y[i, j] = sum_k x[i, k] W[k, j]`` with ``W`` (``K x N``) a constant (a classifier's
``nn.Linear``, after TVM folds its ``permute_dims``; a one-pixel 1x1 conv, :mod:`.pixel_matmul`)
reads ``W`` as ``Wp[j // B, k, j % B]``: ``Wp`` (``N/B x K x B``) holds ``B`` consecutive
output columns of every row ``k`` next to each other, so the micro-kernel of
:func:`.schedules.cpu_other_ops.schedule_matmul` (``B`` outputs of a few rows in vector
registers, one broadcast ``x[i, k]`` times one packed row per step) streams its panel from
memory in order. Unpacked, a tile of ``lanes`` columns read 64 bytes out of every 4000-byte row
of a ``1280 x 1000`` classifier, and each accumulator chained ``K`` dependent FMAs.

``B`` (:func:`panel_width`) is a multiple of the target's float32 lanes: four vectors for one
row (a batch of 1: the panel streams, four accumulators), two for more rows, with up to eight
rows in the tile (16 accumulators). ``N`` is padded with zero columns up to a multiple of ``B``;
the kernel then computes the padded product and writes the ``N`` real columns
(:func:`packed_matmul`). Measured hot on a 2-core AVX-512 VM (Zen 5), ``1280 x 1000``: the kernel
alone 73 -> 38 us at batch 1 and 939 -> ~55 us at batch 8 (8 rows x 32 columns, ~400 GFLOP/s);
the compiled classifier (bias fused, one VM call) 42 and 99 us. A panel that is not a multiple
of the lanes (40 columns, ``<40 x float>``) spilled with 4 or more rows.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from .exprs import constant_value, static_shape

__all__ = ["ACCUMULATORS", "legalize_matmul", "pack_weight", "packed_matmul", "panel_width", "tile_rows"]

#: vector accumulators of the register tile (rows x panel vectors; AVX-512 has 32 registers)
ACCUMULATORS = 16


def panel_width(n: int, rows: int, lanes: int) -> int:
    """The panel width ``B`` for ``N = n`` output columns and ``rows`` rows (``M``): four vectors
    of ``lanes`` for one row, two for more, fewer where ``N`` is smaller."""
    vectors = 4 if rows == 1 else 2
    return min(vectors, -(-n // lanes)) * lanes


def tile_rows(m: int, width: int, lanes: int) -> int:
    """Rows of the register tile: the largest divisor of ``m`` that keeps ``rows x width / lanes``
    within :data:`ACCUMULATORS` (at least 1)."""
    cap = max(1, ACCUMULATORS // max(1, width // lanes))
    return max(d for d in range(1, min(m, cap) + 1) if m % d == 0)


def pack_weight(w: np.ndarray, width: int) -> np.ndarray:
    """``W`` (``K x N``) as panels ``Wp[j // B, k, j % B]`` (``ceil(N/B) x K x B``), the last
    panel padded with zero columns."""
    k, n = w.shape
    panels = -(-n // width)
    padded = np.zeros((k, panels * width), w.dtype)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, width).transpose(1, 0, 2))


def packed_matmul(x: te.Tensor, wp: te.Tensor, n: int, pixel: bool = False) -> te.Tensor:
    """``y[i, j] = sum_k x[i, k] * wp[j // B, k, j % B]`` for ``j < n``; ``pixel``: ``x`` is
    ``(M, K, 1, 1)`` and ``y`` ``(M, n, 1, 1)`` (a one-pixel conv keeps its 4-d shape, so the bias
    add and activation after it still fuse). With padded panels (``n`` not a multiple of ``B``)
    the product is computed over every panel column and the first ``n`` are copied out."""
    panels, k_len, width = (int(s) for s in wp.shape)
    m = int(x.shape[0])
    rk = te.reduce_axis((0, k_len), name="rk")
    if pixel:
        y = te.compute((m, panels * width, 1, 1), lambda i, j, h, w: te.sum(
            x[i, rk, h, w] * wp[j // width, rk, j % width], axis=rk), name="packed_matmul")
        if panels * width == n:
            return y
        return te.compute((m, n, 1, 1), lambda i, j, h, w: y[i, j, h, w], name="packed_matmul_columns")
    y = te.compute((m, panels * width), lambda i, j: te.sum(
        x[i, rk] * wp[j // width, rk, j % width], axis=rk), name="packed_matmul")
    if panels * width == n:
        return y
    return te.compute((m, n), lambda i, j: y[i, j], name="packed_matmul_columns")


def constant_weight(call: relax.Call) -> np.ndarray | None:
    """The ``K x N`` constant weight of a 2-d float ``relax.matmul`` whose output type is its
    inputs', else None."""
    x, w = call.args
    xs, ws = static_shape(x), static_shape(w)
    if xs is None or ws is None or len(xs) != 2 or len(ws) != 2:
        return None
    dtype = str(x.ty.dtype)
    out_dtype = str(call.attrs.out_dtype) if call.attrs.out_dtype is not None else ""
    if dtype != str(w.ty.dtype) or not dtype.startswith("float") or out_dtype not in ("", "void", dtype):
        return None
    return constant_value(w)


def legalize_matmul(bb: relax.BlockBuilder, call: relax.Call, lanes: int = 16) -> relax.Expr:
    """``relax.matmul`` legalization: a 2-d matmul with a constant weight as :func:`packed_matmul`
    (the weight packed once, a constant), every other one as TVM legalizes it.
    ``FoldConstant`` must run first, so that a ``permute_dims`` of the weight is a constant."""
    value = constant_weight(call)
    if value is None:
        return tvm.ir.Op.get("relax.matmul").get_attr("FLegalize")(bb, call)
    m, n = static_shape(call.args[0])[0], value.shape[1]
    wp = relax.const(pack_weight(value, panel_width(n, m, lanes)), str(call.args[1].ty.dtype))
    return bb.call_te(packed_matmul, call.args[0], wp, n, primfunc_name_hint="packed_matmul")
