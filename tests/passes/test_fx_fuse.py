"""The conv + Deep Control [+ act] -> fused op rule: module, functional and plain-op forms."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcgraph
from dcgraph import zoo
from dcgraph.nn import DeepControlConv2d
from dcgraph.passes import verify
from dcgraph.passes.fx import convert, fuse, rewrite


def _params(c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(0.5 + torch.rand(c, 1, 1, generator=gen)) for _ in range(3)]


class PlainDC(nn.Module):
    """Deep Control written out as plain ops, in one of the orders people write it."""

    def __init__(self, order: str, act=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=True)
        self.a, self.g, self.b = _params(6)
        self.order, self.act = order, act

    def forward(self, x):
        y = self.conv(x)
        a, g, b = self.a, self.g, self.b
        if self.order == "g(y-am)+b":
            z = g * (y - a * y.mean(dim=(2, 3), keepdim=True)) + b
        elif self.order == "(y-ma)g+b":
            m = torch.mean(y, [-2, -1], keepdim=True)
            z = (y - m * a) * g + b
        elif self.order == "b+gy-gam":
            z = b + g * y - (g * a) * y.mean((2, 3), keepdim=True)
        elif self.order == "centre-then-scale":
            d = y - y.mean(dim=(-1, -2), keepdim=True)
            z = torch.add(torch.mul(d + (1 - a) * y.mean((2, 3), keepdim=True), g), b)
        elif self.order == "divide":
            z = (y - a * y.mean((2, 3), keepdim=True)) / (1.0 / g) + b
        return z if self.act is None else self.act(z)


ORDERS = ["g(y-am)+b", "(y-ma)g+b", "b+gy-gam", "centre-then-scale", "divide"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("act", [None, nn.ReLU(), F.relu6, torch.nn.functional.silu])
def test_plain_ops_in_any_order(order, act):
    model = PlainDC(order, act).eval()
    fused, report = fuse(model)
    assert report.counts == {"conv+deep_control->fused": 1}, str(report)
    (m,) = report.matches
    assert m.kind == "plain_ops"
    assert m.act == {None: "identity"}.get(act, m.act) and (act is None) == (m.act == "identity")
    assert [type(x).__name__ for x in fused.children()] == ["DeepControlConv2d"]
    verify(model, fused, [torch.randn(2, 3, 7, 8)], rtol=1e-5)


def test_mean_used_elsewhere_is_not_fused():
    class Leak(PlainDC):
        def forward(self, x):
            y = self.conv(x)
            m = y.mean((2, 3), keepdim=True)
            return self.g * (y - self.a * m) + self.b, m

    _fused, report = fuse(Leak("g(y-am)+b"))
    assert not report.matches
    assert "outside the Deep Control subgraph" in report.skips[0].reason


def test_not_affine_is_not_fused():
    class Square(PlainDC):
        def forward(self, x):
            y = self.conv(x)
            return (y - y.mean((2, 3), keepdim=True)) * y

    _, report = fuse(Square("g(y-am)+b"))
    assert not report.matches and "multiplies two non-constant" in report.skips[0].reason


def test_module_and_function_forms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), dcgraph.DeepControl2d(4, act="relu6", learn_a=False),
                          nn.Conv2d(4, 4, 1, bias=False), dcgraph.DeepControl2d(4), nn.Hardswish())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dcgraph.DeepControl2d):
                m.a.uniform_(0, 1), m.g.uniform_(0.5, 1.5), m.b.normal_()
    fused, report = fuse(model)
    assert [m.act for m in report.matches] == ["relu6", "hardswish"]
    assert all(isinstance(m, DeepControlConv2d) for m in fused.children())
    assert not fused.get_submodule("0").a.requires_grad  # the learn flags carry over
    verify(model, fused, [torch.randn(2, 3, 9, 9)], rtol=1e-5)
    traced = torch.fx.symbolic_trace(model)  # plain symbolic_trace: deep_control call_functions
    fused2, report2 = fuse(traced)
    assert report2.counts == {"conv+deep_control->fused": 2}
    verify(model, fused2, [torch.randn(2, 3, 9, 9)], rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet", "vgg"])
def test_zoo_fused_matches_converted(name):
    factory, shape = zoo.MODELS[name]
    model = zoo.randomize_norm_stats(factory()).eval()
    x = torch.randn(2, *shape[1:])
    converted, _ = convert(model)
    fused, report = fuse(converted, residual=False)
    n = sum(isinstance(m, dcgraph.DeepControl2d) for m in converted.modules())
    assert report.counts == {"conv+deep_control->fused": n}
    verify(converted, fused, [x], rtol=1e-5)
    verify(model, fused, [x], rtol=1e-5)


def test_fresh_rewrite_trains_at_batch_size_one():
    torch.manual_seed(0)
    model, _ = rewrite(zoo.resnet18_like(width=8), "fresh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(1, 3, 32, 32), torch.tensor([3])
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model.train()(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
