"""Rule family: ``Conv -> norm [-> activation]`` becomes ``Conv -> ai.dcgraph.DeepControl``.

Norms: ``BatchNormalization`` (inference mode: exact with ``preserve``; ``training_mode=1``,
the form InstanceNorm can take: approximate), ``InstanceNormalization``,
``GroupNormalization``, and GroupNorm as exporters below opset 21 write it:
``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add``. Activations: Relu,
Clip(0, 6), LeakyRelu, HardSwish, ``x * Sigmoid(x)``. Inits and the conv-bias fold as in
the spec (section 2) and :mod:`dcgraph.passes.fx.convert_norm`.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from ..report import Match
from .common import ACTS, DOMAIN, ConvInfo, Recorder, act_attrs, act_pattern, const, per_channel

NORMS = ("batchnorm", "instancenorm", "groupnorm", "groupnorm_reshaped", "groupnorm_reshaped_static")


def _norm_pattern(op, y, kind: str, gn_scale, gn_shift):
    if kind == "batchnorm":
        return op.BatchNormalization(y, _allow_other_inputs=True, _outputs=["norm_out"])
    if kind == "instancenorm":
        return op.InstanceNormalization(y, _allow_other_inputs=True, _outputs=["norm_out"])
    if kind == "groupnorm":
        return op.GroupNormalization(y, _allow_other_inputs=True, _outputs=["norm_out"])
    r1 = op.Reshape(y, _allow_other_inputs=True, _outputs=["reshape_in"])
    inn = op.InstanceNormalization(r1, _allow_other_inputs=True, _outputs=["inner_norm"])
    if kind == "groupnorm_reshaped":  # back to the conv's own (dynamic) shape
        r2 = op.Reshape(inn, op.Shape(y), _outputs=["reshape_out"])
    else:
        r2 = op.Reshape(inn, _allow_other_inputs=True, _outputs=["reshape_out"])
    return op.Add(op.Mul(r2, gn_scale, _outputs=["gamma_mul"]), gn_shift, _outputs=["norm_out"])


class ConvNormToDeepControl(RewriteRuleClassBase):
    """One (norm kind, activation) combination of the rule family."""

    def __init__(self, kind: str, act: str, init: str, recorder: Recorder) -> None:
        super().__init__(name=f"conv+{kind}+{act}->deep_control")
        self.kind, self.act, self.init, self.rec = kind, act, init, recorder

    def pattern(self, op, x, gn_scale, gn_shift):
        conv = op.Conv(x, _allow_other_inputs=True, _outputs=["conv_out"])
        return act_pattern(op, _norm_pattern(op, conv, self.kind, gn_scale, gn_shift), self.act)

    # -- reading the norm ---------------------------------------------------------------
    def _norm_params(self, norm_out: ir.Value, channels: int, rank: int):
        """``(gamma, beta, mean, var, eps, batch_stats)`` as float64 vectors, or a reason."""
        node = norm_out.producer()
        if self.kind.startswith("groupnorm_reshaped"):
            add = norm_out.producer()
            mul = next(v.producer() for v in add.inputs
                       if v.producer() is not None and v.producer().op_type == "Mul")
            shift = next(v for v in add.inputs if v.producer() is not mul)
            scale = next(v for v in mul.inputs
                         if v.producer() is None or v.producer().op_type != "Reshape")
            gamma = per_channel(const(scale), channels, rank)
            beta = per_channel(const(shift), channels, rank)
            if gamma is None or beta is None:
                return "GroupNorm's scale or shift is not a per-channel constant"
            return gamma, beta, None, None, 0.0, True
        ins = list(node.inputs)
        eps_attr = node.attributes.get("epsilon")
        eps = eps_attr.as_float() if eps_attr is not None else 1e-5
        gamma, beta = const(ins[1]) if len(ins) > 1 else None, const(ins[2]) if len(ins) > 2 else None
        if gamma is None or beta is None:
            return "the norm's scale or shift is not a constant"
        if self.kind == "groupnorm":
            if gamma.shape[0] != channels:  # opset 18's per-group scale: not per channel
                return "GroupNormalization with per-group scale (opset 18) is not supported"
            return gamma.astype(np.float64), beta.astype(np.float64), None, None, eps, True
        if self.kind == "instancenorm":
            return gamma.astype(np.float64), beta.astype(np.float64), None, None, eps, True
        mean, var = const(ins[3]), const(ins[4])
        training = node.attributes.get("training_mode")
        batch = training is not None and training.as_int() == 1
        if (mean is None or var is None) and not batch:
            return "BatchNormalization statistics are not constants"
        return (gamma.astype(np.float64), beta.astype(np.float64),
                None if mean is None else mean.astype(np.float64),
                None if var is None else var.astype(np.float64), eps, batch)

    def check(self, context, x, conv_out, norm_out, act_out=None, **_) -> MatchResult:
        result = MatchResult()
        last = act_out if act_out is not None else norm_out
        if self.act == "identity" and followed_by_activation(norm_out):
            return result.fail("an activation follows; its rule takes the match")
        info = ConvInfo(conv_out)
        reason = info.problem()
        if reason is None:
            params = self._norm_params(norm_out, info.channels, info.rank)
            reason = params if isinstance(params, str) else None
        if reason is None:
            _, reason = act_attrs(self.act, act_out)
        if reason is not None:
            return result.fail(self.rec.fail(last.producer(), reason))
        return result

    def rewrite(self, op, x, conv_out, norm_out, act_out=None, **_):
        info = ConvInfo(conv_out)
        gamma, beta, mean, var, eps, batch = self._norm_params(norm_out, info.channels, info.rank)
        c = info.channels
        note, exact = "", True
        if self.init == "preserve" and not batch and self.kind == "batchnorm":
            g = gamma / np.sqrt(var + eps)
            a, b = np.zeros(c), beta - g * mean
        else:
            a, g, b = np.ones(c), gamma, beta
            exact = False
            note = {"batchnorm": "BatchNormalization in training mode divides by a batch std",
                    "instancenorm": "InstanceNorm divides by a per-sample std",
                    "groupnorm": "GroupNorm divides by a per-sample, per-group std",
                    }[kind_of(self.kind)] + ": approximate"
            if self.init == "fresh" and self.kind == "batchnorm" and not batch:
                note = "fresh init (training from scratch)"
        if info.bias is not None:
            b = b + g * (1 - a) * info.bias.astype(np.float64)
        dtype = info.weight.dtype
        name = info.node.name or "conv"
        conv = op.Conv(info.x, op.initializer(ir.tensor(info.weight), name=f"{name}.weight_dc"),
                       **info.conv_attrs())
        attrs, _ = act_attrs(self.act, act_out)
        consts = [op.initializer(ir.tensor(v.astype(dtype)), name=f"{name}.{k}")
                  for k, v in (("a", a), ("g", g), ("b", b))]
        nodes = [info.node.name, norm_out.producer().name]
        if act_out is not None:
            nodes.append(act_out.producer().name)
        kind = "groupnorm" if self.kind.startswith("groupnorm") else self.kind
        self.rec.report.matched(Match(f"conv+{kind}->deep_control", tuple(nodes), kind,
                                      self.act, self.init, exact, note))
        return op.DeepControl(conv, *consts, _domain=DOMAIN, **attrs)


def kind_of(kind: str) -> str:
    return "groupnorm" if kind.startswith("groupnorm") else kind


def followed_by_activation(value: ir.Value) -> bool:
    """True if ``value``'s only consumer is an activation the rules absorb (``x * Sigmoid(x)``:
    its two consumers are that Sigmoid and that Mul)."""
    users = [n for n, _ in value.uses()]
    if len(users) == 1 and users[0].domain in ("", "ai.onnx"):
        if users[0].op_type == "Clip":  # only Clip(0, 6) is an activation the rules absorb
            return act_attrs("relu6", users[0].outputs[0])[1] is None
        return users[0].op_type in ("Relu", "LeakyRelu", "HardSwish")
    if len(users) == 2:
        sig = next((n for n in users if n.op_type == "Sigmoid"), None)
        mul = next((n for n in users if n.op_type == "Mul"), None)
        return sig is not None and mul is not None and sig.outputs[0] in mul.inputs
    return False


def rules(init: str, recorder: Recorder) -> list:
    """Activation-absorbing rules first, then the plain ones."""
    acts = [a for a in ACTS if a != "identity"] + ["identity"]
    return [ConvNormToDeepControl.rule(kind, act, init, recorder)
            for act in acts for kind in NORMS]
