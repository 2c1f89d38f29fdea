"""Winograd F(m, 3) (``backends/tvm/winograd.py``): the transform algebra, the weight packing, and
the compiled kernel against :func:`dcgraph.reference.conv_deep_control` on shared and own cases,
both tile sizes, both x86 families; a wrong transform must fail the same check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from dcgraph import reference
from dcgraph.backends.tvm import compiler, targets, winograd
from dcgraph.backends.tvm.frontends import prepare
from dcgraph.backends.tvm.layout import block_layout, blocked_kernels
from dcgraph.backends.tvm.pipeline import relax_pipeline
from dcgraph.backends.tvm.schedules.cpu import cpu_features
from dcgraph.nn import DeepControlConv2d
from dcgraph.testing import CASES, ConvCase, with_batch
from tests.backends.tvm_cases import RTOL, relative_error

HOST = targets.resolve("x86")
HOST_FEATURES = cpu_features(HOST)

# the shared cases Winograd takes (3x3, stride 1, no dilation, one group), and sizes they do not
# reach: F(4,3) maps (>= 20) with partial last tiles, no padding, padding 2, 16 and 24 channels,
# every activation kind the epilogue has
OWN = [
    ConvCase("m4_partial", 1, 16, 16, (22, 21), (3, 3), padding=(1, 1), act="silu"),
    ConvCase("m4_batch3", 3, 8, 24, (20, 20), (3, 3), padding=(1, 1), bias=True, act="relu6"),
    ConvCase("m2_valid", 2, 16, 8, (9, 12), (3, 3), act="leaky_relu"),
    ConvCase("m2_pad2", 1, 8, 16, (7, 6), (3, 3), padding=(2, 2), act="hardswish"),
    ConvCase("m2_identity", 1, 32, 16, (5, 5), (3, 3), padding=(1, 1), act="identity"),
]
SHARED = [c for c in CASES if len(c.size) == 2 and c.kernel == (3, 3)
          and winograd.applies(c.kernel, c.stride, c.dilation, c.groups, c.padding) is None
          and min(s + 2 * p - 2 for s, p in zip(c.size, c.padding, strict=True)) >= winograd.MIN_MAP]
WINOGRAD_CASES = [*SHARED, *[with_batch(c, 1) for c in SHARED], *OWN]


def _module(case: ConvCase) -> tuple[torch.nn.Module, torch.Tensor, np.ndarray]:
    """The case as a :class:`DeepControlConv2d` (its weight becomes a constant on import, which
    Winograd needs), its input, and the float64 reference output."""
    t = case.tensors(torch.float64)
    m = DeepControlConv2d(case.in_channels, case.out_channels, case.kernel, stride=case.stride,
                          padding=case.padding, dilation=case.dilation, groups=case.groups,
                          bias=case.bias, act=case.act)
    with torch.no_grad():
        for name in ("weight", "bias", "a", "g", "b"):
            if t[name] is not None:
                getattr(m, name).copy_(t[name])
    want = reference.conv_deep_control(t["x"], t["weight"], t["bias"], t["a"], t["g"], t["b"],
                                       act=case.act, **case.conv_kwargs()).numpy()
    return m.float().eval(), t["x"].float(), want


def _run(mod: tvm.IRModule, target: tvm.target.Target, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    if "avx512f" in cpu_features(target) and "avx512f" not in HOST_FEATURES:
        pytest.skip("compiled; this CPU has no AVX-512 to run it")
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("m", [2, 4])
def test_the_matrices_compute_a_1d_correlation(m):
    """``A^T [(G g) * (B^T d)] = (d * g)`` (correlation, ``m`` outputs from ``m + 2`` inputs)."""
    a, b, g = winograd.transform_matrices(m)
    assert a.shape == (m + 2, m) and b.shape == (m + 2, m + 2) and g.shape == (m + 2, 3)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
        want = np.array([d[i:i + 3] @ k for i in range(m)])
        np.testing.assert_allclose(a.T @ ((g @ k) * (b.T @ d)), want, rtol=1e-12, atol=1e-12)


def test_packed_weight_is_g_w_gt_where_the_gemm_reads_it():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 10, 3, 3)).astype("float32")
    u = winograd.pack_weight(w, 2, 4, 8)  # 10 input channels -> 3 blocks of 4, 12 outputs -> 2 of 8
    assert u.shape == (16, 2, 3, 4, 8)
    _, _, g = winograd.transform_matrices(2)
    k, c = 11, 9  # block (1, 2), lanes (1 of 4 in, 3 of 8 out)
    want = g @ w[k, c].astype(np.float64) @ g.T
    np.testing.assert_allclose(u[:, 1, 2, 1, 3], want.reshape(16), rtol=1e-6)
    assert not u[:, 1, :, :, 4:].any() and not u[:, :, 2, 2:].any()  # zero padding channels


def test_applies_names_why_not():
    assert winograd.applies((3, 3), (1, 1), (1, 1), 1, (1, 1)) is None
    assert "stride" in winograd.applies((3, 3), (2, 2), (1, 1), 1, (1, 1))
    assert "3x3" in winograd.applies((5, 5), (1, 1), (1, 1), 1, (2, 2))
    assert "dilation" in winograd.applies((3, 3), (1, 1), (2, 2), 1, (2, 2))
    assert "groups" in winograd.applies((3, 3), (1, 1), (1, 1), 4, (1, 1))
    assert winograd.output_tile(56, 56) == 4 and winograd.output_tile(14, 14) == 2


@pytest.mark.parametrize("mcpu", ["skylake-avx512", "haswell"])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=[f"{c.name}-b{c.batch}" for c in WINOGRAD_CASES])
def test_winograd_matches_the_reference(case, mcpu):
    """Through the pipeline (import, blocked layout, the Winograd kernel and its schedule) on
    AVX-512 and AVX2 code, each compiled here and run where this CPU has it."""
    model, x, want = _module(case)
    mod = prepare(model, x)
    lanes = 16 if mcpu == "skylake-avx512" else 8
    assert any(n.startswith("dc_winograd") for n in blocked_kernels(block_layout(mod, lanes)))
    target = targets.resolve({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    assert relative_error(_run(mod, target, x.numpy()), want) < RTOL


def test_convs_winograd_does_not_take_stay_direct():
    """Strided, and a 3x3 reading padding channels (24 stored as 32 at 16 lanes: the direct kernel's
    sum skips them), and everything with ``use_winograd=False``."""
    for case in (ConvCase("s2", 1, 16, 16, (12, 12), (3, 3), stride=(2, 2), padding=(1, 1)),
                 ConvCase("c24", 1, 24, 16, (10, 10), (3, 3), padding=(1, 1))):
        model, x, _ = _module(case)
        assert not any("winograd" in n for n in blocked_kernels(block_layout(prepare(model, x), 16)))
    model, x, _ = _module(OWN[0])
    mod = prepare(model, x)
    assert not any("winograd" in n for n in blocked_kernels(block_layout(mod, 8, use_winograd=False)))


def test_compile_winograd_false_gives_direct_kernels_with_the_same_result():
    model, x, want = _module(OWN[1])
    fast = compiler.compile(model, HOST, x, convert=False)
    direct = compiler.compile(model, HOST, x, convert=False, winograd=False)
    assert any("winograd" in k.name for k in fast.kernels)
    assert not any("winograd" in k.name for k in direct.kernels)
    for compiled in (fast, direct):
        assert relative_error(compiled(x).numpy(), want) < RTOL


def test_a_wrong_transform_fails_the_check(monkeypatch):
    """The check above can fail: one output-transform coefficient off by 1% of F(2,3)'s ``A``."""
    a, b, g = winograd.transform_matrices(2)
    bad = a.copy()
    bad[1, 0] *= 1.01
    monkeypatch.setattr(winograd, "transform_matrices", lambda m: (bad, b, g))
    case = SHARED[0]
    model, x, want = _module(case)
    assert relative_error(_run(prepare(model, x), HOST, x.numpy()), want) > RTOL


def test_arm_builds_use_winograd_too():
    """NEON (4 lanes) gets the same kernels (their results on the emulated ARM: the whole-model
    tests of ``test_tvm_arm.py`` and ``test_whole_models.py``, whose ResNets run Winograd)."""
    model, x, _ = _module(OWN[2])
    compiled = compiler.compile(model, "arm", x, convert=False)
    assert any("winograd" in k.name for k in compiled.kernels)
