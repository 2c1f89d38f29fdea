"""``fold_numpy.fold_constant_arithmetic``: the constants it folds equal, bit for bit, what TVM's
``FoldConstant`` computes with a kernel; what it does not handle is left in place."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from dcgraph.backends.tvm.exprs import constant_value
from dcgraph.backends.tvm.fold_numpy import fold_constant_arithmetic


def _module() -> tvm.IRModule:
    rng = np.random.default_rng(0)
    g = relax.const(rng.standard_normal((1, 8, 1, 1)).astype("float32"))
    s = relax.const(rng.standard_normal((8,)).astype("float32") + 3)
    w = relax.const(rng.standard_normal((8, 5)).astype("float32"))
    i = relax.const(np.arange(8, dtype="int32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gs = bb.emit(relax.op.multiply(g, relax.op.reshape(s, (1, 8, 1, 1))))
            es = bb.emit(relax.op.exp(s))  # not an operation folded here: FoldConstant's
            q = bb.emit(relax.op.divide(relax.op.subtract(s, relax.const(1.5, "float32")), s))
            wt = bb.emit(relax.op.permute_dims(w))
            ii = bb.emit(relax.op.add(i, i))  # integers: left to FoldConstant
            y = bb.emit(relax.op.multiply(relax.op.add(x, gs), relax.op.reshape(q, (1, 8, 1, 1))))
            out = bb.emit_output((y, wt, ii, es))
        bb.emit_func_output(out)
    return bb.get()


def _constants(mod: tvm.IRModule) -> list[np.ndarray]:
    found = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(constant_value(e))
                                    if constant_value(e) is not None else None)
    return found


def test_folded_values_are_foldconstants_bit_for_bit():
    mod = _module()
    ours = relax.transform.FoldConstant()(fold_constant_arithmetic(mod))
    theirs = relax.transform.FoldConstant()(mod)
    a = sorted(_constants(ours), key=lambda v: (v.shape, v.dtype.str, v.tobytes()))
    b = sorted(_constants(theirs), key=lambda v: (v.shape, v.dtype.str, v.tobytes()))
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


def test_what_it_folds_and_what_it_leaves():
    folded = fold_constant_arithmetic(_module())
    script = folded["main"].script()
    assert "R.permute_dims" not in script and "R.subtract" not in script and "R.reshape" not in script
    assert script.count("R.add") == 2  # the integer add, and x + gs
    assert "R.exp" in script  # not ours to fold: FoldConstant's
    mod = tvm.IRModule()
    assert fold_constant_arithmetic(mod) is mod
