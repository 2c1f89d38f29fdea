"""The passes on torch.export programs (ATen level), and the rewritten models through
torch.export save/load and torch.compile."""

import torch

from dcgraph import zoo
from dcgraph.passes import verify
from dcgraph.passes.export import rewrite_exported
from dcgraph.passes.fx import rewrite

OP = torch.ops.dcgraph.conv_deep_control.default


def _ops(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def test_rewrite_exported_resnet_dynamic_batch_save_load(tmp_path):
    model = zoo.randomize_norm_stats(zoo.resnet18_like()).eval()
    batch = torch.export.Dim("batch", min=1, max=32)
    ep = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    assert torch.ops.aten.batch_norm.default in _ops(ep)
    new_ep, report = rewrite_exported(ep, dynamic_shapes=({0: batch},), verify_result=True)
    assert report.counts == {"conv+batchnorm->deep_control": 20, "conv+deep_control->fused": 20,
                             "fused+residual->fused": 8}  # ResNet-18's 8 basic blocks
    targets = _ops(new_ep)
    assert targets.count(OP) == 20 and torch.ops.aten.batch_norm.default not in targets
    path = tmp_path / "resnet_dc.pt2"
    torch.export.save(new_ep, path)
    loaded = torch.export.load(path)
    for n in (1, 5):
        x = torch.randn(n, 3, 64, 64)
        verify(model, loaded.module(), [x], rtol=1e-5)


def test_rewrite_exported_plain_ops_and_idempotent():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.a = torch.nn.Parameter(torch.rand(4, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(2.0 * (y - self.a * y.mean((2, 3), keepdim=True)) + 1.0)

    model = M()
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    new_ep, report = rewrite_exported(ep, verify_result=True)
    assert report.counts == {"conv+deep_control->fused": 1} and report.matches[0].act == "relu"
    again, report2 = rewrite_exported(new_ep)
    assert not report2.matches and _ops(again).count(OP) == 1


def test_rewritten_model_export_and_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = zoo.randomize_norm_stats(zoo.mobilenet_v2_like()).eval()
    fused, _ = rewrite(model)
    x = torch.randn(2, 3, 64, 64)
    ep = torch.export.export(fused, (x,))
    assert _ops(ep).count(OP) == 16
    compiled = torch.compile(fused)
    with torch.no_grad():
        verify(model, compiled, [x], rtol=1e-4)
