"""The residual tail through TVM: ``ai.dcgraph.DeepControlConvAdd`` (ONNX) and the torch op
with ``skip`` (torch.export) against the reference, on the shared cases; the tail's add and
activation land in the conv kernel's epilogue, as the unfused add and relu did."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from dcgraph import onnx_ops, onnx_tools, zoo  # noqa: E402
from dcgraph import reference as R  # noqa: E402
from dcgraph.backends.tvm.frontends.from_onnx import OnnxFrontendError, from_onnx  # noqa: E402
from dcgraph.backends.tvm.pipeline import relax_pipeline  # noqa: E402
from dcgraph.testing import CASE_IDS, CASES  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}


def _host_family() -> str:
    with open("/proc/cpuinfo") as f:
        return "avx512" if "avx512f" in f.read() else "avx2"

ALPHA = 0.1
TARGETS = {"avx512": {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2},
           "avx2": {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}}


def _skip_shape(case) -> list[int]:
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
           zip(case.size, case.kernel, case.stride, case.padding, case.dilation, strict=True)]
    return [case.batch, case.out_channels, *out]


def _add_model(case, t: dict, act: str) -> onnx.ModelProto:
    inits = {"W": t["weight"].numpy(), "A": t["a"].numpy(), "G": t["g"].numpy(), "Bo": t["b"].numpy()}
    if t["bias"] is not None:
        inits["B"] = t["bias"].numpy()
    node = h.make_node("DeepControlConvAdd", ["x", "W", "B" if "B" in inits else "", "A", "G", "Bo", "skip"],
                       ["z"], domain=onnx_ops.DOMAIN, name="tail", strides=list(case.stride),
                       pads=list(case.padding) * 2, dilations=list(case.dilation), group=case.groups,
                       activation=act, alpha=ALPHA)
    shape = _skip_shape(case)
    inputs = [h.make_tensor_value_info("x", TensorProto.FLOAT, [case.batch, case.in_channels, *case.size]),
              h.make_tensor_value_info("skip", TensorProto.FLOAT, shape)]
    out = h.make_tensor_value_info("z", TensorProto.FLOAT, shape)
    graph = h.make_graph([node], "g", inputs, [out],
                         initializer=[nh.from_array(v, k) for k, v in inits.items()])
    return onnx_ops.attach_functions(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))


def _run(mod, target: dict, *arrays: np.ndarray) -> np.ndarray:
    target = tvm.target.Target(target)
    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a, tvm.cpu()) for a in arrays)).numpy()


@pytest.mark.parametrize("case", CASES[:12], ids=CASE_IDS[:12])
def test_deep_control_conv_add_matches_reference_in_tvm_and_onnxruntime(case):
    t = case.tensors(torch.float32)
    skip = torch.randn(_skip_shape(case))
    d = {k: (v.double() if v is not None else None) for k, v in t.items()}
    ref = R.conv_deep_control(d["x"], d["weight"], d["bias"], d["a"], d["g"], d["b"], act=case.act,
                              negative_slope=ALPHA, skip=skip.double(), **case.conv_kwargs()).numpy()
    model = _add_model(case, t, case.act)
    onnx_ops.check(model)
    got_ort = onnx_tools.run(model, {"x": t["x"].numpy(), "skip": skip.numpy()})[0]
    np.testing.assert_allclose(got_ort, ref, **TOL)
    got = _run(from_onnx(model), TARGETS[_host_family()], t["x"].numpy(), skip.numpy())
    np.testing.assert_allclose(got, ref, **TOL)


def test_skip_of_a_higher_rank_is_refused():
    case = CASES[0]
    model = _add_model(case, case.tensors(), "relu")
    skip = h.make_tensor_value_info("skip", TensorProto.FLOAT, [1, *_skip_shape(case)])
    model.graph.input[1].CopyFrom(skip)
    with pytest.raises(OnnxFrontendError, match="Skip has rank 5"):
        from_onnx(model)


@pytest.mark.parametrize("family", ["avx512", "avx2"])
def test_resnet_blocks_rewritten_with_tails_compile_and_match(family):
    """torch route: BasicBlocks rewritten (tails inside the op), exported, compiled for both x86
    families (the host's runs); the tail's add and relu fuse into the conv: no separate add."""
    from dcgraph.backends.tvm import compile as tvm_compile
    from dcgraph.passes.fx import rewrite

    torch.manual_seed(0)
    blocks = torch.nn.Sequential(zoo.BasicBlock(8, 16, 2), zoo.BasicBlock(16, 16))
    model = zoo.randomize_norm_stats(blocks).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, report = rewrite(model)
    assert report.counts["fused+residual->fused"] == 2
    x = torch.randn(2, 8, 12, 12)
    program = torch.export.export(fused, (x,))
    compiled = tvm_compile(program, target=TARGETS[family])
    names = [k.name for k in compiled.kernels]
    assert not any(n == "add" or n.startswith(("add_", "add1")) for n in names), names
    if family == _host_family():
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(np.asarray(compiled(x.numpy())), expected, **TOL)
