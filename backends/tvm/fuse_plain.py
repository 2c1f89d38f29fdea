"""Find Deep Control written as plain Relax ops after a convolution; replace it with dcgraph's kernels.

A model that spells Deep Control out (``DeepControl2d`` modules, a hand-written forward, an
ONNX graph of Mul/Sub/Add) imports into Relax as a conv, a mean and an elementwise chain,
which TVM compiles as three passes over the conv output (its FuseOps never starts a group at
a reduction). :class:`FusePlainDeepControl` matches, with the dataflow pattern language
(``tvm.relax.dpl``), for ``y = conv{1,2,3}d(x, W) [+ c0]`` and ``m = mean(y, axis=S,
keepdims=True)`` over exactly the spatial axes ``S``::

    z = (y - a * m) * g + b        every * and + in either operand order, so also
                                   (y - m * a) * g + b  and  g * (y - a * m) + b
    z = y * g - m * (a * g) + b    (a recovered as (a*g) / g)
    z = y * g + reshape(b - (a * g) * m', (N, C, 1, ..))   with m' = mean(y, S) without keepdims
                                   (dcgraph.functional.deep_control, what DeepControl2d exports)
    z = y * g + (b - (a * g) * m)  (the same, keepdims)
    out = act(z)                   act: relu | clip(z, 0, 6) | leaky_relu | hardswish (the torch,
                                   ONNX HardSwish and z * HardSigmoid spellings) | silu
                                   (z * sigmoid(z) or nn.silu) | none

with ``a, g, b, c0`` constants broadcasting per channel (``(C, 1, 1)``, ``(1, C, 1, 1)``, or a
scalar; a plain ``(C,)`` broadcasts over the last spatial axis, so it is not per channel and
is left alone), and replaces ``out`` by :func:`.lowering.emit_conv_deep_control`: the mean
hoisted to the input, one pass over the output. Anything else is left exactly as it was: other
layouts or out_dtypes, asymmetric conv padding, a mean over other axes (or with the wrong
keepdims for its form), non-constant ``a, g, b``, and any chain whose intermediate values
(``y``, ``m``, ...) have users outside it (the fused kernels would not produce them). If only
``z`` has another user, Deep Control fuses without the activation, which stays as it was.

Constants computed in the graph (``reshape(bias)``, ``a * g``) are folded first
(``relax.transform.FoldConstant``); a module with no match is returned unchanged. The spellings
every plain-ops matcher (this one, the fx rule, the ONNX rules) is tested on are one table,
:data:`dcgraph.testing.DC_FORMS` (``tests/test_forms.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.dpl import DFPattern, WildcardPattern, is_const, is_op, wildcard

from .fold_numpy import fold_constant_arithmetic
from .lowering import LoweringOptions, current_options, emit_conv_deep_control
from .lowering import options as lowering_options

CONV_LAYOUTS = {  # conv op -> (data/out layout, kernel layout) the kernels implement
    "relax.nn.conv1d": ("NCW", "OIW"),
    "relax.nn.conv2d": ("NCHW", "OIHW"),
    "relax.nn.conv3d": ("NCDHW", "OIDHW"),
}


@dataclass
class DcMatch:
    """One matched ``conv -> Deep Control -> act`` chain, its values checked and normalised."""

    root: relax.Var  # the binding the fused kernels replace (the activation's output, or z)
    inner: set = field(repr=False)  # the other bindings of the chain (dead after the rewrite)
    x: relax.Expr = field(repr=False)
    w: relax.Expr = field(repr=False)
    bias: np.ndarray | None
    a: np.ndarray
    g: np.ndarray
    b: np.ndarray
    conv: dict
    act: str
    alpha: float
    form: str  # "scaled" (y - a*m)*g + b, "folded" y*g - m*(a*g) + b, "shifted" y*g + (b - a*g*m) with
    # the (N, C) mean reshaped back, "shifted_kd" the same with a keepdims mean


# ------------------------------------------------------------------ patterns

class _Core:
    """``z`` of both algebraic forms, over ``y = conv(x, W) [+ c0]`` (dpl; + and * commute)."""

    def __init__(self) -> None:
        self.x, self.w = wildcard(), wildcard()
        convs = [is_op(op)(self.x, self.w) for op in CONV_LAYOUTS]
        self.conv = convs[0] | convs[1] | convs[2]
        self.y = is_op("relax.add")(self.conv, is_const()) | self.conv
        self.mean = is_op("relax.mean")(self.y)
        self.a, self.g, self.b, self.ag = is_const(), is_const(), is_const(), is_const()
        diff = is_op("relax.subtract")(self.y, is_op("relax.multiply")(self.mean, self.a))
        self.scaled = is_op("relax.add")(is_op("relax.multiply")(diff, self.g), self.b)
        self.folded = is_op("relax.add")(is_op("relax.subtract")(
            is_op("relax.multiply")(self.y, self.g), is_op("relax.multiply")(self.mean, self.ag)), self.b)
        # dcgraph.functional.deep_control: y * g + reshape(b - (a*g) * mean(y, keepdims=False), (N, C, 1..))
        self.shift = is_op("relax.reshape")(
            is_op("relax.subtract")(self.b, is_op("relax.multiply")(self.mean, self.ag)), wildcard())
        self.shifted = is_op("relax.add")(is_op("relax.multiply")(self.y, self.g), self.shift)
        # y * g + (b - (a*g) * mean(y, keepdims=True)): the same with the mean kept 4-d
        self.shifted_kd = is_op("relax.add")(is_op("relax.multiply")(self.y, self.g), is_op("relax.subtract")(
            self.b, is_op("relax.multiply")(self.mean, self.ag)))
        self.forms = (("scaled", self.scaled), ("folded", self.folded), ("shifted", self.shifted),
                      ("shifted_kd", self.shifted_kd))


def _clip(v: DFPattern) -> DFPattern:
    """``clip(v, lo, hi)`` or ``clip(clip(v, lo1, hi1), lo2, hi2)`` (bounds checked by :func:`_bounds`)."""
    once = is_op("relax.clip")(v, wildcard(), wildcard())
    return is_op("relax.clip")(once, wildcard(), wildcard()) | once


@dataclass
class _Act:
    name: str
    pattern: DFPattern
    z: DFPattern
    consts: dict[DFPattern, float]  # scalar constants the pattern needs, with their values
    clips: dict[DFPattern, tuple[float, float]]  # clip chains and the bounds they must add up to


def _activations() -> list[_Act]:
    """Activation spellings, the longer ones first (a root matching none is the identity)."""
    acts = []
    z = wildcard()
    acts.append(_Act("relu", is_op("relax.nn.relu")(z), z, {}, {}))
    z = wildcard()
    clip = _clip(z)
    acts.append(_Act("relu6", clip, z, {}, {clip: (0.0, 6.0)}))
    z = wildcard()
    acts.append(_Act("leaky_relu", is_op("relax.nn.leakyrelu")(z), z, {}, {}))
    # hardswish: z * clip(z + 3, 0, 6) / 6, as torch, TVM's ONNX HardSwish and z * HardSigmoid write it
    for spelling in ("div_after", "mul_sixth", "div_inside", "hardsigmoid"):
        z, k3, k6 = wildcard(), is_const(), is_const()
        relu6 = _clip(is_op("relax.add")(z, k3))
        if spelling == "div_after":
            pattern = is_op("relax.divide")(is_op("relax.multiply")(z, relu6), k6)
            consts = {k3: 3.0, k6: 6.0}
        elif spelling == "mul_sixth":
            pattern = is_op("relax.multiply")(is_op("relax.multiply")(z, relu6), k6)
            consts = {k3: 3.0, k6: 1.0 / 6.0}
        elif spelling == "div_inside":
            pattern = is_op("relax.multiply")(z, is_op("relax.divide")(relu6, k6))
            consts = {k3: 3.0, k6: 6.0}
        else:
            relu6 = _clip(is_op("relax.add")(is_op("relax.multiply")(z, k6), k3))
            pattern = is_op("relax.multiply")(z, relu6)
            consts = {k3: 0.5, k6: 1.0 / 6.0}
        acts.append(_Act("hardswish", pattern, z, consts, {relu6: (0.0, 1.0 if spelling == "hardsigmoid"
                                                                  else 6.0)}))
    z = wildcard()
    silu = is_op("relax.multiply")(z, is_op("relax.sigmoid")(z)) | is_op("relax.nn.silu")(z)
    acts.append(_Act("silu", silu, z, {}, {}))
    return acts


# ------------------------------------------------------------------ value checks

def _array(expr: relax.Expr) -> np.ndarray | None:
    """A constant's value: a tensor constant, or a scalar PrimValue (such as clip's bounds)."""
    value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.Constant) else None
    if hasattr(value, "numpy"):
        return value.numpy()
    return np.asarray(value) if isinstance(value, int | float) else None


def _scalar(expr: relax.Expr) -> float | None:
    arr = _array(expr)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _close(v: float | None, want: float) -> bool:
    return v is not None and math.isclose(v, want, rel_tol=1e-6, abs_tol=1e-7)


def _bounds(call: relax.Call, var2val: dict) -> tuple[float, float] | None:
    """The interval a (possibly nested) clip chain clamps to."""
    lo, hi = _scalar(call.args[1]), _scalar(call.args[2])
    if lo is None or hi is None:
        return None
    inner = call.args[0]
    inner = var2val.get(inner, inner) if isinstance(inner, relax.Var) else inner
    if isinstance(inner, relax.Call) and getattr(inner.op, "name", "") == "relax.clip":
        got = _bounds(inner, var2val)
        if got is None:
            return None
        lo, hi = max(lo, got[0]), min(hi, got[1])
    return lo, hi


def _per_channel(expr: relax.Expr, rank: int, channels: int, dtype: str) -> np.ndarray | None:
    """A constant broadcasting per channel against ``(N, C, *S)`` as a ``(C,)`` array, else None."""
    arr = _array(expr)
    if arr is None or str(arr.dtype) != dtype or arr.ndim > rank:
        return None
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(arr.reshape(shape).reshape(-1), (channels,)).copy()


def _static(shape: relax.Expr) -> list[int | None]:
    return [int(s) if isinstance(s, tirx.IntImm) else None for s in shape]


def _conv_params(call: relax.Call, x: relax.Expr, w: relax.Expr) -> dict | None:
    """The conv's stride/padding/dilation/groups if the kernels implement it, else None."""
    layout, kernel_layout = CONV_LAYOUTS[call.op.name]
    attrs = call.attrs
    dtype = str(x.ty.dtype) if isinstance(x.ty, relax.TensorType) else ""
    if (not dtype.startswith(("float", "bfloat")) or str(w.ty.dtype) != dtype
            or attrs.data_layout != layout or attrs.kernel_layout != kernel_layout
            or attrs.out_layout not in ("", layout)
            or str(attrs.out_dtype or "") not in ("", "void", "None", dtype)):
        return None
    if x.ty.shape is None or w.ty.shape is None:
        return None
    xs, ws = _static(x.ty.shape), _static(w.ty.shape)
    if None in xs[1:] or None in ws:
        return None  # the kernels need static channels and spatial sizes (the batch may be symbolic)
    nd = len(layout) - 2
    pad = [int(p) for p in attrs.padding]
    if len(pad) != 2 * nd or pad[:nd] != pad[nd:]:
        return None  # the kernels pad symmetrically
    return {"stride": [int(s) for s in attrs.strides], "padding": pad[:nd],
            "dilation": [int(d) for d in attrs.dilation], "groups": int(attrs.groups)}


