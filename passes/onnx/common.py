"""Shared pieces of the ONNX rules: activation patterns, constant and attribute readers,
and the report the rules write into."""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from dcgraph.reference import ACTIVATIONS

from ..report import RewriteReport

DOMAIN = "ai.dcgraph"
ACTS = ACTIVATIONS  # every activation of the spec has an ONNX spelling below


def act_pattern(op, z, act: str):
    """The pattern of ``act(z)`` (``identity`` is ``z`` itself)."""
    if act == "identity":
        return z
    if act == "relu":
        return op.Relu(z, _outputs=["act_out"])
    if act == "relu6":
        return op.Clip(z, _allow_other_inputs=True, _outputs=["act_out"])
    if act == "leaky_relu":
        return op.LeakyRelu(z, _outputs=["act_out"])
    if act == "hardswish":
        return op.HardSwish(z, _outputs=["act_out"])
    if act == "silu":
        return op.Mul(z, op.Sigmoid(z), _outputs=["act_out"])
    raise ValueError(act)


def const(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value (an initializer or a folded constant), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def act_attrs(act: str, act_out: ir.Value | None) -> tuple[dict, str | None]:
    """``({"activation": ..., "alpha": ...}, reason-or-None)`` for the matched activation."""
    attrs: dict = {"activation": act}
    if act == "relu6":
        ins = [*act_out.producer().inputs, None, None]
        lo, hi = (const(v) for v in ins[1:3])
        if lo is None or hi is None or float(lo) != 0.0 or float(hi) != 6.0:
            return attrs, "Clip is not Clip(0, 6)"
    if act == "leaky_relu":
        attr = act_out.producer().attributes.get("alpha")
        attrs["alpha"] = attr.as_float() if attr is not None else 0.01
    return attrs, None


def per_channel(value: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts per channel against ``(N, C, *S)``, as a ``(C,)`` vector."""
    if value is None:
        return None
    shape = list(value.shape)
    if len(shape) > rank:
        return None
    shape = [1] * (rank - len(shape)) + shape
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


class ConvInfo:
    """Weight, bias and attributes of a matched Conv node."""

    def __init__(self, conv_out: ir.Value) -> None:
        self.node = conv_out.producer()
        inputs = list(self.node.inputs)
        self.x = inputs[0]
        self.weight = const(inputs[1])
        self.bias = const(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
        self.has_bias_input = len(inputs) > 2 and inputs[2] is not None
        a = self.node.attributes
        self.auto_pad = a["auto_pad"].as_string() if "auto_pad" in a else "NOTSET"
        self.attrs = {k: a[k].value for k in ("strides", "pads", "dilations", "group",
                                              "kernel_shape") if k in a}

    def problem(self) -> str | None:
        if self.weight is None:
            return "the conv weight is not a constant"
        if self.has_bias_input and self.bias is None:
            return "the conv bias is not a constant"
        if self.auto_pad not in ("NOTSET", ""):
            return f"auto_pad={self.auto_pad} (explicit pads only)"
        return None

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    @property
    def rank(self) -> int:
        return self.weight.ndim

    def conv_attrs(self) -> dict:
        return {k: v for k, v in self.attrs.items() if k != "kernel_shape"}


class Recorder:
    """Collects matches and check failures while the rules run (shared by all rules)."""

    def __init__(self) -> None:
        self.report = RewriteReport()
        self.failures: dict[str, str] = {}

    def fail(self, node: ir.Node, reason: str) -> str:
        self.failures[node.name or str(id(node))] = reason
        return reason
