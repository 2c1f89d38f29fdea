"""The TVM kernels cross-compiled for aarch64 + NEON and run on the emulated ARM RPC server.

All shared cases (batch 1 and 4) go into one Relax module, one function per case: one
compile, one upload. Then whole models from the torch and the ONNX route.
"""

from __future__ import annotations

import pytest
import torch
import tvm
from tvm import relax

from dcgraph import zoo
from dcgraph.backends import tvm as dtvm
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.pipeline import relax_pipeline
from dcgraph.testing import live_mean
from tests.backends.tvm_cases import RTOL, batch_cases, case_module, relative_error

ARM = targets.resolve("arm")
CASES_B = batch_cases()


@pytest.fixture(scope="module")
def arm_cases(arm_remote, tmp_path_factory):
    """Every batch case compiled into one library, loaded on the ARM server."""
    from dcgraph.backends.tvm.remote import cross_compiler

    bb = relax.BlockBuilder()
    data = {}
    for i, case in enumerate(CASES_B):
        _, inputs, want = case_module(case, bb=bb, name=f"case{i}")
        data[case.name] = (f"case{i}", inputs, want)
    ex = tvm.compile(bb.get(), target=ARM, relax_pipeline=relax_pipeline(ARM))
    lib = tmp_path_factory.mktemp("arm") / "cases.so"
    ex.export_library(str(lib), fcompile=cross_compiler())
    arm_remote.upload(str(lib))
    vm = relax.VirtualMachine(arm_remote.load_module(lib.name), arm_remote.cpu())
    return vm, data


@pytest.mark.parametrize("case", CASES_B, ids=[c.name for c in CASES_B])
def test_kernel_on_arm_matches_reference(arm_cases, arm_remote, case):
    vm, data = arm_cases
    name, inputs, want = data[case.name]
    dev = arm_remote.cpu()
    got = vm[name](*[tvm.runtime.tensor(a, dev) for a in inputs]).numpy()
    assert got.shape == want.shape
    assert relative_error(got, want) < RTOL


@pytest.fixture(scope="module")
def resnet():
    """ResNet-18-like with the mean path live (a != 0 after conversion): a = 0 would hide a broken mean."""
    torch.manual_seed(0)
    model = live_mean(zoo.randomize_norm_stats(zoo.resnet18_like(width=8)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    return model, x, want


def test_resnet_onnx_route_on_arm(arm_remote, resnet):
    # (the torch route on ARM, and its mutation guard: test_whole_models.py)
    """torch (Deep Control modules) -> ONNX -> dcgraph's ONNX rules -> TVM's ONNX importer + dcgraph's
    converter."""
    from dcgraph.onnx_export import export_onnx

    model, x, want = resnet
    compiled = dtvm.compile(export_onnx(model, x), "arm", x)
    got = compiled.remote(arm_remote)(x)
    assert relative_error(got, want) < RTOL


def test_arm_code_does_not_run_here(resnet):
    model, x, _ = resnet
    compiled = dtvm.compile(model, "arm", x, convert=True)
    with pytest.raises(dtvm.CompileError, match="does not run on this machine"):
        compiled(x)
