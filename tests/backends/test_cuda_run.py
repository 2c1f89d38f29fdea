"""dcgraph's CUDA kernels run on a GPU: every shared case, both plans, batch 1 and 4 (and two
larger cases that keep the conv schedule's full register tiles), against
:func:`dcgraph.reference.conv_deep_control` (float32 vs the float64 oracle, rtol = atol = 1e-4).

Skipped, with the reason, where there is no CUDA device. Two ways to run it:

- with TVM's compiler and a GPU on one machine, each case is compiled here and run;
- on a GPU machine with TVM's runtime only, it loads the modules that
  ``dcgraph bench gpu --gpu-mode build`` exported on a build machine (``build/fusion_gpu/cases``
  or ``$DCGRAPH_GPU_ARTIFACTS``; set that variable to use them even where a compiler exists).

The device code is compiled when a module is loaded: by NVRTC (Python packages ``cuda-bindings``
and ``nvidia-cuda-nvrtc``), or with ``TVM_CUDA_COMPILE_MODE=nvcc`` by ``nvcc`` on the PATH.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from dcgraph.bench import gpu_level  # noqa: E402
from dcgraph.bench import gpu_runtime as gk  # noqa: E402
from tests.backends.tvm_cases import case_module  # noqa: E402

try:
    gk.cuda_runtime()
except gk.NoGPU as err:
    pytest.skip(f"no CUDA GPU here ({err})", allow_module_level=True)

ARTIFACTS = Path(os.environ.get("DCGRAPH_GPU_ARTIFACTS", gpu_level.ARTIFACTS))
USE_ARTIFACTS = "DCGRAPH_GPU_ARTIFACTS" in os.environ or bool(tvm.base._RUNTIME_ONLY)
CASES = gpu_level.case_stems()
DEV = tvm.cuda(0)


def _vm(case, plan: str, stem: str):
    if USE_ARTIFACTS:
        path = ARTIFACTS / "cases" / f"{stem}.so"
        if not path.exists():
            pytest.fail(f"{path} is missing: run `dcgraph bench gpu --gpu-mode build` on a machine "
                        "with TVM's compiler and bring build/fusion_gpu here")
        return gk.load_vm(path, DEV)
    from tvm import relax

    from dcgraph.backends.tvm import targets

    arch = "sm_" + DEV.compute_version.replace(".", "")
    target = targets.resolve({**targets.CUDA, "arch": arch})
    return relax.VirtualMachine(gk.compile_cuda(case_module(case, plan)[0], target), DEV)


@pytest.mark.parametrize(("case", "plan", "stem"), CASES, ids=[s for _, _, s in CASES])
def test_cuda_kernel_matches_reference(case, plan, stem):
    _, inputs, want = case_module(case, plan)
    got = gk.run_vm(_vm(case, plan, stem), inputs, DEV)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
