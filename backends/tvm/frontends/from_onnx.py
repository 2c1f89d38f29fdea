"""ONNX models with ``ai.dcgraph`` nodes into Relax, through TVM's stock ONNX importer.

TVM 0.27's ``tvm.relax.frontend.onnx.from_onnx`` has no custom-op hook: it looks every node
up by ``op_type`` alone in a map that ``_get_convert_map()`` rebuilds on each call (so it
cannot be extended in place), raises ``OpNotImplemented`` for anything missing, ignores node
domains and never reads ``model.functions``. The one place dcgraph plugs in is
:class:`DcgraphOnnxImporter`, a subclass of TVM's ``ONNXGraphImporter`` that overrides the two
methods that consult the map (``_check_for_unsupported_ops`` and ``_convert_operator``) and
answers :data:`CONVERTERS` itself; every other node goes to TVM's converters unchanged. The
model-local function bodies are never looked at, so they cannot confuse the importer.

The operators (domain ``ai.dcgraph``, version 1, see :mod:`dcgraph.onnx_ops`)::

    DeepControlConv(X, W, B, A, G, Bo):  y = Conv(X, W, B);  Z = act(G * (y - A * mean_S(y)) + Bo)
    DeepControl(Y, A, G, Bo):            Z = act(G * (Y - A * mean_S(Y)) + Bo)
    DeepControlConvAdd(X, W, B, A, G, Bo, Skip):  DeepControlConv's Z with act(... + Skip)

``DeepControlConv`` becomes dcgraph's fused kernels (:func:`..lowering.emit_conv_deep_control`,
the mean hoisted to the input); ``DeepControl`` becomes the two-pass kernel
(:func:`..kernels.deep_control`). Attribute values the kernels do not cover (non-symmetric
pads, ``auto_pad``, unknown activations, ...) are rejected with a ``ValueError`` naming the
node before anything is emitted.

The same subclass fills two gaps of the stock importer that every dynamic-batch torch export
hits: ``Constant(value_ints=...)`` (TVM reads only ``value``) and ``Reshape`` of the scalar
batch size that TVM's ``Squeeze`` makes of ``Shape(x)[:1]`` (see :func:`_scalar_shape_reshape`).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import tvm
from onnx import helper
from tvm import relax, tirx
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from dcgraph import onnx_ops

from .. import kernels
from ..lowering import KERNEL_ATTR, emit_conv_deep_control

DEFAULT_ALPHA = 0.01  # LeakyRelu's default, what the ONNX function body uses without ``alpha``


class OnnxFrontendError(ValueError):
    """A model (or an attribute value) this frontend cannot import, with the reason."""


@dataclass(frozen=True)
class DcAttrs:
    """The validated attributes of one ``ai.dcgraph`` node (conv fields unused for DeepControl)."""

    act: str = "identity"
    alpha: float = DEFAULT_ALPHA
    strides: tuple[int, ...] | None = None
    pads: tuple[int, ...] | None = None  # per spatial dim (symmetric: begin == end)
    dilations: tuple[int, ...] | None = None
    group: int = 1
    kernel_shape: tuple[int, ...] | None = None


_ACT_ATTRS = {"activation", "alpha"}
_CONV_ATTRS = {"strides", "pads", "dilations", "group", "auto_pad", "kernel_shape"}


def _node_name(attr: Mapping[str, Any]) -> str:
    return str(attr.get("tvm_custom", {}).get("name", ""))


def _where(op_type: str, name: str) -> str:
    return f"{op_type} node {name!r}" if name else f"{op_type} node"


def _plain(v: Any) -> Any:
    """An attribute value as plain Python (TVM's parser gives bytes and tuples)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list | tuple):
        return tuple(_plain(i) for i in v)
    return v


def parse_attrs(op_type: str, name: str, attrs: Mapping[str, Any], overload: str = "") -> DcAttrs:
    """Validate ``attrs`` of an ``ai.dcgraph`` node; raise ``ValueError`` naming it if unsupported."""
    where = _where(op_type, name)
    attrs = {k: _plain(v) for k, v in attrs.items() if k != "tvm_custom"}
    allowed = _ACT_ATTRS | (_CONV_ATTRS if op_type.startswith("DeepControlConv") else set())
    unknown = sorted(set(attrs) - allowed)
    if unknown:
        raise OnnxFrontendError(f"{where}: unknown attribute(s) {unknown}; {op_type} takes {sorted(allowed)}")
    act = attrs.get("activation", overload or "identity")
    if act not in onnx_ops.ACTIVATIONS:
        raise OnnxFrontendError(f"{where}: activation {act!r} is not supported; expected one of "
                                f"{', '.join(onnx_ops.ACTIVATIONS)}")
    if overload and overload != act:  # onnxruntime runs the overload: the two must agree
        raise OnnxFrontendError(f"{where}: activation={act!r} but the node calls function "
                                f"overload {overload!r}")
    alpha = float(attrs.get("alpha", DEFAULT_ALPHA))
    if op_type == "DeepControl":
        return DcAttrs(act=act, alpha=alpha)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad != "NOTSET":
        raise OnnxFrontendError(f"{where}: auto_pad={auto_pad!r} is not supported; give explicit symmetric "
                                "'pads' (SAME_* padding is non-symmetric for even kernels or strides)")
    pads = attrs.get("pads")
    if pads is not None:
        if len(pads) % 2:
            raise OnnxFrontendError(f"{where}: pads={list(pads)} has an odd length; ONNX pads are "
                                    "[x1_begin, x2_begin, ..., x1_end, x2_end]")
        half = len(pads) // 2
        begin, end = pads[:half], pads[half:]
        if begin != end:
            raise OnnxFrontendError(
                f"{where}: non-symmetric pads={list(pads)} (begin {list(begin)} != end {list(end)}); "
                "dcgraph's kernels and hoisted mean assume the same zero padding on both sides of "
                "each axis. Pad the input with an explicit Pad node first and use pads of 0")
        if any(p < 0 for p in begin):
            raise OnnxFrontendError(f"{where}: negative pads={list(pads)} are not supported")
        pads = begin
    group = int(attrs.get("group", 1))
    if group < 1:
        raise OnnxFrontendError(f"{where}: group={group} must be >= 1")
    strides, dilations = attrs.get("strides"), attrs.get("dilations")
    for key, vals in (("strides", strides), ("dilations", dilations)):
        if vals is not None and any(int(v) < 1 for v in vals):
            raise OnnxFrontendError(f"{where}: {key}={list(vals)} must be >= 1")
    return DcAttrs(act=act, alpha=alpha, strides=strides, pads=pads, dilations=dilations, group=group,
                   kernel_shape=attrs.get("kernel_shape"))


# ------------------------------------------------------------------ shapes of the relax inputs

def _static_shape(expr: relax.Expr) -> list[int | None]:
    """Per dim: the int size, or None where it is symbolic."""
    return [int(s) if isinstance(s, tirx.IntImm) else None for s in expr.ty.shape]


def _check_tensor(where: str, label: str, expr: relax.Expr | None) -> None:
    if not isinstance(expr, relax.Expr) or not isinstance(expr.ty, relax.TensorType) or expr.ty.shape is None:
        raise OnnxFrontendError(f"{where}: input {label} must be a tensor of known rank")


def _per_channel(bb: relax.BlockBuilder, where: str, label: str, expr: relax.Expr, c: int,
                 dtype: str) -> relax.Expr:
    """``expr`` as a ``(C,)`` vector (the function body reshapes A, G, Bo to ``(C, 1)``)."""
    _check_tensor(where, label, expr)
    if expr.ty.dtype != dtype:
        raise OnnxFrontendError(f"{where}: {label} is {expr.ty.dtype}, the data is {dtype}")
    shape = _static_shape(expr)
    if None in shape or int(np.prod(shape)) != c:
        raise OnnxFrontendError(f"{where}: {label} has shape {shape}; expected {c} values (one per channel)")
    if shape == [c]:
        return expr
    return bb.emit(relax.op.reshape(expr, [c]))


def _is_zero_const(expr: relax.Expr) -> bool:
    value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.Constant) else None
    return hasattr(value, "numpy") and not np.any(value.numpy())


