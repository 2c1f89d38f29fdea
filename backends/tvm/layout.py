"""The blocked layout through the whole graph: ``NCHW -> NCHW[x]c`` for CPU targets.

:func:`block_layout` rewrites a Relax module (after import, before TVM's legalization) so that
dcgraph's 2-d conv + Deep Control kernels run on blocked tensors (:mod:`.kernels_blocked`; ``x``
and the channels stored, :func:`.kernels_blocked.blocking`, from the channel count and the
target's SIMD width: 24 channels at 16 lanes are stored as 2 blocks of 16, the last 8 zero; the
per-channel vectors are padded to match, the convs sum only the real input channels and
``from_blocked`` drops the padding), and so do the operators between them that do not care about
the layout: elementwise ops (a residual add, relu, clip, sigmoid, a Squeeze-Excitation scale),
max/avg pooling, the global mean, a channel concat. Each rewritten value keeps its ``NCHW`` form
as a ``from_blocked`` binding for any consumer that needs it; the ones nobody reads are removed
(dead code), so layout changes are left only at the graph's edges and in front of operators that
need ``NCHW`` (a reshape, a matmul, a conv without Deep Control). Weights are packed once here,
as constants (never per call).

A depthwise conv's two-pass plan (raw conv, then map sum and epilogue) becomes one kernel
(:func:`.kernels_blocked.depthwise_deep_control`): a depthwise channel's mean reads only its own
map, which one parallel iteration computes and keeps in cache.

One forward walk in program order; a value's blocked form is remembered, so a tensor is
blocked at most once however many convs read it. Convs this does not cover (1-d/3-d, grouped
but not depthwise, symbolic sizes) keep their ``NCHW`` kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import kernels_blocked as kb
from . import kernels_pointwise as kp
from . import winograd
from .exprs import constant_value, static_shape
from .layout_reads import conv_params as _conv_params
from .layout_reads import global_pool as _global_pool
from .layout_reads import kernel_fed as _kernel_fed
from .layout_reads import pointwise as _pointwise
from .lowering import CONV_ATTR, KERNEL_ATTR

__all__ = ["block_layout", "blocked_kernels"]

LAYOUT_ATTR = "dcgraph.layout"
_UNARY = {"relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.nn.silu", "relax.tanh", "relax.nn.leakyrelu",
          "relax.nn.gelu", "relax.exp"}
_BINARY = {"relax.add", "relax.multiply", "relax.subtract", "relax.divide", "relax.maximum", "relax.minimum"}
_POOL = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}
#: pointwise convs between NCHW values stay NCHW (:meth:`_Blocker._nchw_pointwise`); False: blocked
NCHW_EDGES = True


@mutator
class _Blocker(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int, use_winograd: bool = True,
                 kernel_fed: frozenset = frozenset()) -> None:
        super().__init__(mod)
        self.kernel_fed = kernel_fed  # values only dcgraph's conv kernels read (_kernel_fed)
        self.var: relax.Var | None = None  # the binding being rewritten
        self.mod_ = mod
        self.lanes = lanes
        self.use_winograd = use_winograd
        self.blocked: dict[relax.Var, relax.Var] = {}  # NCHW var (new program) -> its blocked twin
        # a blocked raw depthwise conv -> what makes it (its two-pass epilogue is fused with it)
        self.depthwise_raw: dict[relax.Var, tuple[relax.Var, relax.Expr, dict[str, Any]]] = {}
        self.count = 0

    # -- helpers ---------------------------------------------------------------------------
    def _emit(self, fn, *args: relax.Expr, name: str, kind: str | None = None, layout: str = "blocked",
              **kw: Any) -> relax.Var:
        attrs = {LAYOUT_ATTR: layout}
        if kind:
            attrs[KERNEL_ATTR] = kind
        return self.builder_.emit_te(lambda *a: fn(*a, **kw), *args, primfunc_name_hint=name,
                                     primfunc_attrs=attrs)

    def _block(self, x: relax.Expr) -> relax.Var:
        """The blocked form of NCHW ``x`` (made once)."""
        if x in self.blocked:
            return self.blocked[x]
        stored, cb = kb.blocking(static_shape(x)[1], self.lanes)
        xb = self._emit(kb.to_blocked, x, name="to_blocked", cb=cb, stored=stored)
        if isinstance(x, relax.Var):
            self.blocked[x] = xb
        return xb

    def _unblock(self, xb: relax.Var, channels: int) -> relax.Var:
        """Emit the NCHW form (``channels``) of blocked ``xb`` (dead code removes it when nobody
        reads it)."""
        out = self._emit(kb.from_blocked, xb, name="from_blocked", channels=channels)
        self.blocked[out] = xb
        return out

    def _per_channel(self, v: relax.Expr, stored: int) -> relax.Expr:
        """A per-channel vector ``(C,)`` (or a per-sample ``(N, C)``) zero-padded to ``stored``."""
        shape = static_shape(v)
        if shape[-1] == stored:
            return v
        data = constant_value(v)
        if data is not None:
            pad = [(0, 0)] * (data.ndim - 1) + [(0, stored - shape[-1])]
            return relax.const(np.pad(data, pad), str(data.dtype))
        limits = [None] * (len(shape) - 1) + [shape[-1]]

        def te_pad(t: te.Tensor) -> te.Tensor:
            return te.compute((*shape[:-1], stored), lambda *i: kb.read_or_zero(t, i, limits),
                              name="pad_channels")

        return self._emit(te_pad, v, name="pad_channels")

    def _weight(self, w: relax.Expr, pack, *cbs: int) -> relax.Expr:
        data = constant_value(w)
        if data is not None:
            return relax.const(pack(data, *cbs), str(data.dtype))
        shape = static_shape(w)

        def te_pack(wt: te.Tensor) -> te.Tensor:  # a weight fed at run time: packed by a kernel
            def at(o, i, r, s):  # zero past the weight's channels (the blocks' padding)
                return kb.read_or_zero(wt, [o, i, r, s], [shape[0], shape[1], None, None])

            if pack is kb.pack_mean_weight:
                cb = cbs[0]
                return te.compute((-(-shape[0] // cb), shape[1], shape[2], shape[3], cb),
                                  lambda o, i, r, s, j: at(o * cb + j, i, r, s), name="pack")
            if pack is kb.pack_depthwise:
                cb = cbs[0]
                return te.compute((-(-shape[0] // cb), shape[2], shape[3], cb),
                                  lambda k, r, s, j: at(k * cb + j, 0, r, s), name="pack")
            cbi, cbo = cbs
            return te.compute((-(-shape[0] // cbo), -(-shape[1] // cbi), shape[2], shape[3], cbi, cbo),
                              lambda o, i, r, s, ii, oo: at(o * cbo + oo, i * cbi + ii, r, s), name="pack")

        return self._emit(te_pack, w, name="pack_weight")

    # -- the walk ----------------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        self.var = binding.var
        new = None
        # aliases keep the blocked twin; an output binding stays a binding (a dataflow variable
        # returned from the block is dead code to FuseTIR's clean-up)
        if isinstance(value, relax.Var | relax.TupleGetItem) and isinstance(binding.var, relax.DataflowVar):
            alias = self._alias(value)
            if alias is not None:
                self.set_var_remap(binding.var, alias)
                return
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            args = [self.visit_expr(a) for a in value.args]
            name = value.op.name
            if name == "relax.call_tir":
                new = self._dc_kernel(value, args)
            else:
                new = self._op(value, name, args)
        if new is None:
            super().visit_var_binding_(binding)
            return
        self.count += 1
        self.set_var_remap(binding.var, new)

    def _alias(self, value: relax.Expr) -> relax.Var | None:
        """``v = u`` or ``v = (..., u, ...)[i]`` (what the importer leaves between ops) for a ``u``
        with a blocked twin: ``u`` itself, else None."""
        if isinstance(value, relax.Var):
            new = self.visit_expr(value)
            return new if new in self.blocked else None
        tup = self.visit_expr(value.tuple_value)
        src = self.lookup_binding(tup) if isinstance(tup, relax.Var) else tup
        if isinstance(src, relax.Tuple):
            field = src.fields[value.index]
            return field if field in self.blocked else None
        return None

    def _dc_kernel(self, call: relax.Call, args: list[relax.Expr]) -> relax.Var | None:
        func = self.mod_[args[0]] if isinstance(args[0], relax.GlobalVar) else None
        attrs = getattr(func, "attrs", None) or {}
        if KERNEL_ATTR not in attrs or CONV_ATTR not in attrs:
            return None
        kind = str(attrs[KERNEL_ATTR])
        ins = list(args[1].fields)
        p = _conv_params(attrs)
        if kind == "dc_two_pass":
            y = ins[0]
            if y not in self.blocked:
                return None
            epi = {"act": p["act"], "negative_slope": p["negative_slope"]}
            yb = self.blocked[y]
            agb = [self._per_channel(v, _stored(yb)) for v in ins[1:]]
            raw = self.depthwise_raw.get(yb)
            if raw is not None:  # one kernel: the raw conv is left to dead code unless read elsewhere
                xb, wp, conv = raw
                out = self._emit(kb.depthwise_deep_control, xb, wp, *agb, name="dc_depthwise_two_pass",
                                 kind="dc_depthwise_two_pass", **conv, **epi)
                return self._unblock(out, static_shape(y)[1])
            out = self._emit(kb.deep_control, yb, *agb, name="dc_two_pass", kind=kind, **epi)
            return self._unblock(out, static_shape(y)[1])
        x, w = ins[0], ins[1]
        xs, ws = static_shape(x), static_shape(w)
        if xs is None or ws is None or len(xs) != 4:
            return None
        depthwise = p["groups"] > 1 and ws[1] == 1 and ws[0] == xs[1] == p["groups"]
        if p["groups"] != 1 and not depthwise:
            return None
        conv = {k: p[k] for k in ("stride", "padding", "dilation")}
        if NCHW_EDGES and not depthwise and ws[2:] == (1, 1) and _pointwise(conv) and x not in self.blocked:
            edge = self._nchw_pointwise(kind, x, w, ins, p)
            if edge is not None:
                return edge
        xb = self._block(x)
        cbi = int(static_shape(xb)[-1])
        stored, cbo = kb.blocking(ws[0], self.lanes)
        if kind == "dc_shift":
            wm = self._weight(w, kb.pack_mean_weight, cbo)
            ins = ins[:2] + [self._per_channel(v, stored) for v in ins[2:]]
            if len(ins) == 5:  # (x, w, a, g, b): no conv bias
                def shift(x_, w_, a_, g_, b_, **kw):
                    return kb.hoisted_shift(x_, w_, None, a_, g_, b_, **kw)
            else:
                def shift(*args, **kw):
                    return kb.hoisted_shift(*args, **kw)
            return self._emit(shift, xb, wm, *ins[2:], name="dc_shift", kind=kind, groups=p["groups"], **conv)
        epi = {"act": p["act"], "negative_slope": p["negative_slope"]}
        tile = None if depthwise else self._winograd_tile(xs, ws, xb, w, p)
        if tile is not None:
            data = constant_value(w)
            wp = relax.const(winograd.pack_weight(data, tile, cbi, cbo), str(data.dtype))
            fn = winograd.conv
            conv_kw = {"tile": tile, "padding": conv["padding"]}
        elif depthwise:
            wp = self._weight(w, kb.pack_depthwise, cbo)
            fn = kb.depthwise
            conv_kw = conv
        else:
            wp = self._weight(w, kb.pack_weight, cbi, cbo)
            fn = kb.conv
            # the conv's sum skips the input's padding channels
            conv_kw = {**conv, "in_channels": ws[1]} if ws[1] < _stored(xb) else conv
            if ws[2:] == (1, 1) and self.var in self.kernel_fed and _pointwise(conv):
                return self._flat_pointwise(kind, xb, wp, ins, stored, conv_kw, epi, ws[0])
        if kind == "dc_conv":
            g, o = self._per_channel(ins[2], stored), self._per_channel(ins[3], stored)
            out = self._emit(lambda x_, w_, g_, o_, **kw: fn(x_, w_, g_, o_, **kw), xb, wp, g, o,
                             name="dc_winograd" if tile else "dc_conv", kind=kind, **conv_kw, **epi)
        elif kind == "dc_conv_raw":
            out = self._emit(lambda x_, w_, **kw: fn(x_, w_, None, None, **kw), xb, wp,
                             name="dc_winograd_raw" if tile else "dc_conv_raw", kind=kind, **conv_kw)
            if depthwise:
                self.depthwise_raw[out] = (xb, wp, conv)
        else:
            return None
        return self._unblock(out, ws[0])

    def _flat_pointwise(self, kind: str, xb: relax.Expr, wp: relax.Expr, ins: list[relax.Expr], stored: int,
                        conv_kw: dict[str, Any], epi: dict[str, Any], channels: int) -> relax.Var | None:
        """A 1x1 stride-1 conv over the map's pixels as one row: ``(N, C/cb, H, W, cb)`` viewed as
        ``(N, C/cb, 1, H*W, cb)`` (the same bytes), so the register tile takes its columns from
        ``H*W`` rather than ``W`` (a 14 px row gave a 7-column x 1-block tile; 196 pixels give
        4 x 2): 1.2-1.4x faster at 14 and 28 px. Only for a value nothing but dcgraph's kernels
        reads (the view back to 2-d would keep FuseOps from merging an add into the kernel)."""
        n, kin, h, w, cb = (int(d) for d in static_shape(xb))
        flat = self.builder_.emit(relax.op.reshape(xb, [n, kin, 1, h * w, cb]))
        if kind == "dc_conv":
            g, o = self._per_channel(ins[2], stored), self._per_channel(ins[3], stored)
            out = self._emit(lambda x_, w_, g_, o_, **kw: kb.conv(x_, w_, g_, o_, **kw), flat, wp, g, o,
                             name="dc_conv", kind=kind, **conv_kw, **epi)
        elif kind == "dc_conv_raw":
            out = self._emit(lambda x_, w_, **kw: kb.conv(x_, w_, None, None, **kw), flat, wp,
                             name="dc_conv_raw", kind=kind, **conv_kw)
        else:
            return None
        on, ok, _, _, ocb = (int(d) for d in static_shape(out))
        out = self.builder_.emit(relax.op.reshape(out, [on, ok, h, w, ocb]))
        return self._unblock(out, channels)

    def _nchw_pointwise(self, kind: str, x: relax.Expr, w: relax.Expr, ins: list[relax.Expr],
                        p: dict[str, Any]) -> relax.Var | None:
        """A 1x1 stride-1 conv of an ``NCHW`` value (not blocked: the graph's input, or what an op
        that needs ``NCHW`` made) as the ``NCHW`` GEMM over its pixels of :mod:`.kernels_pointwise`:
        no layout change, unless blocked kernels read the output (then the blocked conv, which
        changes the layout of the input instead). Its hoisted shift reads ``x`` as it is too (kept
        ``NCHW`` whichever form the conv takes); a raw conv (the two-pass plan) writes ``NCHW`` for
        its two-pass kernel, which stays ``NCHW``. None: not applicable (a map that is not a whole
        number of vectors, another kernel kind)."""
        h, wd = static_shape(x)[2:]
        if (h * wd) % self.lanes or kind not in ("dc_shift", "dc_conv", "dc_conv_raw"):
            return None
        if kind == "dc_conv" and self.var in self.kernel_fed:
            return None
        if kind == "dc_shift":
            bias, (a, g, b) = (ins[2], ins[3:]) if len(ins) == 6 else (None, ins[2:])
            if bias is None:
                return self._emit(lambda x_, w_, a_, g_, b_: kp.map_shift(x_, w_, None, a_, g_, b_), x, w,
                                  a, g, b, name="dc_shift", kind=kind, layout="nchw")
            return self._emit(kp.map_shift, x, w, bias, a, g, b, name="dc_shift", kind=kind, layout="nchw")
        if kind == "dc_conv_raw":  # the two-pass kernel after it reads it as it is, NCHW
            return self._emit(lambda x_, w_: kp.pointwise(x_, w_, None, None), x, w, name="dc_conv_raw",
                              kind=kind, layout="nchw")
        return self._emit(kp.pointwise, x, w, ins[2], ins[3], name="dc_conv", kind=kind, layout="nchw",
                          act=p["act"], negative_slope=p["negative_slope"])

    def _winograd_tile(self, xs: tuple[int, ...], ws: tuple[int, ...], xb: relax.Expr, w: relax.Expr,
                       p: dict[str, Any]) -> int | None:
        """``m`` of the Winograd F(m, 3) form for this conv, or None for the direct kernel: a 3x3
        stride-1 conv (:func:`.winograd.applies`) with a constant weight (transformed here, at
        compile time) over every channel its input stores (no padding channels to skip)."""
        if not self.use_winograd:
            return None
        if winograd.applies(ws[2:], p["stride"], p["dilation"], p["groups"], p["padding"]) is not None:
            return None
        if constant_value(w) is None or ws[1] != _stored(xb):
            return None
        ho, wo = (xs[i + 2] + 2 * p["padding"][i] - 2 for i in range(2))
        return winograd.output_tile(ho, wo) if min(ho, wo) >= winograd.MIN_MAP else None

    def _op(self, call: relax.Call, name: str, args: list[relax.Expr]) -> relax.Var | None:
        """A layout-agnostic op on blocked inputs, done blocked; None where it stays NCHW."""
        tensors = [a for a in args if static_shape(a) is not None and len(static_shape(a)) > 0]
        if not tensors or not any(a in self.blocked for a in tensors):
            return None
        first = next(a for a in tensors if a in self.blocked)
        big = static_shape(first)
        op = relax.op
        channels = big[1]
        padded = _stored(self.blocked[first]) != channels
        if name in _UNARY:
            new_args = [self.blocked.get(a, a) for a in args]
            return self._unblock(self.builder_.emit(relax.Call(call.op, new_args, call.attrs, call.ty_args)),
                                 channels)
        divisor = static_shape(args[1]) if name == "relax.divide" else None
        if padded and divisor:  # by a per-channel tensor: 0 / 0 in the padding is NaN, and 0 * NaN too
            return None
        if name in _BINARY:
            new_args = []
            for a in args:
                s = static_shape(a)
                if s is None or len(s) == 0:
                    new_args.append(a)
                elif len(s) == 4 and s[1] == big[1] and all(d in (1, b) for d, b in zip(s, big, strict=True)):
                    new_args.append(self._block(a))
                else:
                    return None
            return self._unblock(self.builder_.emit(relax.Call(call.op, new_args, call.attrs, call.ty_args)),
                                 channels)
        x = args[0]
        if x not in self.blocked:
            return None
        xb = self.blocked[x]
        cb = int(static_shape(xb)[-1])
        if name in _POOL and str(call.attrs.layout) == "NCHW":
            a = call.attrs
            fn = op.nn.max_pool2d if name == "relax.nn.max_pool2d" else op.nn.avg_pool2d
            kw = {"count_include_pad": bool(a.count_include_pad)} if name == "relax.nn.avg_pool2d" else {}
            out = self.builder_.emit(fn(xb, pool_size=a.pool_size, strides=a.strides, padding=a.padding,
                                        dilation=a.dilation, ceil_mode=bool(a.ceil_mode),
                                        layout=f"NCHW{cb}c", out_layout=f"NCHW{cb}c", **kw))
            return self._unblock(out, channels)
        if name == "relax.nn.adaptive_avg_pool2d" and _global_pool(call.attrs):  # = a keepdims mean
            return self._unblock(self.builder_.emit(op.mean(xb, axis=[2, 3], keepdims=True)), channels)
        if name == "relax.mean" and call.attrs.axis is not None:
            axes = sorted(int(v) % 4 for v in call.attrs.axis)
            if axes != [2, 3]:
                return None
            if bool(call.attrs.keepdims):
                return self._unblock(self.builder_.emit(op.mean(xb, axis=[2, 3], keepdims=True)), channels)
            m = self.builder_.emit(op.mean(xb, axis=[2, 3]))  # (N, S/cb, cb): c = k*cb + j
            m = self.builder_.emit(op.reshape(m, [big[0], _stored(xb)]))
            if padded:
                m = self.builder_.emit(op.strided_slice(m, axes=[1], begin=[0], end=[channels]))
            return m
        return None


def _stored(xb: relax.Expr) -> int:
    """The channels blocked ``xb`` stores (its real ones and any padding)."""
    shape = static_shape(xb)
    return int(shape[1]) * int(shape[4])


def block_layout(mod: tvm.IRModule, lanes: int, use_winograd: bool = True) -> tvm.IRModule:
    """``mod`` with dcgraph's 2-d conv kernels and the layout-agnostic ops around them in
    ``NCHW[x]c`` (see the module docstring); ``lanes``: the target's float32 SIMD width;
    ``use_winograd``: 3x3 stride-1 convs as Winograd F(m, 3) (:mod:`.winograd`), else all direct."""
    if lanes <= 1:
        return mod
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            blocker = _Blocker(mod, lanes, use_winograd, _kernel_fed(func, mod))
            new = blocker.visit_expr(func)
            if blocker.count:
                updates[gv] = new
            mod = blocker.builder_.get()
    for gv, func in updates.items():
        mod[gv] = func
    return relax.transform.DeadCodeElimination()(mod)


def blocked_kernels(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs :func:`block_layout` emitted (before fusion)."""
    return sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and LAYOUT_ATTR in (f.attrs or {}))

