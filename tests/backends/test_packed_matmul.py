"""Matmuls with a constant weight packed in column panels (``packed_matmul.py``, CPU targets):
the panel and tile sizes, the packing itself, and classifiers (``nn.Linear``, with and without an
activation, ``N`` a multiple of the panel or padded) against torch, built for both x86 families."""

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
from dcgraph.backends.tvm.packed_matmul import ACCUMULATORS, pack_weight, panel_width, tile_rows
from dcgraph.backends.tvm.pipeline import lower_pipeline, optimize, relax_pipeline
from dcgraph.backends.tvm.schedules.common import SCHEDULED
from dcgraph.testing import relative_error

HOST = targets.resolve("x86")
RTOL = 1e-5



@pytest.mark.parametrize("lanes", [4, 8, 16])
@pytest.mark.parametrize("n", [1, 3, 10, 16, 37, 64, 1000, 1024])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 12])
def test_panels_are_whole_vectors_and_tiles_fit_the_registers(m, n, lanes):
    width = panel_width(n, m, lanes)
    assert width % lanes == 0 and width <= (4 if m == 1 else 2) * lanes
    assert width - lanes < n  # no panel wider than N needs
    rows = tile_rows(m, width, lanes)
    assert m % rows == 0 and (rows == 1 or rows * width // lanes <= ACCUMULATORS)


@pytest.mark.parametrize(("k", "n", "width"), [(5, 16, 16), (5, 10, 16), (7, 40, 32)])
def test_pack_weight_puts_each_panel_row_together_and_pads_with_zeros(k, n, width):
    w = np.random.default_rng(0).standard_normal((k, n)).astype("float32")
    wp = pack_weight(w, width)
    assert wp.shape == (-(-n // width), k, width) and wp.flags.c_contiguous
    for j in range(wp.shape[0] * width):
        want = w[:, j] if j < n else np.zeros(k, "float32")
        np.testing.assert_array_equal(wp[j // width, :, j % width], want)


class Classifier(nn.Module):
    def __init__(self, k: int, n: int, act: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(k, n)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return torch.relu(y) if self.act else y


@pytest.mark.parametrize(("m", "k", "n", "act"), [
    (1, 1280, 1000, False),  # MobileNetV2's classifier: 1000 padded to panels of 64
    (8, 512, 1000, True),  # ResNet-18's at batch 8: 8-row tiles, panels of 32
    (3, 64, 10, False),  # ten classes: one panel of 16, three rows
    (5, 100, 64, True),  # no padding
    (1, 7, 3, False),
])
def test_linear_layers_run_packed_with_torch_values(m, k, n, act):
    torch.manual_seed(0)
    model = Classifier(k, n, act).eval()
    x = torch.randn(m, k)
    mod = optimize(prepare(model, x, convert=False), HOST)
    names = {gv.name_hint: str(f.attrs[SCHEDULED]) for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(names) == 1 and "packed_matmul" in next(iter(names)), names  # bias (+ relu) fused
    assert set(names.values()) == {"matmul"}, names
    got = tvm_compile(model, HOST, x, convert=False)(x)
    with torch.no_grad():
        want = model(x)
    assert got.shape == want.shape
    assert relative_error(np.asarray(got), want.numpy()) < RTOL


@pytest.mark.parametrize(("mcpu", "reg"), [("skylake-avx512", "zmm"), ("znver3", "ymm"), ("haswell", "ymm")])
def test_both_x86_families_build_the_packed_kernel(mcpu, reg):
    target = targets.resolve({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    x = torch.randn(2, 96)
    mod = optimize(prepare(Classifier(96, 50, True).eval(), x, convert=False), target)
    ex = tvm.compile(mod, target=target, relax_pipeline=lower_pipeline(target))
    asm = ex.mod.imports[0].inspect_source("asm")
    assert "vfmadd" in asm and reg in asm


def test_a_matmul_of_two_inputs_is_left_to_tvm():
    """No constant weight: TVM's own legalization, values unchanged."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((3, 20), "float32"))
    b = relax.Var("b", relax.TensorType((20, 30), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(y)
    mod = bb.get()
    assert not any("packed" in gv.name_hint for gv, _ in optimize(mod, HOST).functions_items())
    ex = tvm.compile(mod, target=HOST, relax_pipeline=relax_pipeline(HOST))
    rng = np.random.default_rng(0)
    av, bv = rng.standard_normal((3, 20), "float32"), rng.standard_normal((20, 30), "float32")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(av), tvm.runtime.tensor(bv)).numpy()
    assert relative_error(got, av.astype("float64") @ bv.astype("float64")) < RTOL
