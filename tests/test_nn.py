"""Modules and the functional API against the reference, on the shared cases."""

import pytest
import torch
from torch import nn

import dcgraph
from dcgraph import functional as DF
from dcgraph import reference as R
from dcgraph.testing import ACTIVATIONS, CASE_IDS, CASES

CONV_MODULES = {1: dcgraph.DeepControlConv1d, 2: dcgraph.DeepControlConv2d, 3: dcgraph.DeepControlConv3d}
DC_MODULES = {1: dcgraph.DeepControl1d, 2: dcgraph.DeepControl2d, 3: dcgraph.DeepControl3d}


def _module_for(case, **extra):
    cls = CONV_MODULES[len(case.size)]
    m = cls(case.in_channels, case.out_channels, case.kernel, bias=case.bias, act=case.act,
            dtype=torch.float64, **case.conv_kwargs(), **extra)
    t = case.tensors(torch.float64)
    with torch.no_grad():
        for name in ("weight", "bias", "a", "g", "b"):
            if t[name] is not None:
                getattr(m, name).copy_(t[name])
    return m, t


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv_module_matches_reference(case):
    m, t = _module_for(case)
    expected = R.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"],
                                   act=case.act, **case.conv_kwargs())
    torch.testing.assert_close(m(t["x"]), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_deep_control_module_matches_reference(case):
    t = case.tensors(torch.float64)
    y = R.conv(t["x"], t["weight"], t["bias"], **case.conv_kwargs())
    m = DC_MODULES[len(case.size)](case.out_channels, act=case.act, dtype=torch.float64)
    with torch.no_grad():
        m.a.copy_(t["a"]), m.g.copy_(t["g"]), m.b.copy_(t["b"])
    torch.testing.assert_close(m(y), R.deep_control(y, t["a"], t["g"], t["b"], case.act),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes(padding_mode):
    case = CASES[3]  # stride 3, padding 2, kernel 5
    m, t = _module_for(case, padding_mode=padding_mode)
    expected = R.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"],
                                   act=case.act, padding_mode=padding_mode, **case.conv_kwargs())
    torch.testing.assert_close(m(t["x"]), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("kernel", "dilation"), [(3, 1), (4, 1), (3, 2), (2, 3)])
def test_padding_same_and_valid(kernel, dilation):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    for padding in ("same", "valid"):
        m = dcgraph.DeepControlConv2d(3, 4, kernel, padding=padding, dilation=dilation,
                                      act="relu", dtype=torch.float64)
        ref_conv = nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation, dtype=torch.float64)
        ref_conv.load_state_dict({"weight": m.weight, "bias": m.bias})
        expected = R.deep_control(ref_conv(x), m.a, m.g, m.b, "relu")
        torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
        if padding == "same":
            assert m(x).shape[2:] == x.shape[2:]


def test_looks_like_a_conv_layer():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    m = dcgraph.DeepControlConv2d(4, 8, 3, stride=2, padding=1, groups=2, act="relu6")
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias", "a", "g", "b"]
    assert m.weight.shape == conv.weight.shape and m.bias.shape == conv.bias.shape
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(m, attr) == getattr(conv, attr), attr
    assert (m.a == 1).all() and (m.g == 1).all() and (m.b == 0).all()
    assert "act='relu6'" in repr(m)


def test_learn_flags_freeze_parameters():
    m = dcgraph.DeepControlConv2d(3, 4, 3, learn_a=False, init_a=0.25, init_g=2.0, init_b=-1.0)
    assert not m.a.requires_grad and m.g.requires_grad and m.b.requires_grad
    assert (m.a == 0.25).all() and (m.g == 2.0).all() and (m.b == -1.0).all()
    m(torch.randn(2, 3, 6, 6)).sum().backward()
    assert m.a.grad is None and m.g.grad is not None
    dc = dcgraph.DeepControl2d(4, learn_g=False, learn_b=False)
    assert [n for n, p in dc.named_parameters() if p.requires_grad] == ["a"]
    assert "frozen=['g', 'b']" in repr(dc)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_train_and_eval_are_identical(act):
    torch.manual_seed(0)
    m = nn.Sequential(dcgraph.DeepControlConv2d(3, 6, 3, padding=1, act=act),
                      nn.Conv2d(6, 6, 3), dcgraph.DeepControl2d(6, act=act))
    x = torch.randn(4, 3, 8, 8)
    train_out = m.train()(x)
    eval_out = m.eval()(x)
    assert torch.equal(train_out, eval_out)


def test_batchnorm_is_not_identical_in_train_and_eval():
    """The contrast the previous test draws: BatchNorm's two modes differ."""
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    x = torch.randn(4, 3, 8, 8)
    assert not torch.allclose(m.train()(x), m.eval()(x))


def test_functional_matches_module():
    m = dcgraph.DeepControlConv2d(3, 4, 3, stride=2, padding=1, act="silu")
    x = torch.randn(2, 3, 9, 9)
    out = DF.conv_deep_control(x, m.weight, m.bias, m.a, m.g, m.b, 2, 1, act="silu")
    torch.testing.assert_close(out, m(x), rtol=0, atol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"act": "gelu"}, "unknown activation"),
    ({"groups": 3}, "divisible by groups"),
    ({"padding_mode": "mirror"}, "padding_mode"),
])
def test_module_construction_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dcgraph.DeepControlConv2d(4, 8, 3, **kwargs)


def test_wrong_input_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="expects a 4-d input"):
        dcgraph.DeepControlConv2d(3, 4, 3)(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="got 5 channels"):
        dcgraph.DeepControl2d(4)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="strided"):
        dcgraph.DeepControlConv2d(3, 4, 3, stride=2, padding="same")(torch.randn(1, 3, 8, 8))
