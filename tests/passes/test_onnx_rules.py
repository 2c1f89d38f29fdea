"""The ONNX rules (onnxscript rewriter): counts, checker, onnxruntime numerics against the
original and the reference, the forms exporters emit, negative cases, round trips."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper as nh

from dcgraph import onnx_ops, onnx_tools, zoo
from dcgraph import reference as R
from dcgraph.onnx_export import export_onnx
from dcgraph.passes.fx import rewrite
from dcgraph.passes.onnx import rewrite_onnx

RNG = np.random.default_rng(0)


def _parse(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text syntax; the named graph inputs become initializers."""
    model = onnx.parser.parse_model(text)
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend(nh.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(model)
    return model


def _w(*shape, scale=0.3):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _stats(c=4):
    return {"gamma": 0.5 + RNG.random(c, dtype=np.float32), "beta": _w(c),
            "mean": _w(c), "var": 0.5 + RNG.random(c, dtype=np.float32)}


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _assert_rewritten(model, out, report, counts, exact=True, rtol=1e-5):
    assert report.counts == counts, str(report)
    assert report.exact == exact
    onnx_ops.check(out)
    if exact:
        assert onnx_tools.compare(model, out) <= rtol


HEADER = '<ir_version: 10, opset_import: ["" : {opset}]>'


def test_conv_bn_relu_matches_original_and_reference():
    s = _stats()
    w, c0 = _w(4, 3, 3, 3), _w(4)
    model = _parse(HEADER.format(opset=18) + """
        g (float[N, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] c0, float[4] gamma, float[4] beta,
           float[4] mean, float[4] var) => (float[N, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, c0)
            n = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
            y = Relu (n)
        }""", w=w, c0=c0, **s)
    out, report = rewrite_onnx(model)
    _assert_rewritten(model, out, report, {"conv+batchnorm->deep_control": 1,
                                           "conv+deep_control->fused": 1})
    assert _ops(out) == ["DeepControlConv"] and out.graph.node[0].overload == "relu"
    # the reference semantics with the spec's preserve init: a = 0, g = gamma / std, ...
    g = s["gamma"] / np.sqrt(s["var"] + 1e-3)
    b = s["beta"] - g * s["mean"] + g * c0
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = torch.from_numpy
    ref = R.conv_deep_control(t(x).double(), t(w).double(), None, torch.zeros(4, dtype=torch.float64),
                              t(g).double(), t(b).double(), padding=1, act="relu")
    got = onnx_tools.run(out, {"x": x})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("act_text", "act"), [
    ("y = Identity (n)", "identity"),
    ("lo = Constant <value = float {0.0}> ()\n hi = Constant <value = float {6.0}> ()\n"
     " y = Clip (n, lo, hi)", "relu6"),
    ("y = LeakyRelu <alpha = 0.2> (n)", "leaky_relu"),
    ("y = HardSwish (n)", "hardswish"),
    ("s = Sigmoid (n)\n y = Mul (s, n)", "silu"),
])
def test_activations_are_absorbed(act_text, act):
    model = _parse(HEADER.format(opset=18) + """
        g (float[N, 3, 8, 8] x, float[4, 3, 1, 1] w, float[4] gamma, float[4] beta, float[4] mean,
           float[4] var) => (float[N, 4, 8, 8] y) {
            c = Conv (x, w)
            n = BatchNormalization (c, gamma, beta, mean, var)
            """ + act_text + "\n}", w=_w(4, 3, 1, 1), **_stats())
    out, report = rewrite_onnx(model)
    _assert_rewritten(model, out, report, {"conv+batchnorm->deep_control": 1,
                                           "conv+deep_control->fused": 1})
    assert report.matches[-1].act == act
    assert [n.op_type for n in out.graph.node if n.domain == "ai.dcgraph"] == ["DeepControlConv"]


def test_clip_other_than_0_6_is_not_absorbed():
    model = _parse(HEADER.format(opset=18) + """
        g (float[N, 3, 8, 8] x, float[4, 3, 1, 1] w, float[4] gamma, float[4] beta, float[4] mean,
           float[4] var) => (float[N, 4, 8, 8] y) {
            c = Conv (x, w)
            n = BatchNormalization (c, gamma, beta, mean, var)
            lo = Constant <value = float {0.0}> ()
            hi = Constant <value = float {5.0}> ()
            y = Clip (n, lo, hi)
        }""", w=_w(4, 3, 1, 1), **_stats())
    out, report = rewrite_onnx(model)
    _assert_rewritten(model, out, report, {"conv+batchnorm->deep_control": 1,
                                           "conv+deep_control->fused": 1})
    assert _ops(out)[-1] == "Clip" and report.matches[0].act == "identity"


