"""One table of Deep Control spellings (:data:`dcgraph.testing.DC_FORMS`), matched in all three IRs.

Each spelling, after a conv and before a relu, must be fused exactly once by the torch.fx rule,
by the ONNX rules (on what the exporter emits) and by the Relax plain-ops fusion (on what
``torch.export`` emits), and each rewritten model must compute what the original computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dcgraph.passes import verify
from dcgraph.passes.fx import fuse
from dcgraph.testing import DC_FORMS, PlainDeepControl, relative_error

FORMS = sorted(DC_FORMS)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("form", FORMS)
def test_fx_rule_fuses_every_form(form):
    model = PlainDeepControl(form).eval()
    fused, report = fuse(model)
    assert report.counts == {"conv+deep_control->fused": 1}, str(report)
    assert report.matches[0].act == "relu"
    verify(model, fused, [_x()], rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_onnx_rules_fuse_every_form(form):
    pytest.importorskip("onnxruntime")
    from dcgraph.onnx_export import export_onnx
    from dcgraph.onnx_tools import run
    from dcgraph.passes.onnx import rewrite_onnx

    model, x = PlainDeepControl(form).eval(), _x()
    exported = export_onnx(model, x)
    out, report = rewrite_onnx(exported)
    assert [n.op_type for n in out.graph.node].count("DeepControlConv") == 1, str(report)
    assert report.matches[0].kind == "plain_ops" and report.matches[0].act == "relu"
    name = out.graph.input[0].name
    got = run(out, {name: x.numpy()})[0]
    with torch.no_grad():
        assert relative_error(got, model(x).numpy()) < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_relax_fusion_fuses_every_form(form):
    pytest.importorskip("tvm")
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from dcgraph.backends.tvm import fuse_plain, targets
    from dcgraph.backends.tvm.pipeline import relax_pipeline

    model, x = PlainDeepControl(form).eval(), _x()
    with torch.no_grad():
        mod = from_exported_program(torch.export.export(model, (x,)))
    fused, count = fuse_plain.fuse_plain_deep_control(mod)
    assert count == 1
    (match,) = fuse_plain.find_plain_deep_control(relax.transform.FoldConstant()(mod)["main"])
    assert match.act == "relu"
    target = targets.resolve("x86")
    ex = tvm.compile(fused, target=target, relax_pipeline=relax_pipeline(target))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    with torch.no_grad():
        assert relative_error(np.asarray(got), model(x).numpy()) < 1e-5