# ------------------------------------------------------------------ the two converters

def convert_deep_control_conv(bb: relax.BlockBuilder, inputs: Sequence[relax.Expr | None],
                              attr: Mapping[str, Any], op_type: str = "DeepControlConv") -> relax.Expr:
    """``DeepControlConv(X, W, B, A, G, Bo)`` -> dcgraph's fused kernels (B may be absent);
    ``DeepControlConvAdd(..., Skip)``: the same with the residual added before the activation."""
    where = _where(op_type, _node_name(attr))
    spec = parse_attrs(op_type, _node_name(attr), attr)
    names = ["X", "W", "B", "A", "G", "Bo"] + (["Skip"] if op_type == "DeepControlConvAdd" else [])
    if len(inputs) != len(names):
        raise OnnxFrontendError(f"{where}: expected {len(names)} inputs ({', '.join(names)}), "
                                f"got {len(inputs)}")
    x, w, bias, a, g, b = inputs[:6]
    skip = inputs[6] if len(names) == 7 else None
    if len(names) == 7:
        _check_tensor(where, "Skip", skip)
    _check_tensor(where, "X", x)
    _check_tensor(where, "W", w)
    rank = len(x.ty.shape)
    nd = rank - 2
    if nd not in (1, 2, 3) or len(w.ty.shape) != rank:
        raise OnnxFrontendError(f"{where}: X has rank {rank} and W rank {len(w.ty.shape)}; expected equal "
                                "ranks 3, 4 or 5 (1-, 2- or 3-d convolution)")
    xs, ws = _static_shape(x), _static_shape(w)
    if None in xs[1:] or None in ws:
        raise OnnxFrontendError(f"{where}: X {xs} and W {ws} need static sizes except the batch "
                                "(give from_onnx a shape= for the inputs)")
    dtype = x.ty.dtype
    if w.ty.dtype != dtype:
        raise OnnxFrontendError(f"{where}: W is {w.ty.dtype}, X is {dtype}")
    c_out, cig, kernel = ws[0], ws[1], ws[2:]
    if spec.kernel_shape is not None and list(spec.kernel_shape) != kernel:
        raise OnnxFrontendError(f"{where}: kernel_shape={list(spec.kernel_shape)} but W has kernel {kernel}")
    if xs[1] != cig * spec.group or c_out % spec.group:
        raise OnnxFrontendError(f"{where}: X has {xs[1]} channels, W is {ws} with group={spec.group}; "
                                "need C_in == W.shape[1] * group and C_out % group == 0")
    conv = {}
    for key, vals, default in (("stride", spec.strides, 1), ("padding", spec.pads, 0),
                               ("dilation", spec.dilations, 1)):
        vals = [default] * nd if vals is None else [int(v) for v in vals]
        if len(vals) != nd:
            raise OnnxFrontendError(f"{where}: {key} has {len(vals)} values for a {nd}-d convolution")
        conv[key] = vals
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
           zip(xs[2:], kernel, conv["stride"], conv["padding"], conv["dilation"], strict=True)]
    if min(out) < 1:
        raise OnnxFrontendError(f"{where}: the convolution output {out} is empty for input {xs[2:]}")
    if bias is not None:
        bias = None if _is_zero_const(bias) else _per_channel(bb, where, "B", bias, c_out, dtype)
    a, g, b = (_per_channel(bb, where, n, v, c_out, dtype) for n, v in (("A", a), ("G", g), ("Bo", b)))
    if skip is not None and len(skip.ty.shape) > rank:
        raise OnnxFrontendError(f"{where}: Skip has rank {len(skip.ty.shape)}, the output {rank}")
    return emit_conv_deep_control(bb, x, w, bias, a, g, b, groups=spec.group, act=spec.act,
                                  negative_slope=spec.alpha, skip=skip, **conv)