@pytest.mark.parametrize(("opset", "mean_text"), [
    (18, "ax = Constant <value = int64[2] {2, 3}> ()\n m = ReduceMean <keepdims = 1> (c, ax)"),
    (17, "m = ReduceMean <axes = [-2, -1], keepdims = 1> (c)"),
    (13, "m = ReduceMean <axes = [2, 3], keepdims = 1> (c)"),
])
@pytest.mark.parametrize("order", ["(c-m*a)*g+b", "g*(c-a*m)+b", "b+(c*g-m*ga)", "(c-m*a)*g"])
def test_plain_ops_deep_control_is_fused(opset, mean_text, order):
    body = {
        "(c-m*a)*g+b": "am = Mul (m, a)\n d = Sub (c, am)\n gd = Mul (d, g)\n z = Add (gd, b)",
        "g*(c-a*m)+b": "am = Mul (a, m)\n d = Sub (c, am)\n gd = Mul (g, d)\n z = Add (gd, b)",
        "b+(c*g-m*ga)": "cg = Mul (c, g)\n ga = Mul (g, a)\n mga = Mul (m, ga)\n d = Sub (cg, mga)\n"
                        " z = Add (b, d)",
        "(c-m*a)*g": "am = Mul (m, a)\n d = Sub (c, am)\n z = Mul (d, g)",
    }[order]
    a, g, b = (0.5 + RNG.random((4, 1, 1), dtype=np.float32) for _ in range(3))
    model = _parse(HEADER.format(opset=opset) + """
        gr (float[N, 3, 7, 6] x, float[4, 3, 3, 3] w, float[4] c0, float[4, 1, 1] a,
            float[4, 1, 1] g, float[4, 1, 1] b) => (float[N, 4, 5, 4] y) {
            c = Conv <strides = [1, 1]> (x, w, c0)
            """ + mean_text + "\n" + body + "\n y = Relu (z)\n}",
        w=_w(4, 3, 3, 3), c0=_w(4), a=a, g=g, b=b)
    out, report = rewrite_onnx(model)
    assert bool(report.notes) == (opset < 15)  # opset 13 is upgraded (and says so)
    _assert_rewritten(model, out, report, {"conv+deep_control->fused": 1})
    assert report.matches[0].kind == "plain_ops" and report.matches[0].act == "relu"


@pytest.mark.parametrize("norm", ["instance", "groupnorm21", "bn_training"])
def test_approximate_norms_are_flagged(norm):
    text = {
        "instance": "n = InstanceNormalization (c, gamma, beta)",
        "groupnorm21": "n = GroupNormalization <num_groups = 2> (c, gamma, beta)",
        "bn_training": "n, rm, rv = BatchNormalization <training_mode = 1> (c, gamma, beta, mean, var)",
    }[norm]
    s, w = _stats(), _w(4, 3, 3, 3)
    model = _parse(HEADER.format(opset=21) + """
        g (float[N, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] gamma, float[4] beta, float[4] mean,
           float[4] var) => (float[N, 4, 6, 6] y) {
            c = Conv (x, w)
            """ + text + "\n y = Relu (n)\n}", w=w, **s)
    out, report = rewrite_onnx(model)
    kind = {"instance": "instancenorm", "groupnorm21": "groupnorm", "bn_training": "batchnorm"}[norm]
    assert report.counts == {f"conv+{kind}->deep_control": 1, "conv+deep_control->fused": 1}
    assert not report.exact and "approximate" in report.matches[0].note
    onnx_ops.check(out)
    # what it computes now is Deep Control with a = 1, g = gamma, b = beta
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = torch.from_numpy
    ref = R.conv_deep_control(t(x), t(w), None, torch.ones(4), t(s["gamma"]), t(s["beta"]), act="relu")
    np.testing.assert_allclose(onnx_tools.run(out, {"x": x})[0], ref.numpy(), rtol=1e-4, atol=1e-5)