# ------------------------------------------------------------------ matching

class _Matcher:
    """Finds the chains of one function; ``find`` returns them keyed by root var."""

    def __init__(self, func: relax.Function) -> None:
        self.var2val = relax.analysis.get_var2val(func)
        self.bindings: list[relax.VarBinding] = []
        self.users: dict[relax.Var, set] = {}
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                continue
            self.bindings.extend(b for b in block.bindings if isinstance(b, relax.VarBinding))
            for var, users in relax.analysis.udchain(block).items():
                self.users.setdefault(var, set()).update(users)
        self.val2var = {b.value: b.var for b in self.bindings}
        self.core = _Core()
        self.acts = _activations()

    def find(self) -> dict[relax.Var, DcMatch]:
        found: dict[relax.Var, DcMatch] = {}
        taken: set = set()
        for binding in reversed(self.bindings):  # from the outputs: the longest chain wins
            if binding.var in taken:
                continue
            match = self._match(binding)
            if match is not None:
                found[binding.var] = match
                taken |= match.inner | {match.root}
        return found

    def _match(self, binding: relax.VarBinding) -> DcMatch | None:
        for act in self.acts:
            got = act.pattern.extract_matched_expr(binding.value, self.var2val)
            if got is None or not self._act_ok(act, got):
                continue
            z = self._var(got[act.z])
            if not isinstance(z, relax.DataflowVar) or z not in self.var2val:
                continue
            alpha = float(binding.value.attrs.alpha) if act.name == "leaky_relu" else 0.01
            match = self._core(binding.var, self.var2val[z], self._calls(got) | {z}, act.name, alpha)
            if match is not None:
                return match
        return self._core(binding.var, binding.value, set(), "identity", 0.01)

    def _act_ok(self, act: _Act, got: dict) -> bool:
        if any(not _close(_scalar(got[p]), v) for p, v in act.consts.items()):
            return False
        for p, (lo, hi) in act.clips.items():
            bounds = _bounds(got[p], self.var2val)
            if bounds is None or not (_close(bounds[0], lo) and _close(bounds[1], hi)):
                return False
        return True

    def _calls(self, got: dict) -> set:
        """The vars bound to the matched calls, leaves (wildcards) excluded."""
        return {self.val2var[e] for p, e in got.items()
                if not isinstance(p, WildcardPattern) and isinstance(e, relax.Call) and e in self.val2var}

    def _var(self, expr: relax.Expr) -> relax.Expr:
        """A leaf as the program refers to it: with var2val the matcher records a bound var's value."""
        return self.val2var.get(expr, expr) if isinstance(expr, relax.Call) else expr

    def _core(self, root: relax.Var, value: relax.Expr, act_vars: set, act: str, alpha: float
              ) -> DcMatch | None:
        core = self.core
        tries = ((form, pattern.extract_matched_expr(value, self.var2val)) for form, pattern in core.forms)
        form, got = next(((f, g) for f, g in tries if g is not None), ("", None))
        if got is None:
            return None
        inner = (self._calls(got) | act_vars) - {root}
        if not self._owned(root, inner):
            return None
        conv_call, y, x, w = got[core.conv], got[core.y], self._var(got[core.x]), self._var(got[core.w])
        conv = _conv_params(conv_call, x, w)
        if conv is None:
            return None
        rank, dtype = len(x.ty.shape), str(x.ty.dtype)
        channels = int(w.ty.shape[0])
        mean = got[core.mean]
        axes = sorted(int(i) % rank for i in (mean.attrs.axis or range(rank)))
        if axes != list(range(2, rank)) or bool(mean.attrs.keepdims) != (form != "shifted"):
            return None
        if form == "shifted":  # the (N, C) shift must come back as (N, C, 1, ..., 1)
            shape = _static(got[core.shift].ty.shape)
            if len(shape) != rank or shape[1] != channels or any(s != 1 for s in shape[2:]):
                return None
        bias = None
        if not y.same_as(conv_call):  # y = conv + c0, c0 on either side
            c0 = next(arg for arg in y.args if isinstance(arg, tvm.ir.Constant))
            bias = _per_channel(c0, rank, channels, dtype)
            if bias is None:
                return None
        vec_rank = 2 if form == "shifted" else rank  # b and a*g meet the (N, C) mean there
        vals = {"g": _per_channel(got[core.g], rank, channels, dtype),
                "b": _per_channel(got[core.b], vec_rank, channels, dtype),
                "a": _per_channel(got[core.a if form == "scaled" else core.ag], vec_rank, channels, dtype)}
        if any(v is None for v in vals.values()):
            return None
        a, g, b = vals["a"], vals["g"], vals["b"]
        if form != "scaled":  # a*g given: a = (a*g)/g, and where g == 0 the product must be 0 too
            if np.any((g == 0) & (a != 0)):
                return None
            a = np.divide(a, g, out=np.zeros_like(a), where=g != 0)
        return DcMatch(root=root, inner=inner, x=x, w=w, bias=bias, a=a, g=g, b=b, conv=conv,
                       act=act, alpha=alpha, form=form)

    def _owned(self, root: relax.Var, inner: set) -> bool:
        """Every intermediate is block-local and used only inside the chain."""
        allowed = inner | {root}
        return all(isinstance(v, relax.DataflowVar) and self.users.get(v, set()) <= allowed for v in inner)


