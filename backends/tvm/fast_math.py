"""exp and sigmoid as plain float32 TIR arithmetic, so that LLVM vectorises them.

``tirx.exp`` / ``tirx.sigmoid`` lower to ``llvm.exp``, which LLVM here turns into one scalar
``expf`` call per element (no vector math library), and a vectorised loop around it is
scalarised. These are the same function as straight-line arithmetic: a clamp, a
Cody-Waite range reduction, a polynomial and an exponent built by integer bit manipulation
(the method of ``topi.fast_exp``, with Cephes' ``expf`` coefficients), so every step is a
vector instruction (compare, round, FMA, integer shift).

Only float32 has the fast path; other dtypes get ``tirx.exp`` / ``tirx.sigmoid``.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import te, tirx

__all__ = ["EXP_MAX_REL_ERROR", "EXP_RANGE", "SILU_EXP_MAX", "fast_exp", "fast_sigmoid", "fast_silu"]

#: ``fast_exp`` is accurate on ``[ln FLT_MIN, ln FLT_MAX]`` (float32 constants rounded
#: inwards), where its result is a normal float32.
EXP_RANGE = (-87.33654, 88.72283)
#: Bound on the relative error of ``fast_exp`` on :data:`EXP_RANGE` against exp in float64
#: (measured, not proved: the largest seen was 8.46e-8, 1.01 float32 ulps, over every float32 in
#: ``[-1, 1]``, a 2^26-point grid and 2^24 random points over the range; rounding the exact value
#: to float32 alone costs up to 5.96e-8). ``tests/backends/test_fast_math.py`` re-measures it.
EXP_MAX_REL_ERROR = 1e-7

_LOG2E = 1.4426950408889634
# ln 2 = _LN2_HI + _LN2_LO; _LN2_HI has 9 significant bits, so n * _LN2_HI is exact for |n| <= 2^15
# and x - n * _LN2_HI is exact (Cody-Waite).
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2 / 2 (Cephes expf).
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
      5.0000001201e-1)


def _as_expr(x) -> tirx.PrimExpr:
    """A PrimExpr for ``x`` (a TE ``A[i]`` is a TensorSlice until it is used in an expression)."""
    return x.asobject() if isinstance(x, te.TensorSlice) else x


def _dtype(x: tirx.PrimExpr) -> str:
    return str(x.ty)


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _pow2(n: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^n as float32 for int32 ``n`` in [-126, 127]: the bits ``(n + 127) << 23``."""
    bits = tirx.shift_left(n + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return tirx.reinterpret("float32", bits)


def _exp_parts(xc: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """``exp(xc) = er * 2^n`` for float32 ``xc`` already clamped: ``n = floor(xc log2 e + 1/2)``
    (int32), ``r = xc - n ln2`` with ln2 split in two constants (``|r| <= ln2/2``, exactly up
    to the low part), ``er = exp(r) = 1 + r + r^2 P(r)`` with P of degree 5 (Cephes expf)."""
    nf = tirx.floor(xc * _f32(_LOG2E) + _f32(0.5))
    r = (xc - nf * _f32(_LN2_HI)) - nf * _f32(_LN2_LO)
    p = _f32(_P[0])
    for c in _P[1:]:
        p = p * r + _f32(c)
    return p * (r * r) + r + _f32(1.0), nf.astype("int32")


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` for float32 ``x`` as vectorisable arithmetic (other dtypes: ``tirx.exp``).

    Relative error below :data:`EXP_MAX_REL_ERROR` (1e-7; 8.46e-8 = 1.01 float32 ulps measured) on
    :data:`EXP_RANGE` ``= [-87.33654, 88.72283]``, the inputs whose exp is a normal float32.
    Below the range the result is 0 (the true value is subnormal: absolute error < 1.2e-38,
    and no slow subnormal arithmetic); above it, ``exp(88.72283)`` = 3.4e38 (no inf). NaN is
    not propagated (it comes out as a number in that range).

    Method: clamp ``x``; ``n = floor(x log2 e + 1/2)``; ``r = x - n ln2`` with ln2 split in two
    constants (``|r| <= ln2/2``, exactly up to the low part); ``exp(r) = 1 + r + r^2 P(r)``
    with P of degree 5; times ``2^n`` as two exact power-of-two factors (``n`` reaches 128,
    whose 2^n alone is not a float32).
    """
    x = _as_expr(x)
    if _dtype(x) != "float32":
        return tirx.exp(x)
    lo, hi = EXP_RANGE
    er, n = _exp_parts(tirx.min(tirx.max(x, _f32(lo)), _f32(hi)))  # n in [-126, 128]
    n1 = tirx.shift_right(n, tirx.const(1, "int32"))  # floor(n / 2): [-63, 64]
    y = er * _pow2(n1) * _pow2(n - n1)
    return tirx.Select(x < _f32(lo), _f32(0.0), y)


def fast_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``1 / (1 + exp(-x))`` for float32 ``x`` (other dtypes: ``tirx.sigmoid``), through
    :func:`fast_exp` of ``-|x|`` only: ``e = exp(-|x|)`` in (0, 1], ``s = 1 / (1 + e)``,
    ``sigmoid(x) = s`` for ``x >= 0`` and ``e * s`` for ``x < 0``. No intermediate overflows,
    the negative tail keeps its relative accuracy, and large ``|x|`` gives exactly 0 or 1
    (``|x| > 87.3``). Measured against float64 over ``[-100, 100]``: absolute error below 9e-8."""
    x = _as_expr(x)
    if _dtype(x) != "float32":
        return tirx.sigmoid(x)
    zero = _f32(0.0)
    e = fast_exp(zero - tirx.abs(x))
    s = _f32(1.0) / (_f32(1.0) + e)
    return tirx.Select(x >= zero, s, e * s)


#: :func:`fast_silu` computes ``exp(-x)`` on ``-x`` clamped to ``[ln FLT_MIN, SILU_EXP_MAX]``,
#: where one power-of-two factor is a normal float32 (``n <= 126``).
SILU_EXP_MAX = 87.0


def fast_silu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``x * sigmoid(x)`` for float32 ``x`` as ``max(x, -87) / (1 + exp(-x))`` (other dtypes:
    ``x * tirx.sigmoid(x)``), ``exp`` as in :func:`fast_exp` with ``-x`` clamped to
    ``[-87.33654, 87]`` and a single power-of-two factor. One division and no select: 40% fewer
    vector instructions than ``x * fast_sigmoid(x)``, the activation every EfficientNet conv
    applies on its register tile. The relative error is that of ``exp`` plus the division's
    rounding for ``x > -87``; below, the result is ``-87 / (1 + e^87)`` = -1.5e-36 (the true
    value is smaller still). Measured against float64 over ``[-100, 100]``: absolute error
    below ``1.5e-7 * max(1, |x|)`` (1.24e-6 at most, where a float32 ulp is 9.5e-7), the same
    as ``x * tirx.sigmoid(x)`` through libm's ``expf``."""
    x = _as_expr(x)
    if _dtype(x) != "float32":
        return x * tirx.sigmoid(x)
    t = tirx.min(tirx.max(_f32(0.0) - x, _f32(EXP_RANGE[0])), _f32(SILU_EXP_MAX))
    er, n = _exp_parts(t)
    return tirx.max(x, _f32(-SILU_EXP_MAX)) / (_f32(1.0) + er * _pow2(n))


def _legalize_with(op_name: str, fn: Any, name: str) -> Any:
    """A legalization of the unary Relax op ``op_name`` as ``fn`` per element (float32; other
    dtypes: TVM's own)."""

    def legalize(bb: Any, call: Any) -> Any:
        x = call.args[0]
        if x.ty.dtype != "float32":
            return tvm.ir.Op.get(op_name).get_attr("FLegalize")(bb, call)

        def compute(t: te.Tensor) -> te.Tensor:
            return te.compute(t.shape, lambda *i: fn(t(*i)), name=name, tag="elemwise")

        return bb.call_te(compute, x, primfunc_name_hint=name)

    return legalize


#: Relax ``sigmoid`` legalized with :func:`fast_sigmoid` (float32; other dtypes: TVM's own).
#: TVM's legalization calls libm's scalar ``expf`` per element: a model that spells swish as
#: ``x * sigmoid(x)`` (pytorchcv's EfficientNet-B0, Squeeze-Excitation gates) then spent 37 of
#: its 61 ms in the conv kernels that FuseOps had merged the sigmoid into.
legalize_sigmoid = _legalize_with("relax.sigmoid", fast_sigmoid, "sigmoid")
#: Relax ``nn.silu`` (``torch.nn.SiLU`` in a program imported without decompositions) legalized
#: with :func:`fast_silu`, for the same reason.
legalize_silu = _legalize_with("relax.nn.silu", fast_silu, "silu")
