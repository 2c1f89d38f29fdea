"""Shared-case plumbing for the TVM tests: one Relax module per conv case, its reference output.

Every target (x86 here, ARM over RPC, CUDA) builds the same module from
:data:`dcgraph.testing.CASES` (:func:`dcgraph.backends.tvm.modules.block_module`) and compares
with :func:`dcgraph.reference.conv_deep_control`.
"""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax, te

from dcgraph import reference
from dcgraph.backends.tvm.modules import block_module
from dcgraph.testing import BATCHES, ConvCase, batch_cases, relative_error, with_batch

# float32 kernels vs the float64 reference, relative to the output's scale
RTOL = 1e-4

__all__ = ["BATCHES", "MUTATIONS", "RTOL", "apply_mutation", "batch_cases", "case_module",
           "ignore_a_two_pass",
           "relative_error", "with_batch"]


def case_module(case: ConvCase, plan: str = "hoisted", kind: str = "fused",
                bb: relax.BlockBuilder | None = None, name: str = "main"
                ) -> tuple[tvm.IRModule, list[np.ndarray], np.ndarray]:
    """``(module, float32 inputs, float64 reference output)``: x, weight, [bias], a, g, b as inputs.

    With ``bb``, the case is added to that builder as function ``name`` (many cases, one module)."""
    t = case.tensors(torch.float64)
    names = [k for k in ("x", "weight", "bias", "a", "g", "b") if t[k] is not None]
    mod = block_module(kind, tuple(t["x"].shape), tuple(t["weight"].shape), act=case.act, bias=case.bias,
                       plan=plan, bb=bb, name=name, **case.conv_kwargs())
    want = reference.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"],
                                       act=case.act, **case.conv_kwargs()).numpy()
    return mod, [t[k].float().numpy() for k in names], want


# ---------------------------------------------------------------- kernel mutations (the mean guard)
# Plausible ways a kernel rewrite could break the mean path; test_whole_models.py and test_tune.py
# patch them into dcgraph.backends.tvm.kernels and require every route's whole-model check to fail.

def zero_like(a: te.Tensor) -> te.Tensor:
    return te.compute(a.shape, lambda *i: tvm.tirx.const(0.0, a.dtype), name="a_ignored")


def ignore_stride(original):
    """The hoisted shift computed as if every conv had stride 1 (its taps and count go wrong)."""
    def shift(x, w, bias, a, g, b, *, stride, padding, dilation, groups):
        return original(x, w, bias, a, g, b, stride=[1] * len(stride), padding=padding, dilation=dilation,
                        groups=groups)
    return shift


def ignore_a_shift(original):
    def shift(x, w, bias, a, g, b, **conv):
        return original(x, w, bias, zero_like(a), g, b, **conv)
    return shift


def ignore_a_two_pass(original):
    def dc(y, a, g, b, act="identity", negative_slope=0.01):
        return original(y, zero_like(a), g, b, act, negative_slope)
    return dc


MUTATIONS = {
    "ignore_stride": {"hoisted_shift": ignore_stride},
    "ignore_a": {"hoisted_shift": ignore_a_shift, "deep_control": ignore_a_two_pass},
}


def apply_mutation(monkeypatch, mutation: str | dict) -> None:
    """Patch a mutation into both kernel families: ``kernels`` (NCHW) and ``kernels_blocked``
    (the same signatures on blocked tensors), so every layout's route runs the broken mean."""
    from dcgraph.backends.tvm import kernels, kernels_blocked

    for name, make in (MUTATIONS[mutation] if isinstance(mutation, str) else mutation).items():
        for module in (kernels, kernels_blocked):
            monkeypatch.setattr(module, name, make(getattr(module, name)))
