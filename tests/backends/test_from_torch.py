"""The torch route's converter (``frontends/from_torch.py``) on the shared cases: a program holding
one ``dcgraph::conv_deep_control`` call, imported into Relax, built for x86 and run, against
:func:`dcgraph.reference.conv_deep_control` (float32 vs the float64 oracle), both plans: the same
matrix the ONNX route's converter is tested on (``test_from_onnx.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from dcgraph import ops  # noqa: E402, F401  (registers torch.ops.dcgraph.conv_deep_control)
from dcgraph import reference as R  # noqa: E402
from dcgraph.backends.tvm import lowering, targets  # noqa: E402
from dcgraph.backends.tvm.frontends.from_torch import from_torch  # noqa: E402
from dcgraph.backends.tvm.pipeline import relax_pipeline  # noqa: E402
from dcgraph.testing import CASE_IDS, CASES, ConvCase, relative_error  # noqa: E402

TARGET = targets.resolve("x86")
RTOL = 1e-4


class OneOp(nn.Module):
    """``x -> dcgraph::conv_deep_control(x, W, [c0], a, g, b, ...)`` with the case's parameters."""

    def __init__(self, case: ConvCase, t: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.case = case
        for k in ("weight", "bias", "a", "g", "b"):
            if t[k] is not None:
                self.register_buffer(k, t[k].float())
        self.has_bias = t["bias"] is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.case
        return torch.ops.dcgraph.conv_deep_control(
            x, self.weight, self.bias if self.has_bias else None, self.a, self.g, self.b, list(c.stride),
            list(c.padding), list(c.dilation), c.groups, c.act, 0.01)


def _program(case: ConvCase):
    t = case.tensors(torch.float64)
    with torch.no_grad():
        program = torch.export.export(OneOp(case, t).eval(), (t["x"].float(),))
    want = R.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"], act=case.act,
                               **case.conv_kwargs())
    return program, t["x"].float().numpy(), want


def _kernels(mod: tvm.IRModule) -> list[str]:
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


@pytest.mark.parametrize("plan", ["hoisted", "two_pass"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv_cases_match_reference(case, plan):
    program, x, want = _program(case)
    with lowering.options(plan=plan):
        mod = from_torch(program)
    kernels = _kernels(mod)
    expected = ["dc_conv", "dc_shift"] if plan == "hoisted" else ["dc_conv_raw", "dc_two_pass"]
    assert kernels == expected, kernels
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=relax_pipeline(TARGET))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    assert relative_error(got, want) <= RTOL


class PoolHead(nn.Module):
    """Conv + BatchNorm (converted to Deep Control: a blocked kernel), SiLU, global average pool
    and classifier: the undecomposed import keeps ``nn.silu`` and ``adaptive_avg_pool2d``
    (decomposed: ``sigmoid * x`` and ``mean``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the second silu is a standalone op (the first is fused into the Deep Control kernel)
        return self.fc(torch.flatten(self.act(self.pool(self.act(self.bn(self.conv(x))))), 1))


def _run_pool_head():
    from dcgraph.backends.tvm import compiler

    torch.manual_seed(0)
    model, x = PoolHead().eval(), torch.randn(2, 3, 9, 9) * 4
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    compiled = compiler.compile(model, "x86", x)
    with torch.no_grad():
        want = model.double()(x.double()).numpy()
    return compiled, relative_error(compiled(x).numpy(), want)


def test_undecomposed_import_keeps_silu_fast_and_the_pool_blocked():
    """The shortcut (no torch decompositions) must not cost speed: ``nn.silu`` is legalized with
    :func:`fast_math.fast_silu` (no scalar ``expf`` call) and the global pool stays in the
    blocked layout (a mean, no ``from_blocked`` + NCHW pool)."""
    import re

    compiled, err = _run_pool_head()
    assert err <= RTOL
    names = [k.name for k in compiled.kernels]
    assert any("mean" in n for n in names) and not any("adaptive_avg_pool" in n for n in names), names
    assert any("silu" in n for n in names), names
    asm = compiled.executable.mod.imports[0].inspect_source("asm")
    assert re.findall(r"call\w*\s+\w*exp\w*", asm) == []


def test_import_falls_back_to_decomposed_programs(monkeypatch):
    """An undecomposed program TVM cannot convert is imported again with torch's decompositions
    (here the shortcut is made to fail): the same numbers come out."""
    from dcgraph.backends.tvm.frontends import from_torch as ft

    real, calls = ft._import, []

    def shortcut_fails(program, decompose):
        calls.append(decompose)
        if not decompose:
            raise AssertionError("an op only its decomposition converts")
        return real(program, decompose)

    monkeypatch.setattr(ft, "_import", shortcut_fails)
    _, err = _run_pool_head()
    assert calls == [False, True]
    assert err <= RTOL
