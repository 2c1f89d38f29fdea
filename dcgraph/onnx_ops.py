"""Deep Control in ONNX: the ``ai.dcgraph`` domain, its operators as model-local functions.

Three operators, version 1 of domain ``ai.dcgraph``:

- ``DeepControl(Y, A, G, Bo) -> Z``: Deep Control on a conv output ``Y (N, C, *S)``.
- ``DeepControlConv(X, W, B, A, G, Bo) -> Z``: ``act(DeepControl(Conv(X, W, B)))`` with Conv's
  attributes ``strides``, ``pads``, ``dilations``, ``group``.
- ``DeepControlConvAdd(X, W, B, A, G, Bo, Skip) -> Z``: the residual tail (spec section 4a),
  ``act(DeepControl(Conv(X, W, B)) + Skip)``, ``Skip`` broadcast like ``Add``.

Both take ``activation`` (identity, relu, relu6, leaky_relu, hardswish, silu) and ``alpha``
(leaky_relu's slope). Each is shipped in the model as an ONNX function whose body is
standard ONNX (in the model's own default opset, 15 or newer), so any runtime executes it
with no plugin. A function body cannot
branch on a string attribute, so each activation is one *overload* of the function (IR
version 10): the node carries ``activation=relu`` and ``overload=relu``.

Body, for any number of spatial dims (the map is flattened to ``(N, C, S)``)::

    Yf = Reshape(Y, [0, 0, -1]);  M = ReduceMean(Yf, axes=[2], keepdims=1)
    Z  = Reshape(G' * (Yf - A' * M) + Bo', Shape(Y))          # A', G', Bo' of shape (C, 1)
    out = act(Z)
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, FunctionProto, ModelProto, NodeProto, TensorProto
from onnx import helper as h

from dcgraph.reference import ACTIVATIONS

DOMAIN = "ai.dcgraph"
VERSION = 1
BODY_OPSET = 18  #: the default; bodies exist for default-domain opsets >= MIN_OPSET
MIN_OPSET = 15  #: CastLike
MIN_IR_VERSION = 10  # function overloads
CONV_ATTRS = ("strides", "pads", "dilations", "group")


def _ref(name: str, kind: int) -> AttributeProto:
    return h.make_attribute_ref(name, kind)


def _const(name: str, values: list[int] | float) -> NodeProto:
    if isinstance(values, float):
        tensor = h.make_tensor(name, TensorProto.FLOAT, [], [values])
    else:
        tensor = h.make_tensor(name, TensorProto.INT64, [len(values)], values)
    return h.make_node("Constant", [], [name], value=tensor)


def _activation_nodes(act: str, z: str, out: str) -> list[NodeProto]:
    if act == "identity":
        return [h.make_node("Identity", [z], [out])]
    if act == "relu":
        return [h.make_node("Relu", [z], [out])]
    if act == "relu6":
        return [_const("zero_f", 0.0), _const("six_f", 6.0),
                h.make_node("CastLike", ["zero_f", z], ["zero"]),
                h.make_node("CastLike", ["six_f", z], ["six"]),
                h.make_node("Clip", [z, "zero", "six"], [out])]
    if act == "leaky_relu":
        node = h.make_node("LeakyRelu", [z], [out])
        node.attribute.append(_ref("alpha", AttributeProto.FLOAT))
        return [node]
    if act == "hardswish":  # z * HardSigmoid(z): HardSwish itself needs opset 14
        return [h.make_node("HardSigmoid", [z], ["hs"], alpha=1.0 / 6.0, beta=0.5),
                h.make_node("Mul", [z, "hs"], [out])]
    if act == "silu":
        return [h.make_node("Sigmoid", [z], ["sig"]), h.make_node("Mul", [z, "sig"], [out])]
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def _deep_control_nodes(y: str, act: str, opset: int, skip: str | None = None) -> list[NodeProto]:
    if opset >= 18:  # axes became an input in opset 18
        mean = [_const("axis2", [2]), h.make_node("ReduceMean", ["yf", "axis2"], ["m"], keepdims=1)]
    else:
        mean = [h.make_node("ReduceMean", ["yf"], ["m"], axes=[2], keepdims=1)]
    return [
        _const("flat_shape", [0, 0, -1]), _const("col", [-1, 1]),
        h.make_node("Reshape", [y, "flat_shape"], ["yf"]),
        *mean,
        h.make_node("Reshape", ["A", "col"], ["a2"]),
        h.make_node("Reshape", ["G", "col"], ["g2"]),
        h.make_node("Reshape", ["Bo", "col"], ["b2"]),
        h.make_node("Mul", ["a2", "m"], ["am"]),
        h.make_node("Sub", ["yf", "am"], ["d"]),
        h.make_node("Mul", ["g2", "d"], ["gd"]),
        h.make_node("Add", ["gd", "b2"], ["zf"]),
        h.make_node("Shape", [y], ["y_shape"]),
        h.make_node("Reshape", ["zf", "y_shape"], ["z"]),
        *([h.make_node("Add", ["z", skip], ["zs"])] if skip else []),
        *_activation_nodes(act, "zs" if skip else "z", "Z"),
    ]


def deep_control_function(act: str, opset: int = BODY_OPSET) -> FunctionProto:
    """``DeepControl`` with activation ``act`` (its overload), body in default opset ``opset``."""
    nodes = _deep_control_nodes("Y", act, opset)
    f = h.make_function(DOMAIN, "DeepControl", ["Y", "A", "G", "Bo"], ["Z"], nodes,
                        [h.make_opsetid("", opset)], attributes=["activation", "alpha"])
    f.overload = act
    f.doc_string = f"Deep Control (arXiv 1706.03907) with activation {act}."
    return f


def deep_control_conv_function(act: str, opset: int = BODY_OPSET) -> FunctionProto:
    """``DeepControlConv`` with activation ``act`` (its overload), body in opset ``opset``."""
    conv = h.make_node("Conv", ["X", "W", "B"], ["Y"])
    conv.attribute.extend([_ref("strides", AttributeProto.INTS), _ref("pads", AttributeProto.INTS),
                           _ref("dilations", AttributeProto.INTS), _ref("group", AttributeProto.INT)])
    nodes = [conv, *_deep_control_nodes("Y", act, opset)]
    f = h.make_function(DOMAIN, "DeepControlConv", ["X", "W", "B", "A", "G", "Bo"], ["Z"], nodes,
                        [h.make_opsetid("", opset)],
                        attributes=[*CONV_ATTRS, "activation", "alpha"])
    f.overload = act
    f.doc_string = f"Conv + Deep Control + {act}, fused (arXiv 1706.03907)."
    return f


def deep_control_conv_add_function(act: str, opset: int = BODY_OPSET) -> FunctionProto:
    """``DeepControlConvAdd`` (the residual tail) with activation ``act``, body in opset ``opset``."""
    conv = h.make_node("Conv", ["X", "W", "B"], ["Y"])
    conv.attribute.extend([_ref("strides", AttributeProto.INTS), _ref("pads", AttributeProto.INTS),
                           _ref("dilations", AttributeProto.INTS), _ref("group", AttributeProto.INT)])
    nodes = [conv, *_deep_control_nodes("Y", act, opset, skip="Skip")]
    f = h.make_function(DOMAIN, "DeepControlConvAdd", ["X", "W", "B", "A", "G", "Bo", "Skip"], ["Z"],
                        nodes, [h.make_opsetid("", opset)],
                        attributes=[*CONV_ATTRS, "activation", "alpha"])
    f.overload = act
    f.doc_string = f"Conv + Deep Control + residual add + {act}, fused (arXiv 1706.03907)."
    return f


_BUILDERS = {"DeepControl": deep_control_function, "DeepControlConv": deep_control_conv_function,
             "DeepControlConvAdd": deep_control_conv_add_function}


def node_activation(node: NodeProto) -> str:
    for a in node.attribute:
        if a.name == "activation":
            return a.s.decode()
    return "identity"


def attach_functions(model: ModelProto) -> ModelProto:
    """Give every ``ai.dcgraph`` node its overload and the model the functions it calls.

    Idempotent; also adds the ``ai.dcgraph`` opset import and raises the IR version to 10.
    """
    needed: set[tuple[str, str]] = set()
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type not in _BUILDERS:
            raise ValueError(f"unknown {DOMAIN} operator {node.op_type!r}")
        act = node_activation(node)
        if act not in ACTIVATIONS:
            raise ValueError(f"{node.name}: unknown activation {act!r}")
        node.overload = act
        needed.add((node.op_type, act))
    if not needed:
        return model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"the {DOMAIN} functions need default-domain opset >= {MIN_OPSET}, "
                         f"the model imports {opset} (onnx.version_converter upgrades it)")
    have = {(f.name, f.overload) for f in model.functions if f.domain == DOMAIN}
    for op_type, act in sorted(needed - have):
        model.functions.append(_BUILDERS[op_type](act, opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(h.make_opsetid(DOMAIN, VERSION))
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model


def _schema(name: str, inputs: list[str], attrs: list[tuple[str, int]],
            optional: tuple[str, ...] = ()) -> onnx.defs.OpSchema:
    from onnx.defs import OpSchema

    T = "T"
    opt = OpSchema.FormalParameterOption
    return OpSchema(
        name, DOMAIN, VERSION,
        inputs=[OpSchema.FormalParameter(i, T, "", param_option=opt.Optional if i in optional else opt.Single)
                for i in inputs],
        outputs=[OpSchema.FormalParameter("Z", T)],
        type_constraints=[(T, ["tensor(float)", "tensor(double)", "tensor(float16)",
                               "tensor(bfloat16)"], "floating point")],
        attributes=[OpSchema.Attribute(a, kind, "", required=False) for a, kind in attrs],
        doc=f"{name} (arXiv 1706.03907); defined by a model-local function.",
    )


def register_schemas() -> None:
    """Register the ``ai.dcgraph`` operator schemas with ``onnx.defs`` (idempotent).

    Tools that build graphs through schemas (onnxscript, the torch exporter) need them; the
    models themselves do not (they carry the functions).
    """
    from onnx.defs import OpSchema

    at = OpSchema.AttrType
    act = [("activation", at.STRING), ("alpha", at.FLOAT)]
    conv = [("strides", at.INTS), ("pads", at.INTS), ("dilations", at.INTS), ("group", at.INT)]
    for schema in (_schema("DeepControl", ["Y", "A", "G", "Bo"], act),
                   _schema("DeepControlConv", ["X", "W", "B", "A", "G", "Bo"], conv + act,
                           optional=("B",)),  # the conv bias may be absent (input name "")
                   _schema("DeepControlConvAdd", ["X", "W", "B", "A", "G", "Bo", "Skip"], conv + act,
                           optional=("B",))):
        if onnx.defs.has(schema.name, VERSION, DOMAIN):
            continue
        onnx.defs.register_schema(schema)


def check(model: ModelProto) -> None:
    """``onnx.checker`` with full shape inference (raises on an invalid model)."""
    onnx.checker.check_model(model, full_check=True)