# ------------------------------------------------------------------ rewriting

@relax.expr_functor.mutator
class _Emitter(relax.PyExprMutator):
    """Re-emits each function, replacing every matched root by dcgraph's kernels."""

    def __init__(self, mod: tvm.IRModule, matches: dict[relax.Var, DcMatch]) -> None:
        super().__init__(mod)
        self.matches = matches

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        match = self.matches.get(binding.var)
        if match is None:
            super().visit_var_binding_(binding)
            return
        dtype = str(match.x.ty.dtype)

        def const(v: np.ndarray | None) -> relax.Expr | None:
            return None if v is None else relax.const(v.astype(dtype), dtype)

        out = emit_conv_deep_control(
            self.builder_, self.visit_expr(match.x), self.visit_expr(match.w), const(match.bias),
            const(match.a), const(match.g), const(match.b), act=match.act, negative_slope=match.alpha,
            **match.conv)
        if isinstance(binding.var, relax.DataflowVar):
            self.set_var_remap(binding.var, out)
        else:  # a block output: keep the var, bound to the kernels' result
            self.builder_.emit_normalized(relax.VarBinding(binding.var, out))


def find_plain_deep_control(func: relax.Function) -> list[DcMatch]:
    """The chains :func:`fuse_plain_deep_control` would replace in ``func`` (constants already folded)."""
    return list(_Matcher(func).find().values())


