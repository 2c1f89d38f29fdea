"""Emit the fused Deep Control op into a Relax program: the one place both frontends call.

``emit_conv_deep_control`` turns one ``conv -> Deep Control -> act`` into two ``call_tir``
kernels (see :mod:`.kernels`): the hoisted per-sample shift from ``x``, then the conv with
the scale/shift/activation epilogue. ``plan="two_pass"`` emits the conv, then a mean over
its output and the epilogue instead. ``plan="auto"`` (the default) picks per conv:
``two_pass`` for depthwise convs (one input channel per output channel), for convs whose
weight outweighs their output and for 1x1 convs whose input is at least twice their output
(see :func:`choose_plan`), ``hoisted`` otherwise.

Why: the hoisted shift reads ``x`` once per kernel tap (box sums), a small cost next to a
conv that does ``C_in/groups * k^2`` MACs per output but as large as the conv itself when
``C_in/groups = 1``. Measured on x86 (2 threads, interleaved, whole block): two-pass / hoisted
0.52-0.59x on MobileNetV2 / EfficientNet-B0 depthwise blocks at batch 1, 0.80x at batch 8;
on dense convs 0.88-1.04x at batch 1 but up to 1.6x at batch 8 (a 1x1 expand whose 14 MB
output no longer fits in cache for the second pass), so dense convs stay hoisted.

**Options.** How the op is lowered (today: ``plan``) is :class:`LoweringOptions`, set once for
a whole import with :func:`options` (``with options(plan="two_pass"): ...``; ``compile`` and
``tune`` do it for their ``plan=`` argument) and read by :func:`emit_conv_deep_control`, so
the frontends and the plain-ops fusion between the entry point and the emitter carry nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tvm import relax

from dcgraph.activations import check as check_act

from . import kernels

PLANS = ("auto", "hoisted", "two_pass")
KERNEL_ATTR = "dcgraph.kernel"  # marks the PrimFuncs dcgraph emitted (schedules and reports read it)
CONV_ATTR = "dcgraph.conv"  # the conv's parameters on them (:mod:`.layout` re-emits the kernels blocked)


@dataclass(frozen=True)
class LoweringOptions:
    """How the fused op is lowered. ``plan``: ``auto`` (default), ``hoisted`` or ``two_pass``."""

    plan: str = "auto"

    def __post_init__(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"unknown plan {self.plan!r}; expected one of {', '.join(PLANS)}")


_DEFAULTS = LoweringOptions()
_OPTIONS: contextvars.ContextVar[LoweringOptions | None] = contextvars.ContextVar(
    "dcgraph_lowering_options", default=None)


def current_options() -> LoweringOptions:
    """The options in force (the defaults outside any :func:`options` block)."""
    return _OPTIONS.get() or _DEFAULTS


@contextlib.contextmanager
def options(**changes: Any) -> Iterator[LoweringOptions]:
    """Lower with these options inside the block (``None`` values keep the current ones)."""
    new = replace(current_options(), **{k: v for k, v in changes.items() if v is not None})
    token = _OPTIONS.set(new)
    try:
        yield new
    finally:
        _OPTIONS.reset(token)


def kernel_origin(name: str, attrs: Mapping[str, Any] | None) -> str:
    """``"dcgraph"`` for a PrimFunc dcgraph emitted, else ``"tvm"``. FuseOps renames a dcgraph
    kernel it merged a residual add into (``fused_dc_conv2_add_relu``) and may drop the mark,
    so the name counts too."""
    return "dcgraph" if KERNEL_ATTR in (attrs or {}) or "dc_" in name else "tvm"


def _ints(v: int | Sequence[int], nd: int, name: str) -> list[int]:
    vals = [int(v)] * nd if isinstance(v, int) else [int(i) for i in v]
    if len(vals) == 1 and nd > 1:
        vals = vals * nd
    if len(vals) != nd:
        raise ValueError(f"{name} has {len(vals)} values for a {nd}-d convolution")
    return vals


def choose_plan(w: relax.Expr, groups: int, x: relax.Expr | None = None,
                conv: Mapping[str, Any] | None = None) -> str:
    """``plan="auto"``: ``two_pass`` for a depthwise conv (weight ``[C_out, 1, k...]``,
    ``groups > 1``) and for a conv whose output is small next to its weight
    (``C_in/groups * k^2 > 2 * N * |O|``: the hoisted mean reads the whole weight once more,
    where a second pass over an output that small runs in cache), for a 1x1 conv whose input
    is at least twice its output (``C_in * |X| >= 2 * C_out * |O|``: the hoisted mean reads the
    input once more, the second pass reads and writes the output), ``hoisted`` otherwise (see
    the module docstring for the measurements)."""
    try:
        shape = [int(d) for d in w.ty.shape]
        per_group = shape[1]
    except (AttributeError, TypeError, IndexError, ValueError):
        return "hoisted"
    taps = math.prod(shape[2:])
    if groups > 1 and per_group == 1:
        return "two_pass"
    try:
        xs = [int(d) for d in x.ty.shape]
        out = kernels.output_size(xs[2:], shape[2:], conv["stride"], conv["padding"],
                                  conv["dilation"])
    except (AttributeError, TypeError, ValueError, KeyError):  # a symbolic size: keep one pass
        return "hoisted"
    out_map = math.prod(out)
    if per_group * taps > 2 * xs[0] * out_map:
        return "two_pass"
    # a 1x1 conv's hoisted mean is one more pass over its whole input; the two-pass plan's second
    # pass is over the output (read and rewritten): the smaller wins. Measured (blocked, 2-core
    # AVX-512, batch 1 / 8): 144->24 and 240->40 projections 3-12% faster two-pass, 24->144
    # expansions 16-33% faster hoisted, the 64->128 stride-2 downsample even.
    if taps == 1 and groups == 1 and math.prod(xs[1:]) >= 2 * shape[0] * out_map:
        return "two_pass"
    return "hoisted"


def activation_expr(z: relax.Expr, act: str, negative_slope: float = 0.01) -> relax.Expr:
    """``act(z)`` as the plain Relax ops TVM's importers write (which the fusion passes read)."""
    op = relax.op
    if act == "identity":
        return z
    if act == "relu":
        return op.nn.relu(z)
    if act == "relu6":
        return op.clip(z, relax.prim_value(0.0), relax.prim_value(6.0))
    if act == "silu":
        return op.nn.silu(z)
    if act == "leaky_relu":
        return op.nn.leakyrelu(z, negative_slope)
    if act == "hardswish":
        return op.divide(op.multiply(z, op.clip(op.add(z, relax.const(3.0, "float32")), relax.prim_value(0.0),
                                                relax.prim_value(6.0))), relax.const(6.0, "float32"))
    raise ValueError(f"no plain Relax spelling for activation {act!r}")