def convert_deep_control(bb: relax.BlockBuilder, inputs: Sequence[relax.Expr | None],
                         attr: Mapping[str, Any]) -> relax.Expr:
    """``DeepControl(Y, A, G, Bo)`` -> the two-pass kernel (mean over Y, then the epilogue):
    nothing to hoist, Y is given."""
    where = _where("DeepControl", _node_name(attr))
    spec = parse_attrs("DeepControl", _node_name(attr), attr)
    if len(inputs) != 4:
        raise OnnxFrontendError(f"{where}: expected 4 inputs (Y, A, G, Bo), got {len(inputs)}")
    y, a, g, b = inputs
    _check_tensor(where, "Y", y)
    ys = _static_shape(y)
    if len(ys) < 3 or None in ys[1:]:
        raise OnnxFrontendError(f"{where}: Y {ys} must be (N, C, *S) with static C and S "
                                "(the batch may be symbolic)")
    dtype = y.ty.dtype
    a, g, b = (_per_channel(bb, where, n, v, ys[1], dtype) for n, v in (("A", a), ("G", g), ("Bo", b)))
    return bb.emit_te(lambda y_, a_, g_, b_: kernels.deep_control(y_, a_, g_, b_, spec.act, spec.alpha),
                      y, a, g, b, primfunc_name_hint="dc_deep_control",
                      primfunc_attrs={KERNEL_ATTR: "dc_deep_control"})


