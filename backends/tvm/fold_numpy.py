"""Fold elementwise arithmetic and transposes of constants with numpy, before TVM's ``FoldConstant``.

``relax.transform.FoldConstant`` evaluates a constant subexpression by building it into a kernel
with LLVM and running it: about 0.1 s each. An imported ResNet-18 holds 20 such products of
parameters (the converted Deep Control gains), 2.4 s of its 8 s compile, and 20 reshapes of
constants (1 s) once imported without torch's decompositions. A single IEEE float operation gives
the same bits in numpy (a transpose or reshape moves bits), so these are folded here first;
anything else is left to ``FoldConstant``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .exprs import constant_value

__all__ = ["fold_constant_arithmetic"]

_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
           "relax.divide": np.divide}


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        if call.op.name == "relax.permute_dims":  # a weight's transpose (a classifier's)
            value = constant_value(self._value(call.args[0]))
            if value is None:
                return call
            axes = call.attrs.axes
            self.count += 1
            out = np.ascontiguousarray(np.transpose(value, None if axes is None else [int(i) for i in axes]))
            return relax.const(out, str(value.dtype))
        if call.op.name == "relax.reshape":  # a per-channel gain made (1, C, 1, 1)
            value = constant_value(self._value(call.args[0]))
            shape = _static(call.args[1])
            if value is None or shape is None or int(np.prod(shape)) != value.size:
                return call
            self.count += 1
            return relax.const(np.ascontiguousarray(value.reshape(shape)), str(value.dtype))
        if call.op.name not in _BINARY or len(call.args) != 2:
            return call
        a, b = (constant_value(self._value(arg)) for arg in call.args)
        if a is None or b is None or a.dtype != b.dtype or a.dtype.kind != "f":
            return call
        with np.errstate(all="ignore"):  # inf / NaN: as the kernel would compute them
            out = _BINARY[call.op.name](a, b).astype(a.dtype, copy=False)
        self.count += 1
        return relax.const(out, str(a.dtype))

    def _value(self, expr: relax.Expr) -> relax.Expr:
        """A variable bound to a constant (in a dataflow block): that constant."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None and isinstance(bound, tvm.ir.Constant):
                return bound
        return expr


def _static(shape: relax.Expr) -> list[int] | None:
    """A ``ShapeExpr`` of constant sizes as ints, else None."""
    if not isinstance(shape, relax.ShapeExpr):
        return None
    if not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        return None
    return [int(v) for v in shape.values]


def fold_constant_arithmetic(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every add / subtract / multiply / divide of two float constants of one dtype,
    and every ``permute_dims`` and ``reshape`` (to a static shape) of a constant, replaced by its
    value (numpy's, bit for bit what a kernel computes)."""
    updates = {}
    folder = _Folder(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            new = folder.visit_expr(func)
            if folder.count:
                updates[gv] = relax.analysis.remove_all_unused(new)
    if not updates:
        return mod
    mod = folder.builder_.get()
    for gv, func in updates.items():
        mod[gv] = func
    return mod