def fuse_plain_deep_control(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Replace every plain ``conv -> Deep Control [-> act]`` of ``mod``'s Relax functions
    (lowered with the options in force: :func:`.lowering.options`).

    Returns ``(new module, number of chains replaced)``; with no match, ``mod`` itself.
    """
    folded = relax.transform.FoldConstant()(fold_constant_arithmetic(mod))
    per_func = {}
    for gv, func in folded.functions_items():
        if isinstance(func, relax.Function):
            matches = _Matcher(func).find()
            if matches:
                per_func[gv] = matches
    if not per_func:
        return mod, 0
    emitter = _Emitter(folded, {k: v for m in per_func.values() for k, v in m.items()})
    for gv in per_func:
        new = emitter.visit_expr(folded[gv])
        emitter.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
    return emitter.builder_.get(), sum(len(m) for m in per_func.values())


@tvm.transform.module_pass(opt_level=0, name="dcgraph.FusePlainDeepControl")
class FusePlainDeepControl:
    """Module pass form of :func:`fuse_plain_deep_control`; ``.count`` holds the last run's rewrites.

    A pass runs later than it is made: it keeps the lowering options in force when it was made
    (or ``options``), and lowers with them whenever it runs."""

    def __init__(self, options: LoweringOptions | None = None) -> None:
        self.options = options or current_options()
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with lowering_options(plan=self.options.plan):
            mod, self.count = fuse_plain_deep_control(mod)
        return mod


__all__ = ["CONV_LAYOUTS", "DcMatch", "FusePlainDeepControl", "find_plain_deep_control",
           "fuse_plain_deep_control"]
