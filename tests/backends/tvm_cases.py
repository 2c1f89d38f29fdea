"""Shared-case plumbing for the TVM tests: one Relax module per conv case, its reference output.

Every target (x86 here, ARM over RPC, CUDA) builds the same module from
:data:`tests.cases.CASES` and compares with :func:`dcgraph.reference.conv_deep_control`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import tvm
from tvm import relax

from dcgraph import reference
from dcgraph.backends.tvm.lowering import emit_conv_deep_control
from tests.cases import CASES, ConvCase

# float32 kernels vs the float64 reference, relative to the output's scale
RTOL = 1e-4
BATCHES = (1, 4)


def with_batch(case: ConvCase, batch: int) -> ConvCase:
    return dataclasses.replace(case, name=f"{case.name}-b{batch}", batch=batch)


def batch_cases() -> list[ConvCase]:
    """Every shared case at batch 1 and batch 4 (issue 5's matrix)."""
    return [with_batch(c, b) for c in CASES for b in BATCHES]


def case_module(case: ConvCase, plan: str = "hoisted", bb: relax.BlockBuilder | None = None,
                name: str = "main") -> tuple[tvm.IRModule, list[np.ndarray], np.ndarray]:
    """``(module, float32 inputs, float64 reference output)``: x, weight, [bias], a, g, b as inputs.

    With ``bb``, the case is added to that builder as function ``name`` (many cases, one module).
    """
    t = case.tensors(torch.float64)
    names = [k for k in ("x", "weight", "bias", "a", "g", "b") if t[k] is not None]
    params = {k: relax.Var(k, relax.TensorType(tuple(t[k].shape), "float32")) for k in names}
    bb = bb or relax.BlockBuilder()
    with bb.function(name, list(params.values())):
        with bb.dataflow():
            out = emit_conv_deep_control(
                bb, params["x"], params["weight"], params.get("bias"), params["a"], params["g"],
                params["b"], act=case.act, plan=plan, **case.conv_kwargs())
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    want = reference.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"],
                                       act=case.act, **case.conv_kwargs()).numpy()
    return bb.get(), [t[k].float().numpy() for k in names], want


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-12))
