"""The residual-tail rules (``passes/fx/fuse_residual.py``, ``passes/onnx/fuse_residual.py``):
what they rewrite (counted), what they leave alone (with the reason), numerics against the
original model (torch) and in onnxruntime (ONNX)."""

import warnings

import torch
from torch import nn

from dcgraph import onnx_ops, onnx_tools, zoo
from dcgraph.nn import DeepControlConv2d
from dcgraph.onnx_export import export_onnx
from dcgraph.passes.export import rewrite_exported
from dcgraph.passes.fx import fuse, rewrite
from dcgraph.passes.onnx import rewrite_onnx
from dcgraph.passes.verify import verify

RULE = "fused+residual->fused"


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _blocks() -> nn.Module:
    torch.manual_seed(0)
    return zoo.randomize_norm_stats(nn.Sequential(zoo.BasicBlock(8, 16, 2), zoo.BasicBlock(16, 16),
                                                  zoo.BasicBlock(16, 16))).eval()


def test_basic_blocks_take_their_add_and_relu():
    model = _blocks()
    x = torch.randn(2, 8, 10, 10)
    fused, report = _quiet(rewrite, model, verify_inputs=[x])
    assert report.counts[RULE] == 3
    tails = [m for m in report.matches if m.rule == RULE]
    assert all(m.act == "relu" for m in tails)
    graph_ops = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert "add" not in " ".join(map(str, graph_ops))
    calls = [n for n in fused.graph.nodes if n.op == "call_module"
             and isinstance(fused.get_submodule(n.target), DeepControlConv2d)]
    assert sum(len(n.args) == 2 for n in calls) == 3  # (x, skip)
    verify(model, fused, [torch.randn(3, 8, 10, 10)], rtol=1e-5)
    _, report2 = fuse(fused)  # idempotent: nothing left to take
    assert RULE not in report2.counts


class _Cases(nn.Module):
    """Adds the rule must leave alone, and one without an activation after it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = DeepControlConv2d(4, 4, 3, padding=1)  # output used twice
        self.c2 = DeepControlConv2d(4, 4, 3, padding=1, act="relu")  # already has an activation
        self.c3 = DeepControlConv2d(4, 4, 3, padding=1)  # add with alpha
        self.c4 = DeepControlConv2d(4, 4, 3, padding=1)  # plain tail, no activation

    def forward(self, x):
        y1 = self.c1(x)
        h = y1 + x + y1.mean()
        h = self.c2(h) + x
        h = torch.add(self.c3(h), x, alpha=2.0)
        return self.c4(h) + h


def test_leaves_alone_what_it_must_and_says_why():
    model = _Cases().eval()
    fused, report = _quiet(fuse, model)
    assert report.counts == {RULE: 1}
    (match,) = report.matches
    assert match.act == "identity" and match.nodes[0] == "c4"
    assert any("already applies relu" in s.reason for s in report.skips)
    verify(model, fused, [torch.randn(2, 4, 6, 6)], rtol=1e-6)


def test_export_route_checks_the_residual_shape():
    """ATen graphs carry shapes: a residual that would broadcast the output up is refused."""

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, big):
            return torch.relu(self.bn(self.conv(x)) + big)

    model = zoo.randomize_norm_stats(Up()).eval()
    args = (torch.randn(1, 3, 6, 6), torch.randn(2, 4, 6, 6))
    new_ep, report = _quiet(rewrite_exported, torch.export.export(model, args), verify_result=True)
    assert RULE not in report.counts
    assert any("does not broadcast" in s.reason for s in report.skips)
    torch.testing.assert_close(new_ep.module()(*args), model(*args), rtol=1e-5, atol=1e-5)


def test_onnx_rule_counts_and_runs_in_onnxruntime():
    model = _blocks()
    x = torch.randn(2, 8, 10, 10)
    proto = export_onnx(model, x)
    out, report = rewrite_onnx(proto)
    assert report.counts[RULE] == 3
    nodes = [n.op_type for n in out.graph.node]
    assert nodes.count("DeepControlConvAdd") == 3 and "Add" not in nodes and "Relu" not in nodes
    onnx_ops.check(out)
    assert onnx_tools.compare(proto, out) <= 1e-5
    kept, report2 = rewrite_onnx(proto, residual=False)
    assert RULE not in report2.counts and [n.op_type for n in kept.graph.node].count("Add") == 3
