"""The ai.dcgraph ONNX functions, run by onnxruntime, against the reference on the shared cases."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from dcgraph import onnx_ops
from dcgraph import reference as R
from dcgraph.testing import ACTIVATIONS, CASE_IDS, CASES


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _model(case, t, act, opset=18):
    nd = len(case.size)
    c = case.out_channels
    bias = t["bias"] if t["bias"] is not None else torch.zeros(c)
    inits = [nh.from_array(v.numpy(), n) for n, v in
             (("W", t["weight"]), ("B", bias), ("A", t["a"]), ("G", t["g"]), ("Bo", t["b"]))]
    conv = h.make_node("DeepControlConv", ["x", "W", "B", "A", "G", "Bo"], ["z"],
                       domain=onnx_ops.DOMAIN, strides=list(case.stride), pads=list(case.padding) * 2,
                       dilations=list(case.dilation), group=case.groups, activation=act, alpha=0.1)
    dc = h.make_node("DeepControl", ["z", "A", "G", "Bo"], ["z2"], domain=onnx_ops.DOMAIN,
                     activation=act, alpha=0.1)
    spatial = [f"s{i}" for i in range(nd)]
    out = [h.make_tensor_value_info(n, TensorProto.FLOAT, ["N", c, *spatial]) for n in ("z", "z2")]
    graph = h.make_graph([conv, dc], "g", [h.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", case.in_channels, *case.size])], out, initializer=inits)
    return onnx_ops.attach_functions(h.make_model(graph, opset_imports=[h.make_opsetid("", opset)]))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_functions_match_reference(case):
    t = case.tensors(torch.float32)
    model = _model(case, t, case.act)
    onnx_ops.check(model)
    z, z2 = _run(model, t["x"].numpy())
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}
    ref = R.conv_deep_control(d["x"], d["weight"], d["bias"], d["a"], d["g"], d["b"],
                              act=case.act, negative_slope=0.1, **case.conv_kwargs())
    ref2 = R.deep_control(ref, d["a"], d["g"], d["b"], case.act, 0.1)
    np.testing.assert_allclose(z, ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z2, ref2.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_in_one_model_and_batch_one(act):
    case = CASES[1]  # batch 1
    t = case.tensors(torch.float32)
    model = _model(case, t, act, opset=20)
    assert {f.overload for f in model.functions} == {act}
    assert all(n.overload == act for n in model.graph.node)
    z, _ = _run(model, t["x"].numpy())
    ref = R.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"], act=act,
                              negative_slope=0.1, **case.conv_kwargs())
    np.testing.assert_allclose(z, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_attach_is_idempotent_and_checks_opset():
    case = CASES[0]
    model = _model(case, case.tensors(), "relu")
    n = len(model.functions)
    onnx_ops.attach_functions(model)
    assert len(model.functions) == n and model.ir_version >= 10
    old = _model(case, case.tensors(), "relu")
    del old.functions[:]
    old.opset_import[0].version = 13
    with pytest.raises(ValueError, match="opset >= 15"):
        onnx_ops.attach_functions(old)


@pytest.mark.parametrize("opset", [15, 17])
def test_functions_in_older_opsets(opset):
    case = CASES[5]  # groups 2, relu6
    t = case.tensors(torch.float32)
    for act in ("relu6", "hardswish"):
        model = _model(case, t, act, opset=opset)
        onnx_ops.check(model)
        z, _ = _run(model, t["x"].numpy())
        ref = R.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"], act=act,
                                  **case.conv_kwargs())
        np.testing.assert_allclose(z, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_conv_bias_is_optional():
    """DeepControlConv with no bias (input name ""): the schema allows it, the function runs it."""
    case = CASES[0]
    t = case.tensors(torch.float32)
    model = _model(case, {**t, "bias": None}, case.act)
    conv = model.graph.node[0]
    conv.input[2] = ""
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "B"))
    onnx_ops.register_schemas()
    onnx_ops.check(model)
    z, _ = _run(model, t["x"].numpy())
    ref = R.conv_deep_control(t["x"], t["weight"], None, t["a"], t["g"], t["b"], act=case.act,
                              negative_slope=0.1, **case.conv_kwargs())
    np.testing.assert_allclose(z, ref.numpy(), rtol=1e-4, atol=1e-4)
