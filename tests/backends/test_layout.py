"""The blocked layout (``NCHW[x]c``): the layout pass, the packing, and the blocked kernels at
real channel counts on both x86 families, against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from dcgraph import zoo
from dcgraph.backends.tvm import kernels_blocked as kb
from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.frontends import prepare
from dcgraph.backends.tvm.layout import block_layout, blocked_kernels
from dcgraph.backends.tvm.pipeline import kernel_report, optimize, relax_pipeline
from dcgraph.backends.tvm.schedules.common import SCHEDULED
from dcgraph.backends.tvm.schedules.cpu import cpu_features
from dcgraph.testing import ConvCase, live_mean
from tests.backends.tvm_cases import RTOL, case_module, relative_error

HOST = targets.resolve("x86")
HOST_FEATURES = cpu_features(HOST)

# channel counts the small shared cases do not reach: a first layer's 3 channels, full 16-lane
# blocks with two blocks per register tile (32, 64), an odd number of blocks (48), padded blocks
# (24 and 40 stored as 32 and 48 at 16 lanes; whole 8-lane blocks on AVX2), strides
CASES = [
    ConvCase("c32_3x3", 1, 32, 64, (14, 14), (3, 3), padding=(1, 1)),
    ConvCase("c48_s2", 2, 16, 48, (15, 15), (3, 3), stride=(2, 2), padding=(1, 1), bias=True),
    ConvCase("c24_1x1", 1, 24, 40, (9, 9), (1, 1), act="silu"),
    ConvCase("c32_dw", 2, 32, 32, (10, 10), (3, 3), stride=(2, 2), padding=(1, 1), groups=32, act="relu6"),
    ConvCase("c16_dil", 1, 16, 32, (12, 11), (3, 3), padding=(2, 2), dilation=(2, 2), act="hardswish"),
    # a first layer: 3 channels (a channel block of 1: the shift's row sums vectorise along rows)
    ConvCase("c3_stem", 2, 3, 32, (23, 21), (7, 7), stride=(2, 2), padding=(3, 3), bias=True),
    # channels stored padded to whole 16-lane vectors (24 -> 32, 40 -> 48): a dense 3x3 reading a
    # padded input (its sum skips the padding) and a depthwise conv writing padded blocks
    ConvCase("c24_3x3", 2, 24, 24, (11, 10), (3, 3), stride=(2, 2), padding=(1, 1), act="relu6"),
    ConvCase("c40_dw5", 1, 40, 40, (9, 9), (5, 5), padding=(2, 2), groups=40, act="silu"),
]


@pytest.mark.parametrize(("channels", "lanes", "block"), [(64, 16, 16), (24, 16, 8), (40, 16, 8), (3, 16, 1),
                                                          (6, 4, 2), (96, 8, 8), (20, 8, 4)])
def test_channel_block_is_the_largest_power_of_two_up_to_the_lanes(channels, lanes, block):
    assert kb.channel_block(channels, lanes) == block


def test_packed_weight_holds_every_weight_where_the_kernel_reads_it():
    w = np.arange(32 * 24 * 3 * 3, dtype="float32").reshape(32, 24, 3, 3)
    p = kb.pack_weight(w, 8, 16)
    assert p.shape == (2, 3, 3, 3, 8, 16)
    assert p[1, 2, 0, 2, 5, 7] == w[1 * 16 + 7, 2 * 8 + 5, 0, 2]
    m = kb.pack_mean_weight(w, 16)
    assert m.shape == (2, 24, 3, 3, 16) and m[1, 5, 2, 1, 3] == w[19, 5, 2, 1]
    d = kb.pack_depthwise(w[:, :1], 16)
    assert d.shape == (2, 3, 3, 16) and d[1, 2, 0, 4] == w[20, 0, 2, 0]


@pytest.mark.parametrize(("channels", "lanes", "stored", "block"), [
    (24, 16, 32, 16), (40, 16, 48, 16), (64, 16, 64, 16), (24, 8, 24, 8), (3, 16, 3, 1), (12, 16, 12, 4),
    (20, 8, 24, 8)])
def test_channels_are_stored_in_whole_vectors_past_one(channels, lanes, stored, block):
    assert kb.blocking(channels, lanes) == (stored, block)


def test_packing_pads_the_channels_with_zeros():
    """A 24 -> 40 weight at 16 lanes: both channel counts padded to whole blocks (32, 48), every
    real weight where the kernel reads it, zeros in the padding."""
    w = np.random.default_rng(0).standard_normal((40, 24, 3, 3)).astype("float32") + 5
    p = kb.pack_weight(w, 16, 16)
    assert p.shape == (3, 2, 3, 3, 16, 16)
    assert p[2, 1, 1, 2, 7, 7] == w[39, 23, 1, 2]
    assert not p[:, 1, :, :, 8:].any() and not p[2, :, :, :, :, 8:].any()
    assert np.count_nonzero(p) == w.size
    m = kb.pack_mean_weight(w, 16)
    assert m.shape == (3, 24, 3, 3, 16) and m[2, 23, 0, 1, 7] == w[39, 23, 0, 1] and not m[2, ..., 8:].any()
    d = kb.pack_depthwise(w[:, :1], 16)
    assert d.shape == (3, 3, 3, 16) and d[2, 1, 2, 7] == w[39, 0, 1, 2] and not d[2, ..., 8:].any()


def _resnet(width: int = 16, size: int = 32) -> tuple[tvm.IRModule, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = live_mean(zoo.randomize_norm_stats(zoo.resnet18_like(width=width)))
    x = torch.randn(1, 3, size, size)
    return prepare(model, x), model, x


def test_a_resnet_changes_layout_only_at_its_edges():
    """ResNet-18-like: every Deep Control kernel, residual add, relu, the max-pool and the global
    mean run blocked; one ``to_blocked`` (the input) and one ``from_blocked`` (before the
    classifier's reshape) are left of the one-per-conv pairs the rewrite starts from."""
    mod, _, _ = _resnet()
    blocked = block_layout(mod, 16)
    names = blocked_kernels(blocked)
    assert sum(n.startswith("to_blocked") for n in names) == 1
    assert sum(n.startswith("from_blocked") for n in names) == 1
    nchw_dc = [gv.name_hint for gv, f in blocked.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and "dcgraph.kernel" in (f.attrs or {}) and "dcgraph.layout" not in (f.attrs or {})]
    assert nchw_dc == []
    script = blocked["main"].script()
    assert "NCHW16c" in script  # the max-pool runs blocked
    assert block_layout(mod, 1) is mod  # no vector unit: nothing to block for


def test_every_kernel_of_a_blocked_resnet_is_scheduled():
    mod, _, _ = _resnet()
    report = kernel_report(optimize(mod, HOST))
    assert [k.name for k in report if k.schedule == "none"] == []


@pytest.mark.parametrize("lanes", [16, 8])
def test_from_blocked_is_a_tiled_transpose_and_exact(lanes):
    """The way out of the blocked layout gets its own rule (not the injective order) and
    unpacks every element where ``from_blocked`` says."""
    from tvm import te

    from dcgraph.backends.tvm.schedules import apply_cpu_rules

    xb = te.placeholder((2, 3, 5, 70, lanes), name="xb")
    func = te.create_prim_func([xb, kb.from_blocked(xb)])
    name, sch = apply_cpu_rules(tvm.IRModule({"main": func}), lanes)
    assert name == "from_blocked"
    lib = tvm.compile(sch.mod, target=HOST)
    a = np.random.default_rng(0).standard_normal((2, 3, 5, 70, lanes)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((2, 3 * lanes, 5, 70), "float32"))
    lib(tvm.runtime.tensor(a), out)
    want = a.transpose(0, 1, 4, 2, 3).reshape(2, 3 * lanes, 5, 70)
    np.testing.assert_array_equal(out.numpy(), want)


def _targets() -> list:
    out = [pytest.param("skylake-avx512", marks=pytest.mark.skipif(
        "avx512f" not in HOST_FEATURES, reason="this CPU has no AVX-512")),
        pytest.param("haswell", marks=pytest.mark.skipif("avx2" not in HOST_FEATURES, reason="no AVX2"))]
    return out


def _run(mod: tvm.IRModule, target: tvm.target.Target, inputs: list[np.ndarray]) -> np.ndarray:
    ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in inputs]).numpy()


