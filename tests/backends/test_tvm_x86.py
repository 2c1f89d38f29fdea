"""The TVM kernels on x86, compiled and run here, against the reference on the shared cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from dcgraph.backends.tvm import kernels_blocked as kb
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.pipeline import kernel_report, optimize, relax_pipeline
from dcgraph.backends.tvm.schedules.cpu import vector_lanes
from dcgraph.testing import CASES
from tests.backends.tvm_cases import RTOL, batch_cases, case_module, relative_error

TARGET = targets.resolve("x86")
CASES_B = batch_cases()


def run(mod: tvm.IRModule, inputs: list[np.ndarray], layout: str = "auto") -> np.ndarray:
    ex = tvm.compile(mod, target=TARGET, relax_pipeline=relax_pipeline(TARGET, layout=layout))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in inputs]).numpy()


@pytest.mark.parametrize("case", CASES_B, ids=[c.name for c in CASES_B])
def test_hoisted_kernel_matches_reference(case):
    """The default layout (blocked ``NCHW[x]c`` for 2-d convs on x86)."""
    mod, inputs, want = case_module(case, "hoisted")
    got = run(mod, inputs)
    assert got.shape == want.shape
    assert relative_error(got, want) < RTOL


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hoisted_nchw_kernel_matches_reference(case):
    """``layout="nchw"``: the plain kernels (what 1-d/3-d and grouped convs always get)."""
    mod, inputs, want = case_module(case, "hoisted")
    assert relative_error(run(mod, inputs, layout="nchw"), want) < RTOL


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("layout", ["auto", "nchw"])
def test_two_pass_kernel_matches_reference(case, layout):
    mod, inputs, want = case_module(case, "two_pass")
    assert relative_error(run(mod, inputs, layout), want) < RTOL


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_fused_kernel_gets_the_default_schedule(case):
    mod, _, _ = case_module(case, "hoisted")
    report = {k.name: k for k in kernel_report(optimize(mod, TARGET, layout="nchw"))}
    assert set(report) == {"dc_shift", "dc_conv"}
    assert report["dc_conv"].schedule == "default"
    assert all(k.origin == "dcgraph" for k in report.values())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_blocked_kernel_gets_a_default_schedule(case):
    """Blocked: the conv, its shift, the layout changes at the edges and the weight packing (the
    weight is an input here; a constant one is packed at compile time) are all scheduled."""
    mod, _, _ = case_module(case, "hoisted")
    report = {k.name: k for k in kernel_report(optimize(mod, TARGET))}
    depthwise = case.groups == case.in_channels == case.out_channels
    blocked = len(case.kernel) == 2 and (case.groups == 1 or depthwise)
    if not blocked:
        assert set(report) == {"dc_shift", "dc_conv"}
        return
    kinds = {name.rstrip("0123456789") for name in report}
    assert {"dc_shift", "dc_conv"} <= kinds
    # a layout change with a channel block of 1 moves no data: the input's is a view (no kernel);
    # the one that writes the function's output stays a copy
    lanes = vector_lanes(TARGET)
    assert ("to_blocked" in kinds) == (kb.blocking(case.in_channels, lanes)[1] > 1), sorted(kinds)
    if kb.blocking(case.out_channels, lanes)[1] > 1:
        assert "from_blocked" in kinds, sorted(kinds)
    assert {k.name: k.schedule for k in report.values()} == {k: "default" for k in report}


def test_conv_schedule_also_applies_to_tvm_legalized_conv():
    """The unfused baseline (TVM's own conv2d + fusion) gets the same conv schedule."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 14, 14), "float32"))
    w = relax.Var("w", relax.TensorType((16, 8, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1)))
            gv = bb.emit_output(y)
        bb.emit_func_output(gv)
    opt = optimize(bb.get(), TARGET)
    (conv,) = [k for k in kernel_report(opt) if "conv2d" in k.name]
    assert conv.schedule == "default"
    xs = np.random.default_rng(0).standard_normal((1, 8, 14, 14)).astype("float32")
    ws = np.random.default_rng(1).standard_normal((16, 8, 3, 3)).astype("float32")
    got = run(bb.get(), [xs, ws])
    want = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(xs).double(),
                                                 torch.from_numpy(ws).double(), padding=1)).numpy()
    assert relative_error(got, want) < RTOL
