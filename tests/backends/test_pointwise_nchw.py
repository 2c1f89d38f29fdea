"""The NCHW pointwise kernels (``kernels_pointwise``): a 1x1 stride-1 conv between NCHW values runs
as a GEMM over its pixels, with no layout change, and matches the reference; where blocked
kernels read its output, or its map is not a whole number of vectors, the blocked conv stays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from dcgraph.backends.tvm import layout as layout_pass
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.frontends import prepare
from dcgraph.backends.tvm.layout import block_layout, blocked_kernels
from dcgraph.backends.tvm.pipeline import fuse, relax_pipeline
from dcgraph.backends.tvm.schedules import knob_space, traced_candidate
from dcgraph.backends.tvm.schedules.cpu import cpu_features
from dcgraph.backends.tvm.tuning import extract_tasks
from dcgraph.backends.tvm.tuning.measure import fixed_inputs, mismatch, reference_outputs
from dcgraph.backends.tvm.tuning.tools import tuning_target
from dcgraph.nn import DeepControlConv2d
from dcgraph.testing import ConvCase
from tests.backends.tvm_cases import RTOL, case_module, relative_error

HOST = targets.resolve("x86")
FEATURES = cpu_features(HOST)
FAMILIES = [
    pytest.param("skylake-avx512", marks=pytest.mark.skipif("avx512f" not in FEATURES, reason="no AVX-512")),
    pytest.param("haswell", marks=pytest.mark.skipif("avx2" not in FEATURES, reason="no AVX2")),
]

# maps of 16k pixels (whole 8- and 16-lane vectors); channel counts a 4-channel tile does not
# divide (9, 20); a conv bias; batch 1 and 3; every activation form the epilogue takes
CASES = [
    ConvCase("b1_silu", 1, 40, 24, (4, 8), (1, 1), act="silu"),
    ConvCase("b3_leaky_odd", 3, 7, 9, (4, 4), (1, 1), act="leaky_relu"),
    ConvCase("b2_relu6_bias", 2, 24, 20, (8, 6), (1, 1), bias=True, act="relu6"),
    ConvCase("b2_identity", 2, 32, 16, (2, 16), (1, 1), act="identity"),
]


def _run(mod: tvm.IRModule, target: tvm.target.Target, inputs: list[np.ndarray]) -> np.ndarray:
    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in inputs]
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*args).numpy()


@pytest.mark.parametrize("mcpu", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pointwise_blocks_run_nchw_and_match_the_reference(case, mcpu):
    target = targets.resolve({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    lanes = 16 if mcpu == "skylake-avx512" else 8
    for plan in ("hoisted", "two_pass"):
        mod, inputs, want = case_module(case, plan)
        names = blocked_kernels(block_layout(mod, lanes))
        assert not any(n.startswith(("to_blocked", "from_blocked")) for n in names), (plan, names)
        assert relative_error(_run(mod, target, inputs), want) < RTOL, plan


def test_the_nchw_path_computes_what_the_blocked_one_does(monkeypatch):
    case = CASES[2]
    mod, inputs, _ = case_module(case, "hoisted")
    got = _run(mod, HOST, inputs)
    monkeypatch.setattr(layout_pass, "NCHW_EDGES", False)
    names = blocked_kernels(block_layout(mod, 8))
    assert any(n.startswith("to_blocked") for n in names)
    np.testing.assert_allclose(got, _run(mod, HOST, inputs), rtol=1e-5, atol=1e-5)


def test_a_map_of_partial_vectors_stays_blocked():
    case = ConvCase("odd_map", 1, 16, 16, (9, 9), (1, 1), act="relu")  # 81 pixels
    mod, inputs, want = case_module(case, "hoisted")
    assert any(n.startswith("to_blocked") for n in blocked_kernels(block_layout(mod, 8)))
    assert relative_error(_run(mod, HOST, inputs), want) < RTOL


class _ExpandThenConv(torch.nn.Module):
    """A 1x1 conv on the input whose output a 3x3 Deep Control conv reads, then a 1x1 projection
    whose input is blocked (the 3x3's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = DeepControlConv2d(8, 32, 1, act="relu")
        self.conv = DeepControlConv2d(32, 32, 3, padding=1, act="relu")
        self.project = DeepControlConv2d(32, 16, 1, act="identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.conv(self.expand(x)))


def test_a_pointwise_conv_read_by_blocked_kernels_changes_the_input_layout_instead():
    torch.manual_seed(0)
    model = _ExpandThenConv().eval()
    with torch.no_grad():
        for m in (model.expand, model.conv, model.project):
            m.a.uniform_(0.5, 1.5), m.g.uniform_(0.5, 1.5), m.b.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 8, 8)
    mod = prepare(model, x)
    blocked = block_layout(mod, 8)
    names = blocked_kernels(blocked)
    assert sum(n.startswith("to_blocked") for n in names) == 1  # the model's input, once
    assert sum(n.startswith("from_blocked") for n in names) == 1  # its output, once
    nchw = [gv.name_hint for gv, f in blocked.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and str((f.attrs or {}).get("dcgraph.layout")) == "nchw"]
    # only the expand's shift, reading the input as it is
    assert len(nchw) == 1 and nchw[0].startswith("dc_shift"), nchw
    with torch.no_grad():
        want = model(x).numpy()
    assert relative_error(_run(mod, HOST, [x.numpy()]), want) < RTOL


def test_every_point_of_the_pointwise_space_computes_what_the_unscheduled_kernel_does():
    mod, _, _ = case_module(CASES[0], "hoisted")
    target = tuning_target(HOST, 2)
    tasks = [t for t in extract_tasks(fuse(mod, HOST, "auto", True), target)
             if knob_space(t.mod, target)[0] == "pointwise"]
    assert len(tasks) == 1
    task = tasks[0]
    _, points = knob_space(task.mod, target)
    assert len(points) >= 3 and points[0]["oc_tile"] == 4
    args = [a.as_json() for a in tvm.s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(task.mod["main"])]
    arrays = fixed_inputs(args)
    want = reference_outputs(task, arrays)
    for values in points:
        lib = tvm.tirx.build(traced_candidate(task.mod, target, values).mod, target=target)
        tensors = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
        lib["main"](*tensors)
        assert mismatch([t.numpy() for t in tensors], want) is None, values