@pytest.mark.parametrize("mcpu", _targets())
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_blocked_kernels_match_the_reference_on_both_x86_families(case, mcpu):
    """AVX-512 (16 lanes) and AVX2 (8 lanes) code, each run here where the CPU has it."""
    target = targets.resolve({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    for plan in ("hoisted", "two_pass"):
        mod, inputs, want = case_module(case, plan)
        assert relative_error(_run(mod, target, inputs), want) < RTOL, plan


@pytest.mark.parametrize("mcpu", ["znver3", "skylake-avx512", "haswell"])
def test_blocked_resnet_compiles_for_each_x86_family(mcpu):
    """Code generation for each family (a Zen 3 AVX2 build too), whatever this host runs."""
    mod, _, _ = _resnet(width=16, size=16)
    target = targets.resolve({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
    tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))


class _PaddedChannels(torch.nn.Module):
    """24- and 40-channel maps (stored padded at 16 lanes) through a residual add, a per-channel
    divide (kept ``NCHW``: 0 / 0 in the padding), a scalar divide (kept blocked), a depthwise
    conv and the global mean."""

    def __init__(self) -> None:
        super().__init__()
        from dcgraph.nn import DeepControlConv2d

        self.c1 = DeepControlConv2d(3, 24, 3, padding=1, act="relu")
        self.c2 = DeepControlConv2d(24, 24, 1, act="identity")
        self.dw = DeepControlConv2d(24, 24, 3, padding=1, groups=24, act="relu6")
        self.c3 = DeepControlConv2d(24, 40, 1, act="silu")
        self.scale = torch.nn.Parameter(torch.rand(1, 24, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        y = (self.c2(y) + y) / self.scale
        y = self.c3(self.dw(y) / 3.0)
        return y.mean(dim=(2, 3))


def test_padded_channels_match_the_eager_model():
    torch.manual_seed(0)
    model = _PaddedChannels().eval()
    with torch.no_grad():  # a live mean (a in [0.5, 1.5)), and a non-trivial gain and offset
        for m in (model.c1, model.c2, model.dw, model.c3):
            m.a.uniform_(0.5, 1.5), m.g.uniform_(0.5, 1.5), m.b.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 13, 11)
    mod = prepare(model, x)
    names = blocked_kernels(block_layout(mod, 16))
    assert sum(n.startswith("to_blocked") for n in names) == 2  # the input, and again after the divide
    with torch.no_grad():
        want = model(x).numpy()
    assert relative_error(_run(mod, HOST, [x.numpy()]), want) < RTOL


def test_a_blocked_resnet_matches_the_eager_model():
    mod, model, x = _resnet(width=16, size=32)
    with torch.no_grad():
        want = model(x).numpy()
    got = _run(mod, HOST, [x.numpy()])
    assert relative_error(got, want) < RTOL


def test_a_depthwise_two_pass_is_one_kernel_and_exact():
    """A depthwise conv's raw conv and its two-pass epilogue become one blocked kernel
    (``dc_depthwise_two_pass``, scheduled by its own rule), with the reference's result."""
    case = next(c for c in CASES if c.name == "c32_dw")
    mod, inputs, want = case_module(case, "two_pass")
    names = blocked_kernels(block_layout(mod, 16))
    assert any(n.startswith("dc_depthwise_two_pass") for n in names)
    assert not any(n.startswith(("dc_conv_raw", "dc_two_pass")) for n in names)
    rules = [str(f.attrs[SCHEDULED]) for gv, f in optimize(mod, HOST).functions_items()
             if gv.name_hint.startswith("dc_depthwise_two_pass")]
    assert rules == ["blocked_depthwise_dc"]
    assert relative_error(_run(mod, HOST, inputs), want) < RTOL


class _InvertedResidual(torch.nn.Module):
    """MobileNetV2's block at 14 px: 1x1 expand (read only by the depthwise kernel: flattened),
    depthwise, 1x1 project (two-pass: its raw conv is read only by the epilogue kernel:
    flattened) + residual add, then a 1x1 conv whose output is the model's (not flattened)."""

    def __init__(self) -> None:
        super().__init__()
        from dcgraph.nn import DeepControlConv2d

        self.expand = DeepControlConv2d(16, 96, 1, act="relu6")
        self.dw = DeepControlConv2d(96, 96, 3, padding=1, groups=96, act="relu6")
        self.project = DeepControlConv2d(96, 16, 1, act="identity")
        self.head = DeepControlConv2d(16, 24, 1, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.project(self.dw(self.expand(x))) + x)


def test_pointwise_convs_read_only_by_kernels_run_on_the_flattened_map():
    torch.manual_seed(0)
    model = _InvertedResidual().eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "a"):
                m.a.uniform_(0.5, 1.5), m.g.uniform_(0.5, 1.5), m.b.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 14, 14)
    mod = prepare(model, x)
    blocked = block_layout(mod, 8)
    flat = [tuple(int(d) for d in f.params[0].shape) for gv, f in blocked.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(("dc_conv", "dc_conv_raw"))]
    assert sorted(s[2:4] for s in flat) == [(1, 196), (1, 196), (14, 14)], flat  # expand, project; head
    with torch.no_grad():
        want = model(x).numpy()
    assert relative_error(_run(mod, HOST, [x.numpy()]), want) < RTOL