def emit_conv_deep_control(
    bb: relax.BlockBuilder, x: relax.Expr, w: relax.Expr, bias: relax.Expr | None,
    a: relax.Expr, g: relax.Expr, b: relax.Expr, *,
    stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1, groups: int = 1,
    act: str = "identity", negative_slope: float = 0.01, plan: str | None = None,
    skip: relax.Expr | None = None,
) -> relax.Var:
    """Emit ``act(g * (y - a * mean_S(y)) + b [+ skip])`` for ``y = conv(x, w) + bias``; returns
    the output var.

    ``plan``: this call's plan; None (the frontends' way) takes :func:`current_options`'s. A
    residual ``skip`` becomes the Relax ``add`` and activation that the unfused graph has, which
    the pipeline fuses into the conv kernel's epilogue as before."""
    check_act(act)
    if skip is not None:
        out = emit_conv_deep_control(bb, x, w, bias, a, g, b, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, plan=plan)
        z = bb.emit(relax.op.add(out, skip))
        return z if act == "identity" else bb.emit(activation_expr(z, act, negative_slope))
    plan = LoweringOptions(plan).plan if plan is not None else current_options().plan
    nd = len(x.ty.shape) - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"Deep Control conv needs 1-3 spatial dims, got input rank {nd + 2}")
    conv = {"stride": _ints(stride, nd, "stride"), "padding": _ints(padding, nd, "padding"),
            "dilation": _ints(dilation, nd, "dilation"), "groups": int(groups)}
    if plan == "auto":
        plan = choose_plan(w, int(groups), x, conv)
    params = {**conv, "act": act, "negative_slope": float(negative_slope)}

    def attrs(kind: str) -> dict:
        return {KERNEL_ATTR: kind, CONV_ATTR: params}

    if plan == "hoisted":
        if bias is None:
            shift = bb.emit_te(lambda x_, w_, a_, g_, b_: kernels.hoisted_shift(
                x_, w_, None, a_, g_, b_, **conv), x, w, a, g, b, primfunc_name_hint="dc_shift",
            primfunc_attrs=attrs("dc_shift"))
        else:
            shift = bb.emit_te(lambda x_, w_, c_, a_, g_, b_: kernels.hoisted_shift(
                x_, w_, c_, a_, g_, b_, **conv), x, w, bias, a, g, b, primfunc_name_hint="dc_shift",
            primfunc_attrs=attrs("dc_shift"))
        return bb.emit_te(lambda x_, w_, g_, o_: kernels.conv_epilogue(
            x_, w_, g_, o_, act=act, negative_slope=negative_slope, **conv),
            x, w, g, shift, primfunc_name_hint="dc_conv",
            primfunc_attrs=attrs("dc_conv"))
    y = bb.emit_te(lambda x_, w_: kernels.conv_epilogue(x_, w_, None, None, **conv), x, w,
                   primfunc_name_hint="dc_conv_raw",
            primfunc_attrs=attrs("dc_conv_raw"))
    if bias is not None:  # DC of y + c0 is DC of y with b' = b + g * c0 * (1 - a)
        one = relax.const(1.0, x.ty.dtype)
        b = bb.emit(relax.op.add(b, relax.op.multiply(g, relax.op.multiply(bias, relax.op.subtract(one, a)))))
    return bb.emit_te(lambda y_, a_, g_, b_: kernels.deep_control(y_, a_, g_, b_, act, negative_slope),
                      y, a, g, b, primfunc_name_hint="dc_two_pass",
            primfunc_attrs=attrs("dc_two_pass"))
