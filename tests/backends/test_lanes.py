"""Vector width from the target's CPU features (not from a list of CPU names)."""

from __future__ import annotations

import platform

import pytest
import tvm

from dcgraph.backends.tvm import targets
from dcgraph.backends.tvm.schedules import vector_lanes
from dcgraph.backends.tvm.schedules.cpu import cpu_features


def _llvm(**attrs) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", **attrs})


@pytest.mark.parametrize(("mcpu", "lanes"), [("skylake-avx512", 16), ("rocketlake", 16), ("znver4", 16),
                                             ("haswell", 8), ("znver3", 8), ("sandybridge", 8),
                                             ("core2", 4)])
def test_x86_lanes_from_mcpu(mcpu, lanes):
    assert vector_lanes(_llvm(mcpu=mcpu)) == lanes


def test_arm_preset_is_neon():
    target = targets.resolve("arm")
    assert "neon" in cpu_features(target)
    assert vector_lanes(target) == 4


def test_mattr_is_honoured():
    assert vector_lanes(_llvm(mcpu="skylake-avx512", mattr=["-avx512f"])) == 8
    assert vector_lanes(_llvm(mcpu="haswell", mattr=["+avx512f"])) == 16
    assert "avx512f" not in cpu_features(_llvm(mcpu="skylake-avx512", mattr=["-avx512f"]))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="LLVM's generic x86-64 CPU")
def test_no_mcpu_is_generic_not_host():
    # TVM compiles a target without mcpu for LLVM's generic CPU (SSE2 on x86-64), whatever the host.
    generic = _llvm()
    assert {"sse", "sse2"} <= cpu_features(generic)
    assert "avx" not in cpu_features(generic)
    assert vector_lanes(generic) == 4


def test_host_preset_uses_host_features():
    host = targets.resolve("x86")
    assert cpu_features(host) == cpu_features(_llvm(mcpu=targets.host_cpu()))
    expected = 16 if "avx512f" in cpu_features(host) else 8 if "avx" in cpu_features(host) else 4
    assert vector_lanes(host) == expected


def test_non_llvm_targets():
    assert cpu_features(targets.resolve("cuda")) == frozenset()
    assert vector_lanes(targets.resolve("cuda")) == 8