Converter = Callable[[relax.BlockBuilder, Sequence[relax.Expr | None], Mapping[str, Any], str], relax.Expr]

#: The ``ai.dcgraph`` operators this frontend adds to TVM's importer (op_type -> converter).
CONVERTERS: dict[str, Converter] = {
    "DeepControlConv": convert_deep_control_conv,
    "DeepControlConvAdd": lambda bb, inputs, attr: convert_deep_control_conv(bb, inputs, attr,
                                                                             "DeepControlConvAdd"),
    "DeepControl": convert_deep_control,
}


def _validate_dcgraph_nodes(model: onnx.ModelProto) -> None:
    """Static checks, before the importer emits anything: domains, versions, attributes."""
    version = next((o.version for o in model.opset_import if o.domain == onnx_ops.DOMAIN), None)
    uses = [n for n in model.graph.node if n.domain == onnx_ops.DOMAIN or n.op_type in CONVERTERS]
    if uses and version is not None and version != onnx_ops.VERSION:
        raise OnnxFrontendError(f"the model imports {onnx_ops.DOMAIN} version {version}; this frontend "
                                f"knows version {onnx_ops.VERSION}")
    for node in uses:
        where = _where(node.op_type, node.name)
        if node.domain != onnx_ops.DOMAIN:
            raise OnnxFrontendError(f"{where} is in domain {node.domain!r}, not {onnx_ops.DOMAIN!r}")
        if node.op_type not in CONVERTERS:
            raise OnnxFrontendError(f"{where}: unknown {onnx_ops.DOMAIN} operator; this frontend converts "
                                    f"{', '.join(CONVERTERS)}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        parse_attrs(node.op_type, node.name, attrs, node.overload)


_CONSTANT_FORMS = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32,
                   "value_floats": np.float32}


def _constant_as_tensor(attrs: dict) -> dict:
    """``Constant(value_int[s]/value_float[s])`` as ``Constant(value=tensor)``: TVM reads ``value`` only.

    (The torch exporter writes ``value_ints`` for the shapes of its ``Reshape`` nodes.)
    """
    for key, dtype in _CONSTANT_FORMS.items():
        if key in attrs and "value" not in attrs:
            value = np.asarray(_plain(attrs[key]), dtype=dtype)
            attrs = {k: v for k, v in attrs.items() if k != key}
            attrs["value"] = onnx.numpy_helper.from_array(value)
    return attrs


def _is_scalar_shape_value(expr: Any) -> bool:
    return isinstance(getattr(expr, "ty", None), tvm.ir.PrimType)


