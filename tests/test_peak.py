"""The measured fp32 peak and the op level's per-kernel GFLOP/s table."""

from __future__ import annotations

import shutil

import pytest

from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.schedules import vector_lanes
from dcgraph.bench import peak


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_the_fma_loop_runs_at_a_believable_clock():
    """A loop the compiler had removed or left scalar would imply an absurd or tiny clock."""
    got = peak.measure(1, vector_lanes(targets.resolve("x86")), iters=20_000_000)
    assert got["gflops"] and got["gflops"] > 0, got
    assert 0.5 <= got["implied_ghz_at_2_fma"] <= 6.5, got
    assert "GFLOP/s" in peak.describe(got)


def test_the_kernel_table_divides_the_conv_flops_by_each_rows_time():
    recs = [{"layer": "r18.layer1", "batch": 1, "gflop": 0.2312,
             "rows": {"torch_conv": {"median_ms": 2.0}, "tvm_fused": {"median_ms": 4.0}}}]
    fp32_peak = {"gflops": 231.2, "how": "x", "threads": 2, "lanes": 8, "implied_ghz_at_2_fma": 3.6}
    lines = peak.kernel_table(recs, {"torch_conv": "conv", "tvm_fused": "tvm"}, ["torch_conv", "tvm_fused"],
                              fp32_peak)
    assert recs[0]["rows"]["torch_conv"]["gflops"] == pytest.approx(115.6)
    assert "| r18.layer1 | 1 | 0.231 | 115.6 (50%) | 57.8 (25%) |" in lines
    assert "not measured" in peak.describe({"gflops": None, "why": "no C compiler"})
