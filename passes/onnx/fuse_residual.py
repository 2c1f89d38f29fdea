"""Rule family: ``DeepControlConv -> Add(skip) [-> activation]`` becomes
``ai.dcgraph.DeepControlConvAdd`` (the residual tail, spec section 4a).

ResNet blocks end in ``act(DC(conv(h)) + skip)``. After :mod:`.fuse_deep_control` the
``DeepControlConv`` (activation identity) is followed by the residual ``Add`` and the
activation; this rule folds both into one node, so a runtime or compiler sees the whole block::

    Z = Relu(Add(DeepControlConv(X, W, B, A, G, Bo), Skip))    (Add commutes)
      -> DeepControlConvAdd(X, W, B, A, G, Bo, Skip, activation=relu)

``check`` refuses (with the reason in the report) a DeepControlConv that already has an
activation, an output with other users, and a ``Skip`` that would broadcast the output to a
larger shape.
"""

from __future__ import annotations

from onnxscript import ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from ..report import Match
from .common import ACTS, DOMAIN, Recorder, act_attrs, act_pattern
from .convert_norm import followed_by_activation


def _broadcasts_into(skip: ir.Value, out: ir.Value) -> bool | None:
    """True / False when both shapes are known, None when either is not."""
    if skip.shape is None or out.shape is None:
        return None
    s, o = list(skip.shape), list(out.shape)
    if len(s) > len(o):
        return False
    for ds, do in zip(reversed(s), reversed(o), strict=False):
        if ds == 1 or ds == do:
            continue
        if isinstance(ds, int) and isinstance(do, int):
            return False
        return None  # symbolic dims that may differ
    return True


class FuseResidual(RewriteRuleClassBase):
    def __init__(self, act: str, recorder: Recorder) -> None:
        super().__init__(name=f"deep_control_conv+add+{act}->fused")
        self.act, self.rec = act, recorder

    def pattern(self, op, x, w, c, a, g, b, skip):
        dc = op.DeepControlConv(x, w, c, a, g, b, _domain=DOMAIN, _outputs=["dc_out"])
        return act_pattern(op, op.Add(dc, skip, _outputs=["sum_out"]), self.act)

    def check(self, context, x, w, c, a, g, b, skip, dc_out, sum_out, act_out=None, **_):
        result = MatchResult()
        if self.act == "identity" and followed_by_activation(sum_out):
            return result.fail("an activation follows; its rule takes the match")
        node = dc_out.producer()
        inner = node.attributes.get("activation")
        reason = None
        if inner is not None and inner.as_string() != "identity":
            reason = f"{node.name} already applies {inner.as_string()}: the add comes after it"
        elif len(dc_out.uses()) != 1:
            reason = f"{node.name}'s output has other users besides the residual add"
        elif skip is dc_out:
            reason = "the add doubles the block output"
        elif _broadcasts_into(skip, dc_out) is False:
            reason = f"the residual {skip.shape} does not broadcast to the block output {dc_out.shape}"
        if reason is None and self.act != "identity":
            _, reason = act_attrs(self.act, act_out)
        if reason is not None:
            last = act_out if act_out is not None else sum_out
            return result.fail(self.rec.fail(last.producer(), reason))
        return result

    def rewrite(self, op, x, w, c, a, g, b, skip, dc_out, sum_out, act_out=None, **_):
        node = dc_out.producer()
        conv = {k: node.attributes[k].value for k in ("strides", "pads", "dilations", "group")
                if k in node.attributes}
        attrs, _ = act_attrs(self.act, act_out)
        names = [node.name, sum_out.producer().name]
        if act_out is not None:
            names.append(act_out.producer().name)
        self.rec.report.matched(Match("fused+residual->fused", tuple(names), "residual",
                                      attrs["activation"]))
        return op.DeepControlConvAdd(x, w, c, a, g, b, skip, _domain=DOMAIN, **conv, **attrs)


def rules(recorder: Recorder) -> list:
    acts = [a for a in ACTS if a != "identity"] + ["identity"]
    return [FuseResidual.rule(act, recorder) for act in acts]