def test_negative_cases_left_alone_and_reported():
    model = _parse(HEADER.format(opset=18) + """
        g (float[N, 4, 8, 8] x, float[4, 4, 3, 3] w, float[4] gamma, float[4] beta, float[4] mean,
           float[4] var) => (float[N, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            n = BatchNormalization (c, gamma, beta, mean, var)
            r = Add (n, c)
            n2 = BatchNormalization (r, gamma, beta, mean, var)
            c2 = Conv <auto_pad = "SAME_UPPER"> (n2, w)
            n3 = BatchNormalization (c2, gamma, beta, mean, var)
            ax = Constant <value = int64[1] {3}> ()
            c3 = Conv <pads = [1, 1, 1, 1]> (n3, w)
            m = ReduceMean <keepdims = 1> (c3, ax)
            y = Sub (c3, m)
        }""", w=_w(4, 4, 3, 3), **_stats())
    out, report = rewrite_onnx(model)
    assert not report.matches
    reasons = " | ".join(s.reason for s in report.skips)
    assert "2 users" in reasons
    assert "does not follow a convolution" in reasons
    assert "auto_pad" in reasons
    assert onnx_tools.compare(model, out) <= 1e-6


def _residual_tails(proto) -> int:
    """Adds that take a BatchNormalization output: the residual tails, read off the original."""
    bn_outputs = {o for n in proto.graph.node if n.op_type == "BatchNormalization" for o in n.output}
    return sum(1 for n in proto.graph.node if n.op_type == "Add" and bn_outputs & set(n.input))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet", "vgg"])
def test_zoo_exported_with_batchnorm_then_rewritten(name):
    factory, shape = zoo.MODELS[name]
    model = zoo.randomize_norm_stats(factory()).eval()
    proto = export_onnx(model, torch.randn(*shape))
    pairs = {"resnet18": 20, "mobilenet_v2": 16, "efficientnet": 11, "vgg": 6}[name]
    assert _ops(proto).count("BatchNormalization") == pairs
    out, report = rewrite_onnx(proto)
    counts = {"conv+batchnorm->deep_control": pairs, "conv+deep_control->fused": pairs}
    tails = _residual_tails(proto)
    if name in ("resnet18", "vgg"):  # known by hand: ResNet-18's 8 basic blocks, VGG has none
        assert tails == {"resnet18": 8, "vgg": 0}[name]
    if tails:
        counts["fused+residual->fused"] = tails
    _assert_rewritten(proto, out, report, counts)
    assert _ops(out).count("DeepControlConvAdd") == tails
    again, report2 = rewrite_onnx(out)
    assert not report2.matches and _ops(again) == _ops(out)


def test_round_trips_agree_with_torch():
    model = zoo.randomize_norm_stats(zoo.resnet18_like()).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).numpy()
    fused, _ = rewrite(model)  # torch passes, then export the custom op
    via_torch = export_onnx(fused, x[:1])
    assert _ops(via_torch).count("DeepControlConv") == 12  # and ResNet-18's 8 basic-block tails:
    assert _ops(via_torch).count("DeepControlConvAdd") == 8
    via_onnx, _ = rewrite_onnx(export_onnx(model, x[:1]))  # export BN, then ONNX passes
    for proto in (via_torch, via_onnx):
        onnx_ops.check(proto)
        got = onnx_tools.run(proto, {proto.graph.input[0].name: x.numpy()})[0]
        assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5


def test_exported_fused_model_keeps_every_activation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = rewrite(zoo.randomize_norm_stats(zoo.efficientnet_like()).eval())
    proto = export_onnx(model, torch.randn(1, 3, 64, 64))
    overloads = {n.overload for n in proto.graph.node if n.domain == "ai.dcgraph"}
    assert overloads == {"silu", "identity"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnx_tools.run(proto, {proto.graph.input[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5


def test_torch_groupnorm_and_instancenorm_export_forms():
    """torch exports GroupNorm (opset 20) as Reshape -> InstanceNormalization -> Reshape -> Mul
    -> Add, with a Shape of the conv output; InstanceNorm as InstanceNormalization."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.InstanceNorm2d(8, affine=True),
                                torch.nn.ReLU()).eval()
    proto = export_onnx(model, torch.randn(1, 3, 16, 16))
    assert "Reshape" in _ops(proto) and "GroupNormalization" not in _ops(proto)
    out, report = rewrite_onnx(proto)
    assert report.counts == {"conv+groupnorm->deep_control": 1, "conv+instancenorm->deep_control": 1,
                             "conv+deep_control->fused": 2}
    assert not report.exact and _ops(out) == ["DeepControlConv", "DeepControlConv"]
    assert [m.act for m in report.matches[:2]] == ["silu", "relu"]
    converted, _ = rewrite_onnx(proto, fuse=False)
    assert onnx_tools.compare(converted, out) <= 1e-6  # the fusion itself is exact
