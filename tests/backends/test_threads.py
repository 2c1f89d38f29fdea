"""Small kernels run on one thread (schedules.common.parallel / worth_threads): a 16-channel conv
block on an 8x8 map gets no parallel loop in any kernel, a 32-channel one on a 56x56 map keeps
them in its convs; both agree with the eager model (the mean path live) within RTOL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.compiler import compile as tvm_compile
from dcgraph.backends.tvm.frontends import prepare
from dcgraph.backends.tvm.pipeline import optimize
from dcgraph.backends.tvm.schedules.common import SCHEDULED, SERIAL_FLOPS, worth_threads
from dcgraph.testing import live_mean
from dcgraph.zoo import randomize_norm_stats

HOST = targets.resolve("x86")
RTOL = 1e-5


def block(c: int) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                      nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
    return live_mean(randomize_norm_stats(m)).eval()


def kernels(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and SCHEDULED in (f.attrs or {})}


@pytest.mark.parametrize("c, hw, parallel_convs", [(16, 8, False), (32, 56, True)])
def test_threads_follow_the_kernels_size(c, hw, parallel_convs):
    model, x = block(c), torch.randn(1, c, hw, hw)
    found = kernels(optimize(prepare(model, x), HOST))
    assert any("conv" in name for name in found), sorted(found)
    for name, func in found.items():
        threaded = "T.parallel" in func.script()
        assert threaded == worth_threads(func), (name, threaded)
        if "conv" in name and "shift" not in name:
            assert threaded == parallel_convs, name
    got = tvm_compile(model, HOST, x)(x)
    with torch.no_grad():
        want = model(x).numpy()
    assert float(np.abs(np.asarray(got) - want).max() / np.abs(want).max()) < RTOL


def test_the_threshold_is_in_flops_of_the_kernel():
    from tvm import te

    def add(n: int) -> tvm.tirx.PrimFunc:
        a = te.placeholder((n, n), name="a")
        b = te.compute((n, n), lambda i, j: a[i, j] * 2.0 + 1.0, name="b")
        return te.create_prim_func([a, b])

    assert not worth_threads(add(16))  # 512 FLOPs, 512 elements
    big = add(256)  # 131072 FLOPs, 131072 elements: enough data to share
    assert worth_threads(big)

    def matmul(n: int) -> tvm.tirx.PrimFunc:
        a, w = te.placeholder((n, n), name="a"), te.placeholder((n, n), name="w")
        k = te.reduce_axis((0, n), name="k")
        return te.create_prim_func([a, w, te.compute((n, n), lambda i, j: te.sum(a[i, k] * w[k, j], axis=k))])

    assert SERIAL_FLOPS > 2 * 64 ** 3 and not worth_threads(matmul(64))  # 0.5 MFLOP, 12k elements
    assert SERIAL_FLOPS < 2 * 128 ** 3 and worth_threads(matmul(128))  # 4.2 MFLOP, 49k elements
