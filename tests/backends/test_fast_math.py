"""fast_exp / fast_sigmoid / fast_silu: measured error bounds, and no scalar expf in compiled code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from dcgraph.backends.tvm import fast_math, kernels, targets

LANES = 16
SIZE = 1 << 20


def _build(fn, dtype: str = "float32"):
    """``out[i] = fn(inp[i])`` compiled for the host, vectorised like the conv epilogues."""
    a = te.placeholder((SIZE,), dtype, name="A")
    b = te.compute((SIZE,), lambda i: fn(a[i]), name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("B"))
    _, vec = sch.split(loop, [None, LANES])
    sch.vectorize(vec)
    return tvm.compile(sch.mod, target=targets.resolve("x86"))


def _run(lib, x: np.ndarray) -> np.ndarray:
    dev = tvm.cpu()
    out = np.empty_like(x)
    for k in range(0, len(x), SIZE):
        chunk = x[k:k + SIZE]
        buf = np.zeros(SIZE, x.dtype)
        buf[:len(chunk)] = chunk
        res = tvm.runtime.tensor(np.zeros(SIZE, x.dtype), dev)
        lib["main"](tvm.runtime.tensor(buf, dev), res)
        out[k:k + len(chunk)] = res.numpy()[:len(chunk)]
    return out


@pytest.fixture(scope="module")
def exp_lib():
    return _build(fast_math.fast_exp)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def test_fast_exp_relative_error_bound(exp_lib):
    lo, hi = fast_math.EXP_RANGE
    x = np.concatenate([np.linspace(-88.0, 88.0, 1 << 22, dtype=np.float32),
                        np.random.default_rng(0).uniform(lo, hi, 1 << 20).astype(np.float32),
                        np.float32([lo, hi, 0.0, -0.0, np.log(2), -np.log(2), 0.5 * np.log(2)])])
    y = _run(exp_lib, x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    inside = x >= np.float32(lo)
    rel = np.abs(y - ref)[inside] / ref[inside]
    assert rel.max() < fast_math.EXP_MAX_REL_ERROR, (rel.max(), x[inside][rel.argmax()])
    # Below the range the true value is subnormal; fast_exp gives 0.
    assert np.all(y[~inside] == 0.0) and np.abs(ref[~inside]).max() < np.finfo(np.float32).tiny


def test_fast_exp_extremes_are_finite(exp_lib):
    big = np.finfo(np.float32).max
    x = np.float32([-np.inf, -big, -1e30, -200.0, 88.8, 200.0, 1e30, big, np.inf])
    y = _run(exp_lib, x)
    assert np.all(np.isfinite(y))
    assert np.all(y[:4] == 0.0)
    assert np.all(y[4:] == y[4]) and y[4] > 3.4e38


@pytest.mark.parametrize("name", ["sigmoid", "silu"])
def test_fast_sigmoid_and_silu_error(name):
    fn = fast_math.fast_sigmoid if name == "sigmoid" else fast_math.fast_silu
    lib = _build(fn)
    big = np.finfo(np.float32).max
    extremes = np.float32([0.0, -0.0, 1e-30, -1e-30, 87.3, -87.3, 88.8, -88.8, 100.0, -100.0,
                           1e30, -1e30, big, -big])
    x = np.concatenate([np.linspace(-100.0, 100.0, 1 << 22, dtype=np.float32), extremes])
    y = _run(lib, x)
    assert np.all(np.isfinite(y))
    x64 = x.astype(np.float64)
    ref = _sigmoid64(x64) if name == "sigmoid" else x64 * _sigmoid64(x64)
    err = np.abs(y.astype(np.float64) - ref)
    if name == "sigmoid":
        assert err.max() < 1e-7
        assert np.all(y[x >= 88] == 1.0) and np.all(y[x <= -88] == 0.0)
        assert y[-len(extremes)] == 0.5
    else:
        # float32 silu cannot be within 1e-6 absolute for |x| > 8 (an ulp there is 9.5e-7);
        # relative to max(1, |x|) it is within 1.5e-7, as x * tirx.sigmoid(x) through expf is.
        assert err[np.abs(x) < 8].max() < 1e-6
        assert (err / np.maximum(1.0, np.abs(x64))).max() < 1.5e-7
        # Below x = -87 the result is -87 / (1 + e^87) (-1.5e-36); the true value is smaller still.
        assert y[-len(extremes)] == 0.0 and np.all(np.abs(y[x <= -88]) < 2e-36)
        assert np.all(y[x >= 88] == x[x >= 88])  # exact: exp(-x) is below half an ulp of 1


def test_other_dtypes_keep_tir_intrinsics():
    x = tirx.Var("x", "float64")
    assert str(fast_math.fast_exp(x)) == str(tirx.exp(x))
    assert str(fast_math.fast_sigmoid(x)) == str(tirx.sigmoid(x))
    assert "exp" not in str(fast_math.fast_exp(tirx.Var("y", "float32")))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_silu_activation_has_no_expf_call(dtype):
    lib = _build(lambda v: kernels.activation(v.asobject(), "silu", 0.0, dtype), dtype)
    asm = lib.mod.inspect_source("asm")
    exp_calls = re.findall(r"call\w*\s+\w*exp\w*", asm)
    if dtype == "float32":
        assert exp_calls == []
        assert "zmm" in asm or "ymm" in asm or "xmm" in asm
    else:
        assert exp_calls  # float64 keeps libm's exp


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relax_sigmoid_is_legalized_with_the_fast_polynomial(dtype):
    """A model's own ``sigmoid`` (swish spelled ``x * sigmoid(x)``, Squeeze-Excitation gates) goes
    through dcgraph's CPU pipeline as :func:`fast_math.fast_sigmoid` in float32: the values
    match, and the compiled kernel calls no scalar ``exp``; float64 keeps TVM's (libm's)."""
    from tvm import relax

    from dcgraph.backends.tvm.pipeline import relax_pipeline

    target = targets.resolve("x86")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 32, 9, 9), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.multiply(x, relax.op.sigmoid(x))))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target))
    a = np.random.default_rng(0).uniform(-30, 30, (4, 32, 9, 9)).astype(dtype)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
    want = a.astype("float64") / (1.0 + np.exp(-a.astype("float64")))
    assert np.abs(got - want).max() <= 2e-6 * max(1.0, np.abs(want).max())
    exp_calls = re.findall(r"call\w*\s+\w*exp\w*", ex.mod.imports[0].inspect_source("asm"))
    assert (exp_calls == []) == (dtype == "float32"), exp_calls
