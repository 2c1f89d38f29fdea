"""The custom op through torch.export (dynamic batch, save/load) and torch.compile."""

import torch
from torch import nn

import dcgraph
from dcgraph import reference as R


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        dcgraph.DeepControlConv2d(3, 8, 3, stride=2, padding=1, act="relu"),
        dcgraph.DeepControlConv2d(8, 8, 3, padding=1, groups=8, act="relu6"),
        dcgraph.DeepControlConv2d(8, 4, 1, act="silu"),
    )


def _reference(net, x):
    for m in net:
        x = R.conv_deep_control(x, m.weight, m.bias, m.a, m.g, m.b, m.stride, m.padding,
                                m.dilation, m.groups, m.act)
    return x


def test_export_dynamic_batch_save_and_load(tmp_path):
    net = _net().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dcgraph.conv_deep_control.default) == 3
    path = tmp_path / "net.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    for n in (1, 5):
        x = torch.randn(n, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(x), _reference(net, x), rtol=1e-4, atol=1e-4)


def test_export_of_training_graph_has_the_op_and_differentiates():
    net = _net()
    ep = torch.export.export(net, (torch.randn(2, 3, 8, 8),))
    gm = ep.module()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    gm(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    _reference(net, x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


def test_torch_compile_forward_and_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    net = _net()
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = _reference(net, x2)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


def test_export_under_no_grad_still_records_the_op():
    """The eager no-grad shortcut must never hide the op from a tracer."""
    net = _net().eval()
    with torch.no_grad():
        ep = torch.export.export(net, (torch.randn(2, 3, 8, 8),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dcgraph.conv_deep_control.default) == 3


def test_eager_no_grad_matches_reference():
    net = _net()
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _reference(net, x), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), _reference(net, x), rtol=1e-4, atol=1e-4)


def test_fx_symbolic_trace_keeps_one_node_per_module():
    net = nn.Sequential(_net(), nn.Conv2d(4, 4, 1), dcgraph.DeepControl2d(4, act="relu"))
    gm = torch.fx.symbolic_trace(net)
    calls = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    assert calls == ["conv_deep_control"] * 3 + ["deep_control"]
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)