def _scalar_shape_reshape(value: relax.Expr, shape: Any, attrs: dict) -> relax.Expr:
    """``Reshape(d, [-1])`` of a scalar shape value ``d`` as the shape ``(d,)``.

    A dynamic-batch torch export flattens with ``Shape(x)[:1] -> Squeeze -> Reshape(-1) ->
    Concat -> Reshape``: TVM's Squeeze turns the one-element shape into a scalar value, which its
    Reshape cannot take. As a shape ``(d,)`` the chain stays in TVM's shape arithmetic.
    """
    data = getattr(shape, "value", None) if isinstance(shape, tvm.ir.Constant) else None
    target = data.numpy().tolist() if hasattr(data, "numpy") else None
    if target not in ([-1], [1]):
        name = _node_name(attrs)
        raise OnnxFrontendError(f"Reshape node {name!r}: reshaping a scalar shape value to {target} "
                                "is not supported by TVM's importer")
    return relax.ShapeExpr([value])


class DcgraphOnnxImporter(ONNXGraphImporter):
    """TVM's ONNX graph importer, with the ``ai.dcgraph`` operators of :data:`CONVERTERS`."""

    def __init__(self, shape_dict: Mapping[str, Sequence[int]] | None) -> None:
        # dtype_dict={}: every input keeps the model's own element type
        super().__init__(dict(shape_dict or {}), {}, keep_params_in_input=False, sanitize=True)

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        # TVM's check reads only ``graph.node``: hand it the nodes it is meant to convert
        stock = [n for n in graph.node if n.op_type not in CONVERTERS]
        super()._check_for_unsupported_ops(SimpleNamespace(node=stock))

    def _convert_operator(self, op_name: str, inputs: list, attrs: dict, opset: int) -> relax.Expr:
        convert = CONVERTERS.get(op_name)
        if convert is None:
            if op_name == "Constant":
                attrs = _constant_as_tensor(attrs)
            elif op_name == "Reshape" and _is_scalar_shape_value(inputs[0]):
                return _scalar_shape_reshape(inputs[0], inputs[1], attrs)
            return super()._convert_operator(op_name, inputs, attrs, opset)
        return self.bb.normalize(convert(self.bb, inputs, attrs))


def _load(path: Path) -> onnx.ModelProto:
    """Load a model file (with external data); like TVM, no ``onnx.checker`` gate here."""
    if not path.is_file():
        raise OnnxFrontendError(f"{path}: no such file")
    try:
        return onnx.load(str(path))
    except Exception as err:
        raise OnnxFrontendError(f"{path}: not a readable ONNX model ({err})") from None


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def from_onnx(model: onnx.ModelProto | str | Path, shape: dict[str, Sequence[int]] | None = None,
              ) -> tvm.IRModule:
    """Import ``model`` (a proto or a path) into a Relax module ``main``; initializers become constants.

    ``shape`` maps graph input names to static shapes (the Deep Control kernels need static
    channel and spatial sizes; a symbolic batch is fine). Lowering options (the plan) come from
    :func:`..lowering.options`. Raises
    ``ValueError`` for inputs this frontend cannot take (bad attribute values, unknown input
    names, a model TVM's importer has no converter for).
    """
    if isinstance(model, str | Path):
        model = _load(Path(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    if model.ir_version < 3:
        raise OnnxFrontendError(f"ONNX IR version {model.ir_version} is too old (TVM needs >= 3)")
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    unknown = sorted(set(shape or {}) - set(names))
    if unknown:
        raise OnnxFrontendError(f"shape names {unknown} are not graph inputs; the inputs are {names}")
    _validate_dcgraph_nodes(model)
    importer = DcgraphOnnxImporter(shape)
    printed = io.StringIO()  # TVM prints a failing node's inputs (all metadata) before re-raising
    try:
        with contextlib.redirect_stdout(printed):
            mod = importer.from_onnx(model.graph, _default_opset(model))
    except OnnxFrontendError as err:
        raise OnnxFrontendError(str(err)) from None
    except tvm.error.OpNotImplemented as err:
        raise OnnxFrontendError(f"TVM's ONNX importer cannot convert this model: {err}") from None
    except Exception:
        sys.stdout.write(printed.getvalue())
        raise
    sys.stdout.write(printed.getvalue())
    return mod


__all__ = [
    "CONVERTERS",
    "DcAttrs",
    "DcgraphOnnxImporter",
    "OnnxFrontendError",
    "convert_deep_control",
    "convert_deep_control_conv",
    "from_onnx",
    "parse_attrs",
]
