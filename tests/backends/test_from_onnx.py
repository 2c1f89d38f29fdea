"""ONNX models with ai.dcgraph nodes through TVM's ONNX importer (``from_onnx``): every shared case
as a one-node DeepControlConv model compiled for x86 against the reference, standalone
DeepControl (also after a stock Conv, and checked against onnxruntime running the model-local
functions), a whole zoo model against torch, the kernels in the module, and clear errors.

Tolerances: float32 throughout, ``rtol = atol = 1e-4`` against the float64 reference; the zoo
model ``1e-4`` of the output's largest magnitude.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from dcgraph import onnx_ops, onnx_tools  # noqa: E402
from dcgraph import reference as R  # noqa: E402
from dcgraph.backends.tvm import lowering  # noqa: E402
from dcgraph.backends.tvm.frontends.from_onnx import OnnxFrontendError, from_onnx  # noqa: E402
from dcgraph.backends.tvm.lowering import KERNEL_ATTR  # noqa: E402
from dcgraph.backends.tvm.pipeline import relax_pipeline  # noqa: E402
from dcgraph.testing import ACTIVATIONS, CASE_IDS, CASES  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
TOL = {"rtol": 1e-4, "atol": 1e-4}
ALPHA = 0.1


def _run(mod: tvm.IRModule, *arrays: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=relax_pipeline(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in arrays)).numpy()


def _calls(mod: tvm.IRModule) -> tuple[list[str], list[str]]:
    """(Relax ops called in ``main``, ``dcgraph.kernel`` attrs of the PrimFuncs it calls)."""
    ops, kernels = [], []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call):
                continue
            if isinstance(call.op, tvm.ir.Op):
                ops.append(call.op.name)
            if getattr(call.op, "name", "") == "relax.call_tir":
                attrs = mod[call.args[0]].attrs or {}
                if KERNEL_ATTR in attrs:
                    kernels.append(str(attrs[KERNEL_ATTR]))
    return ops, kernels


def _model(nodes: list, inputs: list, inits: dict[str, np.ndarray], out_shape: list,
           opset: int = 18) -> onnx.ModelProto:
    out = h.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, out_shape)
    graph = h.make_graph(nodes, "g", inputs, [out],
                         initializer=[nh.from_array(v, k) for k, v in inits.items()])
    return onnx_ops.attach_functions(h.make_model(graph, opset_imports=[h.make_opsetid("", opset)]))


def _conv_model(case, t: dict, act: str, **attrs) -> onnx.ModelProto:
    """One DeepControlConv node; no conv bias -> the empty-string B input."""
    inits = {"W": t["weight"].numpy(), "A": t["a"].numpy(), "G": t["g"].numpy(), "Bo": t["b"].numpy()}
    if t["bias"] is not None:
        inits["B"] = t["bias"].numpy()
    conv = {"strides": list(case.stride), "pads": list(case.padding) * 2,
            "dilations": list(case.dilation), "group": case.groups, "activation": act, "alpha": ALPHA}
    conv.update(attrs)
    node = h.make_node("DeepControlConv", ["x", "W", "B" if "B" in inits else "", "A", "G", "Bo"], ["z"],
                       domain=onnx_ops.DOMAIN, name="dcc", **conv)
    x = h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", case.in_channels, *case.size])
    return _model([node], [x], inits, ["N", case.out_channels, *(f"s{i}" for i in range(len(case.size)))])


def _reference(case, t: dict, act: str) -> np.ndarray:
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}
    return R.conv_deep_control(d["x"], d["weight"], d["bias"], d["a"], d["g"], d["b"], act=act,
                               negative_slope=ALPHA, **case.conv_kwargs()).numpy()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv_cases_match_reference(case):
    t = case.tensors(torch.float32)
    mod = from_onnx(_conv_model(case, t, case.act))
    ops, kernels = _calls(mod)
    depthwise = case.groups > 1 and case.in_channels == case.groups  # plan="auto" -> two_pass
    assert kernels == (["dc_conv_raw", "dc_two_pass"] if depthwise else ["dc_shift", "dc_conv"])
    assert "relax.mean" not in ops
    np.testing.assert_allclose(_run(mod, t["x"].numpy()), _reference(case, t, case.act), **TOL)


def test_two_pass_plan_and_a_zero_conv_bias():
    case = CASES[0]
    t = dict(case.tensors(torch.float32), bias=torch.zeros(case.out_channels))  # dropped: all zeros
    model = _conv_model(case, t, "leaky_relu")
    with lowering.options(plan="two_pass"):  # the lowering options, set once for a whole import
        mod = from_onnx(model)
    assert _calls(mod)[1] == ["dc_conv_raw", "dc_two_pass"]
    np.testing.assert_allclose(_run(mod, t["x"].numpy()), _reference(case, t, "leaky_relu"), **TOL)
    assert _calls(from_onnx(model))[1] == ["dc_shift", "dc_conv"]


def _dc_model(c: int, spatial: tuple[int, ...], act: str, vec_shape: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    a, g, b = (rng.uniform(0.5, 1.5, c).astype(np.float32) for _ in range(3))
    node = h.make_node("DeepControl", ["y", "A", "G", "Bo"], ["z"], domain=onnx_ops.DOMAIN,
                       activation=act, alpha=ALPHA)
    y = h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, *spatial])
    model = _model([node], [y], {"A": a.reshape(vec_shape), "G": g.reshape(vec_shape),
                                 "Bo": b.reshape(vec_shape)}, ["N", c, *spatial])
    data = rng.standard_normal((2, c, *spatial)).astype(np.float32) if all(
        isinstance(s, int) for s in spatial) else None
    return model, (a, g, b), data


@pytest.mark.parametrize(("act", "spatial", "vec_shape"), [
    *[(act, (5, 7), (4,)) for act in ACTIVATIONS],
    ("relu", (9,), (4, 1)), ("silu", (3, 4, 5), (1, 4, 1, 1, 1)),
], ids=[*ACTIVATIONS, "1d_vec_c1", "3d_vec_1c111"])
def test_standalone_deep_control(act, spatial, vec_shape):
    model, (a, g, b), y = _dc_model(4, spatial, act, vec_shape)
    mod = from_onnx(model)
    ops, kernels = _calls(mod)
    assert kernels == ["dc_deep_control"] and "relax.mean" not in ops
    t = [torch.from_numpy(v).double() for v in (y, a, g, b)]
    expected = R.deep_control(*t, act, ALPHA).numpy()
    got = _run(mod, y)
    np.testing.assert_allclose(got, expected, **TOL)
    np.testing.assert_allclose(got, onnx_tools.run(model, {"y": y})[0], **TOL)  # the ONNX functions


def test_stock_conv_then_deep_control_and_a_fused_chain_match_onnxruntime():
    case = CASES[5]  # groups 2, relu6
    # an explicit (zero) conv bias: once dcgraph.onnx_export has registered the ai.dcgraph schemas,
    # onnx's full check rejects the empty-string B (the schema declares it single, not optional)
    t = dict(case.tensors(torch.float32), bias=torch.zeros(case.out_channels))
    model = _conv_model(case, t, "relu6")
    # the fused node, then a stock Conv (1x1) and a standalone DeepControl on its output
    c = case.out_channels
    w1 = (np.random.default_rng(1).standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32)
    model.graph.initializer.append(nh.from_array(w1, "W1"))
    model.graph.node.extend([
        h.make_node("Conv", ["z", "W1"], ["y1"]),
        h.make_node("DeepControl", ["y1", "A", "G", "Bo"], ["z2"], domain=onnx_ops.DOMAIN,
                    activation="hardswish")])
    model.graph.output[0].name = "z2"
    model = onnx_ops.attach_functions(model)
    onnx_ops.check(model)
    mod = from_onnx(model)
    ops, kernels = _calls(mod)
    assert kernels == ["dc_shift", "dc_conv", "dc_deep_control"] and "relax.nn.conv2d" in ops
    x = t["x"].numpy()
    np.testing.assert_allclose(_run(mod, x), onnx_tools.run(model, {"x": x})[0], **TOL)


def test_zoo_resnet18_through_onnx_matches_torch():
    from dcgraph import zoo
    from dcgraph.onnx_export import export_onnx
    from dcgraph.passes.onnx import rewrite_onnx

    model = zoo.randomize_norm_stats(zoo.resnet18_like()).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    proto, report = rewrite_onnx(export_onnx(model, x[:1]))  # BN kept, then the ONNX passes
    assert report.counts["conv+deep_control->fused"] == 20
    mod = from_onnx(proto)  # dynamic batch: the kernels take a symbolic N
    ops, kernels = _calls(mod)
    assert kernels.count("dc_conv") == 20 and kernels.count("dc_shift") == 20
    assert ops.count("relax.mean") == 1 and "relax.nn.conv2d" not in ops  # the head's pool only
    got = _run(mod, x.numpy())
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_path_and_static_shape(tmp_path):
    case = CASES[0]
    t = case.tensors(torch.float32)
    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(case, t, "relu"), path)
    mod = from_onnx(str(path), shape={"x": (2, case.in_channels, *case.size)})
    assert [int(s) for s in mod["main"].params[0].ty.shape] == [2, case.in_channels, *case.size]
    with pytest.raises(ValueError, match="no such file"):
        from_onnx(tmp_path / "missing.onnx")


def _bad(**attrs) -> onnx.ModelProto:
    case = CASES[0]
    return _conv_model(case, case.tensors(), "relu", **attrs)


def _bad_activation() -> onnx.ModelProto:
    model = _bad()  # attach_functions itself refuses an unknown activation: set it afterwards
    node = model.graph.node[0]
    act = next(a for a in node.attribute if a.name == "activation")
    act.s = b"gelu"
    node.overload = ""
    return model


@pytest.mark.parametrize(("make", "message"), [
    (lambda: _bad(pads=[1, 1, 2, 2]), r"non-symmetric pads=\[1, 1, 2, 2\].*explicit Pad"),
    (lambda: _bad(auto_pad="SAME_UPPER"), "auto_pad='SAME_UPPER' is not supported"),
    (_bad_activation, "activation 'gelu' is not supported"),
    (lambda: _bad(kernel_size=[3, 3]), r"unknown attribute\(s\) \['kernel_size'\]"),
    (lambda: _bad(group=3), "need C_in == W.shape"),
    (lambda: _bad(strides=[2, 2, 2]), "stride has 3 values for a 2-d convolution"),
    (lambda: _bad(kernel_shape=[5, 5]), r"kernel_shape=\[5, 5\] but W has kernel \[3, 3\]"),
], ids=["asym_pads", "auto_pad", "activation", "unknown_attr", "group", "strides", "kernel_shape"])
def test_unsupported_attributes_raise_clear_errors(make, message, capsys):
    with pytest.raises(OnnxFrontendError, match=message) as info:
        from_onnx(make())
    assert "'dcc'" in str(info.value)  # the node is named
    err = info.value  # no TVM traceback: not chained, and no frame inside TVM
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert not any("site-packages/tvm" in str(entry.path) for entry in info.traceback)
    assert capsys.readouterr().out == ""  # TVM's dump of the node's inputs is swallowed


def test_other_bad_input_raises_clear_errors():
    model = _bad()
    model.graph.node[0].overload = "silu"  # onnxruntime would run silu, the attribute says relu
    with pytest.raises(ValueError, match="calls function overload 'silu'"):
        from_onnx(model)
    model = _bad()
    model.graph.node[0].domain = "com.example"
    with pytest.raises(ValueError, match=r"domain 'com\.example'"):
        from_onnx(model)
    with pytest.raises(ValueError, match=r"shape names \['y'\] are not graph inputs"):
        from_onnx(_bad(), shape={"y": (1, 4, 8, 8)})
    with pytest.raises(ValueError, match="unknown plan"), lowering.options(plan="fast"):
        from_onnx(_bad())
    dyn, _, _ = _dc_model(4, ("H", "W"), "relu", (4,))
    with pytest.raises(ValueError, match="static C and S"):
        from_onnx(dyn)
    unsupported = _bad()
    unsupported.graph.node.append(h.make_node("NotAnOp", ["z"], ["u"], domain="com.example"))
    with pytest.raises(ValueError, match=r"TVM's ONNX importer cannot convert this model: .*NotAnOp"):
        from_onnx(unsupported)
