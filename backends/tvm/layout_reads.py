"""What the layout pass (:mod:`.layout`) reads off a Relax program before it rewrites it: a fused
kernel's conv parameters, which values only dcgraph's kernels read (so their layout is the
kernels' business), which convs are pointwise and which pools global."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

from .lowering import CONV_ATTR, KERNEL_ATTR

__all__ = ["conv_params", "global_pool", "kernel_fed", "pointwise"]


def conv_params(attrs: Any) -> dict[str, Any]:
    """A fused kernel's conv parameters (its ``dcgraph.conv`` attribute) as Python values."""
    conv = attrs[CONV_ATTR]
    return {"stride": [int(v) for v in conv["stride"]], "padding": [int(v) for v in conv["padding"]],
            "dilation": [int(v) for v in conv["dilation"]], "groups": int(conv["groups"]),
            "act": str(conv["act"]), "negative_slope": float(conv["negative_slope"])}


def global_pool(attrs: Any) -> bool:
    """Whether an ``adaptive_avg_pool2d``'s attrs make it the global mean (NCHW, output 1x1)."""
    size = [int(v) for v in attrs.output_size] if attrs.output_size is not None else []
    return (str(attrs.layout) == "NCHW" and str(attrs.out_layout or "NCHW") == "NCHW"
            and size in ([1], [1, 1]))


def pointwise(conv: dict[str, Any]) -> bool:
    """Stride 1, no padding, no dilation (with a 1x1 kernel: a per-pixel matmul)."""
    return (all(v == 1 for v in conv["stride"]) and not any(conv["padding"])
            and all(v == 1 for v in conv["dilation"]))


def kernel_fed(func: relax.Function, mod: tvm.IRModule) -> frozenset:
    """The variables of ``func`` that only dcgraph's kernels (``call_tir`` of a PrimFunc with
    the kernel attribute) read: not returned, not read by any other op."""
    readers: dict[relax.Var, bool] = {}

    def note(expr: relax.Expr, by_kernel: bool) -> None:
        for v in relax.analysis.free_vars(expr):
            readers[v] = readers.get(v, True) and by_kernel

    for block in func.body.blocks:
        for b in block.bindings:
            value = b.value
            callee = value.args[0] if isinstance(value, relax.Call) and value.args else None
            prim = mod[callee] if isinstance(callee, relax.GlobalVar) else None
            note(value, isinstance(prim, tvm.tirx.PrimFunc) and KERNEL_ATTR in (prim.attrs or {}))
    note(func.body.body, False)
    return frozenset(v for v, only_kernels in readers.items() if only_kernels)
