"""One-pixel 1x1 convs (Squeeze-Excitation gates, classifiers written as convs) legalized as
matmuls on CPU targets: which convs qualify, the matmul rule schedules them, and the values
match the reference (torch for these plain ops) on both x86 families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.compiler import compile as tvm_compile
from dcgraph.backends.tvm.frontends import prepare
from dcgraph.backends.tvm.pipeline import lower_pipeline, optimize, relax_pipeline
from dcgraph.backends.tvm.pixel_matmul import is_pixel_conv
from dcgraph.backends.tvm.schedules.common import SCHEDULED
from dcgraph.testing import relative_error

HOST = targets.resolve("x86")
RTOL = 1e-5


class SqueezeExcite(nn.Module):
    """EfficientNet's gate, then a classifier written as a 1x1 conv (pytorchcv's MobileNetV2)."""

    def __init__(self, c: int = 48, r: int = 12, classes: int = 40):
        super().__init__()
        self.reduce = nn.Conv2d(c, r, 1)
        self.expand = nn.Conv2d(r, c, 1)
        self.head = nn.Conv2d(c, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))
        y = (x * s).mean((2, 3), keepdim=True)
        return self.head(y).flatten(1)



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SqueezeExcite().eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_gates_and_head_run_as_matmuls_with_the_reference_values(model, batch):
    x = torch.randn(batch, 48, 7, 9)
    mod = optimize(prepare(model, x), HOST)
    rules = {gv.name_hint: str(f.attrs[SCHEDULED]) for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "pixel_matmul" in gv.name_hint}
    assert len(rules) == 3, rules  # reduce (+ bias, silu), expand (+ bias, sigmoid), head
    assert set(rules.values()) == {"matmul"}, rules
    assert not any("conv" in gv.name_hint for gv, _ in mod.functions_items()), "a conv kernel is left"
    got = tvm_compile(model, HOST, x)(x)
    with torch.no_grad():
        want = model(x)
    assert relative_error(np.asarray(got), want.numpy()) < RTOL


@pytest.mark.parametrize("mcpu", ["skylake-avx512", "znver3"])
def test_both_x86_families_build_the_matmul_kernels(model, mcpu):
    target = targets.resolve({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    x = torch.randn(1, 48, 5, 5)
    mod = optimize(prepare(model, x), target)
    ex = tvm.compile(mod, target=target, relax_pipeline=lower_pipeline(target))
    reg = "zmm" if mcpu == "skylake-avx512" else "ymm"
    assert reg in ex.mod.imports[0].inspect_source("asm")


def _conv_function(x_shape, w_shape, **attrs) -> tuple[tvm.IRModule, relax.Call]:
    """``main(x, w) = conv2d(x, w, **attrs)``, and its conv call (normalized: shapes known)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            call = bb.normalize(relax.op.nn.conv2d(x, w, **attrs))
            y = bb.emit_output(call)
        bb.emit_func_output(y)
    return bb.get(), call


@pytest.mark.parametrize(("x_shape", "w_shape", "attrs", "pixel"), [
    ((2, 24, 1, 1), (40, 24, 1, 1), {}, True),
    ((2, 24, 1, 1), (40, 24, 1, 1), {"strides": 2}, True),  # one pixel in, one out
    ((2, 24, 2, 1), (40, 24, 1, 1), {}, False),  # two pixels
    ((2, 24, 1, 1), (40, 24, 1, 1), {"padding": 1}, False),  # a 3x3 output of zeros and one pixel
    ((2, 24, 1, 1), (48, 1, 1, 1), {"groups": 24}, False),  # depthwise
    ((2, 24, 3, 3), (40, 24, 3, 3), {}, False),  # a 3x3 kernel on a 3x3 map
])
def test_which_convs_are_one_pixel_matmuls(x_shape, w_shape, attrs, pixel):
    assert is_pixel_conv(_conv_function(x_shape, w_shape, **attrs)[1]) == pixel


def test_a_weight_fed_at_run_time_is_transposed_in_the_graph():
    """A weight that is an input, not a constant, is transposed by a kernel of its own."""
    mod, _ = _conv_function((2, 24, 1, 1), (40, 24, 1, 1))
    ex = tvm.compile(mod, target=HOST, relax_pipeline=relax_pipeline(HOST))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 24, 1, 1), "float32"), rng.standard_normal((40, 24, 1, 1), "float32")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    want = np.einsum("nc,oc->no", a[:, :, 0, 0].astype("float64"), b[:, :, 0, 0].astype("float64"))
    assert got.shape == (2, 40, 1, 1)
    assert relative_error(got[:, :, 0, 0], want) < RTOL
