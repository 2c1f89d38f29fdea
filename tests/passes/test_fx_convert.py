"""The conv + norm -> Deep Control rule on torch.fx graphs (module and functional forms)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcgraph import reference as R
from dcgraph import zoo
from dcgraph.nn import DeepControl1d, DeepControl2d, DeepControl3d
from dcgraph.passes import verify
from dcgraph.passes.fx import ApproximateConversionWarning, convert, rewrite

# conv + norm pairs, counted by hand from each architecture
PAIRS = {"resnet18": 20, "mobilenet_v2": 16, "efficientnet": 11, "vgg": 6, "two_users": 1}


def _model(name):
    factory, shape = zoo.MODELS[name]
    return zoo.randomize_norm_stats(factory()).eval(), torch.randn(2, *shape[1:])


@pytest.mark.parametrize("name", list(PAIRS))
def test_zoo_preserve_is_exact(name):
    model, x = _model(name)
    converted, report = convert(model)
    assert report.counts == {"conv+batchnorm->deep_control": PAIRS[name]}
    assert report.exact
    assert verify(model, converted, [x], rtol=1e-5) <= 1e-5
    # and in float64, where a wrong rewrite cannot hide behind float32 rounding
    model64 = model.double()
    converted64, _ = convert(model64)
    assert verify(model64, converted64, [x.double()], rtol=1e-10) <= 1e-10
    dcs = [m for m in converted.modules() if isinstance(m, DeepControl2d)]
    assert len(dcs) == PAIRS[name] and all((m.a == 0).all() for m in dcs)


def test_input_model_is_not_modified():
    model, _x = _model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_negative_cases_are_left_alone_and_reported():
    model, x = _model("two_users")
    converted, report = convert(model)
    reasons = {s.node: s.reason for s in report.skips}
    assert "2 users" in reasons["bn1"]
    assert "does not follow a convolution" in reasons["bn3"]
    kinds = [type(m).__name__ for m in converted.modules()]
    assert kinds.count("BatchNorm2d") == 2  # bn1 and bn3 stay
    verify(model, converted, [x])


def test_conv_subclass_is_traced_through_and_transposed_conv_skipped():
    class SameConv(nn.Conv2d):  # like timm's Conv2dSame: pads in its own forward
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    model = zoo.randomize_norm_stats(nn.Sequential(
        SameConv(3, 4, 3), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4))).eval()
    converted, report = convert(model)
    # fx traces into the subclass: F.pad, then the functional conv, which converts exactly
    assert [m.kind for m in report.matches] == ["batchnorm"]
    assert [s.reason for s in report.skips] == ["batchnorm does not follow a convolution"]
    verify(model, converted, [torch.randn(2, 3, 8, 8)], rtol=1e-5)


@pytest.mark.parametrize(("conv", "norm", "dc", "shape"), [
    (nn.Conv1d(3, 4, 3, bias=True), nn.BatchNorm1d(4), DeepControl1d, (2, 3, 11)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1, bias=True), nn.BatchNorm2d(4), DeepControl2d,
     (2, 3, 9, 9)),
    (nn.Conv3d(2, 4, 3, padding=1, bias=True), nn.BatchNorm3d(4), DeepControl3d, (1, 2, 4, 5, 5)),
])
def test_conv_bias_folds_and_all_dims(conv, norm, dc, shape):
    model = zoo.randomize_norm_stats(nn.Sequential(conv, norm, nn.ReLU())).eval()
    converted, report = convert(model)
    assert report.counts == {"conv+batchnorm->deep_control": 1}
    assert converted.get_submodule("0").bias is None  # folded into b
    assert isinstance(converted.get_submodule("1"), dc)
    assert converted.get_submodule("1").act == "relu"
    verify(model, converted, [torch.randn(*shape)], rtol=1e-5)


def test_fresh_init_is_the_papers_start():
    model, _ = _model("vgg")
    converted, report = convert(model, "fresh")
    assert not report.exact and all(m.init == "fresh" for m in report.matches)
    bn = model.bns[0]
    dc = converted.get_submodule("bns.0")
    torch.testing.assert_close(dc.a, torch.ones(bn.num_features))
    torch.testing.assert_close(dc.g, bn.weight.detach())
    torch.testing.assert_close(dc.b, bn.bias.detach())


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d(4, affine=True), nn.GroupNorm(2, 4)])
def test_instance_and_group_norm_are_flagged_approximate(norm):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), norm, nn.SiLU()).eval()
    with pytest.warns(ApproximateConversionWarning, match="per-sample"):
        converted, report = convert(model)
    (match,) = report.matches
    assert not match.exact and "approximate" in match.note and match.act == "silu"
    x = torch.randn(2, 3, 8, 8)
    # what the rewritten model computes is Deep Control with a = 1, g = gamma, b = beta
    w = model[0].weight
    gamma, beta = model[1].weight.detach(), model[1].bias.detach()
    expected = R.conv_deep_control(x, w, None, torch.ones(4), gamma, beta, act="silu")
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_in_training_mode_uses_running_statistics():
    model, x = _model("resnet18")
    model.train()
    converted, report = convert(model)
    assert report.exact and all("training mode" in m.note for m in report.matches)
    verify(model, converted, [x])  # compares the eval-mode outputs


def test_batchnorm_without_running_stats_is_approximate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.warns(ApproximateConversionWarning, match="batch std"):
        _, report = convert(model)
    assert not report.exact


def test_shared_norm_module_is_not_replaced_for_its_other_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.bn(y + 1.0)  # the same BatchNorm again, not after a conv

    model = zoo.randomize_norm_stats(Shared()).eval()
    converted, report = convert(model)
    assert report.counts == {"conv+batchnorm->deep_control": 1}
    verify(model, converted, [torch.randn(2, 3, 6, 6)])


def test_idempotent():
    model, _x = _model("mobilenet_v2")
    once, _ = rewrite(model)
    twice, report = rewrite(once)
    assert not report.matches and not report.skips
    assert str(once.graph) == str(twice.graph)


def test_report_prints_and_serialises():
    model, _ = _model("two_users")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = rewrite(model)
    text = str(report)
    assert "conv+batchnorm->deep_control" in text and "skipped:" in text and "2 users" in text
    d = report.to_dict()
    assert d["counts"]["conv+deep_control->fused"] == 1 and len(d["skips"]) == 2
