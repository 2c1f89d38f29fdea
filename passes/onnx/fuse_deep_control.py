"""Rule family: ``Conv -> Deep Control [-> activation]`` becomes ``ai.dcgraph.DeepControlConv``.

Deep Control is matched as an ``ai.dcgraph.DeepControl`` node or written out in the orders
exporters and people produce (``Mul`` and ``Add`` commute; ``M = ReduceMean(Y)`` over the
spatial axes with keepdims, axes as an input (opset 18+) or an attribute)::

    ((Y - M * A) * G) + B        (Y * G - M * C) + B  [a = C / G]        (Y - M * A) * G
    Y * G + (B - M * C)  [a = C / G: dcgraph's DeepControl2d as exported]

(the table every plain-ops matcher is tested on is :data:`dcgraph.testing.DC_FORMS`)

followed by Relu, Clip(0, 6), LeakyRelu, HardSwish, ``x * Sigmoid(x)`` or nothing.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from ..report import Match
from .common import ACTS, DOMAIN, ConvInfo, Recorder, act_attrs, act_pattern, const, per_channel
from .convert_norm import followed_by_activation

FORMS = ("node", "scale_shift", "weighted", "shifted", "scale_only")


def _dc_pattern(op, conv, form: str, a, g, b):
    if form == "node":
        return op.DeepControl(conv, a, g, b, _domain=DOMAIN, _outputs=["dc_out"])
    m = op.ReduceMean(conv, _allow_other_inputs=True, _outputs=["mean"])
    if form == "scale_shift":
        return op.Add(op.Mul(op.Sub(conv, op.Mul(m, a)), g), b, _outputs=["dc_out"])
    if form == "weighted":
        return op.Add(op.Sub(op.Mul(conv, g), op.Mul(m, a)), b, _outputs=["dc_out"])
    if form == "shifted":
        return op.Add(op.Mul(conv, g), op.Sub(b, op.Mul(m, a)), _outputs=["dc_out"])
    return op.Mul(op.Sub(conv, op.Mul(m, a)), g, _outputs=["dc_out"])


class FuseDeepControlConv(RewriteRuleClassBase):
    def __init__(self, form: str, act: str, recorder: Recorder) -> None:
        super().__init__(name=f"conv+deep_control[{form}]+{act}->fused")
        self.form, self.act, self.rec = form, act, recorder

    def pattern(self, op, x, a, g, b):
        conv = op.Conv(x, _allow_other_inputs=True, _outputs=["conv_out"])
        return act_pattern(op, _dc_pattern(op, conv, self.form, a, g, b), self.act)

    def _gains(self, info: ConvInfo, dc_out: ir.Value, mean, a, g, b):
        """``(a, g, b, activation attrs)`` as float64 vectors, or a reason string."""
        c, rank = info.channels, info.rank
        if self.form == "node":
            node = dc_out.producer()
            inner = node.attributes.get("activation")
            inner_act = inner.as_string() if inner is not None else "identity"
            if self.act != "identity" and inner_act != "identity":
                return "the DeepControl node already has an activation"
            vals = [const(v) for v in (a, g, b)]  # the operator's own (C,) vectors
            vals = [None if v is None or v.size != c else v.reshape(-1).astype(np.float64) for v in vals]
            if any(v is None for v in vals):
                return "DeepControl's a, g, b are not per-channel constants"
            attrs = {"activation": inner_act}
            alpha = node.attributes.get("alpha")
            if alpha is not None:
                attrs["alpha"] = alpha.as_float()
            return (*vals, attrs)
        mnode = mean.producer()
        axes = mnode.attributes.get("axes")
        axes = list(axes.as_ints()) if axes is not None else (
            None if len(mnode.inputs) < 2 else const(mnode.inputs[1]))
        keep = mnode.attributes.get("keepdims")
        if axes is None or (keep is not None and keep.as_int() != 1):
            return "ReduceMean is not over constant axes with keepdims=1"
        if sorted(int(v) % rank for v in np.ravel(axes)) != list(range(2, rank)):
            return f"ReduceMean over axes {list(np.ravel(axes))}, not the spatial axes"
        av, gv = per_channel(const(a), c, rank), per_channel(const(g), c, rank)
        bv = per_channel(const(b), c, rank) if self.form != "scale_only" else np.zeros(c)
        if av is None or gv is None or bv is None:
            return "the Deep Control parameters are not per-channel constants"
        if self.form in ("weighted", "shifted"):  # the pattern's A is a * g
            if not gv.all():
                return "zero gain in some channel"
            av = av / gv
        return av, gv, bv, {"activation": "identity"}

    def check(self, context, x, a, g, b, conv_out, dc_out, mean=None, act_out=None, **_):
        result = MatchResult()
        if self.act == "identity" and followed_by_activation(dc_out):
            return result.fail("an activation follows; its rule takes the match")
        if self.form == "scale_only" and _followed_by_constant_add(dc_out):
            return result.fail("a constant shift follows; the scale_shift form takes the match")
        info = ConvInfo(conv_out)
        reason = info.problem()
        if reason is None:
            gains = self._gains(info, dc_out, mean, a, g, b)
            reason = gains if isinstance(gains, str) else None
        if reason is None:
            _, reason = act_attrs(self.act, act_out)
        if reason is not None:
            last = act_out if act_out is not None else dc_out
            return result.fail(self.rec.fail(last.producer(), reason))
        return result

    def rewrite(self, op, x, a, g, b, conv_out, dc_out, mean=None, act_out=None, **_):
        info = ConvInfo(conv_out)
        av, gv, bv, attrs = self._gains(info, dc_out, mean, a, g, b)
        if self.act != "identity":
            attrs, _ = act_attrs(self.act, act_out)
        dtype = info.weight.dtype
        name = info.node.name or "conv"
        bias = info.bias if info.bias is not None else np.zeros(info.channels, dtype)
        inputs = [op.initializer(ir.tensor(v.astype(dtype)), name=f"{name}.{k}")
                  for k, v in (("fused_weight", info.weight), ("fused_bias", bias),
                               ("fused_a", av), ("fused_g", gv), ("fused_b", bv))]
        nodes = [info.node.name, dc_out.producer().name]
        if act_out is not None:
            nodes.append(act_out.producer().name)
        kind = "node" if self.form == "node" else "plain_ops"
        self.rec.report.matched(Match("conv+deep_control->fused", tuple(nodes), kind,
                                      attrs["activation"]))
        return op.DeepControlConv(x, inputs[0], inputs[1], *inputs[2:], _domain=DOMAIN,
                                  **info.conv_attrs(), **attrs)


def _followed_by_constant_add(value: ir.Value) -> bool:
    users = [n for n, _ in value.uses()]
    return (len(users) == 1 and users[0].op_type == "Add"
            and any(v is not value and const(v) is not None for v in users[0].inputs))


def rules(recorder: Recorder) -> list:
    acts = [a for a in ACTS if a != "identity"] + ["identity"]
    return [FuseDeepControlConv.rule(form, act, recorder) for act in acts for form in FORMS]
