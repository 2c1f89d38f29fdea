"""Relax modules of one conv + Deep Control block: the unit every TVM test and benchmark builds.

:func:`block_module` makes ``main(x, [weight, bias, a, g, b])`` computing
``act(g * (y - a * mean_S(y)) + b)`` for ``y = conv(x, weight) + bias`` in one of three forms:

- ``fused``: dcgraph's kernels (:func:`.lowering.emit_conv_deep_control`, the plan in force or
  ``plan``);
- ``plain``: the same math as plain Relax ops (:func:`emit_plain_deep_control`), left to TVM's
  own fusion: the peer a fusion benchmark compares against;
- ``conv``: the convolution alone (plus its bias), the floor.

Each of ``weight``, ``bias``, ``a``, ``g``, ``b`` is a constant when given in ``consts``,
else a parameter of ``main`` in that order (so a module can be shipped and fed elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from .lowering import activation_expr, emit_conv_deep_control

KINDS = ("fused", "plain", "conv")

__all__ = ["KINDS", "block_module", "emit_plain_deep_control"]


def _conv(bb: relax.BlockBuilder, x: relax.Expr, w: relax.Expr, nd: int, stride: Sequence[int] | int,
          padding: Sequence[int] | int, dilation: Sequence[int] | int, groups: int) -> relax.Var:
    op = {1: relax.op.nn.conv1d, 2: relax.op.nn.conv2d, 3: relax.op.nn.conv3d}[nd]
    return bb.emit(op(x, w, strides=stride, padding=padding, dilation=dilation, groups=groups))


def emit_plain_deep_control(bb: relax.BlockBuilder, y: relax.Expr, a: relax.Expr, g: relax.Expr,
                            b: relax.Expr, act: str, negative_slope: float = 0.01) -> relax.Var:
    """``act(g * (y - a * mean_S(y)) + b)`` as plain Relax ops (``a, g, b`` of shape ``(C,)``)."""
    op = relax.op
    rank = len(y.ty.shape)
    col = [1, -1] + [1] * (rank - 2)
    a, g, b = (op.reshape(v, col) for v in (a, g, b))
    m = op.mean(y, axis=list(range(2, rank)), keepdims=True)
    z = op.add(op.multiply(op.subtract(y, op.multiply(m, a)), g), b)
    z = activation_expr(z, act, negative_slope)
    return bb.emit(z)


def block_module(kind: str, x_shape: Sequence[int], w_shape: Sequence[int], *, act: str = "relu",
                 stride: Sequence[int] | int = 1, padding: Sequence[int] | int = 0,
                 dilation: Sequence[int] | int = 1, groups: int = 1, bias: bool = False,
                 negative_slope: float = 0.01, consts: Mapping[str, np.ndarray] | None = None,
                 plan: str | None = None, dtype: str = "float32", bb: relax.BlockBuilder | None = None,
                 name: str = "main") -> tvm.IRModule:
    """The module of one block (see the module docstring); ``main``'s inputs: ``x``, then every
    one of ``weight, [bias], a, g, b`` not in ``consts``. With ``bb``, the block is added to that
    builder as function ``name`` (many blocks, one module, one library)."""
    if kind not in KINDS:
        raise ValueError(f"unknown block kind {kind!r}; expected one of {', '.join(KINDS)}")
    consts = dict(consts or {})
    nd = len(x_shape) - 2
    c_out = int(w_shape[0])
    names = ["weight", *(["bias"] if bias else []), *(["a", "g", "b"] if kind != "conv" else [])]
    shapes = {"weight": tuple(w_shape), "bias": (c_out,), "a": (c_out,), "g": (c_out,), "b": (c_out,)}
    x = relax.Var("x", relax.TensorType(tuple(x_shape), dtype))
    params, vals = [x], {}
    for arg in names:
        if arg in consts:
            vals[arg] = relax.const(np.asarray(consts[arg], dtype=dtype), dtype)
        else:
            vals[arg] = relax.Var(arg, relax.TensorType(shapes[arg], dtype))
            params.append(vals[arg])
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    bb = bb or relax.BlockBuilder()
    with bb.function(name, params):
        with bb.dataflow():
            if kind == "fused":
                out = emit_conv_deep_control(bb, x, vals["weight"], vals.get("bias"), vals["a"], vals["g"],
                                             vals["b"], act=act, negative_slope=negative_slope, plan=plan,
                                             **conv)
            else:
                out = _conv(bb, x, vals["weight"], nd, **conv)
                if bias:
                    out = bb.emit(relax.op.add(out, relax.op.reshape(vals["bias"], [1, -1] + [1] * nd)))
                if kind == "plain":
                    out = emit_plain_deep_control(bb, out, vals["a"], vals["g"], vals["b"], act,
                                                  negative_slope)
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    return bb.get()
